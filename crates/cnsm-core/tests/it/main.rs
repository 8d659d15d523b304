mod admission;
mod engine;
mod fastexpr;
mod flags;
mod migration;
