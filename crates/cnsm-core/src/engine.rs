//! The transition engine: given a compiled machine, an instance and a trigger, decide the next
//! history record. Pure: no I/O, time is passed in, effects (the timer to arm) are data in the
//! record.
//!
//! ```
//! use cnsm_core::engine::{Machine, Trigger, Input, NewInstance};
//! let yaml = r#"
//! apiVersion: statemachine.cn/v1alpha1
//! kind: StateMachine
//! metadata: {name: door}
//! spec:
//!   initialState: closed
//!   states:
//!   - {name: closed, type: task, timeoutSeconds: 60, onEvent: [{event: open, target: opened}]}
//!   - {name: opened, type: final}
//! "#;
//! let machine = cnsm_core::admission::admit_str(yaml, None).into_result().unwrap();
//! let machine = Machine::compile(machine).unwrap().with_revision(1);
//! let genesis = machine
//!     .create(NewInstance { namespace: "default", id: "d-1", data: Default::default(),
//!         labels: Default::default(), now_ms: 0, actor: "test" })
//!     .unwrap();
//! let sealed = genesis.seal();
//! let mut door = cnsm_core::Instance::from_genesis(&genesis, sealed.hash).unwrap();
//! let payload = serde_json::Value::Null;
//! let record = machine
//!     .apply(&door, &Input::new(Trigger::Event { name: "open", payload: &payload }, 1_000, "test"))
//!     .unwrap();
//! door.apply_record(&record, record.seal().hash).unwrap();
//! assert_eq!(&*door.state, "opened");
//! assert!(door.status.is_final());
//! ```

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use serde_json::{Map, Value};

use crate::error::{FailureReason, TransitionError};
use crate::expr::{Expr, Scope, VAR_DATA};
use crate::fastexpr::{InstanceView, Vars};
use crate::flags::{FlagQuery, FlagValueType};
use crate::instance::{Instance, Phase, Status};
use crate::record::{
    FlagDecision, GuardTrace, Hash32, MigrationLock, REVISION_DOMAIN, RecordKind, StateChangeEvent,
    Timer, TimerKind, TraceContext,
};
use crate::resource::{
    EVENT_COMPLETE, EVENT_FAIL, FlagErrorPolicy, FlagGate, Outcome, Retry, StateMachine, StateType,
};

/// The actor recorded for timer firings and retry re-entries.
pub const ACTOR_TIMER: &str = "system:timer";

/// Longest chain of choice states one transition may pass through.
const CHOICE_HOPS_MAX: usize = 1000;

type StateId = u32;

/// Maps keyed by short names, hashed with FxHash (the keys are not attacker-chosen at apply time:
/// they are the admitted definition's names).
type FastMap<K, V> = HashMap<K, V, std::hash::BuildHasherDefault<FxHasher>>;

/// The Fx hash (rustc's): one multiply per word; fast for short keys.
#[derive(Default, Clone, Copy)]
struct FxHasher {
    hash: u64,
}

impl std::hash::Hasher for FxHasher {
    fn write(&mut self, bytes: &[u8]) {
        const K: u64 = 0x51_7c_c1_b7_27_22_0a_95;
        let mut chunks = bytes.chunks_exact(8);
        for chunk in &mut chunks {
            let word = u64::from_le_bytes(chunk.try_into().unwrap_or([0; 8]));
            self.hash = (self.hash.rotate_left(5) ^ word).wrapping_mul(K);
        }
        let mut tail = [0u8; 8];
        let rest = chunks.remainder();
        tail[..rest.len()].copy_from_slice(rest);
        self.hash = (self.hash.rotate_left(5) ^ u64::from_le_bytes(tail) ^ rest.len() as u64)
            .wrapping_mul(K);
    }

    fn finish(&self) -> u64 {
        self.hash
    }
}

/// A machine ready to run: targets resolved to indices, expressions compiled.
pub struct Machine {
    definition: StateMachine,
    revision: u32,
    hash: Hash32,
    states: Vec<CompiledState>,
    by_name: FastMap<String, StateId>,
    initial: StateId,
    env: Arc<cel::Env>,
    /// The machine name, shared by every record.
    name: Arc<str>,
    /// The empty state name a genesis step starts from.
    empty: Arc<str>,
}

impl std::fmt::Debug for Machine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Machine")
            .field("name", &self.definition.metadata.name)
            .field("revision", &self.revision)
            .field("hash", &self.hash)
            .finish()
    }
}

struct CompiledState {
    name: Arc<str>,
    state_type: StateType,
    timeout_ms: u64,
    on_timeout: Option<StateId>,
    /// Entries per event in declaration order; a task state's `transition` is a last, unguarded
    /// `complete` entry.
    events: FastMap<Arc<str>, Vec<CompiledTransition>>,
    /// (guard, target, `choices[i]` label)
    choices: Vec<(Expr, StateId, Arc<str>)>,
    default: Option<StateId>,
    outcome: Outcome,
    retry: Option<Retry>,
    on_failure: Option<StateId>,
    compensation: Option<StateId>,
    /// Wait states: where the elapsed wait leads.
    wait_next: Option<StateId>,
}

struct CompiledTransition {
    /// `onEvent[i]`, or `transition` for the shorthand: where a guard trace points.
    entry: Arc<str>,
    target: StateId,
    guard: Option<Expr>,
    flag: Option<FlagGate>,
    /// The gate's compiled `targetingKey` expression (the instance id when absent).
    targeting_key: Option<Expr>,
    /// Data fields passed to the flag evaluation context.
    context: Vec<String>,
    assign: Vec<(String, Expr)>,
}

