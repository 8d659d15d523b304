//! Local mode: the [`Api`] over an in-process [`Runtime`] and the embedded store in `--data-dir`.
//!
//! The store is opened for one command and closed after it: [`Local`] shuts the runtime down when
//! dropped, so every path out of a command (errors included) stops the committer and releases the
//! store's lock before the process exits.

use std::path::Path;

use cnsm_core::Instance;
use cnsm_core::resource::StateMachine;
use cnsm_runtime::{
    AppliedDefinition, ControlRequest, CreateInstance, EraseRequest, EventRequest, HistoryEntry,
    MigrationReport, MigrationRequest, RolloutChange, RolloutStatus, Runtime, RuntimeOptions,
    TransitionOutcome,
};
use cnsm_snapshot::files::SnapshotPaths;
use cnsm_snapshot::{ExportError, ImportFailure, ImportSource, Selection};
use cnsm_store::embedded::{CACHE_LEN_BYTES_DEFAULT, EmbeddedOptions, EmbeddedStore};
use cnsm_store::{
    BackupReport, DefinitionRow, ImportReport, InstanceQuery, PAGE_LEN_MAX, VerifyReport,
};

use crate::api::{Access, Api, InstanceFilter};
use crate::error::CliError;

/// A runtime over the embedded store of one data directory.
#[derive(Debug)]
pub struct Local {
    runtime: Runtime,
}

/// The page cache of a store opened for a snapshot export or import.
pub const SNAPSHOT_CACHE_LEN_BYTES: usize = 64 << 20;

impl Local {
    /// Opens the store in `data_dir`. A mutating command creates the directory when missing and
    /// runs timers (overdue ones fire right away); a read-only one refuses a missing directory
    /// instead of creating an empty store, and runs no timers.
    pub fn open(data_dir: &Path, access: Access) -> Result<Local, CliError> {
        Local::open_with(data_dir, access, true, None, CACHE_LEN_BYTES_DEFAULT)
    }

    /// Like [`Local::open`] for a snapshot export or import: a small page cache, so that the
    /// memory of a command streaming a snapshot stays bounded whatever its size (the import's
    /// one transaction spills its pages to the file instead of keeping them in memory).
    pub fn open_for_snapshot(
        data_dir: &Path,
        access: Access,
        flags: Option<std::sync::Arc<dyn cnsm_runtime::FlagEvaluator>>,
    ) -> Result<Local, CliError> {
        Local::open_with(data_dir, access, true, flags, SNAPSHOT_CACHE_LEN_BYTES)
    }

    /// Like [`Local::open`], with an evaluator for `flag:` gates (`--flags`).
    pub fn open_with_flags(
        data_dir: &Path,
        access: Access,
        flags: Option<std::sync::Arc<dyn cnsm_runtime::FlagEvaluator>>,
    ) -> Result<Local, CliError> {
        Local::open_with(data_dir, access, true, flags, CACHE_LEN_BYTES_DEFAULT)
    }

    /// Opens the store for `store verify`: without the check of the unverified tail that
    /// [`Local::open`] makes, so that a damaged store opens and every problem can be listed.
    pub fn open_for_verify(data_dir: &Path) -> Result<Local, CliError> {
        Local::open_with(
            data_dir,
            Access::ReadOnly,
            false,
            None,
            CACHE_LEN_BYTES_DEFAULT,
        )
    }

    fn open_with(
        data_dir: &Path,
        access: Access,
        verify_tail: bool,
        flags: Option<std::sync::Arc<dyn cnsm_runtime::FlagEvaluator>>,
        cache_len_bytes: usize,
    ) -> Result<Local, CliError> {
        match access {
            Access::Mutating => std::fs::create_dir_all(data_dir).map_err(|e| {
                CliError::unavailable(format!(
                    "cannot create data directory {}: {e}",
                    data_dir.display()
                ))
            })?,
            Access::ReadOnly => {
                if !data_dir.is_dir() {
                    return Err(CliError::unavailable(format!(
                        "no store at {} (apply a definition first, or pass --data-dir / set CNSM_DATA_DIR)",
                        data_dir.display()
                    )));
                }
            }
        }
        let store = if verify_tail {
            EmbeddedStore::open_with_options(
                data_dir,
                EmbeddedOptions::default().with_cache_len_bytes(cache_len_bytes),
            )
        } else {
            EmbeddedStore::open_unverified(data_dir)
        };
        let store = store.map_err(|e| {
            let mut error = CliError::from(e);
            error.message = format!(
                "cannot open the store in {}: {}",
                data_dir.display(),
                error.message
            );
            error
        })?;
        let options = RuntimeOptions {
            timers: access == Access::Mutating,
            flags,
            ..RuntimeOptions::default()
        };
        let runtime = Runtime::open(store, options)?;
        Ok(Local { runtime })
    }
}

