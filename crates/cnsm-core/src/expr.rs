//! CEL guards and assignments: compiled once at admission, evaluated against `data`, `event`
//! and `instance`.
//!
//! An expression in the subset of [`crate::fastexpr`] also gets a fast-path [`Plan`], evaluated
//! straight against the JSON ([`Expr::fast_guard`], [`Expr::fast_value`]); the CEL interpreter
//! ([`Scope`]) runs whenever the fast path does not know the answer.

use std::collections::HashMap;
use std::sync::Arc;

use cel::common::types::{
    CelBool, CelDouble, CelInt, CelList, CelMap, CelMapKey, CelNull, CelString, CelUInt,
};
use cel::common::value::Val;
use serde_json::{Map, Value as Json};

use crate::fastexpr::{InstanceView, Plan, Vars};

/// The longest expression admission accepts, in bytes.
pub const EXPRESSION_LEN_MAX: usize = 4096;

/// The variables an expression may reference.
pub const VARIABLES: [&str; 3] = ["data", "event", "instance"];

/// `data` in [`Expr::needs`].
pub const VAR_DATA: u8 = 1;
/// `event` in [`Expr::needs`].
pub const VAR_EVENT: u8 = 2;
/// `instance` in [`Expr::needs`].
pub const VAR_INSTANCE: u8 = 4;

/// A compiled CEL expression with its source.
pub struct Expr {
    source: Arc<str>,
    program: cel::Program,
    needs: u8,
    /// The fast path, when the expression is in its subset.
    fast: Option<Plan>,
}

impl std::fmt::Debug for Expr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Expr").field(&self.source).finish()
    }
}

impl Expr {
    /// Compiles `source`; the error is CEL's message.
    pub fn compile(source: &str) -> Result<Expr, String> {
        if source.len() > EXPRESSION_LEN_MAX {
            return Err(format!(
                "expression is {} bytes, more than the limit of {EXPRESSION_LEN_MAX}",
                source.len()
            ));
        }
        let program = cel::Program::compile(source).map_err(|e| e.to_string())?;
        let references = program.references();
        let mut needs = 0;
        for (name, bit) in [
            ("data", VAR_DATA),
            ("event", VAR_EVENT),
            ("instance", VAR_INSTANCE),
        ] {
            if references.has_variable(name) {
                needs |= bit;
            }
        }
        let fast = Plan::compile(program.expression());
        Ok(Expr {
            source: source.into(),
            program,
            needs,
            fast,
        })
    }

    /// Whether the expression has a fast path (it may still fall back for some inputs).
    pub fn has_fast_path(&self) -> bool {
        self.fast.is_some()
    }

    /// The guard's result by the fast path: `Some` only when it is the bool the interpreter
    /// gives; `None` when the interpreter must decide (it yields an error, a non-bool, or the
    /// expression or its inputs are outside the fast path).
    pub fn fast_guard(&self, vars: &Vars<'_>) -> Option<bool> {
        self.fast.as_ref()?.guard(vars)
    }

    /// The value by the fast path: `Some` only when it is what [`Scope::value`] gives.
    pub fn fast_value(&self, vars: &Vars<'_>) -> Option<Json> {
        self.fast.as_ref()?.value(vars)
    }

    /// The guard by the CEL interpreter alone, with a scope built for `vars`: the reference the
    /// fast path agrees with.
    pub fn interpret_guard(&self, env: &Arc<cel::Env>, vars: &Vars<'_>) -> Result<bool, String> {
        Scope::for_vars(env, self.needs, vars).guard(self)
    }

    /// The value by the CEL interpreter alone (see [`Expr::interpret_guard`]).
    pub fn interpret_value(&self, env: &Arc<cel::Env>, vars: &Vars<'_>) -> Result<Json, String> {
        Scope::for_vars(env, self.needs, vars).value(self)
    }

    /// Which of `data`, `event`, `instance` the expression reads (`VAR_*` bits).
    pub fn needs(&self) -> u8 {
        self.needs
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    pub fn program(&self) -> &cel::Program {
        &self.program
    }
}

/// The values an expression sees, bound on first use and reused for every guard and assignment
/// of one event.
pub struct Scope {
    root: cel::Context<'static, 'static>,
    has: u8,
    /// Whether the bound `data` has pending assignments overlaid.
    data_pending: bool,
}

impl std::fmt::Debug for Scope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scope").field("has", &self.has).finish()
    }
}

