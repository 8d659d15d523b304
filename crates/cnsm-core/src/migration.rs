//! `StateMigrationPolicy`: how instances of one revision of a machine move to another.
//!
//! ```yaml
//! apiVersion: statemachine.cn/v1alpha1
//! kind: StateMigrationPolicy
//! metadata: {name: order-v1-to-v2, namespace: shop}
//! spec:
//!   machine: order-processing
//!   stateMapping: {paid: payment-received}   # old name -> new name; others keep their name
//!   refuseFrom: [shipped]                     # instances there are not migrated
//!   dataDefaults: {currency: EUR}             # set when the field is absent
//!   dataTransforms: {totalCents: "data.total * 100"}   # CEL over the pre-migration data
//!   lockSeconds: 300                          # the `pre` lock's lease
//! ```
//!
//! [`CompiledMigration::compile`] checks the policy against both revisions (every state of the
//! old revision must have a counterpart in the new one, or be refused) and
//! [`CompiledMigration::plan`] decides one instance: its target state and data changes, or why
//! it is blocked. The records themselves come from [`Machine::lock`] and [`Machine::migrate`].

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::admission::{Problem, Severity};
use crate::engine::Machine;
use crate::expr::Expr;
use crate::fastexpr::{InstanceView, Vars};
use crate::instance::Instance;
use crate::resource::{API_VERSION, Metadata};
use crate::yaml::{self, Node, NodeKind, Scalar};

/// `kind` of a migration policy.
pub const KIND_STATE_MIGRATION_POLICY: &str = "StateMigrationPolicy";

/// The default lease of the `pre` lock.
pub const LOCK_SECONDS_DEFAULT: u64 = 300;

/// A `StateMigrationPolicy` resource.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct StateMigrationPolicy {
    pub api_version: String,
    pub kind: String,
    pub metadata: Metadata,
    pub spec: MigrationSpec,
}

/// `spec` of a `StateMigrationPolicy`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MigrationSpec {
    /// The machine whose instances move.
    pub machine: String,
    /// When given, the revisions the policy is for (the command line must agree).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_revision: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to_revision: Option<u32>,
    /// Old state name → new state name; states not listed keep their name.
    #[serde(default)]
    pub state_mapping: BTreeMap<String, String>,
    /// Old states whose instances are not migrated.
    #[serde(default)]
    pub refuse_from: Vec<String>,
    /// Data fields set when absent.
    #[serde(default)]
    pub data_defaults: Map<String, Value>,
    /// Data fields set to a CEL expression over the pre-migration `data` and `instance`.
    #[serde(default)]
    pub data_transforms: BTreeMap<String, String>,
    /// The lease of the `pre` lock, in seconds.
    #[serde(default = "lock_seconds_default")]
    pub lock_seconds: u64,
}

fn lock_seconds_default() -> u64 {
    LOCK_SECONDS_DEFAULT
}

/// Reads a policy from YAML (the same parser and input limits as definitions). Every problem
/// is reported with its path and, where known, line and column.
pub fn parse_policy(source: &str) -> Result<StateMigrationPolicy, Vec<Problem>> {
    let parsed = yaml::parse(source);
    let mut problems: Vec<Problem> = parsed
        .problems
        .into_iter()
        .map(|p| Problem::new(Severity::Error, p.code, p.path, p.message).at(p.pos))
        .collect();
    let Some(root) = parsed.root else {
        return Err(problems);
    };
    if !problems.is_empty() {
        return Err(problems);
    }
    let value = to_json(&root);
    let policy: StateMigrationPolicy = match serde_json::from_value(value) {
        Ok(policy) => policy,
        Err(e) => {
            problems.push(
                Problem::new(
                    Severity::Error,
                    "invalid-policy",
                    String::new(),
                    e.to_string(),
                )
                .at(Some(root.pos)),
            );
            return Err(problems);
        }
    };
    let mut fail = |path: &str, message: String| {
        problems.push(Problem::new(
            Severity::Error,
            "invalid-policy",
            path.to_owned(),
            message,
        ));
    };
    if policy.api_version != API_VERSION {
        fail(
            "apiVersion",
            format!(
                "apiVersion must be {API_VERSION}, found '{}'",
                policy.api_version
            ),
        );
    }
    if policy.kind != KIND_STATE_MIGRATION_POLICY {
        fail(
            "kind",
            format!(
                "kind must be {KIND_STATE_MIGRATION_POLICY}, found '{}'",
                policy.kind
            ),
        );
    }
    if !crate::admission::is_rfc1123_label(&policy.metadata.name) {
        fail(
            "metadata.name",
            "metadata.name must be an RFC 1123 label".into(),
        );
    }
    if policy.spec.lock_seconds == 0 || policy.spec.lock_seconds > 7 * 86_400 {
        fail(
            "spec.lockSeconds",
            "spec.lockSeconds must be between 1 and 604800 (a week)".into(),
        );
    }
    for (field, source) in &policy.spec.data_transforms {
        if let Err(e) = Expr::compile(source) {
            fail(
                &format!("spec.dataTransforms.{field}"),
                format!("does not compile: {e}"),
            );
        }
    }
    if problems.is_empty() {
        Ok(policy)
    } else {
        Err(problems)
    }
}

