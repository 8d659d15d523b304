//! Test utilities for services that run cnsm state machines.
//!
//! - [`TransitionRecorder`] records every committed transition of a runtime for assertions.
//! - [`SnapshotVerifier`] checks an instance's hash chain, version continuity, and that named
//!   data keys exist.
//! - [`VirtualClock`] lets a test skip time: a 30-day timeout runs in milliseconds.
//!
//! ```
//! # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
//! use std::sync::Arc;
//! use cnsm_runtime::{CreateInstance, Runtime, RuntimeOptions};
//! use cnsm_store::embedded::EmbeddedStore;
//! use cnsm_testkit::{SnapshotVerifier, TransitionRecorder, VirtualClock};
//!
//! let dir = tempfile::tempdir().unwrap();
//! let clock = VirtualClock::new(0);
//! let runtime = Runtime::open(
//!     EmbeddedStore::open(dir.path()).unwrap(),
//!     RuntimeOptions::default().with_clock(Arc::new(clock.clone())),
//! ).unwrap();
//! let recorder = TransitionRecorder::attach(&runtime);
//! runtime.apply_yaml(r#"
//! apiVersion: statemachine.cn/v1alpha1
//! kind: StateMachine
//! metadata: {name: trial}
//! spec:
//!   initialState: running
//!   states:
//!   - {name: running, type: task, timeoutSeconds: 2592000, onTimeout: expired}
//!   - {name: expired, type: final, outcome: cancelled}
//! "#, None).await.unwrap();
//! runtime.create_instance(CreateInstance::new("default", "trial").id("t-1")).await.unwrap();
//! clock.advance_secs(30 * 24 * 3600);          // thirty days, instantly
//! runtime.fire_due_timers().await.unwrap();
//! recorder.assert_path("default", "t-1", &["running", "expired"]);
//! SnapshotVerifier::new(runtime.store().as_ref()).verify_instance("default", "t-1").unwrap();
//! runtime.shutdown();
//! # });
//! ```

use std::sync::{Arc, Mutex};

use cnsm_core::Instance;
use cnsm_core::record::{Hash32, StateChangeEvent, decode_record, verify_chain};
use cnsm_runtime::{CommitListener, Runtime};
use cnsm_store::Store;

pub use cnsm_runtime::clock::{Clock, SystemClock, VirtualClock};

/// One recorded commit.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub record: StateChangeEvent,
    pub hash: Hash32,
    pub instance: Instance,
}

/// Records every committed transition of a runtime, in commit order.
#[derive(Debug, Clone, Default)]
pub struct TransitionRecorder {
    inner: Arc<Mutex<Vec<Recorded>>>,
}

impl CommitListener for TransitionRecorder {
    fn on_commit(&self, record: &StateChangeEvent, hash: Hash32, instance: &Instance) {
        if let Ok(mut v) = self.inner.lock() {
            v.push(Recorded {
                record: record.clone(),
                hash,
                instance: instance.clone(),
            });
        }
    }
}

impl TransitionRecorder {
    /// A recorder subscribed to `runtime`.
    pub fn attach(runtime: &Runtime) -> TransitionRecorder {
        let recorder = TransitionRecorder::default();
        runtime.subscribe(Arc::new(recorder.clone()));
        recorder
    }

    /// Every commit so far.
    pub fn all(&self) -> Vec<Recorded> {
        self.inner.lock().map(|v| v.clone()).unwrap_or_default()
    }

    pub fn len(&self) -> usize {
        self.inner.lock().map(|v| v.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn clear(&self) {
        if let Ok(mut v) = self.inner.lock() {
            v.clear();
        }
    }

    /// The records of one instance, in commit order.
    pub fn records_of(&self, namespace: &str, id: &str) -> Vec<StateChangeEvent> {
        self.all()
            .into_iter()
            .filter(|r| &*r.record.namespace == namespace && &*r.record.instance == id)
            .map(|r| r.record)
            .collect()
    }

    /// The states the instance was in after each recorded commit (genesis included).
    pub fn path_of(&self, namespace: &str, id: &str) -> Vec<String> {
        self.records_of(namespace, id)
            .into_iter()
            .map(|r| r.to.to_string())
            .collect()
    }

    /// Panics with a readable message unless the recorded path equals `expected`.
    pub fn assert_path(&self, namespace: &str, id: &str, expected: &[&str]) {
        let path = self.path_of(namespace, id);
        assert_eq!(
            path.iter().map(String::as_str).collect::<Vec<_>>(),
            expected,
            "states of {namespace}/{id} after each commit"
        );
    }
}

/// Why [`SnapshotVerifier`] rejected an instance.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VerifyError {
    #[error("instance {0} not found")]
    NotFound(String),
    #[error("store error: {0}")]
    Store(#[from] cnsm_store::StoreError),
    #[error("hash chain of {instance}: {source}")]
    Chain {
        instance: String,
        source: cnsm_core::record::ChainError,
    },
    #[error(
        "instance {instance} is at version {stored}, but its history ends at version {history}"
    )]
    VersionMismatch {
        instance: String,
        stored: u64,
        history: u64,
    },
    #[error("instance {instance} does not equal the replay of its history: {detail}")]
    ReplayMismatch { instance: String, detail: String },
    #[error("instance {instance} has no data key '{key}'")]
    MissingKey { instance: String, key: String },
}

