mod admission;
mod engine;
mod fastexpr;
