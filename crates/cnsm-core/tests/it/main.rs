mod admission;
mod engine;
