//! The backend-agnostic conformance suite: the behaviour every [`Store`] backend must show.
//!
//! A backend's test binary implements [`Harness`] (how to get a fresh store and how to restart
//! one) and expands [`conformance_tests!`](crate::conformance_tests) to get one `#[test]` per
//! case, or calls [`run_all`]. The cases drive a real machine through
//! [`cnsm_core::engine::Machine`], so every committed record is a genuine, sealed, hash-chained
//! record, and every instance row is the fold of its records.
//!
//! ```no_run
//! use cnsm_store::conformance::Harness;
//! use cnsm_store::{Store, embedded::EmbeddedStore};
//!
//! struct Embedded { dirs: Vec<tempfile::TempDir> }
//! impl Harness for Embedded {
//!     fn open(&mut self) -> Box<dyn Store> {
//!         self.dirs.push(tempfile::tempdir().unwrap());
//!         Box::new(EmbeddedStore::open(self.dirs.last().unwrap().path()).unwrap())
//!     }
//!     fn reopen(&mut self, store: Box<dyn Store>) -> Box<dyn Store> {
//!         drop(store);
//!         Box::new(EmbeddedStore::open(self.dirs.last().unwrap().path()).unwrap())
//!     }
//!     fn tamper_record(&mut self, store: Box<dyn Store>, namespace: &str, id: &str,
//!                      version: u64, byte_index: usize) -> Box<dyn Store> {
//!         drop(store);
//!         let dir = self.dirs.last().unwrap().path();
//!         cnsm_store::embedded::testing::flip_record_byte(dir, namespace, id, version, byte_index)
//!             .unwrap();
//!         Box::new(EmbeddedStore::open_unverified(dir).unwrap())
//!     }
//! }
//! cnsm_store::conformance::run_all(&mut Embedded { dirs: Vec::new() });
//! ```
//!
//! This module is compiled into the library (it is test support, not product code) and uses
//! plain `assert!`s so that it needs no dev-only dependency.

use std::collections::BTreeMap;
use std::sync::Barrier;

use cnsm_core::engine::{ACTOR_TIMER, Input, Machine, NewInstance, Trigger, revision_hash};
use cnsm_core::record::{Hash32, StateChangeEvent, TimerKind, verify_chain};
use cnsm_core::resource::StateMachine;
use cnsm_core::{Instance, Status};
use serde_json::{Value, json};

use crate::{
    CommitItem, DefinitionRow, IdempotencyEntry, ImportItem, ImportReport, InstanceQuery,
    ItemOutcome, PutDefinition, Refreshed, Store, StoreError, StoredInstance, TimerRef,
};

/// How the suite gets stores from a backend.
pub trait Harness {
    /// A new, empty store.
    fn open(&mut self) -> Box<dyn Store>;
    /// Closes `store` (the one most recently returned by [`Harness::open`] or
    /// [`Harness::reopen`]) and opens the same data again, as a restart would.
    fn reopen(&mut self, store: Box<dyn Store>) -> Box<dyn Store>;
    /// Damages `store` below its checks, as a disk or an intruder would: flips every bit of
    /// byte `byte_index` of the stored bytes of record `version` of `namespace/id`, keeping its
    /// stored hash; returns the store to use afterwards (the same one, or reopened).
    fn tamper_record(
        &mut self,
        store: Box<dyn Store>,
        namespace: &str,
        id: &str,
        version: u64,
        byte_index: usize,
    ) -> Box<dyn Store>;
}

/// One conformance case.
pub type Case = fn(&mut dyn Harness);

/// Every case, by name, in the order [`run_all`] runs them.
pub const CASES: &[(&str, Case)] = &[
    (
        "definitions_put_unchanged_revisions_list",
        definitions_put_unchanged_revisions_list,
    ),
    (
        "delete_definition_refused_while_active",
        delete_definition_refused_while_active,
    ),
    (
        "create_conflicts_with_existing_instance",
        create_conflicts_with_existing_instance,
    ),
    (
        "stale_or_missing_expected_version_conflicts",
        stale_or_missing_expected_version_conflicts,
    ),
    (
        "chain_of_50_records_reads_back_exactly",
        chain_of_50_records_reads_back_exactly,
    ),
    ("history_pages", history_pages),
    (
        "same_expected_version_twice_in_one_batch",
        same_expected_version_twice_in_one_batch,
    ),
    (
        "one_batch_advances_an_instance_twice",
        one_batch_advances_an_instance_twice,
    ),
    (
        "threads_racing_on_one_version_have_one_winner",
        threads_racing_on_one_version_have_one_winner,
    ),
    (
        "threads_racing_to_create_have_one_winner",
        threads_racing_to_create_have_one_winner,
    ),
    (
        "refresh_answers_stale_copies_with_rows",
        refresh_answers_stale_copies_with_rows,
    ),
    ("batch_of_100_instances", batch_of_100_instances),
    (
        "inconsistent_item_refuses_the_whole_batch",
        inconsistent_item_refuses_the_whole_batch,
    ),
    (
        "idempotency_keys_expire_and_purge",
        idempotency_keys_expire_and_purge,
    ),
    (
        "retention_purges_only_old_finished_instances",
        retention_purges_only_old_finished_instances,
    ),
    (
        "rollouts_are_stored_per_machine",
        rollouts_are_stored_per_machine,
    ),
    (
        "delivery_cursors_are_leased_and_fenced",
        delivery_cursors_are_leased_and_fenced,
    ),
    (
        "dead_letters_are_kept_in_order",
        dead_letters_are_kept_in_order,
    ),
    (
        "dead_letters_are_marked_for_redrive",
        dead_letters_are_marked_for_redrive,
    ),
    (
        "timers_follow_each_instance_current_timer",
        timers_follow_each_instance_current_timer,
    ),
    ("reopen_keeps_everything", reopen_keeps_everything),
    (
        "list_instances_filters_and_pages",
        list_instances_filters_and_pages,
    ),
    ("instance_by_uid", instance_by_uid),
    (
        "verify_is_clean_on_a_good_store",
        verify_is_clean_on_a_good_store,
    ),
    (
        "import_restores_instances_history_timers_and_keys",
        import_restores_instances_history_timers_and_keys,
    ),
    (
        "import_refuses_existing_unless_replace",
        import_refuses_existing_unless_replace,
    ),
    (
        "import_refuses_bad_input_and_writes_nothing",
        import_refuses_bad_input_and_writes_nothing,
    ),
    (
        "import_stream_refused_midway_writes_nothing",
        import_stream_refused_midway_writes_nothing,
    ),
    (
        "erase_redacts_history_and_verify_stays_green",
        erase_redacts_history_and_verify_stays_green,
    ),
    (
        "erase_with_a_stale_version_conflicts_and_changes_nothing",
        erase_with_a_stale_version_conflicts_and_changes_nothing,
    ),
    (
        "tampered_redacted_record_fails_verify",
        tampered_redacted_record_fails_verify,
    ),
];

/// Runs every case against the harness.
pub fn run_all(harness: &mut dyn Harness) {
    for (_, case) in CASES {
        case(harness);
    }
}

/// Expands to one `#[test]` per conformance case (plus one that checks the list is complete),
/// each running against a harness made by `$harness`.
///
/// ```no_run
/// use cnsm_store::{Store, conformance::Harness, embedded::EmbeddedStore};
///
/// #[derive(Default)]
/// struct Embedded { dirs: Vec<tempfile::TempDir> }
///
/// impl Harness for Embedded {
///     fn open(&mut self) -> Box<dyn Store> {
///         self.dirs.push(tempfile::tempdir().unwrap());
///         Box::new(EmbeddedStore::open(self.dirs.last().unwrap().path()).unwrap())
///     }
///     fn reopen(&mut self, store: Box<dyn Store>) -> Box<dyn Store> {
///         drop(store);
///         Box::new(EmbeddedStore::open(self.dirs.last().unwrap().path()).unwrap())
///     }
///     fn tamper_record(&mut self, store: Box<dyn Store>, namespace: &str, id: &str,
///                      version: u64, byte_index: usize) -> Box<dyn Store> {
///         drop(store);
///         let dir = self.dirs.last().unwrap().path();
///         cnsm_store::embedded::testing::flip_record_byte(dir, namespace, id, version, byte_index)
///             .unwrap();
///         Box::new(EmbeddedStore::open_unverified(dir).unwrap())
///     }
/// }
///
/// mod conformance {
///     cnsm_store::conformance_tests!(super::Embedded::default());
/// }
/// # fn main() {}
/// ```
#[macro_export]
macro_rules! conformance_tests {
    ($harness:expr) => {
        $crate::conformance_tests!(@cases ($harness)
            definitions_put_unchanged_revisions_list,
            delete_definition_refused_while_active,
            create_conflicts_with_existing_instance,
            stale_or_missing_expected_version_conflicts,
            chain_of_50_records_reads_back_exactly,
            history_pages,
            same_expected_version_twice_in_one_batch,
            one_batch_advances_an_instance_twice,
            threads_racing_on_one_version_have_one_winner,
            threads_racing_to_create_have_one_winner,
            refresh_answers_stale_copies_with_rows,
            batch_of_100_instances,
            inconsistent_item_refuses_the_whole_batch,
            idempotency_keys_expire_and_purge,
            retention_purges_only_old_finished_instances,
            rollouts_are_stored_per_machine,
            delivery_cursors_are_leased_and_fenced,
            dead_letters_are_kept_in_order,
            dead_letters_are_marked_for_redrive,
            timers_follow_each_instance_current_timer,
            reopen_keeps_everything,
            list_instances_filters_and_pages,
            instance_by_uid,
            verify_is_clean_on_a_good_store,
            import_restores_instances_history_timers_and_keys,
            import_refuses_existing_unless_replace,
            import_refuses_bad_input_and_writes_nothing,
            import_stream_refused_midway_writes_nothing,
            erase_redacts_history_and_verify_stays_green,
            erase_with_a_stale_version_conflicts_and_changes_nothing,
            tampered_redacted_record_fails_verify,
        );
    };
    (@cases ($harness:expr) $($case:ident,)*) => {
        $(
            #[test]
            fn $case() {
                let mut harness = $harness;
                $crate::conformance::$case(&mut harness);
            }
        )*

        #[test]
        fn every_conformance_case_is_listed() {
            let listed: Vec<&str> = vec![$(stringify!($case)),*];
            let all: Vec<&str> = $crate::conformance::CASES.iter().map(|(name, _)| *name).collect();
            assert_eq!(listed, all);
        }
    };
}

/// The time the cases start at (ms since the epoch).
pub const T0_MS: u64 = 1_700_000_000_000;

const ACTOR: &str = "test:conformance";

