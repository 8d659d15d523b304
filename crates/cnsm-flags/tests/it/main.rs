//! Integration tests of cnsm-flags (one test binary).

mod gherkin_support;
mod testbed;
mod e2e;
mod openfeature_spec;
mod providers;