/// Why a definition could not be compiled (admission reports these with positions first).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CompileError {
    #[error("state '{0}' is not defined")]
    UndefinedState(String),
    #[error("expression `{expression}` does not compile: {message}")]
    Expression { expression: String, message: String },
    #[error("state '{0}' has no timeoutSeconds")]
    MissingTimeout(String),
}

/// The parameters of a new instance.
#[derive(Debug, Clone)]
pub struct NewInstance<'a> {
    pub namespace: &'a str,
    pub id: &'a str,
    pub data: Map<String, Value>,
    pub labels: BTreeMap<String, String>,
    pub now_ms: u64,
    pub actor: &'a str,
}

/// What happened to the instance.
#[derive(Debug, Clone, Copy)]
pub enum Trigger<'a> {
    /// A named event with its payload (`Value::Null` when none).
    Event { name: &'a str, payload: &'a Value },
    /// A durable timer fell due.
    Timer(Timer),
    /// An operator control; `reason` is kept on a cancel.
    Control {
        action: Control,
        reason: Option<&'a str>,
    },
}

/// An operator control on one instance (DESIGN.md §3), written as an ordinary history record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Control {
    /// End the instance `cancelled`, running its compensations first if it has any.
    Cancel,
    /// Refuse events and hold the timer until [`Control::Resume`].
    Suspend,
    /// Accept events again; a timer that fell due meanwhile fires right after.
    Resume,
    /// Re-enter the state a failed instance failed in, as a fresh entry (attempt 1, new timer).
    Redrive,
}

impl Control {
    pub fn as_str(self) -> &'static str {
        match self {
            Control::Cancel => "cancel",
            Control::Suspend => "suspend",
            Control::Resume => "resume",
            Control::Redrive => "redrive",
        }
    }

    pub fn parse(s: &str) -> Option<Control> {
        Some(match s {
            "cancel" => Control::Cancel,
            "suspend" => Control::Suspend,
            "resume" => Control::Resume,
            "redrive" => Control::Redrive,
            _ => return None,
        })
    }

    fn record_kind(self) -> RecordKind {
        match self {
            Control::Cancel => RecordKind::Cancel,
            Control::Suspend => RecordKind::Suspend,
            Control::Resume => RecordKind::Resume,
            Control::Redrive => RecordKind::Redrive,
        }
    }
}

/// One engine input.
#[derive(Debug, Clone)]
pub struct Input<'a> {
    pub trigger: Trigger<'a>,
    pub now_ms: u64,
    /// Who caused it; shared so that building a record does not copy it.
    pub actor: Arc<str>,
    pub idempotency_key: Option<&'a str>,
    pub trace: Option<TraceContext>,
    /// Flag evaluations made before the event was queued, by flag key.
    pub flags: &'a [FlagDecision],
}

impl<'a> Input<'a> {
    pub fn new(trigger: Trigger<'a>, now_ms: u64, actor: impl Into<Arc<str>>) -> Input<'a> {
        Input {
            trigger,
            now_ms,
            actor: actor.into(),
            idempotency_key: None,
            trace: None,
            flags: &[],
        }
    }
}

impl Machine {
    /// Compiles an admitted definition. Revision 0 until [`Machine::with_revision`].
    pub fn compile(definition: StateMachine) -> Result<Machine, CompileError> {
        let by_name: FastMap<String, StateId> = definition
            .spec
            .states
            .iter()
            .enumerate()
            .map(|(i, s)| (s.name.clone(), i as StateId))
            .collect();
        let resolve = |name: &str| -> Result<StateId, CompileError> {
            by_name
                .get(name)
                .copied()
                .ok_or_else(|| CompileError::UndefinedState(name.to_owned()))
        };
        let resolve_opt = |name: &Option<String>| name.as_deref().map(resolve).transpose();
        let compile = |source: &str| -> Result<Expr, CompileError> {
            Expr::compile(source).map_err(|message| CompileError::Expression {
                expression: source.to_owned(),
                message,
            })
        };
        let mut states = Vec::with_capacity(definition.spec.states.len());
        for state in &definition.spec.states {
            let mut events: FastMap<Arc<str>, Vec<CompiledTransition>> = FastMap::default();
            for (i, t) in state.on_event.iter().enumerate() {
                let guard = t.guard.as_deref().map(compile).transpose()?;
                let assign = t
                    .assign
                    .iter()
                    .map(|(k, v)| Ok((k.clone(), compile(v)?)))
                    .collect::<Result<Vec<_>, CompileError>>()?;
                let targeting_key = t
                    .flag
                    .as_ref()
                    .and_then(|f| f.targeting_key.as_deref())
                    .map(compile)
                    .transpose()?;
                events
                    .entry(Arc::from(t.event.as_str()))
                    .or_default()
                    .push(CompiledTransition {
                        entry: Arc::from(format!("onEvent[{i}]").as_str()),
                        target: resolve(&t.target)?,
                        guard,
                        flag: t.flag.clone(),
                        targeting_key,
                        context: t.context.clone(),
                        assign,
                    });
            }
            let mut wait_next = None;
            match state.state_type {
                StateType::Task => {
                    if let Some(next) = &state.transition {
                        events.entry(Arc::from(EVENT_COMPLETE)).or_default().push(
                            CompiledTransition {
                                entry: Arc::from("transition"),
                                target: resolve(next)?,
                                guard: None,
                                flag: None,
                                targeting_key: None,
                                context: Vec::new(),
                                assign: Vec::new(),
                            },
                        );
                    }
                }
                StateType::Wait => wait_next = resolve_opt(&state.transition)?,
                StateType::Choice | StateType::Final => {}
            }
            let choices = state
                .choices
                .iter()
                .enumerate()
                .map(|(i, c)| {
                    Ok((
                        compile(&c.guard)?,
                        resolve(&c.target)?,
                        Arc::from(format!("choices[{i}]").as_str()),
                    ))
                })
                .collect::<Result<Vec<_>, CompileError>>()?;
            let timeout_ms = match (state.state_type, state.timeout_seconds) {
                (StateType::Final, t) => t.unwrap_or(0) * 1000,
                (_, Some(t)) => t.saturating_mul(1000),
                (_, None) => return Err(CompileError::MissingTimeout(state.name.clone())),
            };
            states.push(CompiledState {
                name: Arc::from(state.name.as_str()),
                state_type: state.state_type,
                timeout_ms,
                on_timeout: resolve_opt(&state.on_timeout)?,
                events,
                choices,
                default: resolve_opt(&state.default)?,
                outcome: state.outcome.unwrap_or_default(),
                retry: state.retry.clone(),
                on_failure: resolve_opt(&state.on_failure)?,
                compensation: resolve_opt(&state.compensation)?,
                wait_next,
            });
        }
        let initial = resolve(&definition.spec.initial_state)?;
        let hash = revision_hash(&definition);
        let name: Arc<str> = Arc::from(definition.metadata.name.as_str());
        Ok(Machine {
            definition,
            revision: 0,
            hash,
            states,
            by_name,
            initial,
            env: Arc::new(cel::Env::stdlib()),
            name,
            empty: Arc::from(""),
        })
    }

