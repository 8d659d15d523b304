//! Integration tests of cnsm-flags (one test binary).

mod e2e;
mod gherkin_support;
mod openfeature_spec;
mod providers;
mod testbed;