/// A YAML tree as JSON (scalars typed by the YAML 1.2 core schema).
fn to_json(node: &Node) -> Value {
    match &node.kind {
        NodeKind::Mapping(entries) => Value::Object(
            entries
                .iter()
                .map(|e| (e.key.clone(), to_json(&e.value)))
                .collect(),
        ),
        NodeKind::Sequence(items) => Value::Array(items.iter().map(to_json).collect()),
        NodeKind::Scalar { text, style } => match Scalar::classify(text, *style) {
            Scalar::Null => Value::Null,
            Scalar::Bool(b) => Value::Bool(b),
            Scalar::Int(i) => i64::try_from(i)
                .map(Value::from)
                .unwrap_or_else(|_| Value::from(i as f64)),
            Scalar::Float(f) => serde_json::Number::from_f64(f)
                .map(Value::Number)
                .unwrap_or(Value::Null),
            Scalar::Str => Value::String(text.clone()),
        },
    }
}

/// A policy checked against the two revisions it connects.
pub struct CompiledMigration {
    pub name: String,
    pub from_revision: u32,
    pub to_revision: u32,
    pub lock_ms: u64,
    mapping: BTreeMap<String, String>,
    refuse: BTreeSet<String>,
    defaults: Map<String, Value>,
    transforms: Vec<(String, Expr)>,
    env: Arc<cel::Env>,
}

impl std::fmt::Debug for CompiledMigration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CompiledMigration")
            .field("name", &self.name)
            .field("from_revision", &self.from_revision)
            .field("to_revision", &self.to_revision)
            .finish()
    }
}

/// What a migration does to one instance.
#[derive(Debug, Clone, PartialEq)]
pub struct MigrationPlan {
    pub target_state: String,
    /// The data fields the migration record sets.
    pub data_set: Map<String, Value>,
}

impl CompiledMigration {
    /// Checks `policy` against revision `from` and `to` of its machine: every mapped state
    /// exists on its side, and every state of `from` that is not refused has a counterpart in
    /// `to`. Every problem is listed.
    pub fn compile(
        policy: &StateMigrationPolicy,
        from: &Machine,
        to: &Machine,
    ) -> Result<CompiledMigration, Vec<String>> {
        let mut problems = Vec::new();
        let spec = &policy.spec;
        if spec.machine != from.name() || spec.machine != to.name() {
            problems.push(format!(
                "the policy is for machine '{}', not '{}'",
                spec.machine,
                from.name()
            ));
        }
        if let Some(r) = spec.from_revision
            && r != from.revision()
        {
            problems.push(format!(
                "the policy migrates from revision {r}, not {}",
                from.revision()
            ));
        }
        if let Some(r) = spec.to_revision
            && r != to.revision()
        {
            problems.push(format!(
                "the policy migrates to revision {r}, not {}",
                to.revision()
            ));
        }
        if from.revision() == to.revision() {
            problems.push("the source and target revisions are the same".into());
        }
        for (old, new) in &spec.state_mapping {
            if !from.has_state(old) {
                problems.push(format!(
                    "stateMapping: revision {} has no state '{old}'",
                    from.revision()
                ));
            }
            if !to.has_state(new) {
                problems.push(format!(
                    "stateMapping: revision {} has no state '{new}' (mapped from '{old}')",
                    to.revision()
                ));
            }
        }
        for state in &spec.refuse_from {
            if !from.has_state(state) {
                problems.push(format!(
                    "refuseFrom: revision {} has no state '{state}'",
                    from.revision()
                ));
            }
        }
        for state in from.state_names() {
            let refused = spec.refuse_from.iter().any(|s| s == state);
            let target = spec
                .state_mapping
                .get(state)
                .map(String::as_str)
                .unwrap_or(state);
            if !refused && !spec.state_mapping.contains_key(state) && !to.has_state(target) {
                problems.push(format!(
                    "state '{state}' of revision {} has no counterpart in revision {}: map it (stateMapping) or refuse it (refuseFrom)",
                    from.revision(),
                    to.revision()
                ));
            }
        }
        let mut transforms = Vec::new();
        for (field, source) in &spec.data_transforms {
            match Expr::compile(source) {
                Ok(expr) => transforms.push((field.clone(), expr)),
                Err(e) => problems.push(format!("dataTransforms.{field}: {e}")),
            }
        }
        if !problems.is_empty() {
            return Err(problems);
        }
        Ok(CompiledMigration {
            name: policy.metadata.name.clone(),
            from_revision: from.revision(),
            to_revision: to.revision(),
            lock_ms: spec.lock_seconds.saturating_mul(1000),
            mapping: spec.state_mapping.clone(),
            refuse: spec.refuse_from.iter().cloned().collect(),
            defaults: spec.data_defaults.clone(),
            transforms,
            env: Arc::clone(to.env()),
        })
    }

