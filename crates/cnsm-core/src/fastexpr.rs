//! A fast path for simple CEL expressions: the common guards and assignments (`event.amount >=
//! data.total`, `data.n + 1`, `has(data.x) && data.x == "a"`) evaluated straight against the
//! JSON the engine holds, without building a `cel::Context` or converting any value.
//!
//! [`Plan::compile`] translates a parsed CEL expression into a [`Plan`] when every node is in the
//! subset below; evaluating a plan gives exactly what the `cel` interpreter gives, or `None`
//! ("don't know") whenever the interpreter would fail, or might: the caller then runs the
//! interpreter, which produces the same value or the same error as it would have without the
//! fast path.
//!
//! The subset, mirroring cel-rust 0.15:
//!
//! - the variables `data`, `event`, `instance`; field selection `a.b` and indexing `a["b"]` of
//!   maps (a missing key is an error), `a[i]` of lists with an int, uint or whole double index
//!   in range; `has(a.b)` on maps (on anything else it is an error);
//! - literals: int, uint, double, string, bool, null (not bytes);
//! - `==` and `!=` on any values: numbers compare numerically across int, uint and double
//!   (`1 == 1.0`, `1 == 1u`), values of different kinds are unequal (`1 == "1"` and
//!   `null == 0` are false, never an error), lists element by element, maps key by key;
//! - `<`, `<=`, `>`, `>=` on numbers (across kinds, as the interpreter does: an int against a
//!   double is compared as `int as f64`), strings (by bytes), bools; anything else, or a NaN,
//!   is an error;
//! - `&&`, `||` as cel-rust evaluates them: the left operand short-circuits; otherwise the right
//!   one is evaluated and its error is the result; a right operand that decides the result
//!   absorbs an error or a non-bool on the left (`error || true` is true, `error && false` is
//!   false); `!` on a bool; `c ? a : b` with a bool condition;
//! - `+ - * / %` on ints and on uints (checked: overflow, division or remainder by zero is an
//!   error), `+ - * /` on doubles (IEEE: `1.0 / 0.0` is infinity; `%` is an error), `+` on
//!   strings and on lists (a list plus a map appends its keys: known only for at most one key);
//!   unary `-` on ints (checked) and doubles; `size(x)` and `x.size()` of strings (code
//!   points), lists and maps.
//!
//! Everything else (macros such as `exists`, `in`, list and map literals, conversions such as
//! `int()`, string methods, optionals, bytes) is left to the interpreter, as is any evaluation
//! that errors: the error messages are the interpreter's.
//!
//! JSON numbers are what [`json_to_cel`](crate::expr::json_to_cel) makes of them: a whole number
//! that fits an `i64` is an int, else one that fits a `u64` a uint, else a double.

use std::borrow::Cow;
use std::cmp::Ordering;
use std::collections::BTreeMap;

use cel::common::ast::{CallExpr, Expr as Ast, IdedExpr, LiteralValue, operators};
use serde_json::{Map, Number, Value as Json};

/// Deeper expressions are left to the interpreter (admission caps the depth anyway).
const DEPTH_MAX: usize = 64;

/// What expressions see as `instance`: `{id, state, version, labels}`.
#[derive(Clone, Copy, Debug)]
pub struct InstanceView<'a> {
    pub id: &'a str,
    pub state: &'a str,
    pub version: u64,
    pub labels: &'a BTreeMap<String, String>,
}

impl InstanceView<'_> {
    /// The view as the JSON object expressions see.
    pub fn to_json(&self) -> Json {
        let mut map = Map::new();
        map.insert("id".into(), Json::from(self.id));
        map.insert("state".into(), Json::from(self.state));
        map.insert("version".into(), Json::from(self.version));
        map.insert(
            "labels".into(),
            Json::Object(
                self.labels
                    .iter()
                    .map(|(k, v)| (k.clone(), Json::from(v.as_str())))
                    .collect(),
            ),
        );
        Json::Object(map)
    }

    /// The view as a CEL value (the interpreter's `instance`).
    pub fn to_cel(&self) -> cel::Value {
        crate::expr::json_to_cel(&self.to_json())
    }
}

