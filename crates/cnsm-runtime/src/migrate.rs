//! Running a `StateMigrationPolicy` over the instances of a machine: a dry run that reports per
//! instance what would happen, and a real run in two phases per chunk of instances — `pre`
//! (a lock record on each: events get `Locked`) and `post` (the migration record on the target
//! revision, which lifts the lock). Both go through the committer, so many instances share each
//! durable commit, and each instance's migration is one atomic record.
//!
//! A run is resumable: instances already migrated are at the target revision and are not
//! selected again; instances a crashed run left locked are still at the source revision, are
//! selected again, and their lock is renewed and completed. A lock is a lease
//! (`lockSeconds`), so an abandoned run never locks an instance forever.

use std::sync::Arc;

use cnsm_core::migration::{CompiledMigration, StateMigrationPolicy};

use crate::{Runtime, RuntimeError, TransitionOutcome, committer};

/// Instances per `pre`/`post` round.
const CHUNK: usize = 1_000;

/// What to migrate.
#[derive(Debug, Clone)]
pub struct MigrationRequest {
    pub namespace: String,
    pub machine: String,
    pub from_revision: u32,
    pub to_revision: u32,
    pub policy: StateMigrationPolicy,
    /// Report what would happen; change nothing.
    pub dry_run: bool,
    /// Move instances migrated by this policy back (`to` → `from`) by the reverse mapping.
    pub rollback: bool,
    /// Which phases to run: both (the default), only `pre` (lock, e.g. to backfill elsewhere
    /// before `post`), or only `post` (migrate the instances this policy locked).
    pub phase: MigrationPhase,
    /// Instances per `pre`/`post` round (0: the default, 1,000).
    pub chunk: usize,
    pub actor: String,
}

/// The phases a run performs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum MigrationPhase {
    /// `pre` then `post` for each chunk.
    #[default]
    All,
    /// Only lock (a lease of `lockSeconds`).
    Pre,
    /// Only migrate instances this policy holds locked.
    Post,
}

impl MigrationRequest {
    /// A request to run `policy` from revision `from` to `to` (both phases, not a dry run).
    pub fn new(policy: StateMigrationPolicy, from: u32, to: u32) -> MigrationRequest {
        MigrationRequest {
            namespace: policy.metadata.namespace.clone(),
            machine: policy.spec.machine.clone(),
            from_revision: from,
            to_revision: to,
            policy,
            dry_run: false,
            rollback: false,
            phase: MigrationPhase::All,
            chunk: 0,
            actor: "system:migration".into(),
        }
    }
}

/// What happened (or would happen) to one instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MigrationOutcome {
    /// Dry run: it would move from `from` to `to`.
    WouldMigrate {
        from: String,
        to: String,
    },
    Migrated {
        from: String,
        to: String,
    },
    /// `pre` only: locked, waiting for `post`.
    Locked,
    /// Not migrated, and why.
    Blocked(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrationEntry {
    pub id: String,
    pub outcome: MigrationOutcome,
}

/// Every instance the run considered, in id order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MigrationReport {
    pub entries: Vec<MigrationEntry>,
}

impl MigrationReport {
    pub fn n_migrated(&self) -> usize {
        self.count(|o| {
            matches!(
                o,
                MigrationOutcome::Migrated { .. } | MigrationOutcome::WouldMigrate { .. }
            )
        })
    }

    pub fn n_blocked(&self) -> usize {
        self.count(|o| matches!(o, MigrationOutcome::Blocked(_)))
    }

    fn count(&self, f: impl Fn(&MigrationOutcome) -> bool) -> usize {
        self.entries.iter().filter(|e| f(&e.outcome)).count()
    }
}

