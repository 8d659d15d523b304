//! Copying one store into another, empty one (`cnsmctl migrate-store`): every definition
//! revision, every instance with its full history (the exact record bytes), its timer and its
//! idempotency keys; then a check that the target holds exactly what the source does.
//!
//! Works between any two [`Store`]s; the source should not be written meanwhile (stop the
//! nodes first).

use cnsm_core::Instance;
use cnsm_store::{
    CommitItem, IdempotencyEntry, InstanceQuery, ItemOutcome, PAGE_LEN_MAX, Store, StoreError,
};

/// What a copy moved.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CopyReport {
    pub n_definitions: u64,
    pub n_revisions: u64,
    pub n_instances: u64,
    pub n_records: u64,
    pub n_idempotency_keys: u64,
    pub n_timers: u64,
}

/// Copies `from` into `to`, which must be empty, and checks the result. `progress` is called
/// after each instance with the number copied so far.
///
/// Errors: [`StoreError::Refused`] when `to` is not empty; [`StoreError::Corrupt`] when the
/// source's history does not replay to its rows or the copy differs from the source.
pub fn copy_store(
    from: &dyn Store,
    to: &dyn Store,
    progress: &mut dyn FnMut(u64),
) -> Result<CopyReport, StoreError> {
    if !to.list_definitions(None)?.is_empty()
        || !to
            .list_instances(&InstanceQuery {
                limit: 1,
                ..InstanceQuery::default()
            })?
            .is_empty()
    {
        return Err(StoreError::Refused(
            "the target store is not empty; migrate into a new database (or schema)".into(),
        ));
    }
    let mut report = CopyReport::default();

    for latest in from.list_definitions(None)? {
        report.n_definitions += 1;
        for revision in 1..=latest.revision {
            // A revision may be missing (never in a store written by cnsm, but be exact).
            let Some(row) = from.definition(&latest.namespace, &latest.name, Some(revision))?
            else {
                continue;
            };
            let put = to.put_definition(&row.definition, row.hash, row.created_ms)?;
            if put != cnsm_store::PutDefinition::Created(revision) {
                return Err(StoreError::Corrupt(format!(
                    "definition {}/{} revision {revision} was stored as {put:?}",
                    row.namespace, row.name
                )));
            }
            report.n_revisions += 1;
        }
    }

    let mut after = None;
    loop {
        let page = from.list_instances(&InstanceQuery {
            after: after.clone(),
            limit: 500,
            ..InstanceQuery::default()
        })?;
        let Some(last) = page.last() else { break };
        after = Some((
            last.instance.namespace.to_string(),
            last.instance.id.to_string(),
        ));
        for stored in &page {
            copy_instance(from, to, &stored.instance, &mut report)?;
            report.n_instances += 1;
            progress(report.n_instances);
        }
    }
    check_copy(from, to, &report)?;
    Ok(report)
}

/// Replays one instance's history into commit items (in pages) and commits them.
fn copy_instance(
    from: &dyn Store,
    to: &dyn Store,
    source: &Instance,
    report: &mut CopyReport,
) -> Result<(), StoreError> {
    let (namespace, id) = (&*source.namespace, &*source.id);
    let corrupt =
        |detail: String| StoreError::Corrupt(format!("instance {namespace}/{id}: {detail}"));
    let mut current: Option<Instance> = None;
    let mut next_version = 0u64;
    loop {
        let page = from.history(namespace, id, next_version, PAGE_LEN_MAX)?;
        if page.is_empty() {
            break;
        }
        let mut items = Vec::with_capacity(page.len());
        for sealed in page {
            if sealed.version != next_version {
                return Err(corrupt(format!(
                    "expected record {next_version}, found {}",
                    sealed.version
                )));
            }
            let record = sealed.open().map_err(|e| corrupt(e.to_string()))?;
            let expected_version = current.as_ref().map(|i| i.version);
            let after = match current.take() {
                None => Instance::from_genesis(&record, sealed.hash),
                Some(mut instance) => instance
                    .apply_record(&record, sealed.hash)
                    .map(|()| instance),
            }
            .map_err(|e| corrupt(e.to_string()))?;
            let idempotency: Option<IdempotencyEntry> = match &record.idempotency_key {
                Some(key) => from
                    .idempotency(namespace, id, key)?
                    .filter(|entry| entry.version == record.version),
                None => None,
            };
            report.n_idempotency_keys += u64::from(idempotency.is_some());
            items.push(CommitItem {
                instance: after.clone(),
                record: sealed,
                expected_version,
                idempotency,
            });
            current = Some(after);
            next_version += 1;
        }
        report.n_records += items.len() as u64;
        for outcome in to.commit(&items)? {
            if !matches!(outcome, ItemOutcome::Committed { .. }) {
                return Err(corrupt(format!("the target refused a record: {outcome:?}")));
            }
        }
    }
    match current {
        Some(replayed) if replayed == *source => {
            report.n_timers += u64::from(replayed.timer.is_some() && !replayed.status.is_final());
            Ok(())
        }
        Some(_) => Err(corrupt(
            "the replay of its history differs from its row".into(),
        )),
        None => Err(corrupt("has no history".into())),
    }
}

/// The target holds what the source does: every instance equal, every history byte for byte,
/// the same timers, and the target verifies.
fn check_copy(from: &dyn Store, to: &dyn Store, report: &CopyReport) -> Result<(), StoreError> {
    let mismatch =
        |what: String| StoreError::Corrupt(format!("the copy differs from the source: {what}"));
    let mut after = None;
    let mut n_instances = 0u64;
    loop {
        let query = InstanceQuery {
            after: after.clone(),
            limit: 500,
            ..InstanceQuery::default()
        };
        let (source, target) = (from.list_instances(&query)?, to.list_instances(&query)?);
        if source.len() != target.len() {
            return Err(mismatch("the instance lists differ".into()));
        }
        let Some(last) = source.last() else { break };
        after = Some((
            last.instance.namespace.to_string(),
            last.instance.id.to_string(),
        ));
        for (s, t) in source.iter().zip(&target) {
            let (namespace, id) = (&*s.instance.namespace, &*s.instance.id);
            if s.instance != t.instance {
                return Err(mismatch(format!("instance {namespace}/{id}")));
            }
            let mut version = 0;
            loop {
                let a = from.history(namespace, id, version, PAGE_LEN_MAX)?;
                let b = to.history(namespace, id, version, PAGE_LEN_MAX)?;
                if a != b {
                    return Err(mismatch(format!("history of {namespace}/{id}")));
                }
                if a.is_empty() {
                    break;
                }
                version += a.len() as u64;
            }
            n_instances += 1;
        }
    }
    if n_instances != report.n_instances {
        return Err(mismatch("the number of instances".into()));
    }
    if count_timers(from)? != count_timers(to)? {
        return Err(mismatch("the number of pending timers".into()));
    }
    let verified = to.verify()?;
    if !verified.is_ok() {
        return Err(mismatch(format!(
            "the target does not verify: {}",
            verified.problems.join("; ")
        )));
    }
    if verified.n_records != report.n_records || verified.n_definitions != report.n_definitions {
        return Err(mismatch("the record or definition counts".into()));
    }
    Ok(())
}

fn count_timers(store: &dyn Store) -> Result<u64, StoreError> {
    let mut n = 0;
    store.pending_timers(&mut |_| n += 1)?;
    Ok(n)
}