/// The variables of one evaluation.
#[derive(Clone, Copy, Debug)]
pub struct Vars<'a> {
    /// The instance data before this transition.
    pub data: &'a Map<String, Json>,
    /// Assignments of this transition overlaid on `data`, if expressions see them.
    pub pending: Option<&'a Map<String, Json>>,
    /// The event payload (`null` when none).
    pub event: &'a Json,
    pub instance: InstanceView<'a>,
}

impl Vars<'_> {
    /// `data` with the pending assignments applied, as one JSON object.
    pub fn data_json(&self) -> Map<String, Json> {
        let mut data = self.data.clone();
        if let Some(pending) = self.pending {
            for (k, v) in pending {
                data.insert(k.clone(), v.clone());
            }
        }
        data
    }
}

/// A compiled fast-path expression.
#[derive(Debug)]
pub struct Plan {
    root: Node,
}

#[derive(Debug)]
enum Node {
    Const(Const),
    Var(Var),
    /// `var.a.b…`: field selections on a variable, walked in one loop.
    Path(Var, Box<[Box<str>]>),
    Select(Box<Node>, Box<str>),
    Has(Box<Node>, Box<str>),
    Index(Box<Node>, Box<Node>),
    Not(Box<Node>),
    Neg(Box<Node>),
    And(Box<Node>, Box<Node>),
    Or(Box<Node>, Box<Node>),
    Cond(Box<Node>, Box<Node>, Box<Node>),
    Eq(Box<Node>, Box<Node>),
    Ne(Box<Node>, Box<Node>),
    Cmp(Cmp, Box<Node>, Box<Node>),
    Arith(Arith, Box<Node>, Box<Node>),
    Size(Box<Node>),
}

#[derive(Debug)]
enum Const {
    Null,
    Bool(bool),
    Int(i64),
    UInt(u64),
    Double(f64),
    Str(Box<str>),
}

#[derive(Debug, Clone, Copy)]
enum Var {
    Data,
    Event,
    Instance,
}

#[derive(Debug, Clone, Copy)]
enum Cmp {
    Lt,
    Le,
    Gt,
    Ge,
}

#[derive(Debug, Clone, Copy)]
enum Arith {
    Add,
    Sub,
    Mul,
    Div,
    Rem,
}

impl Plan {
    /// Translates a parsed expression; `None` when some node is outside the subset.
    pub fn compile(expr: &IdedExpr) -> Option<Plan> {
        Some(Plan {
            root: translate(expr, 0)?,
        })
    }

    /// A guard's result, when it is a bool the interpreter would give too.
    pub fn guard(&self, vars: &Vars<'_>) -> Option<bool> {
        match eval(&self.root, vars)? {
            Val::Bool(b) => Some(b),
            _ => None,
        }
    }

    /// An assignment's result as JSON, when the interpreter would give the same.
    pub fn value(&self, vars: &Vars<'_>) -> Option<Json> {
        let value = eval(&self.root, vars)?;
        to_json(&value, vars)
    }
}

