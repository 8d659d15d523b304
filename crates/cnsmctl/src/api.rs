//! The seam between commands and wherever the machines live.
//!
//! Every command talks to an [`Api`]; it never touches a runtime or a store directly. Two
//! implementations exist: [`crate::local::Local`] (a [`cnsm_runtime::Runtime`] over the embedded
//! store in `--data-dir`) and [`crate::remote::Remote`] (the HTTP API of a `cnsmctl serve`,
//! with `--server URL`). [`crate::commands::Context::connect`] picks one and returns it as a
//! [`Connection`]; the commands do not know which.
//!
//! The trait speaks the core's types ([`Instance`], [`HistoryEntry`], ...), which all have a JSON
//! form, and [`CliError`], which carries the `error.type` of DESIGN.md §4 so an HTTP problem
//! response maps onto it without loss.

use cnsm_core::resource::StateMachine;
use cnsm_core::{Instance, Status};
use cnsm_runtime::delivery::{RedriveReport, RedriveRequest};
use cnsm_runtime::{
    AppliedDefinition, ControlRequest, CreateInstance, EraseRequest, EventRequest, HistoryEntry,
    MigrationReport, MigrationRequest, RolloutChange, RolloutStatus, TransitionOutcome,
};
use cnsm_server::wire::DeliveryList;
use cnsm_snapshot::files::SnapshotPaths;
use cnsm_snapshot::{PublicKey, Selection};
use cnsm_store::{BackupReport, DefinitionRow, ImportReport, VerifyReport};

use crate::error::CliError;
use crate::local::Local;
use crate::remote::Remote;

/// Whether a command changes anything. Local mode runs timers only for mutating commands:
/// overdue timers fire when a mutating command opens the store (the runtime's contract), and a
/// read never changes what it reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    ReadOnly,
    Mutating,
}

/// The filters of `get instances`.
#[derive(Debug, Clone, Default)]
pub struct InstanceFilter {
    /// `None`: every namespace.
    pub namespace: Option<String>,
    pub machine: Option<String>,
    pub state: Option<String>,
    pub status: Option<Status>,
    /// Every pair must match.
    pub labels: Vec<(String, String)>,
    /// `None`: all of them.
    pub limit: Option<usize>,
}

/// What cnsmctl can ask of a cnsm deployment.
///
/// `async fn` because the HTTP implementation will wait on the network; the local one waits on
/// the runtime's committer. Errors are already typed for the exit code.
pub trait Api {
    /// Stores an admitted definition (a new revision unless the content is unchanged).
    async fn apply(&self, machine: StateMachine) -> Result<AppliedDefinition, CliError>;

    /// A revision of a machine (the latest when `revision` is `None`).
    async fn machine(
        &self,
        namespace: &str,
        name: &str,
        revision: Option<u32>,
    ) -> Result<DefinitionRow, CliError>;

    /// The latest revision of every machine, in one namespace or all (`None`).
    async fn machines(&self, namespace: Option<&str>) -> Result<Vec<DefinitionRow>, CliError>;

    /// Deletes every revision of a machine; refused while instances of it are active.
    async fn delete_machine(&self, namespace: &str, name: &str) -> Result<(), CliError>;

    async fn create_instance(&self, request: CreateInstance) -> Result<Instance, CliError>;

    async fn send(
        &self,
        namespace: &str,
        id: &str,
        event: EventRequest,
    ) -> Result<TransitionOutcome, CliError>;

    /// An operator control (cancel, suspend, resume, redrive).
    async fn control(
        &self,
        namespace: &str,
        id: &str,
        request: ControlRequest,
    ) -> Result<TransitionOutcome, CliError>;

    /// Erases personal data from an instance (one `erasure` record).
    async fn erase(
        &self,
        namespace: &str,
        id: &str,
        request: EraseRequest,
    ) -> Result<TransitionOutcome, CliError>;

    async fn instance(&self, namespace: &str, id: &str) -> Result<Instance, CliError>;

    /// Instances ordered by (namespace, id).
    async fn instances(&self, filter: &InstanceFilter) -> Result<Vec<Instance>, CliError>;

    /// Records `from_version..`, at most `limit`, hash-checked.
    async fn history(
        &self,
        namespace: &str,
        id: &str,
        from_version: u64,
        limit: usize,
    ) -> Result<Vec<HistoryEntry>, CliError>;

    /// Checks the whole store (every chain, every instance, every index).
    async fn verify_store(&self) -> Result<VerifyReport, CliError>;

    /// Writes a verified point-in-time copy of the store to the file `out`.
    async fn backup(&self, out: &std::path::Path) -> Result<BackupReport, CliError>;

    async fn rollout_status(&self, namespace: &str, name: &str) -> Result<RolloutStatus, CliError>;

    async fn change_rollout(
        &self,
        namespace: &str,
        name: &str,
        change: RolloutChange,
    ) -> Result<RolloutStatus, CliError>;

    /// Runs (or plans) a migration; `progress(done, total)` after each chunk (local only).
    async fn migrate(
        &self,
        request: MigrationRequest,
        progress: &mut (dyn FnMut(usize, usize) + Send),
    ) -> Result<MigrationReport, CliError>;

