//! The store conformance suite against PostgreSQL with one transaction per item
//! (`PostgresOptions::transaction_per_item`), unchanged: the outcomes are the same as with one
//! transaction per batch.

cnsm_store::conformance_tests!(match crate::PgHarness::per_item() {
    Some(harness) => harness,
    None => return,
});