fn translate(expr: &IdedExpr, depth: usize) -> Option<Node> {
    if depth > DEPTH_MAX {
        return None;
    }
    let next = depth + 1;
    Some(match &expr.expr {
        Ast::Literal(literal) => Node::Const(match literal {
            LiteralValue::Boolean(b) => Const::Bool(*b.inner()),
            LiteralValue::Int(i) => Const::Int(*i.inner()),
            LiteralValue::UInt(u) => Const::UInt(*u.inner()),
            LiteralValue::Double(d) => Const::Double(*d.inner()),
            LiteralValue::String(s) => Const::Str(s.inner().into()),
            LiteralValue::Null => Const::Null,
            LiteralValue::Bytes(_) => return None,
        }),
        Ast::Ident(name) => Node::Var(match name.as_str() {
            "data" => Var::Data,
            "event" => Var::Event,
            "instance" => Var::Instance,
            _ => return None,
        }),
        Ast::Select(select) => {
            let operand = translate(&select.operand, next)?;
            let field: Box<str> = select.field.as_str().into();
            if select.test {
                Node::Has(Box::new(operand), field)
            } else {
                match operand {
                    Node::Var(var) => Node::Path(var, Box::new([field])),
                    Node::Path(var, fields) => {
                        let mut fields = fields.into_vec();
                        fields.push(field);
                        Node::Path(var, fields.into_boxed_slice())
                    }
                    operand => Node::Select(Box::new(operand), field),
                }
            }
        }
        Ast::Call(call) => translate_call(call, next)?,
        Ast::Unspecified | Ast::Comprehension(_) | Ast::List(_) | Ast::Map(_) | Ast::Struct(_) => {
            return None;
        }
    })
}

fn translate_call(call: &CallExpr, depth: usize) -> Option<Node> {
    let arg = |i: usize| -> Option<Box<Node>> { Some(Box::new(translate(&call.args[i], depth)?)) };
    if let Some(target) = &call.target {
        // `x.size()`, the only method in the subset.
        return if call.func_name == "size" && call.args.is_empty() {
            Some(Node::Size(Box::new(translate(target, depth)?)))
        } else {
            None
        };
    }
    let name = call.func_name.as_str();
    Some(match call.args.len() {
        1 => match name {
            operators::LOGICAL_NOT => Node::Not(arg(0)?),
            operators::NEGATE => Node::Neg(arg(0)?),
            "size" => Node::Size(arg(0)?),
            _ => return None,
        },
        2 => {
            let (a, b) = (arg(0)?, arg(1)?);
            match name {
                operators::LOGICAL_AND => Node::And(a, b),
                operators::LOGICAL_OR => Node::Or(a, b),
                operators::EQUALS => Node::Eq(a, b),
                operators::NOT_EQUALS => Node::Ne(a, b),
                operators::LESS => Node::Cmp(Cmp::Lt, a, b),
                operators::LESS_EQUALS => Node::Cmp(Cmp::Le, a, b),
                operators::GREATER => Node::Cmp(Cmp::Gt, a, b),
                operators::GREATER_EQUALS => Node::Cmp(Cmp::Ge, a, b),
                operators::ADD => Node::Arith(Arith::Add, a, b),
                operators::SUBSTRACT => Node::Arith(Arith::Sub, a, b),
                operators::MULTIPLY => Node::Arith(Arith::Mul, a, b),
                operators::DIVIDE => Node::Arith(Arith::Div, a, b),
                operators::MODULO => Node::Arith(Arith::Rem, a, b),
                operators::INDEX => Node::Index(a, b),
                _ => return None,
            }
        }
        3 if name == operators::CONDITIONAL => Node::Cond(arg(0)?, arg(1)?, arg(2)?),
        _ => return None,
    })
}

