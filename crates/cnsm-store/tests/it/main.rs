//! The integration tests of cnsm-store, in one binary: the conformance suite against the
//! embedded store, and the embedded store's own behaviour (locking, formats, verification
//! checkpoints, corruption).

mod backup;
mod conformance;
mod embedded;
mod fixtures;
mod model;

use std::path::Path;

use cnsm_store::Store;
use cnsm_store::conformance::Harness;
use cnsm_store::embedded::EmbeddedStore;

/// Embedded stores in temporary directories; `reopen` drops the store and opens its
/// directory again.
#[derive(Default)]
pub struct EmbeddedHarness {
    dirs: Vec<tempfile::TempDir>,
}

impl EmbeddedHarness {
    fn current(&self) -> &Path {
        self.dirs.last().expect("a store was opened").path()
    }
}

impl Harness for EmbeddedHarness {
    fn open(&mut self) -> Box<dyn Store> {
        self.dirs
            .push(tempfile::tempdir().expect("a temporary directory"));
        Box::new(EmbeddedStore::open(self.current()).expect("the store opens"))
    }

    fn reopen(&mut self, store: Box<dyn Store>) -> Box<dyn Store> {
        drop(store);
        Box::new(EmbeddedStore::open(self.current()).expect("the store reopens"))
    }

    fn tamper_record(
        &mut self,
        store: Box<dyn Store>,
        namespace: &str,
        id: &str,
        version: u64,
        byte_index: usize,
    ) -> Box<dyn Store> {
        drop(store);
        cnsm_store::embedded::testing::flip_record_byte(
            self.current(),
            namespace,
            id,
            version,
            byte_index,
        )
        .expect("the record is edited");
        // Past the checkpoint, as damage found later would be: `verify` must see it.
        cnsm_store::embedded::testing::mark_all_verified(self.current())
            .expect("the checkpoint moves");
        Box::new(EmbeddedStore::open(self.current()).expect("the store reopens"))
    }
}
