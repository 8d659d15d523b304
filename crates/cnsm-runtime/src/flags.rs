//! Flag gates in the runtime (DESIGN.md §3 Determinism, §6): the [`FlagEvaluator`] seam that a
//! provider crate (`cnsm-flags`, OpenFeature) plugs into, and the decisions an event carries
//! to the committer, tagged with the instance version they were evaluated at.
//!
//! The flow for an event whose entries carry a `flag:`:
//! 1. [`crate::Runtime::send`] queues the event without decisions;
//! 2. the committer sees (from the cached current state) that the event needs flags and hands
//!    back the queries with the version it saw, committing nothing;
//! 3. `send` evaluates them asynchronously, outside the committer, and queues the event again
//!    with the decisions tagged with that version;
//! 4. if the instance moved on in between, step 2 repeats (at most [`FLAG_ROUNDS_MAX`] times).
//!
//! Events whose entries carry no flag take the committer path once, as before, with no
//! allocation for flags. Replay and snapshot import use the recorded decisions and never reach
//! an evaluator.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;

use cnsm_core::flags::FlagQuery;
use cnsm_core::record::FlagDecision;

/// How many times an event goes back for fresh flag decisions before it fails `Unavailable`.
pub const FLAG_ROUNDS_MAX: usize = 8;

/// A boxed future, so the trait stays object-safe without an async-trait dependency.
pub type FlagFuture<'a> = Pin<Box<dyn Future<Output = Vec<FlagDecision>> + Send + 'a>>;

/// Evaluates flag queries (through OpenFeature in `cnsm-flags`). One decision per query, in
/// order, with `allowed` left for the engine to decide from the gate. Provider failures are
/// decisions with `reason: "ERROR"` and an `error`, never a panic.
pub trait FlagEvaluator: Send + Sync + std::fmt::Debug + 'static {
    fn evaluate<'a>(&'a self, queries: &'a [FlagQuery]) -> FlagFuture<'a>;

    /// The provider's current problem (a flag file that failed to load), for `/health/statez`.
    fn provider_error(&self) -> Option<String> {
        None
    }

    /// The provider's name (`feature_flag.provider.name`).
    fn provider_name(&self) -> String {
        "unknown".into()
    }

    /// The gate status of each flag evaluated so far (`ACTIVE`, `STABLE`, `DISABLED`,
    /// `DEGRADED`), for `/debug/statemachine`.
    fn gate_statuses(&self) -> BTreeMap<String, String> {
        BTreeMap::new()
    }
}

/// Decisions an event carries to the committer, and the instance version they were made at.
#[derive(Debug, Clone)]
pub(crate) struct SeenFlags {
    pub version: u64,
    pub decisions: Vec<FlagDecision>,
}