    /// The unsigned snapshot payload (deterministic CBOR) of the selected instances of a
    /// namespace, taken at the deployment's current time. `progress(done, total)`.
    /// Written to `out` as it is produced; returns its length.
    async fn export_snapshot(
        &self,
        namespace: &str,
        selection: &Selection,
        out: &mut (dyn std::io::Write + Send),
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<u64, CliError>;

    /// Imports a snapshot file streamed from disk, all or nothing; the deployment checks its
    /// encoding, chains and definitions while it imports. A local deployment also checks the
    /// digest and the signature against `public_key` in that same read of the file, before it
    /// commits (`ImportSource::open_signed`); a server gets the payload of a snapshot the
    /// caller verified (`snapshot import` verifies first when it talks to a server).
    async fn import_snapshot(
        &self,
        namespace: &str,
        payload: &SnapshotPaths,
        public_key: &PublicKey,
        replace: bool,
        progress: Box<dyn FnMut(u64, u64) + Send>,
    ) -> Result<ImportReport, CliError>;

    /// Push delivery: every target's cursor and lease, and every dead letter (of `target`
    /// only, when given), in (target, position) order.
    async fn deliveries(&self, target: Option<&str>) -> Result<DeliveryList, CliError>;

    /// Marks dead letters for redrive (one, or all of a target's).
    async fn redrive_dead_letters(
        &self,
        request: RedriveRequest,
    ) -> Result<RedriveReport, CliError>;
}

/// The [`Api`] a command got: local or remote.
#[derive(Debug)]
pub enum Connection {
    Local(Local),
    Remote(Remote),
}

/// Runs the same call on whichever implementation the connection holds.
macro_rules! delegate {
    ($self:ident, $api:ident => $call:expr) => {
        match $self {
            Connection::Local($api) => $call.await,
            Connection::Remote($api) => $call.await,
        }
    };
}

impl Api for Connection {
    async fn apply(&self, machine: StateMachine) -> Result<AppliedDefinition, CliError> {
        delegate!(self, api => api.apply(machine))
    }

    async fn machine(
        &self,
        namespace: &str,
        name: &str,
        revision: Option<u32>,
    ) -> Result<DefinitionRow, CliError> {
        delegate!(self, api => api.machine(namespace, name, revision))
    }

    async fn machines(&self, namespace: Option<&str>) -> Result<Vec<DefinitionRow>, CliError> {
        delegate!(self, api => api.machines(namespace))
    }

    async fn delete_machine(&self, namespace: &str, name: &str) -> Result<(), CliError> {
        delegate!(self, api => api.delete_machine(namespace, name))
    }

    async fn create_instance(&self, request: CreateInstance) -> Result<Instance, CliError> {
        delegate!(self, api => api.create_instance(request))
    }

    async fn send(
        &self,
        namespace: &str,
        id: &str,
        event: EventRequest,
    ) -> Result<TransitionOutcome, CliError> {
        delegate!(self, api => api.send(namespace, id, event))
    }

    async fn control(
        &self,
        namespace: &str,
        id: &str,
        request: ControlRequest,
    ) -> Result<TransitionOutcome, CliError> {
        delegate!(self, api => api.control(namespace, id, request))
    }

    async fn erase(
        &self,
        namespace: &str,
        id: &str,
        request: EraseRequest,
    ) -> Result<TransitionOutcome, CliError> {
        delegate!(self, api => api.erase(namespace, id, request))
    }

    async fn instance(&self, namespace: &str, id: &str) -> Result<Instance, CliError> {
        delegate!(self, api => api.instance(namespace, id))
    }

    async fn instances(&self, filter: &InstanceFilter) -> Result<Vec<Instance>, CliError> {
        delegate!(self, api => api.instances(filter))
    }

    async fn history(
        &self,
        namespace: &str,
        id: &str,
        from_version: u64,
        limit: usize,
    ) -> Result<Vec<HistoryEntry>, CliError> {
        delegate!(self, api => api.history(namespace, id, from_version, limit))
    }

    async fn verify_store(&self) -> Result<VerifyReport, CliError> {
        delegate!(self, api => api.verify_store())
    }

    async fn backup(&self, out: &std::path::Path) -> Result<BackupReport, CliError> {
        delegate!(self, api => api.backup(out))
    }

    async fn migrate(
        &self,
        request: MigrationRequest,
        progress: &mut (dyn FnMut(usize, usize) + Send),
    ) -> Result<MigrationReport, CliError> {
        delegate!(self, api => api.migrate(request, progress))
    }

    async fn rollout_status(&self, namespace: &str, name: &str) -> Result<RolloutStatus, CliError> {
        delegate!(self, api => api.rollout_status(namespace, name))
    }

    async fn change_rollout(
        &self,
        namespace: &str,
        name: &str,
        change: RolloutChange,
    ) -> Result<RolloutStatus, CliError> {
        delegate!(self, api => api.change_rollout(namespace, name, change))
    }

    async fn export_snapshot(
        &self,
        namespace: &str,
        selection: &Selection,
        out: &mut (dyn std::io::Write + Send),
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<u64, CliError> {
        delegate!(self, api => api.export_snapshot(namespace, selection, out, progress))
    }

    async fn import_snapshot(
        &self,
        namespace: &str,
        payload: &SnapshotPaths,
        public_key: &PublicKey,
        replace: bool,
        progress: Box<dyn FnMut(u64, u64) + Send>,
    ) -> Result<ImportReport, CliError> {
        delegate!(self, api => api.import_snapshot(namespace, payload, public_key, replace, progress))
    }

    async fn deliveries(&self, target: Option<&str>) -> Result<DeliveryList, CliError> {
        delegate!(self, api => api.deliveries(target))
    }

    async fn redrive_dead_letters(
        &self,
        request: RedriveRequest,
    ) -> Result<RedriveReport, CliError> {
        delegate!(self, api => api.redrive_dead_letters(request))
    }
}