    /// Sets the revision number the store assigned.
    pub fn with_revision(mut self, revision: u32) -> Machine {
        self.revision = revision;
        self
    }

    pub fn definition(&self) -> &StateMachine {
        &self.definition
    }

    pub fn name(&self) -> &str {
        &self.definition.metadata.name
    }

    pub fn revision(&self) -> u32 {
        self.revision
    }

    /// Content hash over the deterministic CBOR of the normalized spec.
    /// The CEL environment expressions of this machine run in.
    pub(crate) fn env(&self) -> &Arc<cel::Env> {
        &self.env
    }

    /// Whether the machine defines a state of this name.
    pub fn has_state(&self, name: &str) -> bool {
        self.by_name.contains_key(name)
    }

    /// Every state name, in definition order.
    pub fn state_names(&self) -> impl Iterator<Item = &str> {
        self.states.iter().map(|s| &*s.name)
    }

    pub fn hash(&self) -> Hash32 {
        self.hash
    }

    fn state_id(&self, name: &str) -> Option<StateId> {
        self.by_name.get(name).copied()
    }

    fn state(&self, id: StateId) -> &CompiledState {
        &self.states[id as usize]
    }

    /// The genesis record (version 0) of a new instance. An initial choice state resolves in it.
    pub fn create(&self, new: NewInstance<'_>) -> Result<StateChangeEvent, TransitionError> {
        let mut record = StateChangeEvent {
            format: 1,
            namespace: Arc::from(new.namespace),
            instance: Arc::from(new.id),
            machine: Arc::clone(&self.name),
            revision: self.revision,
            revision_hash: self.hash,
            version: 0,
            kind: RecordKind::Genesis,
            from: None,
            to: Arc::clone(&self.empty),
            via: Vec::new(),
            event: None,
            payload: None,
            guards: Vec::new(),
            flags: Vec::new(),
            data: Map::new(),
            status: Status::Active,
            phase: Phase::Running,
            reason: None,
            entry_seq: 0,
            attempt: 0,
            in_backoff: false,
            suspended: false,
            lock: None,
            compensations: Vec::new(),
            pending_outcome: None,
            timer: None,
            actor: Arc::from(new.actor),
            idempotency_key: None,
            time_ms: new.now_ms,
            trace: None,
            labels: BTreeMap::new(),
            erasure: None,
            prev_hash: Hash32::ZERO,
        };
        let view = View {
            id: new.id,
            state: "",
            version: 0,
            labels: &new.labels,
        };
        let mut step = Step::new(self, &self.empty, &new.data, None, &Value::Null, view);
        step.enter(self.initial, new.now_ms, "create")?;
        step.finish(&mut record);
        record.data = new.data;
        record.labels = new.labels;
        Ok(record)
    }

    /// Decides the record for one trigger.
    ///
    /// A due timer that no longer matches the instance (it left the state, or re-entered it) is
    /// `Ok(None)`: dropped silently.
    pub fn fire(
        &self,
        instance: &Instance,
        input: &Input<'_>,
    ) -> Result<Option<StateChangeEvent>, TransitionError> {
        let Trigger::Timer(timer) = input.trigger else {
            return self.apply(instance, input).map(Some);
        };
        let current = instance.timer.as_ref();
        // A suspended instance holds its timer: the resume record re-arms it.
        if instance.status.is_final()
            || instance.suspended
            || current != Some(&timer)
            || timer.entry_seq != instance.entry_seq
        {
            return Ok(None);
        }
        self.apply(instance, input).map(Some)
    }

