//! The in-memory timer index: one ordered set over every pending timer, rebuilt from the store
//! at start. No task per timer: the committer sleeps until the first due time.

use std::collections::BTreeSet;

use cnsm_core::record::Timer;
use cnsm_store::TimerRef;

/// Pending timers ordered by due time. About 32 bytes of key per timer plus B-tree overhead.
#[derive(Debug, Default)]
pub struct TimerIndex {
    set: BTreeSet<TimerRef>,
}

impl TimerIndex {
    pub fn insert(&mut self, uid: u64, timer: &Timer) {
        self.set.insert(TimerRef {
            due_ms: timer.due_ms,
            uid,
            entry_seq: timer.entry_seq,
            kind: timer.kind,
        });
    }

    pub fn insert_ref(&mut self, timer: TimerRef) {
        self.set.insert(timer);
    }

    pub fn remove(&mut self, uid: u64, timer: &Timer) {
        self.set.remove(&TimerRef {
            due_ms: timer.due_ms,
            uid,
            entry_seq: timer.entry_seq,
            kind: timer.kind,
        });
    }

    /// The earliest due time.
    pub fn next_due_ms(&self) -> Option<u64> {
        self.set.first().map(|t| t.due_ms)
    }

    /// Removes and returns up to `n_max` timers due at `now_ms`.
    pub fn pop_due(&mut self, now_ms: u64, n_max: usize) -> Vec<TimerRef> {
        let mut out = Vec::new();
        while out.len() < n_max {
            match self.set.first() {
                Some(t) if t.due_ms <= now_ms => {
                    if let Some(t) = self.set.pop_first() {
                        out.push(t);
                    }
                }
                _ => break,
            }
        }
        out
    }

    pub fn is_empty(&self) -> bool {
        self.set.is_empty()
    }

    pub fn len(&self) -> usize {
        self.set.len()
    }

    pub fn clear(&mut self) {
        self.set.clear();
    }
}