/// A value during evaluation: scalars by value, strings and containers borrowed where they can
/// be.
#[derive(Clone, Debug)]
enum Val<'a> {
    Null,
    Bool(bool),
    Int(i64),
    UInt(u64),
    Double(f64),
    Str(Cow<'a, str>),
    /// Borrowed from the inputs, or made by `+`.
    List(Cow<'a, [Json]>),
    Map(MapRef<'a>),
}

/// A map expressions can see.
#[derive(Clone, Copy, Debug)]
enum MapRef<'a> {
    Json(&'a Map<String, Json>),
    Labels(&'a BTreeMap<String, String>),
    /// `data`, with the pending assignments overlaid.
    Data,
    /// `instance`.
    Instance,
}

/// The instance view's keys, in order.
const INSTANCE_KEYS: [&str; 4] = ["id", "state", "version", "labels"];

impl<'a> MapRef<'a> {
    fn get(self, vars: &Vars<'a>, key: &str) -> Option<Val<'a>> {
        match self {
            MapRef::Json(map) => map.get(key).map(from_json),
            MapRef::Labels(labels) => labels.get(key).map(|v| Val::Str(Cow::Borrowed(v))),
            MapRef::Data => vars
                .pending
                .and_then(|p| p.get(key))
                .or_else(|| vars.data.get(key))
                .map(from_json),
            MapRef::Instance => {
                let view = vars.instance;
                Some(match key {
                    "id" => Val::Str(Cow::Borrowed(view.id)),
                    "state" => Val::Str(Cow::Borrowed(view.state)),
                    "version" => from_u64(view.version),
                    "labels" => Val::Map(MapRef::Labels(view.labels)),
                    _ => return None,
                })
            }
        }
    }

    fn contains(self, vars: &Vars<'a>, key: &str) -> bool {
        match self {
            MapRef::Json(map) => map.contains_key(key),
            MapRef::Labels(labels) => labels.contains_key(key),
            MapRef::Data => {
                vars.pending.is_some_and(|p| p.contains_key(key)) || vars.data.contains_key(key)
            }
            MapRef::Instance => INSTANCE_KEYS.contains(&key),
        }
    }

    fn len(self, vars: &Vars<'a>) -> usize {
        match self {
            MapRef::Json(map) => map.len(),
            MapRef::Labels(labels) => labels.len(),
            MapRef::Data => {
                let added = vars.pending.map_or(0, |p| {
                    p.keys().filter(|k| !vars.data.contains_key(*k)).count()
                });
                vars.data.len() + added
            }
            MapRef::Instance => INSTANCE_KEYS.len(),
        }
    }

    /// Whether `f` holds for every entry.
    fn all(self, vars: &Vars<'a>, mut f: impl FnMut(&str, Val<'a>) -> bool) -> bool {
        match self {
            MapRef::Json(map) => map.iter().all(|(k, v)| f(k, from_json(v))),
            MapRef::Labels(labels) => labels.iter().all(|(k, v)| f(k, Val::Str(Cow::Borrowed(v)))),
            MapRef::Data => {
                let pending = vars.pending;
                pending.is_none_or(|p| p.iter().all(|(k, v)| f(k, from_json(v))))
                    && vars
                        .data
                        .iter()
                        .filter(|(k, _)| !pending.is_some_and(|p| p.contains_key(*k)))
                        .all(|(k, v)| f(k, from_json(v)))
            }
            MapRef::Instance => INSTANCE_KEYS
                .iter()
                .all(|k| self.get(vars, k).is_some_and(|v| f(k, v))),
        }
    }

    fn to_json(self, vars: &Vars<'a>) -> Json {
        match self {
            MapRef::Json(map) => Json::Object(map.clone()),
            MapRef::Labels(labels) => Json::Object(
                labels
                    .iter()
                    .map(|(k, v)| (k.clone(), Json::from(v.as_str())))
                    .collect(),
            ),
            MapRef::Data => Json::Object(vars.data_json()),
            MapRef::Instance => vars.instance.to_json(),
        }
    }
}

/// A JSON value as CEL sees it (see [`crate::expr::json_to_cel`]).
fn from_json(value: &Json) -> Val<'_> {
    match value {
        Json::Null => Val::Null,
        Json::Bool(b) => Val::Bool(*b),
        Json::Number(n) => from_number(n),
        Json::String(s) => Val::Str(Cow::Borrowed(s)),
        Json::Array(items) => Val::List(Cow::Borrowed(items)),
        Json::Object(map) => Val::Map(MapRef::Json(map)),
    }
}

fn from_number<'a>(n: &Number) -> Val<'a> {
    if let Some(i) = n.as_i64() {
        Val::Int(i)
    } else if let Some(u) = n.as_u64() {
        Val::UInt(u)
    } else {
        Val::Double(n.as_f64().unwrap_or(f64::NAN))
    }
}

/// A `u64` as a JSON number would be: an int when it fits.
fn from_u64<'a>(u: u64) -> Val<'a> {
    match i64::try_from(u) {
        Ok(i) => Val::Int(i),
        Err(_) => Val::UInt(u),
    }
}

/// The result as JSON, as [`crate::expr::cel_to_json`] would convert it; `None` where it fails.
fn to_json(value: &Val<'_>, vars: &Vars<'_>) -> Option<Json> {
    Some(match value {
        Val::Null => Json::Null,
        Val::Bool(b) => Json::Bool(*b),
        Val::Int(i) => Json::from(*i),
        Val::UInt(u) => Json::from(*u),
        Val::Double(d) => Json::Number(Number::from_f64(*d)?),
        Val::Str(s) => Json::String(s.as_ref().to_owned()),
        Val::List(items) => Json::Array(items.clone().into_owned()),
        Val::Map(map) => map.to_json(vars),
    })
}

fn eval<'a>(node: &'a Node, vars: &Vars<'a>) -> Option<Val<'a>> {
    Some(match node {
        Node::Const(c) => match c {
            Const::Null => Val::Null,
            Const::Bool(b) => Val::Bool(*b),
            Const::Int(i) => Val::Int(*i),
            Const::UInt(u) => Val::UInt(*u),
            Const::Double(d) => Val::Double(*d),
            Const::Str(s) => Val::Str(Cow::Borrowed(s)),
        },
        Node::Var(var) => var_val(*var, vars),
        Node::Path(var, fields) => path(*var, fields, vars)?,
        Node::Select(operand, field) => match eval(operand, vars)? {
            Val::Map(map) => map.get(vars, field)?,
            _ => return None,
        },
        Node::Has(operand, field) => match eval(operand, vars)? {
            Val::Map(map) => Val::Bool(map.contains(vars, field)),
            _ => return None,
        },
        Node::Index(operand, index) => {
            let operand = eval(operand, vars)?;
            let index = eval(index, vars)?;
            match (operand, index) {
                (Val::Map(map), Val::Str(key)) => map.get(vars, &key)?,
                // (an element of a list made by `+` is left to the interpreter)
                (Val::List(Cow::Borrowed(items)), index) => {
                    let i = match index {
                        Val::Int(i) => usize::try_from(i).ok()?,
                        Val::UInt(u) => usize::try_from(u).ok()?,
                        // a whole double indexes like an int
                        Val::Double(d) => usize::try_from(double_to_int_lossless(d)?).ok()?,
                        _ => return None,
                    };
                    from_json(items.get(i)?)
                }
                _ => return None,
            }
        }
        Node::Not(operand) => match eval(operand, vars)? {
            Val::Bool(b) => Val::Bool(!b),
            _ => return None,
        },
        Node::Neg(operand) => match eval(operand, vars)? {
            Val::Int(i) => Val::Int(i.checked_neg()?),
            Val::Double(d) => Val::Double(-d),
            _ => return None,
        },
        // cel-rust: the left operand short-circuits; otherwise the right one is evaluated (its
        // error is the result), and a right operand that decides the result absorbs an error
        // (or a non-bool) on the left. An unknown left (`None`) is treated as an error: where
        // that yields a value, it is the value whatever the left really is.
        Node::And(left, right) => {
            let left = eval(left, vars);
            if let Some(Val::Bool(false)) = left {
                return Some(Val::Bool(false));
            }
            match (left, eval(right, vars)?) {
                (Some(Val::Bool(true)), Val::Bool(r)) => Val::Bool(r),
                (_, Val::Bool(false)) => Val::Bool(false),
                _ => return None,
            }
        }
        Node::Or(left, right) => {
            let left = eval(left, vars);
            if let Some(Val::Bool(true)) = left {
                return Some(Val::Bool(true));
            }
            match (left, eval(right, vars)?) {
                (Some(Val::Bool(false)), Val::Bool(r)) => Val::Bool(r),
                (_, Val::Bool(true)) => Val::Bool(true),
                _ => return None,
            }
        }
        Node::Cond(condition, yes, no) => match eval(condition, vars)? {
            Val::Bool(true) => eval(yes, vars)?,
            Val::Bool(false) => eval(no, vars)?,
            _ => return None,
        },
        Node::Eq(a, b) => {
            let a = eval(a, vars)?;
            let b = eval(b, vars)?;
            Val::Bool(equals(&a, &b, vars))
        }
        Node::Ne(a, b) => {
            let a = eval(a, vars)?;
            let b = eval(b, vars)?;
            Val::Bool(!equals(&a, &b, vars))
        }
        Node::Cmp(op, a, b) => {
            let a = eval(a, vars)?;
            let b = eval(b, vars)?;
            let ordering = compare(&a, &b)?;
            Val::Bool(match op {
                Cmp::Lt => ordering == Ordering::Less,
                Cmp::Le => ordering != Ordering::Greater,
                Cmp::Gt => ordering == Ordering::Greater,
                Cmp::Ge => ordering != Ordering::Less,
            })
        }
        Node::Arith(op, a, b) => {
            let a = eval(a, vars)?;
            let b = eval(b, vars)?;
            arith(*op, a, b, vars)?
        }
        Node::Size(operand) => match eval(operand, vars)? {
            Val::Str(s) => Val::Int(i64::try_from(s.chars().count()).ok()?),
            Val::List(items) => Val::Int(i64::try_from(items.len()).ok()?),
            Val::Map(map) => Val::Int(i64::try_from(map.len(vars)).ok()?),
            _ => return None,
        },
    })
}

fn var_val<'a>(var: Var, vars: &Vars<'a>) -> Val<'a> {
    match var {
        Var::Data => Val::Map(MapRef::Data),
        Var::Event => from_json(vars.event),
        Var::Instance => Val::Map(MapRef::Instance),
    }
}