    /// The flag evaluations `event` needs in the instance's current state, one per distinct
    /// flag key of the event's entries, in entry order (DESIGN.md §6). Empty, without
    /// allocating, when no entry for the event carries a `flag:` — the common case. Timers
    /// never need any: `onTimeout`, wait and retry transitions carry no flag.
    pub fn flag_queries(
        &self,
        instance: &Instance,
        event: &str,
        payload: &Value,
    ) -> Vec<FlagQuery> {
        if instance.status.is_final() || instance.in_backoff {
            return Vec::new();
        }
        let Some(state_id) = self.state_id(&instance.state) else {
            return Vec::new();
        };
        let Some(entries) = self.state(state_id).events.get(event) else {
            return Vec::new();
        };
        let mut queries: Vec<FlagQuery> = Vec::new();
        for t in entries {
            let Some(gate) = &t.flag else { continue };
            if queries.iter().any(|q| q.key == gate.key) {
                continue;
            }
            let view = View {
                id: &instance.id,
                state: &instance.state,
                version: instance.version,
                labels: &instance.labels,
            };
            let (targeting_key, targeting_key_error) = match &t.targeting_key {
                None => (instance.id.to_string(), None),
                Some(expr) => {
                    let vars = Vars {
                        data: &instance.data,
                        pending: None,
                        event: payload,
                        instance: view,
                    };
                    let value = match expr.fast_value(&vars) {
                        Some(v) => Ok(v),
                        None => Scope::for_vars(&self.env, expr.needs(), &vars).value(expr),
                    };
                    match value {
                        Ok(Value::String(s)) if !s.is_empty() => (s, None),
                        Ok(Value::Number(n)) => (n.to_string(), None),
                        Ok(other) => (
                            String::new(),
                            Some(format!(
                                "targetingKey `{}` yielded {other}, not a non-empty string",
                                expr.source()
                            )),
                        ),
                        Err(e) => (String::new(), Some(format!("targetingKey {e}"))),
                    }
                }
            };
            let mut context = Map::new();
            for (k, v) in &instance.labels {
                context.insert(k.clone(), Value::String(v.clone()));
            }
            for field in &t.context {
                if let Some(v) = instance.data.get(field) {
                    context.insert(field.clone(), v.clone());
                }
            }
            context.insert("machine".into(), Value::from(&*instance.machine));
            context.insert("revision".into(), Value::from(instance.revision));
            context.insert("state".into(), Value::from(&*instance.state));
            context.insert("event".into(), Value::from(event));
            let value_type = if gate.variant.is_some() {
                FlagValueType::Any
            } else {
                FlagValueType::of_expected(gate.value.as_ref())
            };
            queries.push(FlagQuery {
                key: gate.key.clone(),
                targeting_key,
                targeting_key_error,
                context,
                value_type,
            });
        }
        queries
    }

