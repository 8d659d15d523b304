//! Commits made by other nodes of a shared store, delivered to
//! [`CommitListener::on_remote_commit`](crate::CommitListener::on_remote_commit) (watch streams
//! use it, so a watch on one node sees transitions committed on another).
//!
//! The store reports `(uid, version)` pairs ([`cnsm_store::Store::subscribe_foreign_commits`]);
//! a thread reads each record and the instance right after it from the store and hands them to
//! the listeners, per instance in version order.

use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, Weak};
use std::time::Duration;

use cnsm_core::Instance;

use crate::{RuntimeError, Shared};

/// Pairs waiting to be read; more are dropped (a watch then fills the gap from the store).
const QUEUE_LEN_MAX: usize = 65_536;

/// Subscribes to the store's feed of other nodes' commits, if it has one.
pub(crate) fn start(shared: &Arc<Shared>) -> Result<(), RuntimeError> {
    let (tx, rx) = std::sync::mpsc::sync_channel::<(u64, u64)>(QUEUE_LEN_MAX);
    let has_feed = shared
        .store
        .subscribe_foreign_commits(Arc::new(move |uid, version| {
            let _ = tx.try_send((uid, version));
        }))?;
    if !has_feed {
        return Ok(());
    }
    let weak = Arc::downgrade(shared);
    std::thread::Builder::new()
        .name("cnsm-foreign-commits".into())
        .spawn(move || run(weak, rx))
        .map_err(|e| RuntimeError::Unavailable(format!("cannot start the commit feed: {e}")))?;
    Ok(())
}

fn run(shared: Weak<Shared>, rx: Receiver<(u64, u64)>) {
    loop {
        let (uid, version) = match rx.recv_timeout(Duration::from_millis(500)) {
            Ok(pair) => pair,
            Err(RecvTimeoutError::Timeout) => {
                if shared.strong_count() == 0 {
                    return;
                }
                continue;
            }
            Err(RecvTimeoutError::Disconnected) => return,
        };
        let Some(shared) = shared.upgrade() else {
            return;
        };
        let listeners = shared
            .listeners
            .read()
            .map(|l| l.clone())
            .unwrap_or_default();
        let listeners: Vec<_> = listeners
            .into_iter()
            .filter(|l| l.wants_remote_commits())
            .collect();
        if listeners.is_empty() {
            continue;
        }
        // Best effort: a pair that cannot be read now is skipped (watchers fill gaps).
        let _ = deliver(&shared, &listeners, uid, version);
    }
}

fn deliver(
    shared: &Shared,
    listeners: &[Arc<dyn crate::CommitListener>],
    uid: u64,
    version: u64,
) -> Result<(), RuntimeError> {
    let Some(stored) = shared.store.instance_by_uid(uid)? else {
        return Ok(());
    };
    let (namespace, id) = (
        stored.instance.namespace.clone(),
        stored.instance.id.clone(),
    );
    // The instance right after the record: the row when it has not moved on, else a replay.
    let (record, instance) = if stored.instance.version == version {
        let sealed = shared.store.history(&namespace, &id, version, 1)?;
        let Some(entry) = crate::decode_history(&*shared.store, &namespace, &id, &sealed)?
            .into_iter()
            .next()
        else {
            return Ok(());
        };
        (entry, stored.instance)
    } else {
        let sealed = shared
            .store
            .history(&namespace, &id, 0, version as usize + 1)?;
        let history = crate::decode_history(&*shared.store, &namespace, &id, &sealed)?;
        let instance: Option<Instance> =
            Instance::replay(history.iter().map(|h| (&h.record, h.hash)))
                .map_err(|e| RuntimeError::Unavailable(format!("history does not replay: {e}")))?;
        let (Some(instance), Some(entry)) = (instance, history.into_iter().last()) else {
            return Ok(());
        };
        if entry.record.version != version {
            return Ok(());
        }
        (entry, instance)
    };
    for listener in listeners {
        listener.on_remote_commit(&record.record, record.hash, &instance);
    }
    Ok(())
}
