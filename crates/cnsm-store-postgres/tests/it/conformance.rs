//! The store conformance suite against PostgreSQL, one test per case, unchanged.

cnsm_store::conformance_tests!(match crate::PgHarness::new() {
    Some(harness) => harness,
    None => return,
});