impl Local {
    /// Opens the PostgreSQL store of `--store` (migrating its schema when behind). Local
    /// commands never fire timers there: the `serve` nodes sharing the store own them.
    pub fn open_postgres(
        url: &str,
        access: Access,
        flags: Option<std::sync::Arc<dyn cnsm_runtime::FlagEvaluator>>,
    ) -> Result<Local, CliError> {
        let store = crate::postgres::open(url, access == Access::Mutating)?;
        let options = RuntimeOptions {
            flags,
            ..crate::postgres::runtime_options(format!("cnsmctl-{}", std::process::id()), false)
        };
        let runtime = Runtime::open_shared(store, options)?;
        Ok(Local { runtime })
    }
}

impl Drop for Local {
    fn drop(&mut self) {
        self.runtime.shutdown();
    }
}

impl Api for Local {
    async fn apply(&self, machine: StateMachine) -> Result<AppliedDefinition, CliError> {
        Ok(self.runtime.apply(machine).await?)
    }

    async fn machine(
        &self,
        namespace: &str,
        name: &str,
        revision: Option<u32>,
    ) -> Result<DefinitionRow, CliError> {
        let row = self.runtime.store().definition(namespace, name, revision)?;
        row.ok_or_else(|| match revision {
            Some(r) => CliError::not_found(format!(
                "statemachine {namespace}/{name} revision {r} not found"
            )),
            None => CliError::not_found(format!("statemachine {namespace}/{name} not found")),
        })
    }

    async fn machines(&self, namespace: Option<&str>) -> Result<Vec<DefinitionRow>, CliError> {
        Ok(self.runtime.definitions(namespace).await?)
    }

    async fn delete_machine(&self, namespace: &str, name: &str) -> Result<(), CliError> {
        Ok(self.runtime.delete_definition(namespace, name).await?)
    }

    async fn create_instance(&self, request: CreateInstance) -> Result<Instance, CliError> {
        Ok(self.runtime.create_instance(request).await?)
    }

    async fn send(
        &self,
        namespace: &str,
        id: &str,
        event: EventRequest,
    ) -> Result<TransitionOutcome, CliError> {
        Ok(self.runtime.send(namespace, id, event).await?)
    }

    async fn control(
        &self,
        namespace: &str,
        id: &str,
        request: ControlRequest,
    ) -> Result<TransitionOutcome, CliError> {
        Ok(self.runtime.control(namespace, id, request).await?)
    }

    async fn erase(
        &self,
        namespace: &str,
        id: &str,
        request: EraseRequest,
    ) -> Result<TransitionOutcome, CliError> {
        Ok(self.runtime.erase(namespace, id, request).await?)
    }

    async fn instance(&self, namespace: &str, id: &str) -> Result<Instance, CliError> {
        Ok(self.runtime.instance(namespace, id).await?)
    }

    async fn instances(&self, filter: &InstanceFilter) -> Result<Vec<Instance>, CliError> {
        let limit = filter.limit.unwrap_or(usize::MAX);
        let mut query = InstanceQuery {
            namespace: filter.namespace.clone(),
            machine: filter.machine.clone(),
            state: filter.state.clone(),
            status: filter.status,
            labels: filter.labels.clone(),
            after: None,
            limit: 0,
        };
        let mut out: Vec<Instance> = Vec::new();
        // Page through the store: one query returns at most PAGE_LEN_MAX.
        while out.len() < limit {
            query.limit = (limit - out.len()).min(PAGE_LEN_MAX);
            let page = self.runtime.list_instances(&query).await?;
            let full = page.len() == query.limit;
            out.extend(page);
            match out.last() {
                Some(last) if full => {
                    query.after = Some((last.namespace.to_string(), last.id.to_string()))
                }
                _ => break,
            }
        }
        Ok(out)
    }

    async fn history(
        &self,
        namespace: &str,
        id: &str,
        from_version: u64,
        limit: usize,
    ) -> Result<Vec<HistoryEntry>, CliError> {
        Ok(self
            .runtime
            .history(namespace, id, from_version, limit.min(PAGE_LEN_MAX))
            .await?)
    }

    async fn verify_store(&self) -> Result<VerifyReport, CliError> {
        Ok(self.runtime.store().verify()?)
    }

    async fn rollout_status(&self, namespace: &str, name: &str) -> Result<RolloutStatus, CliError> {
        Ok(self.runtime.rollout_status(namespace, name).await?)
    }

    async fn change_rollout(
        &self,
        namespace: &str,
        name: &str,
        change: RolloutChange,
    ) -> Result<RolloutStatus, CliError> {
        Ok(self.runtime.change_rollout(namespace, name, change).await?)
    }