/// `var.fields…`; a missing key, or a field of something other than a map, is an error.
fn path<'a>(var: Var, fields: &[Box<str>], vars: &Vars<'a>) -> Option<Val<'a>> {
    let (first, rest) = fields.split_first()?;
    // Below the root, maps are JSON objects, except the instance's labels.
    let mut json = match (var, vars.event) {
        (Var::Data, _) => vars
            .pending
            .and_then(|p| p.get(&**first))
            .or_else(|| vars.data.get(&**first))?,
        (Var::Event, Json::Object(map)) => map.get(&**first)?,
        (Var::Event, _) => return None,
        (Var::Instance, _) => {
            let mut value = MapRef::Instance.get(vars, first)?;
            for field in rest {
                match value {
                    Val::Map(map) => value = map.get(vars, field)?,
                    _ => return None,
                }
            }
            return Some(value);
        }
    };
    for field in rest {
        match json {
            Json::Object(map) => json = map.get(&**field)?,
            _ => return None,
        }
    }
    Some(from_json(json))
}

/// `<` and friends (cel-rust `Comparer`): numbers across kinds, strings, bools; `None` is the
/// interpreter's error.
fn compare(a: &Val<'_>, b: &Val<'_>) -> Option<Ordering> {
    match (a, b) {
        (Val::Int(x), Val::Int(y)) => Some(x.cmp(y)),
        (Val::Int(x), Val::UInt(y)) => Some(match u64::try_from(*x) {
            Ok(x) => x.cmp(y),
            Err(_) => Ordering::Less,
        }),
        (Val::Int(x), Val::Double(y)) => (*x as f64).partial_cmp(y),
        (Val::UInt(x), Val::UInt(y)) => Some(x.cmp(y)),
        (Val::UInt(x), Val::Int(y)) => Some(match i64::try_from(*x) {
            Ok(x) => x.cmp(y),
            Err(_) => Ordering::Greater,
        }),
        (Val::UInt(x), Val::Double(y)) => (*x as f64).partial_cmp(y),
        (Val::Double(x), Val::Double(y)) => x.partial_cmp(y),
        (Val::Double(x), Val::Int(y)) => x.partial_cmp(&(*y as f64)),
        (Val::Double(x), Val::UInt(y)) => x.partial_cmp(&(*y as f64)),
        (Val::Str(x), Val::Str(y)) => Some(x.as_ref().cmp(y.as_ref())),
        (Val::Bool(x), Val::Bool(y)) => Some(x.cmp(y)),
        _ => None,
    }
}