    /// Decides the record for an event (or a timer already checked by [`Machine::fire`]).
    pub fn apply(
        &self,
        instance: &Instance,
        input: &Input<'_>,
    ) -> Result<StateChangeEvent, TransitionError> {
        let (event_name, payload) = match input.trigger {
            Trigger::Event { name, payload } => (name, payload),
            Trigger::Timer(_) => ("timer", &Value::Null),
            Trigger::Control { action, .. } => (action.as_str(), &Value::Null),
        };
        let fail = |reason| TransitionError::failure(&instance.state, event_name, reason);
        if !matches!(input.trigger, Trigger::Control { .. }) {
            if instance.status.is_final() {
                return Err(fail(FailureReason::InstanceFinal));
            }
            if instance.suspended {
                return Err(fail(FailureReason::Suspended));
            }
            if let Some(lock) = &instance.lock
                && input.now_ms < lock.until_ms
            {
                return Err(TransitionError::Locked {
                    migration: lock.migration.clone(),
                    until_ms: lock.until_ms,
                });
            }
        }
        let Some(state_id) = self.state_id(&instance.state) else {
            return Err(fail(FailureReason::NoTransition));
        };
        let state = self.state(state_id);
        let view = View {
            id: &instance.id,
            state: &instance.state,
            version: instance.version,
            labels: &instance.labels,
        };
        let mut step = Step::new(
            self,
            &instance.state,
            &instance.data,
            Some(instance),
            payload,
            view,
        );
        // An expired lease is dropped by the next record.
        step.lock = instance
            .lock
            .clone()
            .filter(|lock| input.now_ms < lock.until_ms);
        let mut kind = RecordKind::Event;

        match input.trigger {
            Trigger::Control { action, reason } => {
                kind = action.record_kind();
                let refuse = |why: String| fail(FailureReason::ControlRefused(why));
                let ended = || {
                    refuse(format!(
                        "the instance has already ended ({})",
                        instance.status.as_str()
                    ))
                };
                match action {
                    Control::Cancel => {
                        if instance.status.is_final() {
                            return Err(ended());
                        }
                        step.suspended = false;
                        step.reason = Some(reason.unwrap_or("cancelled by an operator").to_owned());
                        step.cancel(input.now_ms, event_name)?;
                    }
                    Control::Suspend => {
                        if instance.status.is_final() {
                            return Err(ended());
                        }
                        if instance.suspended {
                            return Err(refuse("the instance is already suspended".into()));
                        }
                        step.suspended = true;
                        step.in_backoff = instance.in_backoff;
                    }
                    Control::Resume => {
                        if !instance.suspended {
                            return Err(refuse("the instance is not suspended".into()));
                        }
                        step.suspended = false;
                        step.in_backoff = instance.in_backoff;
                    }
                    Control::Redrive => {
                        if instance.status != Status::Failed {
                            return Err(refuse(format!(
                                "only a failed instance can be redriven; this one is {}",
                                instance.status.as_str()
                            )));
                        }
                        if state.state_type == StateType::Final {
                            return Err(refuse(format!(
                                "the instance failed by reaching the final state '{}'; there is no state to re-enter",
                                instance.state
                            )));
                        }
                        step.status = Status::Active;
                        step.phase = Phase::Running;
                        step.reason = None;
                        step.compensations.clear();
                        step.pending_outcome = None;
                        step.enter(state_id, input.now_ms, event_name)?;
                    }
                }
            }
            Trigger::Timer(timer) => {
                kind = match timer.kind {
                    TimerKind::Backoff => RecordKind::Retry,
                    _ => RecordKind::Timer,
                };
                match timer.kind {
                    TimerKind::Backoff => {
                        // The back-off ended: the next attempt starts.
                        step.attempt = instance.attempt + 1;
                        step.in_backoff = false;
                        step.reenter(state_id, input.now_ms);
                    }
                    TimerKind::Wait => {
                        let next = state
                            .wait_next
                            .ok_or_else(|| fail(FailureReason::NoTransition))?;
                        step.leave(state_id, false);
                        step.enter(next, input.now_ms, event_name)?;
                    }
                    TimerKind::Timeout => match state.on_timeout {
                        Some(next) if instance.phase != Phase::Compensating => {
                            step.leave(state_id, false);
                            step.enter(next, input.now_ms, event_name)?;
                        }
                        _ => step.attempt_failed(state_id, "Timeout", input.now_ms, event_name)?,
                    },
                }
            }
            Trigger::Event { name, .. } => {
                if instance.in_backoff {
                    return Err(fail(FailureReason::RetryBackoff));
                }
                let entries = state.events.get(name).map(Vec::as_slice).unwrap_or(&[]);
                let mut chosen = None;
                for t in entries {
                    if let Some(guard) = &t.guard {
                        let result = step
                            .guard(guard)
                            .map_err(|e| fail(FailureReason::GuardError(e)))?;
                        step.guards.push(GuardTrace {
                            state: Arc::clone(&state.name),
                            entry: Arc::clone(&t.entry),
                            result,
                        });
                        if !result {
                            continue;
                        }
                    }
                    if let Some(gate) = &t.flag {
                        let decision = decide_flag(gate, input.flags);
                        let allowed = decision.allowed;
                        step.flags.push(decision);
                        if !allowed {
                            continue;
                        }
                    }
                    chosen = Some(t);
                    break;
                }
                match chosen {
                    Some(t) => {
                        for (field, expr) in &t.assign {
                            // Every assignment sees the pre-transition data.
                            let value = step
                                .value(expr)
                                .map_err(|e| fail(FailureReason::GuardError(e)))?;
                            step.set(field, value);
                        }
                        step.leave(state_id, false);
                        step.enter(t.target, input.now_ms, name)?;
                    }
                    None if !entries.is_empty() => return Err(fail(FailureReason::GuardsFalse)),
                    None if name == EVENT_FAIL => {
                        let honoured = state.retry.is_some()
                            || state.on_failure.is_some()
                            || instance.phase == Phase::Compensating;
                        if !honoured {
                            return Err(fail(FailureReason::ReservedEventNotHonoured));
                        }
                        step.attempt_failed(state_id, "Failed", input.now_ms, name)?;
                    }
                    None if name == EVENT_COMPLETE && instance.phase == Phase::Compensating => {
                        step.next_compensation(input.now_ms, name)?;
                    }
                    None => return Err(fail(FailureReason::NoTransition)),
                }
            }
        }
        let event = match input.trigger {
            Trigger::Event { name, .. } => Some(
                state
                    .events
                    .get_key_value(name)
                    .map(|(k, _)| Arc::clone(k))
                    .unwrap_or_else(|| Arc::from(name)),
            ),
            Trigger::Timer(_) | Trigger::Control { .. } => None,
        };
        let mut record = self.base_record(instance, input, kind, event, payload);
        step.finish(&mut record);
        record.format = record.min_format();
        Ok(record)
    }

    /// The record of a transition of `instance`, before the step fills in its outcome.
    fn base_record(
        &self,
        instance: &Instance,
        input: &Input<'_>,
        kind: RecordKind,
        event: Option<Arc<str>>,
        payload: &Value,
    ) -> StateChangeEvent {
        StateChangeEvent {
            format: 1,
            namespace: instance.namespace.clone(),
            instance: instance.id.clone(),
            machine: instance.machine.clone(),
            revision: instance.revision,
            revision_hash: instance.revision_hash,
            version: instance.version + 1,
            kind,
            from: Some(instance.state.clone()),
            to: Arc::clone(&self.empty),
            via: Vec::new(),
            event,
            payload: (!payload.is_null()).then(|| payload.clone()),
            guards: Vec::new(),
            flags: Vec::new(),
            data: Map::new(),
            status: Status::Active,
            phase: instance.phase,
            reason: None,
            entry_seq: instance.entry_seq,
            attempt: instance.attempt,
            in_backoff: false,
            suspended: false,
            lock: None,
            compensations: Vec::new(),
            pending_outcome: None,
            timer: None,
            actor: Arc::clone(&input.actor),
            idempotency_key: input.idempotency_key.map(str::to_owned),
            time_ms: input.now_ms,
            trace: input.trace.clone(),
            labels: BTreeMap::new(),
            erasure: None,
            prev_hash: instance.last_hash,
        }
    }