/// The definition the cases run: a queued job that starts, runs and finishes, with timeouts.
///
/// - `queued` (task, 60 s, times out to `expired`): `start` → `running`; `ping` re-enters
///   `queued` (a new entry, a new timer) and copies the payload's `note` into the data.
/// - `running` (task, 30 s): `complete` → `done`; `cancel` → `cancelled`.
/// - `done`, `expired` (failed) and `cancelled` (cancelled) are final.
pub fn job_definition(namespace: &str, name: &str) -> StateMachine {
    let value = json!({
        "apiVersion": "statemachine.cn/v1alpha1",
        "kind": "StateMachine",
        "metadata": {"name": name, "namespace": namespace, "labels": {"team": "conformance"}},
        "spec": {
            "initialState": "queued",
            "states": [
                {"name": "queued", "type": "task", "timeoutSeconds": 60, "onTimeout": "expired",
                 "onEvent": [
                     {"event": "start", "target": "running"},
                     {"event": "ping", "target": "queued", "assign": {"note": "event.note"}}
                 ]},
                {"name": "running", "type": "task", "timeoutSeconds": 30, "transition": "done",
                 "onEvent": [{"event": "cancel", "target": "cancelled"}]},
                {"name": "done", "type": "final"},
                {"name": "expired", "type": "final", "outcome": "failed"},
                {"name": "cancelled", "type": "final", "outcome": "cancelled"}
            ]
        }
    });
    serde_json::from_value(value).expect("the job definition deserializes")
}

/// [`job_definition`] at revision 1 as an import's definition row (what a snapshot of the
/// [`Driver`]'s instances pins), created at `created_ms`.
pub fn job_definition_row(namespace: &str, name: &str, created_ms: u64) -> DefinitionRow {
    let definition = job_definition(namespace, name);
    DefinitionRow {
        namespace: namespace.into(),
        name: name.into(),
        revision: 1,
        hash: revision_hash(&definition),
        definition,
        created_ms,
    }
}

/// Drives instances of one machine and packages each transition as a [`CommitItem`].
pub struct Driver {
    machine: Machine,
}

impl std::fmt::Debug for Driver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Driver")
            .field("machine", &self.machine)
            .finish()
    }
}

impl Driver {
    /// A driver for [`job_definition`] named `name` (in any namespace: the record carries the
    /// instance's namespace), at revision 1.
    pub fn new(name: &str) -> Driver {
        let machine =
            Machine::compile(job_definition("default", name)).expect("the job definition compiles");
        Driver {
            machine: machine.with_revision(1),
        }
    }

    /// The genesis item of a new instance (`data: {"note": "new"}`).
    pub fn create(
        &self,
        namespace: &str,
        id: &str,
        labels: &[(&str, &str)],
        now_ms: u64,
    ) -> CommitItem {
        let mut data = serde_json::Map::new();
        data.insert("note".into(), Value::from("new"));
        let record = self
            .machine
            .create(NewInstance {
                namespace,
                id,
                data,
                labels: labels
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                    .collect(),
                now_ms,
                actor: ACTOR,
            })
            .expect("creation succeeds");
        item(None, &record)
    }

    /// The item for `event` applied to `instance` (`ping` carries `{"note": note}`).
    pub fn event(&self, instance: &Instance, event: &str, note: &str, now_ms: u64) -> CommitItem {
        self.event_with_key(instance, event, note, now_ms, None)
    }

    /// Like [`Driver::event`], with an idempotency key recorded in the record.
    pub fn event_with_key(
        &self,
        instance: &Instance,
        event: &str,
        note: &str,
        now_ms: u64,
        key: Option<&str>,
    ) -> CommitItem {
        let payload = json!({"note": note});
        let mut input = Input::new(
            Trigger::Event {
                name: event,
                payload: &payload,
            },
            now_ms,
            ACTOR,
        );
        input.idempotency_key = key;
        let record = self
            .machine
            .apply(instance, &input)
            .expect("the event applies");
        item(Some(instance), &record)
    }

    /// The item for the instance's current timer firing at `now_ms`.
    pub fn fire(&self, instance: &Instance, now_ms: u64) -> CommitItem {
        let timer = instance.timer.expect("the instance has a timer");
        let input = Input::new(Trigger::Timer(timer), now_ms, ACTOR_TIMER);
        let record = self
            .machine
            .fire(instance, &input)
            .expect("the timer fires")
            .expect("the timer is current");
        item(Some(instance), &record)
    }
}

/// Seals `record` and pairs it with the instance after it.
fn item(before: Option<&Instance>, record: &StateChangeEvent) -> CommitItem {
    let sealed = record.seal();
    let instance = match before {
        None => Instance::from_genesis(record, sealed.hash).expect("a genesis record"),
        Some(before) => {
            let mut after = before.clone();
            after
                .apply_record(record, sealed.hash)
                .expect("the record follows the instance");
            after
        }
    };
    CommitItem {
        expected_version: before.map(|i| i.version),
        instance,
        record: sealed,
        idempotency: None,
    }
}

fn commit_one(store: &dyn Store, item: &CommitItem) -> u64 {
    let outcomes = store
        .commit(std::slice::from_ref(item))
        .expect("the commit succeeds");
    match outcomes.as_slice() {
        [ItemOutcome::Committed { uid }] => *uid,
        other => panic!("expected one committed item, got {other:?}"),
    }
}

fn stored(store: &dyn Store, namespace: &str, id: &str) -> StoredInstance {
    store
        .instance(namespace, id)
        .expect("the read succeeds")
        .unwrap_or_else(|| panic!("{namespace}/{id} exists"))
}

fn timers(store: &dyn Store) -> Vec<TimerRef> {
    let mut found = Vec::new();
    store
        .pending_timers(&mut |timer| found.push(timer))
        .expect("timers read");
    found.sort();
    found
}

fn expected_timer(uid: u64, instance: &Instance) -> TimerRef {
    let timer = instance.timer.expect("the instance has a timer");
    TimerRef {
        due_ms: timer.due_ms,
        uid,
        entry_seq: timer.entry_seq,
        kind: timer.kind,
    }
}

/// put_definition creates revision 1, leaves identical content alone, numbers changes; get by
/// revision and list return what was put.
pub fn definitions_put_unchanged_revisions_list(harness: &mut dyn Harness) {
    let store = harness.open();
    assert!(store.list_definitions(None).unwrap().is_empty());
    assert!(store.definition("default", "job", None).unwrap().is_none());

    let first = job_definition("default", "job");
    let first_hash = revision_hash(&first);
    assert_eq!(
        store.put_definition(&first, first_hash, T0_MS).unwrap(),
        PutDefinition::Created(1)
    );
    assert_eq!(
        store.put_definition(&first, first_hash, T0_MS + 1).unwrap(),
        PutDefinition::Unchanged(1)
    );

    let mut second = first.clone();
    second.spec.states[0].timeout_seconds = Some(61);
    let second_hash = revision_hash(&second);
    assert_ne!(first_hash, second_hash);
    assert_eq!(
        store
            .put_definition(&second, second_hash, T0_MS + 2)
            .unwrap(),
        PutDefinition::Created(2)
    );

    let latest = store
        .definition("default", "job", None)
        .unwrap()
        .expect("latest revision");
    assert_eq!(
        (
            latest.namespace.as_str(),
            latest.name.as_str(),
            latest.revision
        ),
        ("default", "job", 2)
    );
    assert_eq!(latest.hash, second_hash);
    assert_eq!(latest.definition, second);
    assert_eq!(latest.created_ms, T0_MS + 2);
    let one = store
        .definition("default", "job", Some(1))
        .unwrap()
        .expect("revision 1");
    assert_eq!(
        (one.revision, one.hash, one.created_ms),
        (1, first_hash, T0_MS)
    );
    assert_eq!(one.definition, first);
    assert!(
        store
            .definition("default", "job", Some(3))
            .unwrap()
            .is_none()
    );
    assert!(store.definition("other", "job", None).unwrap().is_none());

    // Going back to earlier content is a change too.
    assert_eq!(
        store.put_definition(&first, first_hash, T0_MS + 3).unwrap(),
        PutDefinition::Created(3)
    );

    let elsewhere = job_definition("other", "job");
    let alpha = job_definition("default", "alpha");
    store
        .put_definition(&elsewhere, revision_hash(&elsewhere), T0_MS)
        .unwrap();
    store
        .put_definition(&alpha, revision_hash(&alpha), T0_MS)
        .unwrap();
    let all: Vec<(String, String, u32)> = store
        .list_definitions(None)
        .unwrap()
        .into_iter()
        .map(|row| (row.namespace, row.name, row.revision))
        .collect();
    let want = [
        ("default", "alpha", 1),
        ("default", "job", 3),
        ("other", "job", 1),
    ];
    let want: Vec<(String, String, u32)> = want
        .iter()
        .map(|(n, m, r)| ((*n).into(), (*m).into(), *r))
        .collect();
    assert_eq!(
        all, want,
        "latest revision of each definition, ordered by (namespace, name)"
    );
    let other = store.list_definitions(Some("other")).unwrap();
    assert_eq!(other.len(), 1);
    assert_eq!(other[0].definition, elsewhere);
    assert!(store.list_definitions(Some("nowhere")).unwrap().is_empty());
    assert!(!store.delete_definition("default", "missing").unwrap());
}