/// What [`SnapshotVerifier::verify_instance`] checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedInstance {
    pub n_records: u64,
    pub last_hash: Hash32,
}

/// Checks instances in a store: hash-chain integrity from genesis, version continuity, that the
/// stored instance equals the replay of its history, and that required data keys exist.
pub struct SnapshotVerifier<'a> {
    store: &'a dyn Store,
    required_keys: Vec<String>,
}

impl std::fmt::Debug for SnapshotVerifier<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SnapshotVerifier")
            .field("required_keys", &self.required_keys)
            .finish()
    }
}

impl<'a> SnapshotVerifier<'a> {
    pub fn new(store: &'a dyn Store) -> SnapshotVerifier<'a> {
        SnapshotVerifier {
            store,
            required_keys: Vec::new(),
        }
    }

    /// Requires these keys in every verified instance's data.
    pub fn require_keys<I: IntoIterator<Item = S>, S: Into<String>>(mut self, keys: I) -> Self {
        self.required_keys.extend(keys.into_iter().map(Into::into));
        self
    }

    /// Verifies one instance.
    pub fn verify_instance(
        &self,
        namespace: &str,
        id: &str,
    ) -> Result<VerifiedInstance, VerifyError> {
        let name = format!("{namespace}/{id}");
        let stored = self
            .store
            .instance(namespace, id)?
            .ok_or_else(|| VerifyError::NotFound(name.clone()))?;
        let mut records = Vec::new();
        let mut from = 0;
        loop {
            let page = self
                .store
                .history(namespace, id, from, cnsm_store::PAGE_LEN_MAX)?;
            let n = page.len();
            records.extend(page);
            if n < cnsm_store::PAGE_LEN_MAX {
                break;
            }
            from += n as u64;
        }
        let last_hash =
            verify_chain(namespace, id, 0, Hash32::ZERO, &records).map_err(|source| {
                VerifyError::Chain {
                    instance: name.clone(),
                    source,
                }
            })?;
        let history_version = records.len().saturating_sub(1) as u64;
        if records.is_empty() || stored.instance.version != history_version {
            return Err(VerifyError::VersionMismatch {
                instance: name,
                stored: stored.instance.version,
                history: history_version,
            });
        }
        let decoded = records
            .iter()
            // `verify_chain` checked every hash (redacted records through their erasure record).
            .map(|r| decode_record(r.version, &r.bytes).map(|rec| (rec, r.hash)))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|source| VerifyError::Chain {
                instance: name.clone(),
                source,
            })?;
        let replayed = Instance::replay(decoded.iter().map(|(r, h)| (r, *h))).map_err(|e| {
            VerifyError::ReplayMismatch {
                instance: name.clone(),
                detail: e.to_string(),
            }
        })?;
        if replayed.as_ref() != Some(&stored.instance) {
            return Err(VerifyError::ReplayMismatch {
                instance: name,
                detail: "state, data, version or timers differ".into(),
            });
        }
        for key in &self.required_keys {
            if !stored.instance.data.contains_key(key) {
                return Err(VerifyError::MissingKey {
                    instance: name,
                    key: key.clone(),
                });
            }
        }
        Ok(VerifiedInstance {
            n_records: records.len() as u64,
            last_hash,
        })
    }

    /// Verifies every instance of a namespace (all namespaces when `None`).
    pub fn verify_all(&self, namespace: Option<&str>) -> Result<u64, VerifyError> {
        let mut query = cnsm_store::InstanceQuery {
            namespace: namespace.map(str::to_owned),
            ..Default::default()
        };
        let mut n = 0;
        loop {
            let page = self.store.list_instances(&query)?;
            for s in &page {
                self.verify_instance(&s.instance.namespace, &s.instance.id)?;
                n += 1;
            }
            match page.last() {
                Some(last) if page.len() >= cnsm_store::PAGE_LEN_MAX => {
                    query.after = Some((
                        last.instance.namespace.to_string(),
                        last.instance.id.to_string(),
                    ));
                }
                _ => break,
            }
        }
        Ok(n)
    }
}