    /// The `pre` phase of a migration: a `lock` record that leaves the instance where it is and
    /// makes events fail with `Locked` until `until_ms` (a lease) or the migration record.
    /// Re-locking by the same migration renews the lease.
    pub fn lock(
        &self,
        instance: &Instance,
        migration: &str,
        until_ms: u64,
        input: &Input<'_>,
    ) -> Result<StateChangeEvent, TransitionError> {
        self.check_migratable(instance, migration, input.now_ms)?;
        let mut step = Step::new(
            self,
            &instance.state,
            &instance.data,
            Some(instance),
            &Value::Null,
            self.view(instance),
        );
        step.in_backoff = instance.in_backoff;
        step.lock = Some(MigrationLock {
            migration: migration.to_owned(),
            until_ms,
        });
        let mut record = self.base_record(instance, input, RecordKind::Lock, None, &Value::Null);
        step.finish(&mut record);
        record.format = record.min_format();
        Ok(record)
    }

    /// The `post` phase of a migration, on the target revision (`self`): one `migration`
    /// record that moves `instance` into `target_state` of this revision as a fresh entry (its
    /// timer armed under this revision's timeouts; a choice state resolves at once), sets
    /// `data_set`, pins the instance to this revision, and lifts the lock.
    pub fn migrate(
        &self,
        instance: &Instance,
        migration: &str,
        target_state: &str,
        data_set: Map<String, Value>,
        input: &Input<'_>,
    ) -> Result<StateChangeEvent, TransitionError> {
        self.check_migratable(instance, migration, input.now_ms)?;
        let refuse = |why: String| {
            TransitionError::failure(
                &instance.state,
                "migrate",
                FailureReason::ControlRefused(why),
            )
        };
        if instance.machine.as_ref() != self.name() {
            return Err(refuse(format!(
                "the instance runs machine '{}', not '{}'",
                instance.machine,
                self.name()
            )));
        }
        if instance.revision == self.revision {
            return Err(refuse(format!(
                "the instance is already at revision {}",
                self.revision
            )));
        }
        let target = self.state_id(target_state).ok_or_else(|| {
            refuse(format!(
                "revision {} has no state '{target_state}'",
                self.revision
            ))
        })?;
        let mut step = Step::new(
            self,
            &instance.state,
            &instance.data,
            Some(instance),
            &Value::Null,
            self.view(instance),
        );
        step.lock = None;
        step.suspended = instance.suspended;
        step.data_set = data_set;
        step.enter(target, input.now_ms, "migrate")?;
        let mut record =
            self.base_record(instance, input, RecordKind::Migration, None, &Value::Null);
        record.revision = self.revision;
        record.revision_hash = self.hash;
        record.machine = Arc::clone(&self.name);
        step.finish(&mut record);
        record.format = record.min_format();
        Ok(record)
    }

    /// A migration step applies to an active instance that no other migration holds.
    fn check_migratable(
        &self,
        instance: &Instance,
        migration: &str,
        now_ms: u64,
    ) -> Result<(), TransitionError> {
        if instance.status.is_final() {
            return Err(TransitionError::failure(
                &instance.state,
                "migrate",
                FailureReason::InstanceFinal,
            ));
        }
        if let Some(lock) = &instance.lock
            && lock.migration != migration
            && now_ms < lock.until_ms
        {
            return Err(TransitionError::Locked {
                migration: lock.migration.clone(),
                until_ms: lock.until_ms,
            });
        }
        if instance.phase == Phase::Compensating {
            return Err(TransitionError::failure(
                &instance.state,
                "migrate",
                FailureReason::ControlRefused(
                    "the instance is compensating; migrate it after its compensations ran".into(),
                ),
            ));
        }
        Ok(())
    }

    fn view<'a>(&self, instance: &'a Instance) -> View<'a> {
        View {
            id: &instance.id,
            state: &instance.state,
            version: instance.version,
            labels: &instance.labels,
        }
    }
}

/// What expressions see as `instance`.
type View<'a> = InstanceView<'a>;

/// Applies a gate to the pre-evaluated decision for its key; no decision is a provider error.
fn decide_flag(gate: &FlagGate, decisions: &[FlagDecision]) -> FlagDecision {
    let Some(found) = decisions.iter().find(|d| d.key == gate.key) else {
        return FlagDecision {
            key: gate.key.clone(),
            variant: None,
            value: Value::Null,
            reason: "ERROR".into(),
            error: Some("FLAG_NOT_EVALUATED: no provider evaluated this flag".into()),
            allowed: gate.on_flag_error == FlagErrorPolicy::Allow,
        };
    };
    let mut decision = found.clone();
    decision.allowed = if decision.error.is_some() {
        gate.on_flag_error == FlagErrorPolicy::Allow
    } else if let Some(variant) = &gate.variant {
        decision.variant.as_deref() == Some(variant.as_str())
    } else if let Some(value) = &gate.value {
        &decision.value == value
    } else {
        decision.value == Value::Bool(true)
    };
    decision
}

