//! The conformance suite against the embedded store, one test per case.

cnsm_store::conformance_tests!(crate::EmbeddedHarness::default());

#[test]
fn run_all_passes_on_one_harness() {
    let mut harness = crate::EmbeddedHarness::default();
    cnsm_store::conformance::run_all(&mut harness);
}