/// `==` (cel-rust `Val::equals`): never an error; values of different kinds are unequal, except
/// numbers, which compare numerically.
fn equals(a: &Val<'_>, b: &Val<'_>, vars: &Vars<'_>) -> bool {
    match (a, b) {
        (Val::Null, Val::Null) => true,
        (Val::Bool(x), Val::Bool(y)) => x == y,
        (Val::Str(x), Val::Str(y)) => x == y,
        (
            Val::Int(_) | Val::UInt(_) | Val::Double(_),
            Val::Int(_) | Val::UInt(_) | Val::Double(_),
        ) => compare(a, b) == Some(Ordering::Equal),
        (Val::List(x), Val::List(y)) => {
            x.len() == y.len()
                && x.iter()
                    .zip(y.iter())
                    .all(|(x, y)| equals(&from_json(x), &from_json(y), vars))
        }
        (Val::Map(x), Val::Map(y)) => {
            x.len(vars) == y.len(vars)
                && x.all(vars, |k, v| {
                    y.get(vars, k).is_some_and(|other| equals(&v, &other, vars))
                })
        }
        _ => false,
    }
}

/// `d` as an `i64` if it converts without loss (cel-rust's `double_to_int_lossless`).
fn double_to_int_lossless(d: f64) -> Option<i64> {
    if d > i64::MIN as f64 && d < i64::MAX as f64 {
        let i = d as i64;
        (i as f64 == d).then_some(i)
    } else {
        None
    }
}