/// The evolving outcome of one transition.
struct Step<'m> {
    machine: &'m Machine,
    /// The state the instance is in as the step goes (borrowed from the machine or instance).
    state: &'m Arc<str>,
    via: Vec<Arc<str>>,
    entered_any: bool,
    data_set: Map<String, Value>,
    base_data: &'m Map<String, Value>,
    payload: &'m Value,
    view: View<'m>,
    /// Expression variables, built on first use; `data` is rebuilt after an assignment.
    scope: Option<Scope>,
    data_stale: bool,
    guards: Vec<GuardTrace>,
    flags: Vec<FlagDecision>,
    status: Status,
    phase: Phase,
    reason: Option<String>,
    entry_seq: u64,
    attempt: u32,
    in_backoff: bool,
    suspended: bool,
    lock: Option<MigrationLock>,
    compensations: Vec<String>,
    pending_outcome: Option<Outcome>,
    timer: Option<Timer>,
}

impl<'m> Step<'m> {
    fn new(
        machine: &'m Machine,
        state: &'m Arc<str>,
        data: &'m Map<String, Value>,
        instance: Option<&'m Instance>,
        payload: &'m Value,
        view: View<'m>,
    ) -> Step<'m> {
        Step {
            machine,
            state,
            via: Vec::new(),
            entered_any: false,
            data_set: Map::new(),
            base_data: data,
            payload,
            view,
            scope: None,
            data_stale: false,
            guards: Vec::new(),
            flags: Vec::new(),
            status: Status::Active,
            phase: instance.map(|i| i.phase).unwrap_or_default(),
            reason: instance.and_then(|i| i.reason.clone()),
            entry_seq: instance.map(|i| i.entry_seq).unwrap_or(0),
            attempt: instance.map(|i| i.attempt).unwrap_or(0),
            in_backoff: false,
            suspended: instance.is_some_and(|i| i.suspended),
            lock: instance.and_then(|i| i.lock.clone()),
            compensations: instance
                .map(|i| i.compensations.clone())
                .unwrap_or_default(),
            pending_outcome: instance.and_then(|i| i.pending_outcome),
            // The instance's timer stays armed unless this step changes it.
            timer: instance.and_then(|i| i.timer),
        }
    }

    /// The variables expressions see. Guards (event guards, then choice guards after `assign`)
    /// see the data with this transition's assignments overlaid; assignments see the data as it
    /// was before the transition (`pending: false`), every one of them.
    fn vars(&self, pending: bool) -> Vars<'_> {
        Vars {
            data: self.base_data,
            pending: (pending && !self.data_set.is_empty()).then_some(&self.data_set),
            event: self.payload,
            instance: self.view,
        }
    }

    /// The interpreter's scope with every variable `expr` needs, `data` with or without the
    /// pending assignments.
    fn scope_for(&mut self, expr: &Expr, pending: bool) -> &Scope {
        let mut scope = self
            .scope
            .take()
            .unwrap_or_else(|| Scope::new(&self.machine.env));
        let vars = self.vars(pending);
        let want_pending = vars.pending.is_some();
        if self.data_stale || scope.data_pending() != want_pending {
            scope.forget(VAR_DATA);
        }
        scope.bind(expr.needs(), &vars);
        self.data_stale = false;
        self.scope.insert(scope)
    }

    fn guard(&mut self, expr: &Expr) -> Result<bool, String> {
        if let Some(result) = expr.fast_guard(&self.vars(true)) {
            return Ok(result);
        }
        self.scope_for(expr, true).guard(expr)
    }

    fn value(&mut self, expr: &Expr) -> Result<Value, String> {
        if let Some(value) = expr.fast_value(&self.vars(false)) {
            return Ok(value);
        }
        self.scope_for(expr, false).value(expr)
    }

    fn set(&mut self, field: &str, value: Value) {
        self.data_set.insert(field.to_owned(), value);
    }

    /// Leaving `state` by a transition: push its compensation unless it left by failure.
    fn leave(&mut self, state: StateId, by_failure: bool) {
        if by_failure || self.phase == Phase::Compensating {
            return;
        }
        if let Some(compensation) = self.machine.state(state).compensation {
            self.compensations
                .push(self.machine.state(compensation).name.to_string());
        }
    }

    /// Re-enters the same state for a new attempt.
    fn reenter(&mut self, state: StateId, now_ms: u64) {
        self.entry_seq += 1;
        let s = self.machine.state(state);
        self.timer = Some(Timer {
            due_ms: now_ms.saturating_add(s.timeout_ms),
            entry_seq: self.entry_seq,
            kind: TimerKind::Timeout,
        });
    }

    /// Enters `target`, resolving choice states and final outcomes.
    fn enter(&mut self, target: StateId, now_ms: u64, event: &str) -> Result<(), TransitionError> {
        // Choice guards see the data after `assign`.
        self.data_stale = !self.data_set.is_empty();
        let machine = self.machine;
        let mut current = target;
        for _ in 0..CHOICE_HOPS_MAX {
            let state = machine.state(current);
            if self.entered_any {
                self.via.push(Arc::clone(self.state));
            }
            self.entered_any = true;
            self.state = &state.name;
            self.entry_seq += 1;
            self.attempt = 1;
            self.in_backoff = false;
            self.timer = None;
            match state.state_type {
                StateType::Task => {
                    self.timer = Some(Timer {
                        due_ms: now_ms.saturating_add(state.timeout_ms),
                        entry_seq: self.entry_seq,
                        kind: TimerKind::Timeout,
                    });
                    return Ok(());
                }
                StateType::Wait => {
                    self.timer = Some(Timer {
                        due_ms: now_ms.saturating_add(state.timeout_ms),
                        entry_seq: self.entry_seq,
                        kind: TimerKind::Wait,
                    });
                    return Ok(());
                }
                StateType::Final => {
                    return self.reach_final(state.outcome, now_ms, event);
                }
                StateType::Choice => {
                    let mut next = state.default;
                    for (guard, choice_target, index) in &state.choices {
                        let result = self.guard(guard).map_err(|e| {
                            TransitionError::failure(
                                &state.name,
                                event,
                                FailureReason::GuardError(e),
                            )
                        })?;
                        self.guards.push(GuardTrace {
                            state: Arc::clone(&state.name),
                            entry: Arc::clone(index),
                            result,
                        });
                        if result {
                            next = Some(*choice_target);
                            break;
                        }
                    }
                    match next {
                        Some(n) => current = n,
                        None => {
                            return Err(TransitionError::failure(
                                &state.name,
                                event,
                                FailureReason::GuardsFalse,
                            ));
                        }
                    }
                }
            }
        }
        Err(TransitionError::failure(
            self.state,
            event,
            FailureReason::ChoiceLoop,
        ))
    }

    fn reach_final(
        &mut self,
        outcome: Outcome,
        now_ms: u64,
        event: &str,
    ) -> Result<(), TransitionError> {
        if self.phase == Phase::Compensating {
            // A compensation state cannot transition; reaching a final state here means the
            // stack ran out (handled by next_compensation).
            self.status = outcome.into();
            return Ok(());
        }
        if outcome == Outcome::Succeeded || self.compensations.is_empty() {
            self.status = outcome.into();
            self.compensations.clear();
            return Ok(());
        }
        self.phase = Phase::Compensating;
        self.pending_outcome = Some(outcome);
        self.next_compensation(now_ms, event)
    }

    /// Runs the next compensation, or ends the instance when none is left.
    fn next_compensation(&mut self, now_ms: u64, event: &str) -> Result<(), TransitionError> {
        match self.compensations.pop() {
            Some(name) => {
                let id = self.machine.state_id(&name).ok_or_else(|| {
                    TransitionError::failure(self.state, event, FailureReason::NoTransition)
                })?;
                self.enter(id, now_ms, event)
            }
            None => {
                self.status = self
                    .pending_outcome
                    .map(Status::from)
                    .unwrap_or(Status::Failed);
                self.timer = None;
                Ok(())
            }
        }
    }

    /// An operator cancel: end `cancelled` now, or after the compensation stack has run.
    fn cancel(&mut self, now_ms: u64, event: &str) -> Result<(), TransitionError> {
        self.in_backoff = false;
        if self.phase == Phase::Compensating {
            // Already rolling back: finish the stack, then end cancelled.
            self.pending_outcome = Some(Outcome::Cancelled);
            return Ok(());
        }
        if self.compensations.is_empty() {
            self.status = Status::Cancelled;
            self.timer = None;
            return Ok(());
        }
        self.phase = Phase::Compensating;
        self.pending_outcome = Some(Outcome::Cancelled);
        self.next_compensation(now_ms, event)
    }

    /// A `fail` or a timeout without `onTimeout`: retry, `onFailure`, or a hard failure.
    fn attempt_failed(
        &mut self,
        state: StateId,
        reason: &str,
        now_ms: u64,
        event: &str,
    ) -> Result<(), TransitionError> {
        let machine = self.machine;
        let s = machine.state(state);
        if let Some(retry) = &s.retry
            && self.attempt < retry.max_attempts
        {
            self.in_backoff = true;
            self.timer = Some(Timer {
                due_ms: now_ms.saturating_add(retry.backoff_ms(self.attempt + 1)),
                entry_seq: self.entry_seq,
                kind: TimerKind::Backoff,
            });
            self.state = &s.name;
            return Ok(());
        }
        if self.phase == Phase::Compensating {
            self.status = Status::Failed;
            self.reason = Some("CompensationFailed".into());
            self.state = &s.name;
            self.timer = None;
            return Ok(());
        }
        if let Some(next) = s.on_failure {
            self.leave(state, true);
            return self.enter(next, now_ms, event);
        }
        // A hard failure.
        self.reason = Some(reason.to_owned());
        self.state = &s.name;
        if self.compensations.is_empty() {
            self.status = Status::Failed;
            self.timer = None;
            return Ok(());
        }
        self.phase = Phase::Compensating;
        self.pending_outcome = Some(Outcome::Failed);
        self.next_compensation(now_ms, event)
    }

    fn finish(self, record: &mut StateChangeEvent) {
        let ended = self.status.is_final();
        record.to = Arc::clone(self.state);
        record.via = self.via;
        record.data = self.data_set;
        record.guards = self.guards;
        record.flags = self.flags;
        record.status = self.status;
        record.phase = if ended { Phase::Running } else { self.phase };
        record.reason = self.reason;
        record.entry_seq = self.entry_seq;
        record.attempt = self.attempt;
        record.in_backoff = self.in_backoff;
        record.suspended = self.suspended && !ended;
        record.lock = if ended { None } else { self.lock };
        record.compensations = if ended {
            Vec::new()
        } else {
            self.compensations
        };
        record.pending_outcome = if ended { None } else { self.pending_outcome };
        record.timer = if ended { None } else { self.timer };
    }
}

/// The content hash of a definition: SHA-256 over the deterministic CBOR of its normalized form
/// (serde's view: defaults filled, empty fields omitted).
pub fn revision_hash(definition: &StateMachine) -> Hash32 {
    let value = serde_json::to_value(definition).unwrap_or(Value::Null);
    Hash32::digest(REVISION_DOMAIN, &crate::cbor::encode(&value))
}