impl Scope {
    /// An empty scope; bind variables with [`Scope::set`].
    pub fn new(env: &Arc<cel::Env>) -> Scope {
        Scope {
            root: cel::Context::with_env(Arc::clone(env)),
            has: 0,
            data_pending: false,
        }
    }

    /// A scope with the variables in `needs` (`VAR_*` bits) bound from `vars`.
    pub fn for_vars(env: &Arc<cel::Env>, needs: u8, vars: &Vars<'_>) -> Scope {
        let mut scope = Scope::new(env);
        scope.bind(needs, vars);
        scope
    }

    /// Binds the variables in `needs` not bound yet, converting straight from JSON.
    pub fn bind(&mut self, needs: u8, vars: &Vars<'_>) {
        let missing = needs & !self.has;
        if missing & VAR_DATA != 0 {
            self.set_val(VAR_DATA, data_to_val(vars.data, vars.pending));
            self.data_pending = vars.pending.is_some_and(|p| !p.is_empty());
        }
        if missing & VAR_EVENT != 0 {
            self.set_val(VAR_EVENT, json_to_val(vars.event));
        }
        if missing & VAR_INSTANCE != 0 {
            self.set_val(VAR_INSTANCE, instance_to_val(&vars.instance));
        }
    }

    /// Whether the bound `data` has pending assignments overlaid.
    pub fn data_pending(&self) -> bool {
        self.has & VAR_DATA != 0 && self.data_pending
    }

    /// A scope with all three variables bound.
    pub fn with_all(
        env: &Arc<cel::Env>,
        data: cel::Value,
        event: cel::Value,
        instance: cel::Value,
    ) -> Scope {
        let mut scope = Scope::new(env);
        scope.set(VAR_DATA, data);
        scope.set(VAR_EVENT, event);
        scope.set(VAR_INSTANCE, instance);
        scope
    }

    /// The `VAR_*` bits bound so far.
    pub fn has(&self) -> u8 {
        self.has
    }

    /// Binds one variable (`VAR_DATA`, `VAR_EVENT` or `VAR_INSTANCE`).
    pub fn set(&mut self, var: u8, value: cel::Value) {
        let name = match var {
            VAR_DATA => "data",
            VAR_EVENT => "event",
            VAR_INSTANCE => "instance",
            _ => return,
        };
        self.root.add_variable_from_value(name, value);
        self.has |= var;
    }

    /// Binds one variable to a value already converted (see [`json_to_val`]).
    pub fn set_val(&mut self, var: u8, value: Box<dyn Val>) {
        let name = match var {
            VAR_DATA => "data",
            VAR_EVENT => "event",
            VAR_INSTANCE => "instance",
            _ => return,
        };
        self.root.add_variable_as_val(name, value);
        self.has |= var;
    }

    /// Marks a variable as needing a rebind (the data changed after an assignment).
    pub fn forget(&mut self, var: u8) {
        self.has &= !var;
    }

    /// Evaluates a guard: it must yield a bool.
    pub fn guard(&self, expr: &Expr) -> Result<bool, String> {
        match expr.program.execute(&self.root) {
            Ok(cel::Value::Bool(b)) => Ok(b),
            Ok(other) => Err(format!(
                "guard `{}` yielded {:?}, not a bool",
                expr.source,
                other.type_of()
            )),
            Err(e) => Err(format!("guard `{}`: {e}", expr.source)),
        }
    }

    /// Evaluates an assignment to a JSON value.
    pub fn value(&self, expr: &Expr) -> Result<Json, String> {
        let value = expr
            .program
            .execute(&self.root)
            .map_err(|e| format!("`{}`: {e}", expr.source))?;
        cel_to_json(&value).map_err(|e| format!("`{}`: {e}", expr.source))
    }
}

/// Converts a JSON value into a CEL value. Whole numbers become `int` (or `uint` above
/// `i64::MAX`), others `double`.
pub fn json_to_cel(value: &Json) -> cel::Value {
    match value {
        Json::Null => cel::Value::Null,
        Json::Bool(b) => cel::Value::Bool(*b),
        Json::Number(n) => {
            if let Some(i) = n.as_i64() {
                cel::Value::Int(i)
            } else if let Some(u) = n.as_u64() {
                cel::Value::UInt(u)
            } else {
                cel::Value::Float(n.as_f64().unwrap_or(f64::NAN))
            }
        }
        Json::String(s) => cel::Value::String(Arc::new(s.clone())),
        Json::Array(items) => cel::Value::List(Arc::new(items.iter().map(json_to_cel).collect())),
        Json::Object(map) => map_to_cel(map),
    }
}

