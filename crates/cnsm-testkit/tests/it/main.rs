mod crash;
mod runtime;