impl Runtime {
    /// Runs (or, with `dry_run`, plans) a migration; `progress(done, total)` is called after
    /// each chunk. Errors only for a policy that does not fit the two revisions, or when the
    /// store fails; per-instance refusals are `Blocked` entries.
    pub async fn migrate(
        &self,
        request: &MigrationRequest,
        progress: &mut (dyn FnMut(usize, usize) + Send),
    ) -> Result<MigrationReport, RuntimeError> {
        let ns = &request.namespace;
        let from = self
            .shared
            .machine(ns, &request.machine, request.from_revision)?;
        let to = self
            .shared
            .machine(ns, &request.machine, request.to_revision)?;
        let forward = CompiledMigration::compile(&request.policy, &from, &to)
            .map_err(|problems| RuntimeError::Invalid(problems.join("; ")))?;
        let migration = Arc::new(if request.rollback {
            forward.reverse(&from, &to)
        } else {
            forward
        });
        let source_revision = migration.from_revision;

        // Every active instance of the machine still at the source revision.
        let mut selected = Vec::new();
        self.for_each_active(ns, &request.machine, &mut |instance| {
            if instance.revision == source_revision {
                selected.push(instance);
            }
        })?;
        if request.rollback {
            // Only instances this policy migrated go back.
            selected.retain(|i| self.last_migration_is(i, &request.policy.metadata.name));
        }
        if request.phase == MigrationPhase::Post {
            selected.retain(|i| {
                i.lock
                    .as_ref()
                    .is_some_and(|l| l.migration == migration.name)
            });
        }

        let total = selected.len();
        let mut report = MigrationReport::default();
        if request.dry_run {
            for instance in &selected {
                let outcome = match migration.plan(instance) {
                    Ok(plan) => MigrationOutcome::WouldMigrate {
                        from: instance.state.to_string(),
                        to: plan.target_state,
                    },
                    Err(why) => MigrationOutcome::Blocked(why),
                };
                report.entries.push(MigrationEntry {
                    id: instance.id.to_string(),
                    outcome,
                });
            }
            progress(total, total);
            return Ok(report);
        }

        let chunk_len = if request.chunk == 0 {
            CHUNK
        } else {
            request.chunk
        }
        .min((self.shared.options.queue_len_max / 2).max(1));
        let mut done = 0;
        for chunk in selected.chunks(chunk_len) {
            let ids = chunk.iter().map(|i| i.id.to_string());
            if request.phase == MigrationPhase::Post {
                let steps = self.step_all(ids, &migration, false, request)?;
                self.collect(steps, &mut report).await?;
                done += chunk.len();
                progress(done, total);
                continue;
            }
            // pre: lock every instance of the chunk (one shared commit).
            let locks = self.step_all(ids, &migration, true, request)?;
            let mut locked = Vec::new();
            for (id, result) in locks {
                match result.await {
                    Ok(Ok(_)) => locked.push(id),
                    Ok(Err(e)) => report.entries.push(MigrationEntry {
                        id,
                        outcome: MigrationOutcome::Blocked(e.to_string()),
                    }),
                    Err(_) => {
                        return Err(RuntimeError::Unavailable(
                            "the runtime stopped during the migration".into(),
                        ));
                    }
                }
            }
            if request.phase == MigrationPhase::Pre {
                for id in locked {
                    report.entries.push(MigrationEntry {
                        id,
                        outcome: MigrationOutcome::Locked,
                    });
                }
            } else {
                // post: the migration record of each locked instance.
                let steps = self.step_all(locked.into_iter(), &migration, false, request)?;
                self.collect(steps, &mut report).await?;
            }
            done += chunk.len();
            progress(done, total);
        }
        report.entries.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(report)
    }

    /// Awaits migration records and reports each.
    async fn collect(
        &self,
        steps: Vec<(
            String,
            tokio::sync::oneshot::Receiver<Result<TransitionOutcome, RuntimeError>>,
        )>,
        report: &mut MigrationReport,
    ) -> Result<(), RuntimeError> {
        for (id, result) in steps {
            let outcome = match result.await {
                Ok(Ok(outcome)) => MigrationOutcome::Migrated {
                    from: outcome
                        .record
                        .from
                        .as_deref()
                        .unwrap_or_default()
                        .to_owned(),
                    to: outcome.record.to.to_string(),
                },
                Ok(Err(e)) => MigrationOutcome::Blocked(e.to_string()),
                Err(_) => {
                    return Err(RuntimeError::Unavailable(
                        "the runtime stopped during the migration".into(),
                    ));
                }
            };
            report.entries.push(MigrationEntry { id, outcome });
        }
        Ok(())
    }

    /// Queues one step for every id before awaiting any, so they share commits.
    #[allow(clippy::type_complexity)]
    fn step_all(
        &self,
        ids: impl Iterator<Item = String>,
        migration: &Arc<CompiledMigration>,
        lock: bool,
        request: &MigrationRequest,
    ) -> Result<
        Vec<(
            String,
            tokio::sync::oneshot::Receiver<Result<TransitionOutcome, RuntimeError>>,
        )>,
        RuntimeError,
    > {
        ids.map(|id| {
            let rx = self.enqueue(|reply| committer::Command::Migrate {
                namespace: request.namespace.clone(),
                id: id.clone(),
                migration: Arc::clone(migration),
                lock,
                actor: request.actor.clone(),
                reply,
            })?;
            Ok((id, rx))
        })
        .collect()
    }

    /// Whether the instance's last migration record came from the policy `name`.
    fn last_migration_is(&self, instance: &cnsm_core::Instance, name: &str) -> bool {
        // The lock record just before a migration record names the policy.
        let Ok(sealed) = self.shared.store.history(
            &instance.namespace,
            &instance.id,
            0,
            instance.version as usize + 1,
        ) else {
            return false;
        };
        let Ok(history) = crate::decode_history(
            &*self.shared.store,
            &instance.namespace,
            &instance.id,
            &sealed,
        ) else {
            return false;
        };
        let mut last_lock: Option<&str> = None;
        let mut migrated_by: Option<&str> = None;
        for entry in &history {
            match entry.record.kind {
                cnsm_core::record::RecordKind::Lock => {
                    last_lock = entry.record.lock.as_ref().map(|l| l.migration.as_str());
                }
                cnsm_core::record::RecordKind::Migration => migrated_by = last_lock,
                _ => {}
            }
        }
        migrated_by == Some(name)
    }
}