fn arith<'a>(op: Arith, a: Val<'a>, b: Val<'a>, vars: &Vars<'a>) -> Option<Val<'a>> {
    Some(match (a, b) {
        (Val::Int(x), Val::Int(y)) => Val::Int(match op {
            Arith::Add => x.checked_add(y)?,
            Arith::Sub => x.checked_sub(y)?,
            Arith::Mul => x.checked_mul(y)?,
            Arith::Div => x.checked_div(y)?,
            Arith::Rem => x.checked_rem(y)?,
        }),
        (Val::UInt(x), Val::UInt(y)) => Val::UInt(match op {
            Arith::Add => x.checked_add(y)?,
            Arith::Sub => x.checked_sub(y)?,
            Arith::Mul => x.checked_mul(y)?,
            Arith::Div => x.checked_div(y)?,
            Arith::Rem => x.checked_rem(y)?,
        }),
        (Val::Double(x), Val::Double(y)) => Val::Double(match op {
            Arith::Add => x + y,
            Arith::Sub => x - y,
            Arith::Mul => x * y,
            Arith::Div => x / y,
            Arith::Rem => return None,
        }),
        (Val::Str(x), Val::Str(y)) if matches!(op, Arith::Add) => {
            let mut s = String::with_capacity(x.len() + y.len());
            s.push_str(&x);
            s.push_str(&y);
            Val::Str(Cow::Owned(s))
        }
        (Val::List(x), Val::List(y)) if matches!(op, Arith::Add) => {
            if y.is_empty() {
                Val::List(x)
            } else if x.is_empty() {
                Val::List(y)
            } else {
                let mut items = x.into_owned();
                items.extend_from_slice(&y);
                Val::List(Cow::Owned(items))
            }
        }
        // A list plus a map appends the map's keys, in the order of a `HashMap`: known only when
        // there is at most one.
        (Val::List(x), Val::Map(y)) if matches!(op, Arith::Add) && y.len(vars) <= 1 => {
            let mut keys = Vec::new();
            y.all(vars, |k, _| {
                keys.push(Json::from(k));
                true
            });
            if keys.is_empty() {
                Val::List(x)
            } else {
                let mut items = x.into_owned();
                items.extend(keys);
                Val::List(Cow::Owned(items))
            }
        }
        _ => return None,
    })
}