    /// The reverse migration (for rollback): each state of the target revision goes back to
    /// the one state of the source revision that maps to it; a state with no way back, or
    /// that two source states map to (ambiguous), is refused. Data is left as it is.
    pub fn reverse(&self, from: &Machine, to: &Machine) -> CompiledMigration {
        let mut sources: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for state in from.state_names() {
            if self.refuse.contains(state) {
                continue;
            }
            let target = self.mapping.get(state).map(String::as_str).unwrap_or(state);
            sources.entry(target).or_default().push(state);
        }
        let mut mapping = BTreeMap::new();
        let mut refuse = BTreeSet::new();
        for state in to.state_names() {
            match sources.get(state).map(Vec::as_slice) {
                Some([only]) => {
                    mapping.insert(state.to_owned(), (*only).to_owned());
                }
                _ => {
                    refuse.insert(state.to_owned());
                }
            }
        }
        CompiledMigration {
            name: format!("{}-rollback", self.name),
            from_revision: self.to_revision,
            to_revision: self.from_revision,
            lock_ms: self.lock_ms,
            mapping,
            refuse,
            defaults: Map::new(),
            transforms: Vec::new(),
            env: Arc::clone(&self.env),
        }
    }

    /// What migrating `instance` would do, or why it is blocked.
    pub fn plan(&self, instance: &Instance) -> Result<MigrationPlan, String> {
        if instance.revision != self.from_revision {
            return Err(format!(
                "the instance is at revision {}, not {}",
                instance.revision, self.from_revision
            ));
        }
        if instance.status.is_final() {
            return Err(format!(
                "the instance has ended ({})",
                instance.status.as_str()
            ));
        }
        if instance.phase == crate::instance::Phase::Compensating {
            return Err("the instance is compensating".into());
        }
        let state: &str = &instance.state;
        if self.refuse.contains(state) {
            return Err(format!("migration from state '{state}' is refused"));
        }
        let target_state = self
            .mapping
            .get(state)
            .cloned()
            .unwrap_or_else(|| state.to_owned());
        let mut data_set = Map::new();
        for (field, value) in &self.defaults {
            if !instance.data.contains_key(field) {
                data_set.insert(field.clone(), value.clone());
            }
        }
        let vars = Vars {
            data: &instance.data,
            pending: None,
            event: &Value::Null,
            instance: InstanceView {
                id: &instance.id,
                state: &instance.state,
                version: instance.version,
                labels: &instance.labels,
            },
        };
        for (field, expr) in &self.transforms {
            let value = expr
                .interpret_value(&self.env, &vars)
                .map_err(|e| format!("dataTransforms.{field}: {e}"))?;
            data_set.insert(field.clone(), value);
        }
        Ok(MigrationPlan {
            target_state,
            data_set,
        })
    }
}