    async fn migrate(
        &self,
        request: MigrationRequest,
        progress: &mut (dyn FnMut(usize, usize) + Send),
    ) -> Result<MigrationReport, CliError> {
        Ok(self.runtime.migrate(&request, progress).await?)
    }

    async fn deliveries(
        &self,
        target: Option<&str>,
    ) -> Result<cnsm_server::wire::DeliveryList, CliError> {
        let store = std::sync::Arc::clone(self.runtime.store());
        let target = target.map(str::to_owned);
        tokio::task::spawn_blocking(move || deliveries_of(store.as_ref(), target.as_deref()))
            .await
            .map_err(|e| CliError::unavailable(e.to_string()))?
    }

    async fn redrive_dead_letters(
        &self,
        request: cnsm_runtime::delivery::RedriveRequest,
    ) -> Result<cnsm_runtime::delivery::RedriveReport, CliError> {
        let runtime = self.runtime.clone();
        tokio::task::spawn_blocking(move || runtime.redrive_dead_letters(&request))
            .await
            .map_err(|e| CliError::unavailable(e.to_string()))?
            .map_err(CliError::from)
    }

    async fn backup(&self, out: &std::path::Path) -> Result<BackupReport, CliError> {
        let store = std::sync::Arc::clone(self.runtime.store());
        let out = out.to_owned();
        tokio::task::spawn_blocking(move || store.backup(&out))
            .await
            .map_err(|e| CliError::unavailable(e.to_string()))?
            .map_err(CliError::from)
    }

    async fn export_snapshot(
        &self,
        namespace: &str,
        selection: &Selection,
        out: &mut (dyn std::io::Write + Send),
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<u64, CliError> {
        let as_of_ms = self.runtime.clock().now_ms();
        cnsm_snapshot::export_to(
            &**self.runtime.store(),
            namespace,
            selection,
            as_of_ms,
            out,
            progress,
        )
        .map_err(|e| match e {
            ExportError::Store(e) => CliError::from(e),
            ExportError::NotFound(what) => CliError::not_found(format!("instance {what}")),
            ExportError::Changed(message) => CliError::conflict(message),
            other => CliError::unavailable(other.to_string()),
        })
    }

    async fn import_snapshot(
        &self,
        namespace: &str,
        payload: &SnapshotPaths,
        public_key: &cnsm_snapshot::PublicKey,
        replace: bool,
        progress: Box<dyn FnMut(u64, u64) + Send>,
    ) -> Result<ImportReport, CliError> {
        let reader = payload
            .payload()
            .map_err(|e| CliError::invalid(e.to_string()))?;
        // One read of the file: decoded, checked, hashed; digest and signature are checked
        // at its end, before the store commits.
        let (source, definitions) = ImportSource::open_signed(
            reader,
            &payload.bundle_json,
            public_key,
            namespace,
            progress,
        )
        .map_err(import_failure)?;
        let failure = source.failure();
        let result = self
            .runtime
            .import_stream(definitions, Box::new(source), replace)
            .await;
        if let Some(failure) = failure.lock().ok().and_then(|mut f| f.take()) {
            return Err(import_failure(failure));
        }
        let report = result?;
        // Timers that fell due while the snapshot travelled fire now, before the command ends.
        self.runtime.fire_due_timers().await?;
        Ok(report)
    }
}

/// Every cursor and every dead letter (of `target` only, when given), read a page at a time.
fn deliveries_of(
    store: &dyn cnsm_store::Store,
    target: Option<&str>,
) -> Result<cnsm_server::wire::DeliveryList, CliError> {
    let cursors = store
        .delivery_cursors()?
        .into_iter()
        .filter(|(name, _)| target.is_none_or(|t| t == name))
        .map(|(name, c)| cnsm_server::wire::DeliveryCursorView {
            target: name,
            position: c.position,
            lease_node: c.lease_node,
            lease_until_ms: c.lease_until_ms,
        })
        .collect();
    let mut dead_letters = Vec::new();
    let mut after: Option<(String, u64)> = None;
    loop {
        let page = store.dead_letters(target, after.as_ref().map(|(t, p)| (t.as_str(), *p)), 0)?;
        let full = page.len() >= PAGE_LEN_MAX;
        after = page.last().map(|d| (d.target.clone(), d.position));
        dead_letters.extend(page);
        if !full {
            break;
        }
    }
    Ok(cnsm_server::wire::DeliveryList {
        cursors,
        dead_letters,
        metadata: Default::default(),
    })
}

/// The snapshot's side of a refused streamed import.
fn import_failure(failure: ImportFailure) -> CliError {
    match failure {
        ImportFailure::Verify(e) => CliError::invalid(format!("the snapshot does not verify: {e}")),
        other => CliError::invalid(other.to_string()),
    }
}