/// Converts a JSON value straight into the interpreter's value: the same as
/// `Box::<dyn Val>::try_from(json_to_cel(value))` without the intermediate copy.
pub fn json_to_val(value: &Json) -> Box<dyn Val> {
    match value {
        Json::Null => Box::new(CelNull),
        Json::Bool(b) => Box::new(CelBool::from(*b)),
        Json::Number(n) => {
            if let Some(i) = n.as_i64() {
                Box::new(CelInt::from(i))
            } else if let Some(u) = n.as_u64() {
                Box::new(CelUInt::from(u))
            } else {
                Box::new(CelDouble::from(n.as_f64().unwrap_or(f64::NAN)))
            }
        }
        Json::String(s) => Box::new(CelString::from(s.clone())),
        Json::Array(items) => Box::new(CelList::from(
            items.iter().map(json_to_val).collect::<Vec<_>>(),
        )),
        Json::Object(map) => Box::new(CelMap::from(
            map.iter()
                .map(|(k, v)| (CelMapKey::from(k.clone()), json_to_val(v)))
                .collect::<HashMap<_, _>>(),
        )),
    }
}

/// `data` for the interpreter: `base` with `pending` overlaid, converted without copying the
/// JSON first.
pub fn data_to_val(base: &Map<String, Json>, pending: Option<&Map<String, Json>>) -> Box<dyn Val> {
    let pending = pending.filter(|p| !p.is_empty());
    let mut out: HashMap<CelMapKey<'static>, Box<dyn Val>> =
        HashMap::with_capacity(base.len() + pending.map_or(0, Map::len));
    for (k, v) in base {
        if !pending.is_some_and(|p| p.contains_key(k)) {
            out.insert(CelMapKey::from(k.clone()), json_to_val(v));
        }
    }
    for (k, v) in pending.into_iter().flatten() {
        out.insert(CelMapKey::from(k.clone()), json_to_val(v));
    }
    Box::new(CelMap::from(out))
}

/// `instance` for the interpreter.
pub fn instance_to_val(view: &InstanceView<'_>) -> Box<dyn Val> {
    json_to_val(&view.to_json())
}

/// Converts a JSON object into a CEL map.
pub fn map_to_cel(map: &serde_json::Map<String, Json>) -> cel::Value {
    let mut out: HashMap<cel::objects::Key, cel::Value> = HashMap::with_capacity(map.len());
    for (k, v) in map {
        out.insert(
            cel::objects::Key::String(Arc::new(k.clone())),
            json_to_cel(v),
        );
    }
    cel::Value::Map(cel::objects::Map { map: Arc::new(out) })
}

/// Converts a CEL result into JSON; functions, bytes and opaque values are refused.
pub fn cel_to_json(value: &cel::Value) -> Result<Json, String> {
    Ok(match value {
        cel::Value::Null => Json::Null,
        cel::Value::Bool(b) => Json::Bool(*b),
        cel::Value::Int(i) => Json::from(*i),
        cel::Value::UInt(u) => Json::from(*u),
        cel::Value::Float(f) => serde_json::Number::from_f64(*f)
            .map(Json::Number)
            .ok_or_else(|| "result is not a finite number".to_owned())?,
        cel::Value::String(s) => Json::String(s.as_ref().clone()),
        cel::Value::List(items) => {
            Json::Array(items.iter().map(cel_to_json).collect::<Result<_, _>>()?)
        }
        cel::Value::Map(map) => {
            let mut out = serde_json::Map::new();
            for (k, v) in map.map.iter() {
                let key = match k {
                    cel::objects::Key::String(s) => s.as_ref().clone(),
                    cel::objects::Key::Int(i) => i.to_string(),
                    cel::objects::Key::Uint(u) => u.to_string(),
                    cel::objects::Key::Bool(b) => b.to_string(),
                };
                out.insert(key, cel_to_json(v)?);
            }
            Json::Object(out)
        }
        other => return Err(format!("a {:?} cannot be stored in data", other.type_of())),
    })
}