/// Deleting a definition is refused while an instance of it is active, then removes every
/// revision.
pub fn delete_definition_refused_while_active(harness: &mut dyn Harness) {
    let store = harness.open();
    let definition = job_definition("default", "job");
    store
        .put_definition(&definition, revision_hash(&definition), T0_MS)
        .unwrap();
    let mut changed = definition.clone();
    changed.spec.states[1].timeout_seconds = Some(31);
    store
        .put_definition(&changed, revision_hash(&changed), T0_MS)
        .unwrap();

    let driver = Driver::new("job");
    let create = driver.create("default", "j-1", &[], T0_MS);
    commit_one(&*store, &create);
    // An instance of a same-named machine in another namespace does not count.
    commit_one(&*store, &driver.create("elsewhere", "j-1", &[], T0_MS));

    match store.delete_definition("default", "job") {
        Err(StoreError::Refused(message)) => {
            assert!(
                message.contains('1'),
                "the refusal names the count: {message}"
            );
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert_eq!(
        store
            .definition("default", "job", None)
            .unwrap()
            .map(|d| d.revision),
        Some(2)
    );

    let started = driver.event(&create.instance, "start", "", T0_MS + 1);
    commit_one(&*store, &started);
    let finished = driver.event(&started.instance, "complete", "", T0_MS + 2);
    commit_one(&*store, &finished);
    assert_eq!(finished.instance.status, Status::Succeeded);

    assert!(store.delete_definition("default", "job").unwrap());
    assert!(store.definition("default", "job", None).unwrap().is_none());
    assert!(
        store
            .definition("default", "job", Some(1))
            .unwrap()
            .is_none()
    );
    assert!(store.list_definitions(Some("default")).unwrap().is_empty());
    assert!(!store.delete_definition("default", "job").unwrap());
    // The ended instance and its history stay.
    assert_eq!(stored(&*store, "default", "j-1").instance.version, 2);
    // A new definition of the name starts again at revision 1.
    assert_eq!(
        store
            .put_definition(&definition, revision_hash(&definition), T0_MS)
            .unwrap(),
        PutDefinition::Created(1)
    );
}

/// A create commits once; creating the same id again conflicts with the existing version,
/// also inside one batch.
pub fn create_conflicts_with_existing_instance(harness: &mut dyn Harness) {
    let store = harness.open();
    let driver = Driver::new("job");
    let create = driver.create("default", "j-1", &[("tier", "gold")], T0_MS);
    let uid = commit_one(&*store, &create);
    let row = stored(&*store, "default", "j-1");
    assert_eq!(row.uid, uid);
    assert_eq!(row.instance, create.instance);

    let again = driver.create("default", "j-1", &[], T0_MS + 5);
    assert_eq!(
        store.commit(std::slice::from_ref(&again)).unwrap(),
        vec![ItemOutcome::Conflict { actual: Some(0) }]
    );
    assert_eq!(
        stored(&*store, "default", "j-1").instance,
        create.instance,
        "the conflict wrote nothing"
    );
    assert_eq!(
        store.history("default", "j-1", 0, 0).unwrap(),
        vec![create.record.clone()]
    );

    let started = driver.event(&create.instance, "start", "", T0_MS + 1);
    commit_one(&*store, &started);
    assert_eq!(
        store.commit(std::slice::from_ref(&again)).unwrap(),
        vec![ItemOutcome::Conflict { actual: Some(1) }]
    );

    // Two creates of one id in one batch: the first wins.
    let first = driver.create("default", "j-2", &[], T0_MS);
    let second = driver.create("default", "j-2", &[("x", "y")], T0_MS + 9);
    let outcomes = store.commit(&[first.clone(), second]).unwrap();
    assert!(
        matches!(outcomes[0], ItemOutcome::Committed { .. }),
        "{outcomes:?}"
    );
    assert_eq!(outcomes[1], ItemOutcome::Conflict { actual: Some(0) });
    assert_eq!(stored(&*store, "default", "j-2").instance, first.instance);
}

/// An update whose expected version is behind, or whose instance does not exist, conflicts
/// and writes nothing of the item (not its idempotency key either).
pub fn stale_or_missing_expected_version_conflicts(harness: &mut dyn Harness) {
    let store = harness.open();
    let driver = Driver::new("job");
    let create = driver.create("default", "j-1", &[], T0_MS);
    commit_one(&*store, &create);
    let ping = driver.event(&create.instance, "ping", "one", T0_MS + 1);
    commit_one(&*store, &ping);

    let mut stale =
        driver.event_with_key(&create.instance, "start", "", T0_MS + 2, Some("k-stale"));
    stale.idempotency = Some(IdempotencyEntry {
        key: "k-stale".into(),
        request_hash: Hash32([7; 32]),
        version: 1,
        expires_ms: T0_MS + 1000,
    });
    assert_eq!(
        store.commit(std::slice::from_ref(&stale)).unwrap(),
        vec![ItemOutcome::Conflict { actual: Some(1) }]
    );
    assert_eq!(stored(&*store, "default", "j-1").instance, ping.instance);
    assert!(
        store
            .idempotency("default", "j-1", "k-stale")
            .unwrap()
            .is_none()
    );
    assert_eq!(store.history("default", "j-1", 0, 0).unwrap().len(), 2);

    // The same transition for an instance the store has never seen.
    let ghost_create = driver.create("default", "ghost", &[], T0_MS);
    let ghost = driver.event(&ghost_create.instance, "start", "", T0_MS + 1);
    assert_eq!(
        store.commit(std::slice::from_ref(&ghost)).unwrap(),
        vec![ItemOutcome::Conflict { actual: None }]
    );
    assert!(store.instance("default", "ghost").unwrap().is_none());
    assert!(store.history("default", "ghost", 0, 0).unwrap().is_empty());
}

fn commit_chain(store: &dyn Store, driver: &Driver, id: &str, n_records: u64) -> Vec<CommitItem> {
    let mut items = vec![driver.create("default", id, &[], T0_MS)];
    commit_one(store, &items[0]);
    for i in 1..n_records {
        let last = &items.last().expect("at least genesis").instance;
        let next = driver.event(last, "ping", &format!("ping {i}"), T0_MS + i * 1000);
        commit_one(store, &next);
        items.push(next);
    }
    items
}

/// Fifty records committed one by one read back in order, byte for byte, as a valid chain.
pub fn chain_of_50_records_reads_back_exactly(harness: &mut dyn Harness) {
    let store = harness.open();
    let driver = Driver::new("job");
    let items = commit_chain(&*store, &driver, "j-1", 50);
    let history = store.history("default", "j-1", 0, 0).unwrap();
    let committed: Vec<_> = items.iter().map(|item| item.record.clone()).collect();
    assert_eq!(history.len(), 50);
    assert_eq!(
        history, committed,
        "history is the committed records: versions, bytes and hashes"
    );
    let last_hash =
        verify_chain("default", "j-1", 0, Hash32::ZERO, &history).expect("the chain verifies");
    let row = stored(&*store, "default", "j-1");
    assert_eq!(row.instance.version, 49);
    assert_eq!(row.instance.last_hash, last_hash);
    assert_eq!(row.instance.data.get("note"), Some(&Value::from("ping 49")));
    assert_eq!(&row.instance, &items[49].instance);
}

/// history pages by `from_version` and `limit` (0 meaning the longest page).
pub fn history_pages(harness: &mut dyn Harness) {
    let store = harness.open();
    let driver = Driver::new("job");
    let items = commit_chain(&*store, &driver, "j-1", 20);
    let versions = |from, limit| -> Vec<u64> {
        store
            .history("default", "j-1", from, limit)
            .unwrap()
            .iter()
            .map(|r| r.version)
            .collect()
    };
    assert_eq!(versions(5, 10), (5..15).collect::<Vec<_>>());
    assert_eq!(versions(18, 10), vec![18, 19]);
    assert_eq!(versions(0, 0), (0..20).collect::<Vec<_>>());
    assert_eq!(versions(0, 1), vec![0]);
    assert!(versions(20, 10).is_empty());
    assert!(versions(u64::MAX, 10).is_empty());
    let page = store.history("default", "j-1", 7, 2).unwrap();
    assert_eq!(page, vec![items[7].record.clone(), items[8].record.clone()]);
    assert!(
        store
            .history("default", "nobody", 0, 10)
            .unwrap()
            .is_empty()
    );
    assert!(store.history("elsewhere", "j-1", 0, 10).unwrap().is_empty());
}

/// Two items computed from the same version of one instance, in one batch: the first
/// commits, the second conflicts.
pub fn same_expected_version_twice_in_one_batch(harness: &mut dyn Harness) {
    let store = harness.open();
    let driver = Driver::new("job");
    let create = driver.create("default", "j-1", &[], T0_MS);
    commit_one(&*store, &create);
    let ping = driver.event(&create.instance, "ping", "first", T0_MS + 1);
    let start = driver.event(&create.instance, "start", "", T0_MS + 1);
    let outcomes = store.commit(&[ping.clone(), start]).unwrap();
    assert!(
        matches!(outcomes[0], ItemOutcome::Committed { .. }),
        "{outcomes:?}"
    );
    assert_eq!(outcomes[1], ItemOutcome::Conflict { actual: Some(1) });
    assert_eq!(stored(&*store, "default", "j-1").instance, ping.instance);
    assert_eq!(store.history("default", "j-1", 0, 0).unwrap().len(), 2);
}

/// Later items of a batch see earlier ones: create, v0→v1 and v1→v2 of one instance in one
/// batch all commit.
pub fn one_batch_advances_an_instance_twice(harness: &mut dyn Harness) {
    let store = harness.open();
    let driver = Driver::new("job");
    let create = driver.create("default", "j-1", &[], T0_MS);
    let ping = driver.event(&create.instance, "ping", "one", T0_MS + 1);
    let start = driver.event(&ping.instance, "start", "", T0_MS + 2);
    let outcomes = store
        .commit(&[create.clone(), ping.clone(), start.clone()])
        .unwrap();
    let uid = match outcomes[0] {
        ItemOutcome::Committed { uid } => uid,
        other => panic!("create: {other:?}"),
    };
    assert_eq!(outcomes, vec![ItemOutcome::Committed { uid }; 3]);
    let row = stored(&*store, "default", "j-1");
    assert_eq!((row.uid, &row.instance), (uid, &start.instance));
    let history = store.history("default", "j-1", 0, 0).unwrap();
    assert_eq!(history, vec![create.record, ping.record, start.record]);
}

/// Two threads commit different transitions from the same version of one instance at once:
/// in every round exactly one wins, and the loser learns the winner's version.
pub fn threads_racing_on_one_version_have_one_winner(harness: &mut dyn Harness) {
    let store = harness.open();
    let store: &dyn Store = &*store;
    let driver = Driver::new("job");
    let create = driver.create("default", "j-1", &[], T0_MS);
    commit_one(store, &create);
    let mut current = create.instance;
    for round in 0..20u64 {
        let left = driver.event(
            &current,
            "ping",
            &format!("left {round}"),
            T0_MS + round + 1,
        );
        let right = driver.event(
            &current,
            "ping",
            &format!("right {round}"),
            T0_MS + round + 1,
        );
        let barrier = Barrier::new(2);
        let run = |item: &CommitItem| {
            barrier.wait();
            store
                .commit(std::slice::from_ref(item))
                .expect("the commit succeeds")[0]
        };
        let (a, b) = std::thread::scope(|scope| {
            let a = scope.spawn(|| run(&left));
            let b = scope.spawn(|| run(&right));
            (a.join().expect("thread a"), b.join().expect("thread b"))
        });
        let winner = match (a, b) {
            (ItemOutcome::Committed { .. }, ItemOutcome::Conflict { actual }) => {
                assert_eq!(actual, Some(current.version + 1));
                left
            }
            (ItemOutcome::Conflict { actual }, ItemOutcome::Committed { .. }) => {
                assert_eq!(actual, Some(current.version + 1));
                right
            }
            other => panic!("round {round}: expected exactly one winner, got {other:?}"),
        };
        assert_eq!(stored(store, "default", "j-1").instance, winner.instance);
        current = winner.instance;
    }
    assert_eq!(store.history("default", "j-1", 0, 0).unwrap().len(), 21);
}

/// Two threads commit, at the same moment, a batch that creates the same instance and
/// advances it: one batch commits whole, the other gets a conflict for both items (the
/// instance exists, with the winner's records) and writes nothing.
pub fn threads_racing_to_create_have_one_winner(harness: &mut dyn Harness) {
    let store = harness.open();
    let store: &dyn Store = &*store;
    let driver = Driver::new("job");
    for round in 0..10u64 {
        let id = format!("r-{round}");
        let batch = |side: &str| {
            let create = driver.create("default", &id, &[("side", side)], T0_MS + round);
            let ping = driver.event(&create.instance, "ping", side, T0_MS + round + 1);
            vec![create, ping]
        };
        let (left, right) = (batch("left"), batch("right"));
        let barrier = Barrier::new(2);
        let run = |items: &[CommitItem]| {
            barrier.wait();
            store.commit(items).expect("the commit succeeds")
        };
        let (a, b) = std::thread::scope(|scope| {
            let a = scope.spawn(|| run(&left));
            let b = scope.spawn(|| run(&right));
            (a.join().expect("thread a"), b.join().expect("thread b"))
        });
        // The loser's items each see the winner's instance: at version 1, or at 0 when the
        // store commits item by item and the winner's second item was not in yet.
        let lost = |o: &[ItemOutcome]| {
            o.iter().all(|o| {
                matches!(
                    o,
                    ItemOutcome::Conflict {
                        actual: Some(0 | 1)
                    }
                )
            })
        };
        let committed =
            |o: &[ItemOutcome]| o.iter().all(|o| matches!(o, ItemOutcome::Committed { .. }));
        let winner = if committed(&a) && lost(&b) {
            &left
        } else if committed(&b) && lost(&a) {
            &right
        } else {
            panic!("round {round}: expected exactly one winner, got {a:?} and {b:?}");
        };
        assert_eq!(stored(store, "default", &id).instance, winner[1].instance);
        let history = store.history("default", &id, 0, 0).unwrap();
        assert_eq!(
            history,
            vec![winner[0].record.clone(), winner[1].record.clone()]
        );
    }
}

/// `refresh_instances`: a copy at the stored uid and version may be answered `Unchanged` (or
/// with the same row); a stale copy, or none, gets the stored row; a missing instance is left
/// out.
pub fn refresh_answers_stale_copies_with_rows(harness: &mut dyn Harness) {
    let store = harness.open();
    let driver = Driver::new("job");
    let a = driver.create("default", "a", &[], T0_MS);
    let b = driver.create("default", "b", &[], T0_MS);
    let c = driver.create("default", "c", &[], T0_MS);
    let (uid_a, uid_b) = (commit_one(&*store, &a), commit_one(&*store, &b));
    commit_one(&*store, &c);
    let b1 = driver.event(&b.instance, "ping", "", T0_MS + 1);
    commit_one(&*store, &b1);
    let answers = store
        .refresh_instances(&[
            ("default", "a", Some((uid_a, 0))),
            ("default", "b", Some((uid_b, 0))),
            ("default", "c", None),
            ("default", "missing", Some((uid_a, 0))),
        ])
        .unwrap();
    assert_eq!(answers.len(), 3, "{answers:?}");
    let answer = |id: &str| {
        answers
            .iter()
            .find(|r| match r {
                Refreshed::Unchanged { id: i, .. } => i == id,
                Refreshed::Changed(s) => &*s.instance.id == id,
            })
            .unwrap_or_else(|| panic!("no answer for {id}: {answers:?}"))
            .clone()
    };
    match answer("a") {
        Refreshed::Unchanged { namespace, .. } => assert_eq!(namespace, "default"),
        Refreshed::Changed(stored) => assert_eq!(
            *stored,
            StoredInstance {
                uid: uid_a,
                instance: a.instance.clone()
            }
        ),
    }
    assert_eq!(
        answer("b"),
        Refreshed::Changed(Box::new(StoredInstance {
            uid: uid_b,
            instance: b1.instance.clone()
        }))
    );
    assert!(matches!(answer("c"), Refreshed::Changed(s) if s.instance == c.instance));
}

/// One batch creates 100 instances, the next advances all of them.
pub fn batch_of_100_instances(harness: &mut dyn Harness) {
    let store = harness.open();
    let driver = Driver::new("job");
    let creates: Vec<CommitItem> = (0..100)
        .map(|i| driver.create("default", &format!("j-{i:03}"), &[], T0_MS + i))
        .collect();
    let outcomes = store.commit(&creates).unwrap();
    let mut uids: Vec<u64> = outcomes
        .iter()
        .map(|o| match o {
            ItemOutcome::Committed { uid } => *uid,
            other => panic!("{other:?}"),
        })
        .collect();
    uids.sort_unstable();
    uids.dedup();
    assert_eq!(uids.len(), 100, "every instance has its own uid");

    let starts: Vec<CommitItem> = creates
        .iter()
        .enumerate()
        .map(|(i, c)| driver.event(&c.instance, "start", "", T0_MS + 1000 + i as u64))
        .collect();
    let outcomes = store.commit(&starts).unwrap();
    assert!(
        outcomes
            .iter()
            .all(|o| matches!(o, ItemOutcome::Committed { .. })),
        "{outcomes:?}"
    );
    let listed = store
        .list_instances(&InstanceQuery {
            namespace: Some("default".into()),
            ..Default::default()
        })
        .unwrap();
    assert_eq!(listed.len(), 100);
    for (row, start) in listed.iter().zip(&starts) {
        assert_eq!(row.instance, start.instance);
    }
    assert_eq!(timers(&*store).len(), 100);
}

/// A batch with an item whose parts disagree (instance and record versions) is refused as a
/// whole with `Corrupt`; its valid items do not commit either.
pub fn inconsistent_item_refuses_the_whole_batch(harness: &mut dyn Harness) {
    let store = harness.open();
    let driver = Driver::new("job");
    let good = driver.create("default", "good", &[], T0_MS);
    let create = driver.create("default", "bad", &[], T0_MS);
    commit_one(&*store, &create);
    let mut bad = driver.event(&create.instance, "start", "", T0_MS + 1);
    bad.instance.version += 1;
    match store.commit(&[good, bad.clone()]) {
        Err(StoreError::Corrupt(_)) => {}
        other => panic!("expected Corrupt, got {other:?}"),
    }
    assert!(
        store.instance("default", "good").unwrap().is_none(),
        "nothing of the batch committed"
    );

    let mut unsealed = driver.event(&create.instance, "start", "", T0_MS + 1);
    unsealed.record.bytes.push(0);
    assert!(matches!(
        store.commit(&[unsealed]),
        Err(StoreError::Corrupt(_))
    ));
    assert_eq!(stored(&*store, "default", "bad").instance, create.instance);
}

/// Idempotency keys commit with their transition, read back, and are purged once expired.
/// Retention deletes an instance that ended before the cut-off with its history and keys,
/// and nothing else: not active instances, not recently ended ones, not other machines.
///
/// A store may defer an instance whose records it has not finished checking yet (the embedded
/// store purges only below its verification watermark), so the case polls for a few seconds.
pub fn retention_purges_only_old_finished_instances(harness: &mut dyn Harness) {
    let store = harness.open();
    let driver = Driver::new("job");
    let other = Driver::new("other");
    // old: started, then cancelled at T0 + 2.
    let old = driver.create("default", "old", &[], T0_MS);
    commit_one(&*store, &old);
    let old_start = driver.event_with_key(&old.instance, "start", "", T0_MS + 1, Some("k-old"));
    commit_one(&*store, &old_start);
    let old_end = driver.event(&old_start.instance, "cancel", "", T0_MS + 2);
    commit_one(&*store, &old_end);
    // recent: cancelled a day later.
    let recent = driver.create("default", "recent", &[], T0_MS);
    commit_one(&*store, &recent);
    let recent_start = driver.event(&recent.instance, "start", "", T0_MS + 1);
    commit_one(&*store, &recent_start);
    let day_ms = 86_400_000;
    let recent_end = driver.event(&recent_start.instance, "cancel", "", T0_MS + day_ms);
    commit_one(&*store, &recent_end);
    // active, and an old finished instance of another machine.
    commit_one(&*store, &driver.create("default", "active", &[], T0_MS));
    let foreign = other.create("default", "foreign", &[], T0_MS);
    commit_one(&*store, &foreign);
    let foreign_start = other.event(&foreign.instance, "start", "", T0_MS + 1);
    commit_one(&*store, &foreign_start);
    commit_one(
        &*store,
        &other.event(&foreign_start.instance, "cancel", "", T0_MS + 2),
    );

    let cutoff = T0_MS + day_ms / 2;
    let mut purged = 0;
    for _ in 0..100 {
        purged += store.purge_finished("default", "job", cutoff, 100).unwrap();
        if purged > 0 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert_eq!(
        purged, 1,
        "exactly the old finished instance of this machine"
    );
    assert!(store.instance("default", "old").unwrap().is_none());
    assert!(store.history("default", "old", 0, 100).unwrap().is_empty());
    assert!(
        store
            .idempotency("default", "old", "k-old")
            .unwrap()
            .is_none()
    );
    for id in ["recent", "active", "foreign"] {
        assert!(store.instance("default", id).unwrap().is_some(), "{id}");
    }
    assert_eq!(store.history("default", "recent", 0, 100).unwrap().len(), 3);
    assert_eq!(
        store.purge_finished("default", "job", cutoff, 100).unwrap(),
        0
    );
    assert_eq!(
        store
            .purge_finished("elsewhere", "job", u64::MAX, 100)
            .unwrap(),
        0
    );
    let report = store.verify().unwrap();
    assert!(report.is_ok(), "{:?}", report.problems);
    assert_eq!(report.n_instances, 3);
    let store = harness.reopen(store);
    assert!(store.instance("default", "old").unwrap().is_none());
    assert!(store.verify().unwrap().is_ok());
}

/// A delivery cursor starts at 0, belongs to one node at a time (compare-and-set on the lease),
/// moves only for the node that holds the lease, passes to another node when the lease
/// expires, and survives a reopen.
pub fn delivery_cursors_are_leased_and_fenced(harness: &mut dyn Harness) {
    let store = harness.open();
    let target = "default/job/worker";
    let first = store
        .claim_delivery(target, "node-a", T0_MS, 1_000)
        .unwrap()
        .expect("a new target is free");
    assert_eq!(first.position, 0);
    assert_eq!(first.lease_node, "node-a");
    assert_eq!(first.lease_until_ms, T0_MS + 1_000);
    // Held: another node is refused, the holder renews.
    assert_eq!(
        store
            .claim_delivery(target, "node-b", T0_MS + 500, 1_000)
            .unwrap(),
        None
    );
    assert!(store.put_delivery_cursor(target, "node-a", 42).unwrap());
    assert!(!store.put_delivery_cursor(target, "node-b", 99).unwrap());
    let renewed = store
        .claim_delivery(target, "node-a", T0_MS + 600, 1_000)
        .unwrap()
        .unwrap();
    assert_eq!(
        (renewed.position, renewed.lease_until_ms),
        (42, T0_MS + 1_600)
    );
    // Expired: node-b takes over at the durable position, and node-a is fenced off.
    let taken = store
        .claim_delivery(target, "node-b", T0_MS + 1_600, 1_000)
        .unwrap()
        .expect("an expired lease is free");
    assert_eq!((taken.position, taken.lease_node.as_str()), (42, "node-b"));
    assert!(!store.put_delivery_cursor(target, "node-a", 50).unwrap());
    assert!(store.put_delivery_cursor(target, "node-b", 60).unwrap());
    // Targets are independent.
    let other = store
        .claim_delivery("default/job/audit", "node-a", T0_MS + 1_700, 1_000)
        .unwrap()
        .unwrap();
    assert_eq!(other.position, 0);
    assert!(store.claim_delivery("", "node-a", T0_MS, 1).is_err());
    let store = harness.reopen(store);
    let cursors = store.delivery_cursors().unwrap();
    let names: Vec<&str> = cursors.iter().map(|(t, _)| t.as_str()).collect();
    assert_eq!(names, ["default/job/audit", "default/job/worker"]);
    assert_eq!(cursors[1].1.position, 60);
    assert_eq!(cursors[1].1.lease_node, "node-b");
}

/// Dead letters are kept per (target, position), replaced by a later one for the same
/// position, listed in order per target or for all, paged, and survive a reopen.
pub fn dead_letters_are_kept_in_order(harness: &mut dyn Harness) {
    use crate::DeadLetter;
    let store = harness.open();
    let letter = |target: &str, position: u64, attempts: u32| DeadLetter {
        target: target.to_owned(),
        position,
        namespace: "default".into(),
        instance: format!("j-{position}"),
        version: position,
        event_id: format!("default/j-{position}/{position}"),
        attempts,
        last_error: "HTTP 503".into(),
        failed_ms: T0_MS + position,
        redrive: None,
    };
    assert!(store.dead_letters(None, None, 0).unwrap().is_empty());
    for (target, position) in [("ns/m/b", 7), ("ns/m/a", 9), ("ns/m/a", 3), ("ns/m/b", 1)] {
        store
            .put_dead_letter(&letter(target, position, 12))
            .unwrap();
    }
    store.put_dead_letter(&letter("ns/m/a", 9, 13)).unwrap();
    let store = harness.reopen(store);
    let all = store.dead_letters(None, None, 0).unwrap();
    let keys: Vec<(&str, u64)> = all
        .iter()
        .map(|d| (d.target.as_str(), d.position))
        .collect();
    assert_eq!(
        keys,
        [("ns/m/a", 3), ("ns/m/a", 9), ("ns/m/b", 1), ("ns/m/b", 7)]
    );
    assert_eq!(all[1], letter("ns/m/a", 9, 13));
    let only_b = store.dead_letters(Some("ns/m/b"), None, 0).unwrap();
    assert_eq!(only_b, [letter("ns/m/b", 1, 12), letter("ns/m/b", 7, 12)]);
    let page = store.dead_letters(None, Some(("ns/m/a", 9)), 1).unwrap();
    assert_eq!(page, [letter("ns/m/b", 1, 12)]);
    let page = store
        .dead_letters(Some("ns/m/a"), Some(("ns/m/a", 3)), 10)
        .unwrap();
    assert_eq!(page, [letter("ns/m/a", 9, 13)]);
    assert!(
        store
            .dead_letters(Some("ns/m/c"), None, 0)
            .unwrap()
            .is_empty()
    );
}

/// A redrive marks one dead letter or every one of a target (durably, with who asked and
/// when), the marked ones are listed per target in position order, a letter written again
/// (failed again) loses its mark, a deleted one (delivered) is gone, and nothing else changes.
pub fn dead_letters_are_marked_for_redrive(harness: &mut dyn Harness) {
    use crate::{DeadLetter, Redrive};
    let store = harness.open();
    let letter = |target: &str, position: u64| DeadLetter {
        target: target.to_owned(),
        position,
        namespace: "default".into(),
        instance: format!("j-{position}"),
        version: 1,
        event_id: format!("default/j-{position}/1"),
        attempts: 3,
        last_error: "connection refused".into(),
        failed_ms: T0_MS,
        redrive: None,
    };
    let mark = |at: u64, actor: &str| Redrive {
        requested_ms: T0_MS + at,
        actor: actor.to_owned(),
    };
    for (target, position) in [("ns/m/a", 3), ("ns/m/a", 5), ("ns/m/a", 8), ("ns/m/b", 4)] {
        store.put_dead_letter(&letter(target, position)).unwrap();
    }
    assert!(
        store
            .redrive_requests("ns/m/a", None, 0)
            .unwrap()
            .is_empty()
    );
    // No letter at that position, or no letter of that target: nothing is marked.
    assert_eq!(
        store
            .redrive_dead_letters("ns/m/a", Some(4), &mark(1, "ops"))
            .unwrap(),
        0
    );
    assert_eq!(
        store
            .redrive_dead_letters("ns/m/c", None, &mark(1, "ops"))
            .unwrap(),
        0
    );
    assert!(
        store
            .redrive_dead_letters("", None, &mark(1, "ops"))
            .is_err()
    );
    assert_eq!(
        store
            .redrive_dead_letters("ns/m/a", Some(5), &mark(1, "alice"))
            .unwrap(),
        1
    );
    let store = harness.reopen(store);
    let marked = store.redrive_requests("ns/m/a", None, 0).unwrap();
    assert_eq!(
        marked,
        [DeadLetter {
            redrive: Some(mark(1, "alice")),
            ..letter("ns/m/a", 5)
        }]
    );
    assert!(
        store
            .redrive_requests("ns/m/b", None, 0)
            .unwrap()
            .is_empty()
    );
    // The listing shows the mark.
    let listed = store.dead_letters(Some("ns/m/a"), None, 0).unwrap();
    let marks: Vec<Option<&str>> = listed
        .iter()
        .map(|d| d.redrive.as_ref().map(|r| r.actor.as_str()))
        .collect();
    assert_eq!(marks, [None, Some("alice"), None]);
    // All of a target; other targets untouched.
    assert_eq!(
        store
            .redrive_dead_letters("ns/m/a", None, &mark(2, "bob"))
            .unwrap(),
        3
    );
    let positions =
        |letters: Vec<DeadLetter>| -> Vec<u64> { letters.iter().map(|d| d.position).collect() };
    assert_eq!(
        positions(store.redrive_requests("ns/m/a", None, 0).unwrap()),
        [3, 5, 8]
    );
    assert_eq!(
        positions(store.redrive_requests("ns/m/a", Some(3), 1).unwrap()),
        [5]
    );
    assert!(
        store
            .redrive_requests("ns/m/b", None, 0)
            .unwrap()
            .is_empty()
    );
    // Failed again: the letter is replaced without its mark. Delivered: deleted.
    store
        .put_dead_letter(&DeadLetter {
            attempts: 6,
            ..letter("ns/m/a", 3)
        })
        .unwrap();
    assert!(store.delete_dead_letter("ns/m/a", 5).unwrap());
    assert!(!store.delete_dead_letter("ns/m/a", 5).unwrap());
    let store = harness.reopen(store);
    assert_eq!(
        positions(store.redrive_requests("ns/m/a", None, 0).unwrap()),
        [8]
    );
    let all = store.dead_letters(None, None, 0).unwrap();
    let keys: Vec<(&str, u64, u32, bool)> = all
        .iter()
        .map(|d| {
            (
                d.target.as_str(),
                d.position,
                d.attempts,
                d.redrive.is_some(),
            )
        })
        .collect();
    assert_eq!(
        keys,
        [
            ("ns/m/a", 3, 6, false),
            ("ns/m/a", 8, 3, true),
            ("ns/m/b", 4, 3, false)
        ]
    );
}

/// A machine's rollout is stored, replaced, cleared, survives a reopen, and names only
/// revisions that exist; deleting the machine clears it.
pub fn rollouts_are_stored_per_machine(harness: &mut dyn Harness) {
    use cnsm_core::rollout::Rollout;
    let store = harness.open();
    let v1 = job_definition("default", "job");
    store
        .put_definition(&v1, revision_hash(&v1), T0_MS)
        .unwrap();
    let mut v2 = job_definition("default", "job");
    v2.metadata.labels.insert("v".into(), "2".into());
    store
        .put_definition(&v2, revision_hash(&v2), T0_MS)
        .unwrap();
    assert_eq!(store.rollout("default", "job").unwrap(), None);
    let canary = Rollout {
        stable: 1,
        canary: 2,
        weight: 10,
        flag: None,
    };
    store.put_rollout("default", "job", Some(&canary)).unwrap();
    assert_eq!(
        store.rollout("default", "job").unwrap(),
        Some(canary.clone())
    );
    assert_eq!(store.rollout("other", "job").unwrap(), None);
    let missing = Rollout {
        canary: 9,
        ..canary.clone()
    };
    assert!(matches!(
        store.put_rollout("default", "job", Some(&missing)),
        Err(StoreError::Refused(_))
    ));
    assert_eq!(
        store.rollout("default", "job").unwrap(),
        Some(canary.clone())
    );
    let store = harness.reopen(store);
    assert_eq!(
        store.rollout("default", "job").unwrap(),
        Some(canary.clone())
    );
    let promoted = Rollout {
        weight: 100,
        ..canary.clone()
    };
    store
        .put_rollout("default", "job", Some(&promoted))
        .unwrap();
    assert_eq!(store.rollout("default", "job").unwrap(), Some(promoted));
    // A rollout that routes by a flag keeps the flag's key, across a reopen.
    let by_flag = Rollout {
        stable: 2,
        canary: 2,
        weight: 0,
        flag: Some("job-revision".into()),
    };
    store.put_rollout("default", "job", Some(&by_flag)).unwrap();
    let store = harness.reopen(store);
    assert_eq!(store.rollout("default", "job").unwrap(), Some(by_flag));
    store.put_rollout("default", "job", None).unwrap();
    assert_eq!(store.rollout("default", "job").unwrap(), None);
    store.put_rollout("default", "job", Some(&canary)).unwrap();
    assert!(store.delete_definition("default", "job").unwrap());
    assert_eq!(store.rollout("default", "job").unwrap(), None);
}

pub fn idempotency_keys_expire_and_purge(harness: &mut dyn Harness) {
    let store = harness.open();
    let driver = Driver::new("job");
    let create = driver.create("default", "j-1", &[], T0_MS);
    commit_one(&*store, &create);

    let mut ping = driver.event_with_key(&create.instance, "ping", "a", T0_MS + 1, Some("k-1"));
    let short = IdempotencyEntry {
        key: "k-1".into(),
        request_hash: Hash32([1; 32]),
        version: 1,
        expires_ms: T0_MS + 1000,
    };
    ping.idempotency = Some(short.clone());
    commit_one(&*store, &ping);
    let mut start = driver.event_with_key(&ping.instance, "start", "", T0_MS + 2, Some("k-2"));
    let long = IdempotencyEntry {
        key: "k-2".into(),
        request_hash: Hash32([2; 32]),
        version: 2,
        expires_ms: T0_MS + 5000,
    };
    start.idempotency = Some(long.clone());
    commit_one(&*store, &start);

    assert_eq!(
        store.idempotency("default", "j-1", "k-1").unwrap(),
        Some(short.clone())
    );
    assert_eq!(
        store.idempotency("default", "j-1", "k-2").unwrap(),
        Some(long.clone())
    );
    assert!(
        store
            .idempotency("default", "j-1", "k-3")
            .unwrap()
            .is_none()
    );
    assert!(
        store
            .idempotency("default", "other", "k-1")
            .unwrap()
            .is_none()
    );

    assert_eq!(store.purge_idempotency(T0_MS).unwrap(), 0);
    assert_eq!(store.purge_idempotency(T0_MS + 999).unwrap(), 0);
    assert_eq!(
        store.idempotency("default", "j-1", "k-1").unwrap(),
        Some(short)
    );
    // Expired at `expires_ms` itself.
    assert_eq!(store.purge_idempotency(T0_MS + 1000).unwrap(), 1);
    assert!(
        store
            .idempotency("default", "j-1", "k-1")
            .unwrap()
            .is_none()
    );
    assert_eq!(
        store.idempotency("default", "j-1", "k-2").unwrap(),
        Some(long)
    );
    assert_eq!(store.purge_idempotency(T0_MS + 1000).unwrap(), 0);
    assert_eq!(store.purge_idempotency(u64::MAX).unwrap(), 1);
    assert!(
        store
            .idempotency("default", "j-1", "k-2")
            .unwrap()
            .is_none()
    );
    // Purging forgets keys, never transitions.
    assert_eq!(stored(&*store, "default", "j-1").instance, start.instance);
}

/// pending_timers holds exactly each active instance's current timer: replaced when the
/// timer changes, gone when the instance ends.
pub fn timers_follow_each_instance_current_timer(harness: &mut dyn Harness) {
    let store = harness.open();
    let driver = Driver::new("job");
    assert!(timers(&*store).is_empty());
    let a = driver.create("default", "a", &[], T0_MS);
    let b = driver.create("default", "b", &[], T0_MS + 10);
    let c = driver.create("other", "c", &[], T0_MS + 20);
    let outcomes = store.commit(&[a.clone(), b.clone(), c.clone()]).unwrap();
    let uid = |i: usize| match outcomes[i] {
        ItemOutcome::Committed { uid } => uid,
        other => panic!("{other:?}"),
    };
    let (uid_a, uid_b, uid_c) = (uid(0), uid(1), uid(2));
    let mut want = vec![
        expected_timer(uid_a, &a.instance),
        expected_timer(uid_b, &b.instance),
        expected_timer(uid_c, &c.instance),
    ];
    want.sort();
    assert_eq!(timers(&*store), want);
    assert_eq!(want[0].kind, TimerKind::Timeout);
    assert_eq!(want[0].due_ms, T0_MS + 60_000);

    // Re-entering the state arms a new timer (new entry_seq, later due) instead of the old.
    let a2 = driver.event(&a.instance, "ping", "again", T0_MS + 5_000);
    // b starts running (a 30 s timer).
    let b2 = driver.event(&b.instance, "start", "", T0_MS + 6_000);
    store.commit(&[a2.clone(), b2.clone()]).unwrap();
    let mut want = vec![
        expected_timer(uid_a, &a2.instance),
        expected_timer(uid_b, &b2.instance),
        expected_timer(uid_c, &c.instance),
    ];
    want.sort();
    assert_eq!(timers(&*store), want);
    assert_eq!(
        expected_timer(uid_a, &a2.instance).entry_seq,
        a.instance.entry_seq + 1
    );

    // b completes, c's timeout fires (it expires): both end and lose their timers.
    let b3 = driver.event(&b2.instance, "complete", "", T0_MS + 7_000);
    let c2 = driver.fire(&c.instance, T0_MS + 80_020);
    assert_eq!(&*c2.instance.state, "expired");
    assert_eq!(c2.instance.status, Status::Failed);
    store.commit(&[b3, c2]).unwrap();
    assert_eq!(timers(&*store), vec![expected_timer(uid_a, &a2.instance)]);

    let a3 = driver.event(&a2.instance, "start", "", T0_MS + 8_000);
    let a4 = driver.event(&a3.instance, "cancel", "", T0_MS + 9_000);
    store.commit(&[a3, a4]).unwrap();
    assert!(timers(&*store).is_empty());
}

/// A restart keeps definitions, instances, history, timers and idempotency keys, and the
/// store goes on allocating fresh uids.
pub fn reopen_keeps_everything(harness: &mut dyn Harness) {
    let store = harness.open();
    let driver = Driver::new("job");
    let definition = job_definition("default", "job");
    store
        .put_definition(&definition, revision_hash(&definition), T0_MS)
        .unwrap();
    let items = commit_chain(&*store, &driver, "j-1", 5);
    let other = driver.create("default", "j-2", &[("tier", "gold")], T0_MS);
    let other_uid = commit_one(&*store, &other);
    let mut keyed = driver.event_with_key(&other.instance, "start", "", T0_MS + 1, Some("k"));
    let entry = IdempotencyEntry {
        key: "k".into(),
        request_hash: Hash32([9; 32]),
        version: 1,
        expires_ms: T0_MS + 10_000,
    };
    keyed.idempotency = Some(entry.clone());
    commit_one(&*store, &keyed);

    let before_instances = store.list_instances(&InstanceQuery::default()).unwrap();
    let before_history = store.history("default", "j-1", 0, 0).unwrap();
    let before_timers = timers(&*store);
    let before_definitions = store.list_definitions(None).unwrap();
    assert_eq!(before_timers.len(), 2);

    let store = harness.reopen(store);
    assert_eq!(
        store.list_instances(&InstanceQuery::default()).unwrap(),
        before_instances
    );
    assert_eq!(
        store.history("default", "j-1", 0, 0).unwrap(),
        before_history
    );
    assert_eq!(before_history.last(), Some(&items[4].record));
    assert_eq!(timers(&*store), before_timers);
    assert_eq!(store.list_definitions(None).unwrap(), before_definitions);
    assert_eq!(
        store.idempotency("default", "j-2", "k").unwrap(),
        Some(entry)
    );
    assert_eq!(
        store
            .instance_by_uid(other_uid)
            .unwrap()
            .map(|s| s.instance),
        Some(keyed.instance.clone())
    );
    assert_eq!(
        store
            .put_definition(&definition, revision_hash(&definition), T0_MS)
            .unwrap(),
        PutDefinition::Unchanged(1)
    );

    // Work goes on after the restart.
    let next = driver.event(&items[4].instance, "start", "", T0_MS + 100_000);
    commit_one(&*store, &next);
    let fresh_uid = commit_one(&*store, &driver.create("default", "j-3", &[], T0_MS));
    assert!(
        before_instances.iter().all(|s| s.uid != fresh_uid),
        "uids are never reused"
    );
    assert!(store.verify().unwrap().is_ok());

    let store = harness.reopen(store);
    assert_eq!(stored(&*store, "default", "j-1").instance, next.instance);
    assert_eq!(
        store
            .list_instances(&InstanceQuery::default())
            .unwrap()
            .len(),
        3
    );
}

/// list_instances filters by namespace, machine, state, status and labels, orders by
/// (namespace, id) and pages with `after` and `limit`.
pub fn list_instances_filters_and_pages(harness: &mut dyn Harness) {
    let store = harness.open();
    let job = Driver::new("job");
    let report = Driver::new("report");
    let mut items = Vec::new();
    for (namespace, id, driver, tier) in [
        ("b", "j-1", &job, "gold"),
        ("a", "j-3", &job, "silver"),
        ("a", "j-1", &job, "gold"),
        ("a", "r-1", &report, "gold"),
        ("a", "j-2", &job, "silver"),
        ("c", "j-1", &report, "gold"),
    ] {
        items.push(driver.create(namespace, id, &[("tier", tier), ("app", "shop")], T0_MS));
    }
    store.commit(&items).unwrap();
    // a/j-2 runs; a/j-3 runs and completes.
    let j2 = job.event(&items[4].instance, "start", "", T0_MS + 1);
    let j3 = job.event(&items[1].instance, "start", "", T0_MS + 1);
    let j3_done = job.event(&j3.instance, "complete", "", T0_MS + 2);
    store.commit(&[j2, j3, j3_done]).unwrap();

    let ids = |query: InstanceQuery| -> Vec<String> {
        store
            .list_instances(&query)
            .unwrap()
            .into_iter()
            .map(|s| format!("{}/{}", s.instance.namespace, s.instance.id))
            .collect()
    };
    let q = |namespace: Option<&str>| InstanceQuery {
        namespace: namespace.map(str::to_owned),
        ..Default::default()
    };
    assert_eq!(
        ids(q(None)),
        ["a/j-1", "a/j-2", "a/j-3", "a/r-1", "b/j-1", "c/j-1"]
    );
    assert_eq!(ids(q(Some("a"))), ["a/j-1", "a/j-2", "a/j-3", "a/r-1"]);
    assert!(ids(q(Some("zz"))).is_empty());
    assert_eq!(
        ids(InstanceQuery {
            machine: Some("report".into()),
            ..q(None)
        }),
        ["a/r-1", "c/j-1"]
    );
    assert_eq!(
        ids(InstanceQuery {
            machine: Some("job".into()),
            ..q(Some("a"))
        }),
        ["a/j-1", "a/j-2", "a/j-3"]
    );
    assert_eq!(
        ids(InstanceQuery {
            state: Some("running".into()),
            ..q(None)
        }),
        ["a/j-2"]
    );
    assert_eq!(
        ids(InstanceQuery {
            state: Some("queued".into()),
            ..q(Some("a"))
        }),
        ["a/j-1", "a/r-1"]
    );
    assert_eq!(
        ids(InstanceQuery {
            status: Some(Status::Succeeded),
            ..q(None)
        }),
        ["a/j-3"]
    );
    assert_eq!(
        ids(InstanceQuery {
            status: Some(Status::Active),
            ..q(Some("a"))
        }),
        ["a/j-1", "a/j-2", "a/r-1"]
    );
    let gold = vec![("tier".to_owned(), "gold".to_owned())];
    assert_eq!(
        ids(InstanceQuery {
            labels: gold.clone(),
            ..q(None)
        }),
        ["a/j-1", "a/r-1", "b/j-1", "c/j-1"]
    );
    let gold_shop = vec![
        ("tier".to_owned(), "gold".to_owned()),
        ("app".to_owned(), "shop".to_owned()),
    ];
    assert_eq!(
        ids(InstanceQuery {
            labels: gold_shop,
            machine: Some("job".into()),
            ..q(None)
        }),
        ["a/j-1", "b/j-1"]
    );
    let wrong = vec![
        ("tier".to_owned(), "gold".to_owned()),
        ("app".to_owned(), "bank".to_owned()),
    ];
    assert!(
        ids(InstanceQuery {
            labels: wrong,
            ..q(None)
        })
        .is_empty()
    );

    // Pages of two, across namespaces.
    let mut pages = Vec::new();
    let mut after = None;
    loop {
        let page = store
            .list_instances(&InstanceQuery {
                after: after.clone(),
                limit: 2,
                ..q(None)
            })
            .unwrap();
        assert!(page.len() <= 2);
        let Some(last) = page.last() else { break };
        after = Some((
            last.instance.namespace.to_string(),
            last.instance.id.to_string(),
        ));
        pages.extend(
            page.into_iter()
                .map(|s| format!("{}/{}", s.instance.namespace, s.instance.id)),
        );
    }
    assert_eq!(pages, ids(q(None)));
    let after = |ns: &str, id: &str| Some((ns.to_owned(), id.to_owned()));
    assert_eq!(
        ids(InstanceQuery {
            after: after("a", "j-2"),
            limit: 1,
            ..q(Some("a"))
        }),
        ["a/j-3"]
    );
    assert_eq!(
        ids(InstanceQuery {
            after: after("a", "r-1"),
            ..q(Some("a"))
        }),
        Vec::<String>::new()
    );
    assert_eq!(
        ids(InstanceQuery {
            after: after("a", "zzz"),
            ..q(Some("b"))
        }),
        ["b/j-1"]
    );
    assert!(
        ids(InstanceQuery {
            after: after("c", ""),
            ..q(Some("b"))
        })
        .is_empty()
    );
    assert_eq!(
        ids(InstanceQuery {
            after: after("b", "j-1"),
            ..q(None)
        }),
        ["c/j-1"]
    );
    assert_eq!(
        ids(InstanceQuery {
            labels: gold,
            after: after("a", "j-1"),
            limit: 2,
            ..q(None)
        }),
        ["a/r-1", "b/j-1"]
    );
    let listed = store.list_instances(&q(Some("b"))).unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].instance, items[0].instance);
}

/// instance_by_uid finds the instance a commit reported.
pub fn instance_by_uid(harness: &mut dyn Harness) {
    let store = harness.open();
    let driver = Driver::new("job");
    let a = driver.create("default", "a", &[], T0_MS);
    let b = driver.create("other", "b", &[], T0_MS);
    let uid_a = commit_one(&*store, &a);
    let uid_b = commit_one(&*store, &b);
    assert_ne!(uid_a, uid_b);
    let found = store.instance_by_uid(uid_b).unwrap().expect("b by uid");
    assert_eq!(
        found,
        StoredInstance {
            uid: uid_b,
            instance: b.instance.clone()
        }
    );
    assert_eq!(store.instance("other", "b").unwrap(), Some(found));
    let started = driver.event(&a.instance, "start", "", T0_MS + 1);
    commit_one(&*store, &started);
    assert_eq!(
        store.instance_by_uid(uid_a).unwrap().map(|s| s.instance),
        Some(started.instance)
    );
    let unknown = uid_a.max(uid_b) + 1000;
    assert!(store.instance_by_uid(unknown).unwrap().is_none());
}

/// verify() finds nothing wrong with a store the suite built, and counts what it checked.
pub fn verify_is_clean_on_a_good_store(harness: &mut dyn Harness) {
    let store = harness.open();
    let empty = store.verify().unwrap();
    assert!(empty.is_ok(), "{:?}", empty.problems);
    assert_eq!(
        (empty.n_instances, empty.n_records, empty.n_definitions),
        (0, 0, 0)
    );

    let definition = job_definition("default", "job");
    store
        .put_definition(&definition, revision_hash(&definition), T0_MS)
        .unwrap();
    let driver = Driver::new("job");
    commit_chain(&*store, &driver, "chain", 10);
    let create = driver.create("default", "short", &[("k", "v")], T0_MS);
    commit_one(&*store, &create);
    let mut start = driver.event_with_key(&create.instance, "start", "", T0_MS + 1, Some("key"));
    start.idempotency = Some(IdempotencyEntry {
        key: "key".into(),
        request_hash: Hash32([3; 32]),
        version: 1,
        expires_ms: T0_MS + 10,
    });
    commit_one(&*store, &start);
    commit_one(
        &*store,
        &driver.event(&start.instance, "cancel", "", T0_MS + 2),
    );
    let report = store.verify().unwrap();
    assert!(report.is_ok(), "{:?}", report.problems);
    assert_eq!(
        (report.n_instances, report.n_records, report.n_definitions),
        (2, 13, 1)
    );

    let store = harness.reopen(store);
    let again = store.verify().unwrap();
    assert_eq!(again, report);
    let labels: BTreeMap<String, String> = [("k".to_owned(), "v".to_owned())].into();
    assert_eq!(stored(&*store, "default", "short").instance.labels, labels);
}

/// Reads what an export would carry for one instance: its state, every record, and the
/// idempotency entries its records name.
fn import_item_of(store: &dyn Store, namespace: &str, id: &str) -> ImportItem {
    let instance = stored(store, namespace, id).instance;
    let records = store.history(namespace, id, 0, 0).expect("history reads");
    let mut idempotency = Vec::new();
    for record in &records {
        let decoded = record.open().expect("the record opens");
        if let Some(key) = decoded.idempotency_key.as_deref()
            && let Some(entry) = store.idempotency(namespace, id, key).expect("key reads")
        {
            idempotency.push(entry);
        }
    }
    ImportItem {
        instance,
        records,
        idempotency,
    }
}

/// A source store with the job definition and three instances: `a` pinged with an
/// idempotency key (timer pending), `b` running (timer pending), `c` done (no timer).
fn import_source(
    harness: &mut dyn Harness,
) -> (Box<dyn Store>, Vec<DefinitionRow>, Vec<ImportItem>) {
    let store = harness.open();
    let definition = job_definition("default", "job");
    store
        .put_definition(&definition, revision_hash(&definition), T0_MS)
        .unwrap();
    let driver = Driver::new("job");
    let a = driver.create("default", "a", &[("tier", "gold")], T0_MS);
    let b = driver.create("default", "b", &[], T0_MS);
    let c = driver.create("default", "c", &[], T0_MS);
    store.commit(&[a.clone(), b.clone(), c.clone()]).unwrap();
    let mut a2 = driver.event_with_key(&a.instance, "ping", "hi", T0_MS + 10, Some("k-1"));
    a2.idempotency = Some(IdempotencyEntry {
        key: "k-1".into(),
        request_hash: Hash32([7; 32]),
        version: 1,
        expires_ms: T0_MS + 86_400_000,
    });
    let b2 = driver.event(&b.instance, "start", "", T0_MS + 20);
    let c2 = driver.event(&c.instance, "start", "", T0_MS + 30);
    store.commit(&[a2, b2, c2.clone()]).unwrap();
    let c3 = driver.event(&c2.instance, "complete", "", T0_MS + 40);
    store.commit(&[c3]).unwrap();
    let definitions = vec![
        store
            .definition("default", "job", Some(1))
            .unwrap()
            .unwrap(),
    ];
    let items = ["a", "b", "c"]
        .iter()
        .map(|id| import_item_of(&*store, "default", id))
        .collect();
    (store, definitions, items)
}

fn timers_by_instance(store: &dyn Store) -> Vec<(String, u64, u64)> {
    let mut found: Vec<(String, u64, u64)> = timers(store)
        .into_iter()
        .map(|t| {
            let id = store
                .instance_by_uid(t.uid)
                .unwrap()
                .expect("a timer's uid names an instance")
                .instance
                .id
                .to_string();
            (id, t.due_ms, t.entry_seq)
        })
        .collect();
    found.sort();
    found
}

/// An import into an empty store restores definitions (same revision and hash), instances,
/// their exact history, their timers and idempotency keys; the imported instances take the
/// next transition, a restart keeps it all, and the store verifies clean.
pub fn import_restores_instances_history_timers_and_keys(harness: &mut dyn Harness) {
    let (source, definitions, items) = import_source(harness);
    let target = harness.open();
    let report = target
        .import_instances(&definitions, &items, false)
        .unwrap();
    assert_eq!(
        report,
        ImportReport {
            n_instances: 3,
            n_records: items.iter().map(|i| i.records.len() as u64).sum(),
            n_replaced: 0,
            n_definitions_created: 1,
            n_timers: 2,
        }
    );
    let row = target.definition("default", "job", None).unwrap().unwrap();
    assert_eq!((row.revision, row.hash), (1, definitions[0].hash));
    for item in &items {
        let id = &*item.instance.id;
        assert_eq!(stored(&*target, "default", id).instance, item.instance);
        assert_eq!(target.history("default", id, 0, 0).unwrap(), item.records);
    }
    assert_eq!(timers_by_instance(&*target), timers_by_instance(&*source));
    let key = target.idempotency("default", "a", "k-1").unwrap().unwrap();
    assert_eq!((key.version, key.request_hash), (1, Hash32([7; 32])));
    assert!(
        target
            .import_instances(&definitions, &[], false)
            .unwrap()
            .n_definitions_created
            == 0
    );

    // A page with histories (what exports read) is the rows and their exact records.
    let page = target
        .list_instances_with_history(&InstanceQuery {
            namespace: Some("default".into()),
            limit: 2,
            ..InstanceQuery::default()
        })
        .unwrap();
    assert_eq!(page.len(), 2);
    for ((stored, records), item) in page.iter().zip(&items) {
        assert_eq!(stored.instance, item.instance);
        assert_eq!(records, &item.records);
    }

    // The imported chain goes on.
    let driver = Driver::new("job");
    let a = stored(&*target, "default", "a").instance;
    commit_one(&*target, &driver.event(&a, "start", "", T0_MS + 50));
    let target = harness.reopen(target);
    assert_eq!(stored(&*target, "default", "a").instance.version, 2);
    let report = target.verify().unwrap();
    assert!(report.is_ok(), "{:?}", report.problems);
    assert_eq!(report.n_instances, 3);
}

/// An import that names an existing instance is refused as a whole (nothing written) unless
/// `replace`; with `replace` the instance, its history, timer and keys are the imported ones
/// and the store still verifies clean.
pub fn import_refuses_existing_unless_replace(harness: &mut dyn Harness) {
    let (_source, definitions, items) = import_source(harness);
    let target = harness.open();
    let definition = job_definition("default", "job");
    target
        .put_definition(&definition, revision_hash(&definition), T0_MS)
        .unwrap();
    let driver = Driver::new("job");
    let local_a = driver.create("default", "a", &[], T0_MS + 5);
    target.commit(std::slice::from_ref(&local_a)).unwrap();
    let local_a2 = driver.event_with_key(
        &local_a.instance,
        "ping",
        "local",
        T0_MS + 6,
        Some("k-local"),
    );
    let mut local_a2 = local_a2;
    local_a2.idempotency = Some(IdempotencyEntry {
        key: "k-local".into(),
        request_hash: Hash32([1; 32]),
        version: 1,
        expires_ms: T0_MS + 1_000_000,
    });
    target.commit(std::slice::from_ref(&local_a2)).unwrap();
    let timers_before = timers(&*target);

    match target.import_instances(&definitions, &items, false) {
        Err(StoreError::Refused(message)) => {
            assert!(message.contains("default/a"), "{message}");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert!(target.instance("default", "b").unwrap().is_none());
    assert_eq!(stored(&*target, "default", "a").instance, local_a2.instance);
    assert_eq!(timers(&*target), timers_before);

    let report = target.import_instances(&definitions, &items, true).unwrap();
    assert_eq!((report.n_instances, report.n_replaced), (3, 1));
    assert_eq!(stored(&*target, "default", "a").instance, items[0].instance);
    assert_eq!(
        target.history("default", "a", 0, 0).unwrap(),
        items[0].records
    );
    assert!(
        target
            .idempotency("default", "a", "k-local")
            .unwrap()
            .is_none()
    );
    assert!(target.idempotency("default", "a", "k-1").unwrap().is_some());
    let ids: Vec<String> = timers_by_instance(&*target)
        .into_iter()
        .map(|t| t.0)
        .collect();
    assert_eq!(ids, ["a", "b"]);
    let target = harness.reopen(target);
    let report = target.verify().unwrap();
    assert!(report.is_ok(), "{:?}", report.problems);
}

/// A broken chain, a state that is not its last record, a definition whose revision exists
/// with another hash, or an instance pinned to a revision nobody has: each refused, nothing
/// written.
pub fn import_refuses_bad_input_and_writes_nothing(harness: &mut dyn Harness) {
    let (_source, definitions, items) = import_source(harness);
    let target = harness.open();
    let refused = |definitions: &[DefinitionRow], items: &[ImportItem], what: &str| {
        match target.import_instances(definitions, items, true) {
            Err(StoreError::Refused(_)) => {}
            other => panic!("{what}: expected a refusal, got {other:?}"),
        }
        assert!(
            target
                .list_instances(&InstanceQuery::default())
                .unwrap()
                .is_empty(),
            "{what}"
        );
        assert!(target.list_definitions(None).unwrap().is_empty(), "{what}");
        assert!(timers(&*target).is_empty(), "{what}");
    };

    let mut swapped = items.clone();
    swapped[0].records.swap(0, 1);
    refused(&definitions, &swapped, "swapped records");

    let mut dropped = items.clone();
    dropped[1].records.remove(1);
    refused(&definitions, &dropped, "dropped record");

    let mut flipped = items.clone();
    let last = flipped[2].records.len() - 1;
    flipped[2].records[last].bytes[10] ^= 1;
    refused(&definitions, &flipped, "flipped byte");

    let mut wrong_state = items.clone();
    wrong_state[0].instance.state = "running".into();
    refused(&definitions, &wrong_state, "state not the last record's");

    let mut twice = items.clone();
    twice.push(items[0].clone());
    refused(&definitions, &twice, "instance twice");

    refused(&[], &items, "pinned revision missing");

    let mut changed = definitions.clone();
    changed[0].definition.spec.states[1].timeout_seconds = Some(31);
    refused(&changed, &items, "definition content not its hash");

    // The target has revision 1 of the same name with other content.
    let mut other = job_definition("default", "job");
    other.spec.states[1].timeout_seconds = Some(31);
    target
        .put_definition(&other, revision_hash(&other), T0_MS)
        .unwrap();
    match target.import_instances(&definitions, &items, true) {
        Err(StoreError::Refused(message)) => assert!(message.contains("job@1"), "{message}"),
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert!(
        target
            .list_instances(&InstanceQuery::default())
            .unwrap()
            .is_empty()
    );
    assert_eq!(target.list_definitions(None).unwrap().len(), 1);
}

/// A streamed import writes its items as they arrive in one transaction: a source that fails
/// after some items, an item refused midway (a broken chain, one out of order), or a conflict
/// late in the stream each leave the store as it was; a good stream imports everything, and
/// the store verifies clean.
pub fn import_stream_refused_midway_writes_nothing(harness: &mut dyn Harness) {
    let (_source, definitions, items) = import_source(harness);
    let stream = |target: &dyn Store,
                  definitions: &[DefinitionRow],
                  items: Vec<Result<ImportItem, StoreError>>,
                  replace: bool| {
        let mut source = items.into_iter();
        target.import_stream(definitions, &mut source, replace)
    };
    let all = || items.iter().cloned().map(Ok).collect::<Vec<_>>();
    let assert_empty = |target: &dyn Store, what: &str| {
        assert!(
            target
                .list_instances(&InstanceQuery::default())
                .unwrap()
                .is_empty(),
            "{what}"
        );
        assert!(target.list_definitions(None).unwrap().is_empty(), "{what}");
        assert!(timers(target).is_empty(), "{what}");
        assert!(target.records_after(0, 10).unwrap().is_empty(), "{what}");
    };

    // A conflict on the last item, after the first two were written into the transaction.
    // (Opened before `target`: the harness reopens the store opened last.)
    let other = harness.open();
    let definition = job_definition("default", "job");
    other
        .put_definition(&definition, revision_hash(&definition), T0_MS)
        .unwrap();
    let local_c = Driver::new("job").create("default", "c", &[], T0_MS + 5);
    other.commit(std::slice::from_ref(&local_c)).unwrap();
    let records_before = other.records_after(0, 100).unwrap();
    match stream(&*other, &definitions, all(), false) {
        Err(StoreError::Refused(message)) => assert!(message.contains("default/c"), "{message}"),
        other => panic!("a late conflict: expected a refusal, got {other:?}"),
    }
    assert!(other.instance("default", "a").unwrap().is_none());
    assert_eq!(other.records_after(0, 100).unwrap(), records_before);
    assert_eq!(stored(&*other, "default", "c").instance, local_c.instance);
    drop(other);

    let target = harness.open();
    let failing = vec![
        Ok(items[0].clone()),
        Ok(items[1].clone()),
        Err(StoreError::Refused("the source broke".into())),
        Ok(items[2].clone()),
    ];
    match stream(&*target, &definitions, failing, false) {
        Err(StoreError::Refused(message)) => assert_eq!(message, "the source broke"),
        other => panic!("a failing source: expected its error, got {other:?}"),
    }
    assert_empty(&*target, "a failing source");

    let mut broken = items.clone();
    broken[2].records.swap(0, 1);
    match stream(
        &*target,
        &definitions,
        broken.into_iter().map(Ok).collect(),
        false,
    ) {
        Err(StoreError::Refused(message)) => assert!(message.contains("default/c"), "{message}"),
        other => panic!("a broken chain: expected a refusal, got {other:?}"),
    }
    assert_empty(&*target, "a broken chain last");

    let unordered = vec![Ok(items[1].clone()), Ok(items[0].clone())];
    assert!(matches!(
        stream(&*target, &definitions, unordered, false),
        Err(StoreError::Refused(_))
    ));
    assert_empty(&*target, "out of order");
    let twice = vec![Ok(items[0].clone()), Ok(items[0].clone())];
    assert!(matches!(
        stream(&*target, &definitions, twice, true),
        Err(StoreError::Refused(_))
    ));
    assert_empty(&*target, "twice");

    let report = stream(&*target, &definitions, all(), false).unwrap();
    assert_eq!((report.n_instances, report.n_timers), (3, 2));
    for item in &items {
        let id = &*item.instance.id;
        assert_eq!(stored(&*target, "default", id).instance, item.instance);
        assert_eq!(target.history("default", id, 0, 0).unwrap(), item.records);
    }
    let target = harness.reopen(target);
    let report = target.verify().unwrap();
    assert!(report.is_ok(), "{:?}", report.problems);
    assert_eq!(report.n_instances, 3);
}

/// Plans the erasure of `namespace/id` as stored (all data and payloads, or `fields`).
fn plan_erasure(
    store: &dyn Store,
    namespace: &str,
    id: &str,
    fields: &[String],
    now_ms: u64,
) -> (cnsm_core::erasure::ErasurePlan, CommitItem) {
    let instance = stored(store, namespace, id).instance;
    let history = store.history(namespace, id, 0, 0).expect("history reads");
    let plan = cnsm_core::erasure::plan(
        &instance,
        &history,
        &cnsm_core::erasure::EraseRequest {
            fields,
            reason: Some("subject request"),
            actor: ACTOR,
            now_ms,
            trace: None,
        },
    )
    .expect("the erasure plans");
    let item = CommitItem {
        instance: plan.instance.clone(),
        record: plan.sealed.clone(),
        expected_version: Some(instance.version),
        idempotency: None,
    };
    (plan, item)
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// An erasure replaces the bytes of every record that held personal data, appends the erasure
/// record, redacts the row; history reads, `verify` stays green (also after a restart), the
/// chain continues, and a second erasure works.
pub fn erase_redacts_history_and_verify_stays_green(harness: &mut dyn Harness) {
    let store = harness.open();
    let definition = job_definition("default", "job");
    store
        .put_definition(&definition, revision_hash(&definition), T0_MS)
        .unwrap();
    let driver = Driver::new("job");
    let items = commit_chain(&*store, &driver, "p-1", 5);
    commit_chain(&*store, &driver, "other", 3);
    let (plan, item) = plan_erasure(&*store, "default", "p-1", &["note".into()], T0_MS + 10_000);
    assert_eq!(plan.redacted.len(), 5, "genesis and four pings held a note");
    let outcome = store
        .erase(&plan.redacted, &item)
        .expect("the erasure commits");
    assert!(
        matches!(outcome, ItemOutcome::Committed { .. }),
        "{outcome:?}"
    );

    let history = store
        .history("default", "p-1", 0, 0)
        .expect("history reads");
    assert_eq!(history.len(), 6);
    for (i, sealed) in history.iter().enumerate() {
        assert_eq!(
            sealed.hash,
            items.get(i).map_or(item.record.hash, |it| it.record.hash)
        );
        assert!(
            !contains(&sealed.bytes, b"ping "),
            "record {i} still holds a note"
        );
    }
    let last =
        verify_chain("default", "p-1", 0, Hash32::ZERO, &history).expect("the chain verifies");
    let row = stored(&*store, "default", "p-1").instance;
    assert_eq!(row.last_hash, last);
    assert_eq!(row.version, 5);
    assert_eq!(
        row.data.get("note"),
        Some(&Value::from(cnsm_core::record::ERASED_MARKER))
    );
    assert_eq!(row.state, items[4].instance.state);
    let report = store.verify().unwrap();
    assert!(report.is_ok(), "{:?}", report.problems);
    assert_eq!(report.n_records, 6 + 3);

    // The chain goes on after the erasure, and a second erasure lists every redacted record.
    let next = driver.event(&row, "ping", "ping again", T0_MS + 20_000);
    commit_one(&*store, &next);
    let (again, item2) = plan_erasure(&*store, "default", "p-1", &[], T0_MS + 30_000);
    let listed = again.record.erasure.as_ref().map(|e| e.records.len());
    // 0..=4 (redacted before, listed again) and 6; the first erasure record (5) holds only
    // markers already, so its bytes stay as sealed.
    assert_eq!(
        listed,
        Some(6),
        "every record whose bytes differ from the sealed ones"
    );
    store
        .erase(&again.redacted, &item2)
        .expect("the second erasure commits");
    let store = harness.reopen(store);
    let report = store.verify().unwrap();
    assert!(report.is_ok(), "{:?}", report.problems);
    let history = store
        .history("default", "p-1", 0, 0)
        .expect("history reads");
    assert_eq!(history.len(), 8);
    verify_chain("default", "p-1", 0, Hash32::ZERO, &history).expect("the chain verifies");
    assert_eq!(
        history[0].hash, items[0].record.hash,
        "the first original hash stays"
    );
    // Pages that stop before the erasure record read too.
    assert_eq!(
        store
            .history("default", "p-1", 1, 2)
            .expect("a page reads")
            .len(),
        2
    );
}

/// An erasure computed at an old version is a conflict and writes nothing.
pub fn erase_with_a_stale_version_conflicts_and_changes_nothing(harness: &mut dyn Harness) {
    let store = harness.open();
    let driver = Driver::new("job");
    let items = commit_chain(&*store, &driver, "p-1", 3);
    let (plan, item) = plan_erasure(&*store, "default", "p-1", &[], T0_MS + 10_000);
    commit_one(
        &*store,
        &driver.event(&items[2].instance, "ping", "late", T0_MS + 11_000),
    );
    let before = store.history("default", "p-1", 0, 0).unwrap();
    let outcome = store
        .erase(&plan.redacted, &item)
        .expect("the erasure runs");
    assert_eq!(outcome, ItemOutcome::Conflict { actual: Some(3) });
    assert_eq!(store.history("default", "p-1", 0, 0).unwrap(), before);
    assert_eq!(stored(&*store, "default", "p-1").instance.version, 3);
    let report = store.verify().unwrap();
    assert!(report.is_ok(), "{:?}", report.problems);
}

/// A redacted record whose bytes change again (not through an erasure) fails verification,
/// named by instance and version.
pub fn tampered_redacted_record_fails_verify(harness: &mut dyn Harness) {
    let store = harness.open();
    let driver = Driver::new("job");
    commit_chain(&*store, &driver, "p-1", 3);
    let (plan, item) = plan_erasure(&*store, "default", "p-1", &[], T0_MS + 10_000);
    store
        .erase(&plan.redacted, &item)
        .expect("the erasure commits");
    assert!(store.verify().unwrap().is_ok());
    let store = harness.tamper_record(store, "default", "p-1", 1, 20);
    let report = store.verify().unwrap();
    assert!(
        report
            .problems
            .iter()
            .any(|p| p.contains("default/p-1") && p.contains("record 1")),
        "{:?}",
        report.problems
    );
}
