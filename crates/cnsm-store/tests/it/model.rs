//! A model-based test: random batches of creates, transitions, stale and duplicate items,
//! timer firings, purges and restarts against the embedded store, checked after every step
//! against a plain in-memory model.

use std::collections::BTreeMap;

use cnsm_core::Instance;
use cnsm_core::record::SealedRecord;
use cnsm_store::conformance::{Driver, T0_MS};
use cnsm_store::embedded::EmbeddedStore;
use cnsm_store::{CommitItem, IdempotencyEntry, InstanceQuery, ItemOutcome, Store, TimerRef};

/// A small deterministic generator (xorshift64*), so a failing seed can be replayed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// What the store must hold.
#[derive(Default)]
struct Model {
    instances: BTreeMap<(String, String), (u64, Instance)>,
    history: BTreeMap<(String, String), Vec<SealedRecord>>,
    idempotency: BTreeMap<(String, String, String), IdempotencyEntry>,
}

impl Model {
    fn timers(&self) -> Vec<TimerRef> {
        let mut timers: Vec<TimerRef> = self
            .instances
            .values()
            .filter(|(_, i)| !i.status.is_final())
            .filter_map(|(uid, i)| {
                i.timer.map(|t| TimerRef {
                    due_ms: t.due_ms,
                    uid: *uid,
                    entry_seq: t.entry_seq,
                    kind: t.kind,
                })
            })
            .collect();
        timers.sort();
        timers
    }
}

/// A transition that is valid for the instance's state, if the draw picks one.
fn next_item(
    driver: &Driver,
    rng: &mut Rng,
    instance: &Instance,
    now_ms: u64,
) -> Option<CommitItem> {
    if instance.status.is_final() {
        return None;
    }
    let item = match (&*instance.state, rng.below(4)) {
        ("queued", 0) => driver.event(instance, "start", "", now_ms),
        ("queued", 1) => driver.fire(instance, now_ms),
        ("queued", _) => driver.event(instance, "ping", &format!("at {now_ms}"), now_ms),
        ("running", 0) => driver.event(instance, "cancel", "", now_ms),
        ("running", 1) => driver.event(instance, "complete", "", now_ms),
        // A timeout without `onTimeout`: a hard failure.
        ("running", 2) => driver.fire(instance, now_ms),
        _ => return None,
    };
    Some(item)
}

fn check(store: &dyn Store, model: &Model) {
    let listed = store.list_instances(&InstanceQuery::default()).unwrap();
    let want: Vec<(u64, &Instance)> = model.instances.values().map(|(uid, i)| (*uid, i)).collect();
    let got: Vec<(u64, &Instance)> = listed.iter().map(|s| (s.uid, &s.instance)).collect();
    assert_eq!(got, want);
    let mut timers = Vec::new();
    store.pending_timers(&mut |t| timers.push(t)).unwrap();
    timers.sort();
    assert_eq!(timers, model.timers());
    for ((namespace, id), records) in &model.history {
        assert_eq!(
            &store.history(namespace, id, 0, 0).unwrap(),
            records,
            "{namespace}/{id}"
        );
    }
    for ((namespace, id, key), entry) in &model.idempotency {
        assert_eq!(
            store.idempotency(namespace, id, key).unwrap().as_ref(),
            Some(entry)
        );
    }
}

