mod admission;
mod engine;
mod fastexpr;
mod flags;