fn run(seed: u64, n_steps: u64) {
    let dir = tempfile::tempdir().unwrap();
    let mut store = EmbeddedStore::open(dir.path()).unwrap();
    let driver = Driver::new("job");
    let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let mut model = Model::default();
    let mut now_ms = T0_MS;
    let (mut n_conflicts, mut n_restarts, mut n_purged) = (0u64, 0u64, 0u64);
    for step in 0..n_steps {
        now_ms += 1 + rng.below(50_000);
        match rng.below(10) {
            // A restart, sometimes clean, sometimes not.
            0 => {
                if rng.below(2) == 0 {
                    store.close().unwrap();
                } else {
                    drop(store);
                }
                store = EmbeddedStore::open(dir.path()).unwrap();
                n_restarts += 1;
            }
            1 => {
                let purged = store.purge_idempotency(now_ms).unwrap();
                let before = model.idempotency.len();
                model.idempotency.retain(|_, e| e.expires_ms > now_ms);
                assert_eq!(
                    purged,
                    (before - model.idempotency.len()) as u64,
                    "step {step}"
                );
                n_purged += purged;
            }
            _ => {
                // A batch: some creates (a few of existing ids), some transitions, some stale.
                let mut batch: Vec<CommitItem> = Vec::new();
                let mut expect: Vec<Option<u64>> = Vec::new();
                let mut pending: BTreeMap<(String, String), Instance> = model
                    .instances
                    .iter()
                    .map(|(k, (_, i))| (k.clone(), i.clone()))
                    .collect();
                for _ in 0..1 + rng.below(8) {
                    let namespace = ["a", "b"][rng.below(2) as usize];
                    let id = format!("j-{}", rng.below(12));
                    let key = (namespace.to_owned(), id.clone());
                    let untouched = |current: &Instance| {
                        model
                            .instances
                            .get(&key)
                            .is_some_and(|(_, i)| i.version == current.version)
                    };
                    match pending.get(&key).cloned() {
                        None => {
                            let item = driver.create(namespace, &id, &[("n", &id)], now_ms);
                            pending.insert(key, item.instance.clone());
                            expect.push(None);
                            batch.push(item);
                        }
                        Some(current) if rng.below(8) == 0 => {
                            // A second create of an existing id: must conflict.
                            expect.push(Some(current.version));
                            batch.push(driver.create(namespace, &id, &[], now_ms));
                        }
                        Some(current)
                            if rng.below(6) == 0 && current.version > 0 && untouched(&current) =>
                        {
                            // Computed from an older version: must conflict.
                            let stale = replay(&model.history[&key][..current.version as usize]);
                            if let Some(item) = next_item(&driver, &mut rng, &stale, now_ms) {
                                expect.push(Some(current.version));
                                batch.push(item);
                            }
                        }
                        Some(current) => {
                            if let Some(mut item) = next_item(&driver, &mut rng, &current, now_ms) {
                                if rng.below(3) == 0 {
                                    item.idempotency = Some(IdempotencyEntry {
                                        key: format!("k-{step}"),
                                        request_hash: cnsm_core::Hash32([step as u8; 32]),
                                        version: item.record.version,
                                        expires_ms: now_ms + rng.below(200_000),
                                    });
                                }
                                pending.insert(key, item.instance.clone());
                                expect.push(None);
                                batch.push(item);
                            }
                        }
                    }
                }
                if batch.is_empty() {
                    check(&store, &model);
                    continue;
                }
                let outcomes = store.commit(&batch).unwrap();
                assert_eq!(outcomes.len(), batch.len());
                for ((item, outcome), conflict) in batch.iter().zip(&outcomes).zip(&expect) {
                    let key = (
                        item.instance.namespace.to_string(),
                        item.instance.id.to_string(),
                    );
                    match (outcome, conflict) {
                        (ItemOutcome::Committed { uid }, None) => {
                            if let Some((known, _)) = model.instances.get(&key) {
                                assert_eq!(known, uid, "step {step}: the uid of {key:?} changed");
                            }
                            model
                                .instances
                                .insert(key.clone(), (*uid, item.instance.clone()));
                            model
                                .history
                                .entry(key.clone())
                                .or_default()
                                .push(item.record.clone());
                            if let Some(entry) = &item.idempotency {
                                model
                                    .idempotency
                                    .insert((key.0, key.1, entry.key.clone()), entry.clone());
                            }
                        }
                        (ItemOutcome::Conflict { actual }, Some(version)) => {
                            assert_eq!(*actual, Some(*version), "step {step}: {key:?}");
                            n_conflicts += 1;
                        }
                        other => panic!("step {step}: {key:?}: unexpected {other:?}"),
                    }
                }
            }
        }
        check(&store, &model);
    }
    assert!(
        n_conflicts > 0 && n_restarts > 0 && n_purged > 0,
        "seed {seed} exercised too little"
    );
    let report = store.verify().unwrap();
    assert!(report.is_ok(), "{:?}", report.problems);
    assert_eq!(report.n_instances, model.instances.len() as u64);
    assert_eq!(
        report.n_records,
        model.history.values().map(|h| h.len() as u64).sum::<u64>()
    );
}

fn replay(records: &[SealedRecord]) -> Instance {
    let opened: Vec<_> = records
        .iter()
        .map(|r| (r.open().unwrap(), r.hash))
        .collect();
    Instance::replay(opened.iter().map(|(r, h)| (r, *h)))
        .unwrap()
        .expect("at least genesis")
}

#[test]
fn random_batches_and_restarts_match_the_model() {
    for seed in 1..=4 {
        run(seed, 120);
    }
}
