//! The expression fast path against the CEL interpreter: table-driven cases for every operator
//! and the tricky semantics, a property test over random expressions and data, and the engine's
//! view of assignments.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::sync::Arc;

use cnsm_core::admission::admit_str;
use cnsm_core::engine::{Input, Machine, NewInstance, Trigger};
use cnsm_core::expr::Expr;
use cnsm_core::fastexpr::{InstanceView, Vars};
use cnsm_core::{Instance, Status};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use serde_json::{Map, Value, json};

fn env() -> Arc<cel::Env> {
    Arc::new(cel::Env::stdlib())
}

/// The inputs of one evaluation, owned.
struct Fixture {
    data: Map<String, Value>,
    pending: Option<Map<String, Value>>,
    event: Value,
    labels: BTreeMap<String, String>,
    version: u64,
}

impl Fixture {
    fn vars(&self) -> Vars<'_> {
        Vars {
            data: &self.data,
            pending: self.pending.as_ref(),
            event: &self.event,
            instance: InstanceView {
                id: "o-1",
                state: "validated",
                version: self.version,
                labels: &self.labels,
            },
        }
    }
}

fn object(value: Value) -> Map<String, Value> {
    match value {
        Value::Object(map) => map,
        other => panic!("not an object: {other}"),
    }
}

fn fixture() -> Fixture {
    Fixture {
        data: object(json!({
            "n": 1,
            "total": 40,
            "big": 18446744073709551615u64,
            "imax": i64::MAX,
            "imin": i64::MIN,
            "neg": -5,
            "pi": 3.5,
            "one_f": 1.0,
            "huge": 1e300,
            "s": "abc",
            "uni": "héllo",
            "empty": "",
            "t": true,
            "f": false,
            "nul": null,
            "m": {"a": 1, "b": {"c": "x"}},
            "m2": {"a": 1.0, "b": {"c": "x"}},
            "l": [1, 2.0, "x"],
            "l2": [1.0, 2, "x"],
        })),
        pending: None,
        event: json!({"amount": 40, "kind": "pay", "nested": {"k": [1, 2]}}),
        labels: BTreeMap::from([("team".to_owned(), "payments".to_owned())]),
        version: 3,
    }
}

/// What a guard must give.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Want {
    /// The fast path answers, and the interpreter agrees.
    Fast(bool),
    /// The interpreter fails; the fast path defers to it.
    Error,
    /// Outside the fast path's subset: no plan; the interpreter gives this.
    Slow(Result<bool, ()>),
}

fn check_guard(env: &Arc<cel::Env>, fixture: &Fixture, source: &str, want: Want) {
    let expr = Expr::compile(source).unwrap_or_else(|e| panic!("`{source}`: {e}"));
    let vars = fixture.vars();
    let fast = expr.fast_guard(&vars);
    let slow = expr.interpret_guard(env, &vars);
    match want {
        Want::Fast(b) => {
            assert!(expr.has_fast_path(), "`{source}` has no fast path");
            assert_eq!(
                fast,
                Some(b),
                "`{source}`: fast path (interpreter: {slow:?})"
            );
            assert_eq!(slow, Ok(b), "`{source}`: interpreter");
        }
        Want::Error => {
            assert!(expr.has_fast_path(), "`{source}` has no fast path");
            assert_eq!(fast, None, "`{source}`: fast path must defer");
            assert!(slow.is_err(), "`{source}`: interpreter gave {slow:?}");
        }
        Want::Slow(result) => {
            assert!(!expr.has_fast_path(), "`{source}` has a fast path");
            assert_eq!(fast, None, "`{source}`: fast path");
            assert_eq!(slow.map_err(|_| ()), result, "`{source}`: interpreter");
        }
    }
}

fn check_guards(fixture: &Fixture, cases: &[(&str, Want)]) {
    let env = env();
    for (source, want) in cases {
        check_guard(&env, fixture, source, *want);
    }
}

use Want::{Error, Fast, Slow};

#[test]
fn equality_is_heterogeneous_like_cel() {
    check_guards(
        &fixture(),
        &[
            ("data.n == 1", Fast(true)),
            ("data.n == 1.0", Fast(true)),
            ("data.n == 1u", Fast(true)),
            ("data.one_f == 1", Fast(true)),
            ("data.one_f == 1u", Fast(true)),
            ("1.0 == data.n", Fast(true)),
            ("data.n == 2", Fast(false)),
            ("data.n == '1'", Fast(false)),
            ("'1' == data.n", Fast(false)),
            ("data.n == true", Fast(false)),
            ("data.nul == null", Fast(true)),
            ("null == data.nul", Fast(true)),
            ("null == data.n", Fast(false)),
            ("data.n == null", Fast(false)),
            ("data.s == null", Fast(false)),
            ("data.m == null", Fast(false)),
            ("data.nul != null", Fast(false)),
            ("data.s == 'abc'", Fast(true)),
            ("data.s != 'abd'", Fast(true)),
            ("data.t == true", Fast(true)),
            ("data.t != data.f", Fast(true)),
            ("data.neg == -5", Fast(true)),
            ("data.neg == -5.0", Fast(true)),
            ("data.neg == 18446744073709551611u", Fast(false)),
            ("data.big == 18446744073709551615u", Fast(true)),
            ("data.big == -1", Fast(false)),
            ("data.big == data.imax", Fast(false)),
            ("data.imax == 9223372036854775807u", Fast(true)),
            // int vs double goes through `as f64`: i64::MAX rounds to 2^63
            ("data.imax == 9223372036854775807.0", Fast(true)),
            ("data.imax == 9223372036854775808.0", Fast(true)),
            ("data.big == 18446744073709551616.0", Fast(true)),
            ("data.huge == data.huge", Fast(true)),
            ("0.0 / 0.0 == 0.0 / 0.0", Fast(false)),
            ("0.0 / 0.0 != 0.0 / 0.0", Fast(true)),
            ("0.0 / 0.0 != 1", Fast(true)),
            ("-0.0 == 0.0", Fast(true)),
            ("-0.0 == 0", Fast(true)),
            // containers: element by element, key by key, numbers numerically
            ("data.m == data.m", Fast(true)),
            ("data.m == data.m2", Fast(true)),
            ("data.l == data.l2", Fast(true)),
            ("data.l == data.l", Fast(true)),
            ("data.m == event.nested", Fast(false)),
            ("data.l == data.m", Fast(false)),
            ("event.nested.k == data.l", Fast(false)),
            ("data.m.b == data.m2.b", Fast(true)),
            ("data == data", Fast(true)),
            ("data != event", Fast(true)),
            ("instance == instance", Fast(true)),
            ("instance.labels == instance.labels", Fast(true)),
            ("instance.labels == data.m", Fast(false)),
            // an error on either side is the result
            ("data.missing == 1", Error),
            ("1 != data.missing", Error),
            ("data.missing == null", Error),
        ],
    );
}

#[test]
fn ordering_follows_cel() {
    check_guards(
        &fixture(),
        &[
            ("data.total > 0", Fast(true)),
            ("event.amount >= data.total", Fast(true)),
            ("event.amount > data.total", Fast(false)),
            ("data.total < 1000", Fast(true)),
            ("data.total <= 40", Fast(true)),
            ("data.pi > 3", Fast(true)),
            ("3 < data.pi", Fast(true)),
            ("data.pi >= 3.5", Fast(true)),
            ("data.pi < 4u", Fast(true)),
            ("4u > data.pi", Fast(true)),
            ("data.big > data.imax", Fast(true)),
            ("data.imax < data.big", Fast(true)),
            ("data.neg < 0u", Fast(true)),
            ("0u > data.neg", Fast(true)),
            ("data.big > 1.0", Fast(true)),
            ("data.imin < -9223372036854775807", Fast(true)),
            ("data.imax >= 9223372036854775807.0", Fast(true)),
            ("data.imax > 9223372036854775806.0", Fast(false)),
            ("'a' < 'b'", Fast(true)),
            ("data.s < 'abd'", Fast(true)),
            ("data.s <= 'abc'", Fast(true)),
            ("data.empty < data.s", Fast(true)),
            ("'B' < 'a'", Fast(true)),
            ("data.uni > 'hz'", Fast(true)),
            ("data.uni < 'hé'", Fast(false)),
            ("'é' > 'z'", Fast(true)),
            ("true > false", Fast(true)),
            ("data.f >= data.t", Fast(false)),
            // not comparable: errors
            ("data.nul < 1", Error),
            ("null < null", Error),
            ("data.s < 1", Error),
            ("1 < data.s", Error),
            ("data.t < 1", Error),
            ("data.m < data.m", Error),
            ("data.l <= data.l", Error),
            ("0.0 / 0.0 < 1.0", Error),
            ("1 >= 0.0 / 0.0", Error),
            ("data.missing > 0", Error),
        ],
    );
}

#[test]
fn logic_absorbs_errors_like_cel_rust() {
    check_guards(
        &fixture(),
        &[
            ("data.t && data.t", Fast(true)),
            ("data.t && data.f", Fast(false)),
            ("data.f || data.t", Fast(true)),
            ("data.f || data.f", Fast(false)),
            // short circuit on the left
            ("true || data.missing == 1", Fast(true)),
            ("false && data.missing == 1", Fast(false)),
            ("true || data.n", Fast(true)),
            ("false && data.n", Fast(false)),
            // an error on the left absorbed by a deciding right operand
            ("data.missing == 1 || true", Fast(true)),
            ("data.missing == 1 && false", Fast(false)),
            ("data.n || true", Fast(true)),
            ("data.n && false", Fast(false)),
            ("data.s < 1 || data.t", Fast(true)),
            // otherwise an error
            ("data.missing == 1 || false", Error),
            ("data.missing == 1 && true", Error),
            ("false || data.missing == 1", Error),
            ("true && data.missing == 1", Error),
            ("true && data.n", Error),
            ("false || data.n", Error),
            ("data.n && true", Error),
            ("data.n || false", Error),
            ("data.missing || data.missing", Error),
            ("data.n && data.n", Error),
            // `!`
            ("!data.t", Fast(false)),
            ("!(data.n == 1)", Fast(false)),
            ("!!data.t", Fast(true)),
            ("!data.n", Error),
            ("!data.nul", Error),
            ("!data.missing", Error),
            // `?:`
            ("data.t ? data.n == 1 : data.missing", Fast(true)),
            ("data.f ? data.missing : data.n == 2", Fast(false)),
            ("data.n ? true : false", Error),
            ("data.missing ? true : false", Error),
            ("data.t ? data.n : true", Error),
        ],
    );
}

#[test]
fn arithmetic_is_checked_like_cel() {
    check_guards(
        &fixture(),
        &[
            ("data.n + 1 == 2", Fast(true)),
            ("data.total - data.n == 39", Fast(true)),
            ("data.total * 2 == 80", Fast(true)),
            ("7 / 2 == 3", Fast(true)),
            ("-7 / 2 == -3", Fast(true)),
            ("-7 % 3 == -1", Fast(true)),
            ("7 % -3 == 1", Fast(true)),
            ("-data.neg == 5", Fast(true)),
            ("-data.pi == -3.5", Fast(true)),
            ("data.imax + 1 > 0", Error),
            ("data.imin - 1 < 0", Error),
            ("data.imax * 2 > 0", Error),
            ("data.n / 0 == 0", Error),
            ("data.n % 0 == 0", Error),
            ("data.imin / -1 == 0", Error),
            ("data.imin % -1 == 0", Error),
            ("-data.imin == 0", Error),
            ("-data.big == 0", Error),
            ("-data.s == 0", Error),
            ("5u + 5u == 10u", Fast(true)),
            ("data.big - 1u < data.big", Fast(true)),
            ("7u / 2u == 3u", Fast(true)),
            ("7u % 2u == 1u", Fast(true)),
            ("data.big + 1u > 0u", Error),
            ("1u - 2u == 0u", Error),
            ("data.big * 2u > 0u", Error),
            ("1u / 0u == 0u", Error),
            ("1u % 0u == 0u", Error),
            ("data.pi * 2.0 == 7.0", Fast(true)),
            ("data.pi + 0.5 == 4", Fast(true)),
            ("data.pi - 0.5 == 3u", Fast(true)),
            ("1.0 / 0.0 > 1e308", Fast(true)),
            ("data.huge * data.huge > data.huge", Fast(true)),
            ("data.pi + 1 == 4.5", Error),
            ("1 + data.pi == 4.5", Error),
            ("data.n + 1u == 2", Error),
            ("data.pi % 2.0 == 1.5", Error),
            ("data.s + 'd' == 'abcd'", Fast(true)),
            ("data.s + data.uni == 'abchéllo'", Fast(true)),
            ("data.s + 1 == 'abc1'", Error),
            ("data.nul + 1 == 1", Error),
            ("data.t + data.t", Error),
            ("data.m + data.m == data.m", Error),
        ],
    );
}

#[test]
fn selection_indexing_presence_and_size() {
    check_guards(
        &fixture(),
        &[
            ("data['s'] == 'abc'", Fast(true)),
            ("data.m['b']['c'] == 'x'", Fast(true)),
            ("data.m.b.c == 'x'", Fast(true)),
            ("data['m'].b['c'] == 'x'", Fast(true)),
            ("event['nested'].k[1] == 2", Fast(true)),
            ("data.l[1] == 2", Fast(true)),
            ("data.l[0u] == 1", Fast(true)),
            ("data.l[2] == 'x'", Fast(true)),
            ("data.l[3] == 1", Error),
            ("data.l[-1] == 1", Error),
            ("data.l['a'] == 1", Error),
            ("data.m['zz'] == 1", Error),
            ("data.m[1] == 1", Error),
            ("data.s[0] == 'a'", Error),
            ("data.s.x == 1", Error),
            ("data.l.x == 1", Error),
            ("data.nul.x == 1", Error),
            ("event.amount.x == 1", Error),
            ("data.m.zz == 1", Error),
            ("has(data.n)", Fast(true)),
            ("has(data.nul)", Fast(true)),
            ("has(data.missing)", Fast(false)),
            ("has(data.m.a)", Fast(true)),
            ("has(data.m.b.zz)", Fast(false)),
            ("has(data['m'].a)", Fast(true)),
            ("has(event.kind)", Fast(true)),
            ("has(data.s.x)", Error),
            ("has(data.l.x)", Error),
            ("has(data.nul.x)", Error),
            ("has(data.missing.x)", Error),
            ("has(data.m.zz) || data.m.a == 1", Fast(true)),
            ("size(data.s) == 3", Fast(true)),
            ("size(data.uni) == 5", Fast(true)),
            ("data.uni.size() == 5", Fast(true)),
            ("size(data.empty) == 0", Fast(true)),
            ("data.l.size() == 3", Fast(true)),
            ("size(data.m) == 2", Fast(true)),
            ("size(data) == 19", Fast(true)),
            ("size(event) == 3", Fast(true)),
            ("size(instance) == 4", Fast(true)),
            ("size(data.n) == 1", Error),
            ("size(data.nul) == 0", Error),
            ("data.n.size() == 1", Error),
        ],
    );
}

#[test]
fn instance_view() {
    check_guards(
        &fixture(),
        &[
            ("instance.version == 3", Fast(true)),
            ("instance.version == 3u", Fast(true)),
            ("instance.state == 'validated'", Fast(true)),
            ("instance.id + '!' == 'o-1!'", Fast(true)),
            ("instance.labels.team == 'payments'", Fast(true)),
            ("instance.labels['team'] == 'payments'", Fast(true)),
            ("size(instance.labels) == 1", Fast(true)),
            ("has(instance.labels.team)", Fast(true)),
            ("has(instance.labels.other)", Fast(false)),
            ("has(instance.version)", Fast(true)),
            ("has(instance.nope)", Fast(false)),
            ("instance.nope == 1", Error),
            ("instance.labels.other == 'x'", Error),
        ],
    );
    let mut big = fixture();
    big.version = u64::MAX;
    check_guards(
        &big,
        &[
            ("instance.version == 18446744073709551615u", Fast(true)),
            ("instance.version > 9223372036854775807", Fast(true)),
            ("instance.version + 1u > 0u", Error),
        ],
    );
}

#[test]
fn pending_assignments_overlay_data() {
    let mut fixture = fixture();
    fixture.pending = Some(object(json!({"n": 2, "added": "new", "m": {"a": 5}})));
    check_guards(
        &fixture,
        &[
            ("data.n == 2", Fast(true)),
            ("data.added == 'new'", Fast(true)),
            ("data.total == 40", Fast(true)),
            ("data.m.a == 5", Fast(true)),
            ("has(data.m.b)", Fast(false)),
            ("has(data.added)", Fast(true)),
            ("size(data) == 20", Fast(true)),
            ("data == data", Fast(true)),
        ],
    );
}

#[test]
fn null_and_scalar_events() {
    let mut fixture = fixture();
    fixture.event = Value::Null;
    check_guards(
        &fixture,
        &[
            ("event == null", Fast(true)),
            ("event.amount > 1", Error),
            ("has(event.amount)", Error),
            ("event.amount > 1 || true", Fast(true)),
        ],
    );
    fixture.event = json!(7);
    check_guards(
        &fixture,
        &[("event == 7", Fast(true)), ("event.x == 7", Error)],
    );
    fixture.event = json!("s");
    check_guards(
        &fixture,
        &[
            ("event + 's' == 'ss'", Fast(true)),
            ("size(event) == 1", Fast(true)),
        ],
    );
}

#[test]
fn unsupported_expressions_fall_back() {
    check_guards(
        &fixture(),
        &[
            ("data.l == [1, 2.0, 'x']", Slow(Ok(true))),
            ("data.m == {'a': 1, 'b': {'c': 'x'}}", Slow(Ok(true))),
            ("data.l.exists(x, x == 1)", Slow(Ok(true))),
            ("data.l.all(x, x != 'y')", Slow(Ok(true))),
            ("'a' in data.m", Slow(Ok(true))),
            ("1 in data.l", Slow(Ok(true))),
            ("int(data.pi) == 3", Slow(Ok(true))),
            ("double(data.n) == 1.0", Slow(Ok(true))),
            ("string(data.n) == '1'", Slow(Ok(true))),
            ("type(data.n) == int", Slow(Ok(true))),
            ("data.s.startsWith('a')", Slow(Ok(true))),
            ("data.s.contains('b')", Slow(Ok(true))),
            ("data.s.matches('^a')", Slow(Ok(true))),
            ("b'abc' == b'abc'", Slow(Ok(true))),
            ("unknown == 1", Slow(Err(()))),
            ("size(data.s, 1) == 1", Slow(Err(()))),
        ],
    );
}

/// Assignment values by both paths.
#[test]
fn values_match_the_interpreter() {
    let env = env();
    let mut fixture = fixture();
    fixture.pending = Some(object(json!({"n": 2})));
    let cases: &[(&str, Option<Value>)] = &[
        ("event.amount", Some(json!(40))),
        ("event.kind", Some(json!("pay"))),
        ("event", Some(fixture.event.clone())),
        ("data.n + 1", Some(json!(2))),
        ("data.pi * 2.0", Some(json!(7.0))),
        ("data.one_f", Some(json!(1.0))),
        ("data.big", Some(json!(u64::MAX))),
        ("data.big - 1u", Some(json!(u64::MAX - 1))),
        ("data.imin", Some(json!(i64::MIN))),
        ("data.neg * 2", Some(json!(-10))),
        ("data.s + '!'", Some(json!("abc!"))),
        ("data.nul", Some(Value::Null)),
        ("null", Some(Value::Null)),
        ("data.n > 0", Some(json!(true))),
        ("data.m", Some(json!({"a": 1, "b": {"c": "x"}}))),
        ("data.l", Some(json!([1, 2.0, "x"]))),
        ("data.t ? data.l : data.m", Some(json!([1, 2.0, "x"]))),
        ("instance.labels", Some(json!({"team": "payments"}))),
        ("instance.version", Some(json!(3))),
        (
            "instance",
            Some(json!({"id": "o-1", "state": "validated", "version": 3,
                "labels": {"team": "payments"}})),
        ),
        ("size(data)", Some(json!(19))),
        ("1.0 / 0.0", None),
        ("0.0 / 0.0", None),
        ("data.missing", None),
        ("data.imax + 1", None),
    ];
    for (source, want) in cases {
        let expr = Expr::compile(source).unwrap_or_else(|e| panic!("`{source}`: {e}"));
        // Values see the data before the transition: no pending assignments.
        let vars = Vars {
            pending: None,
            ..fixture.vars()
        };
        let fast = expr.fast_value(&vars);
        let slow = expr.interpret_value(&env, &vars);
        assert_eq!(&fast, want, "`{source}`: fast path");
        match want {
            Some(value) => assert_eq!(slow.as_ref(), Ok(value), "`{source}`: interpreter"),
            None => assert!(slow.is_err(), "`{source}`: interpreter gave {slow:?}"),
        }
    }
    // `data` as a whole, with pending assignments overlaid.
    let expr = Expr::compile("data").expect("compiles");
    let vars = fixture.vars();
    let fast = expr.fast_value(&vars).expect("fast path");
    assert_eq!(fast["n"], json!(2));
    assert_eq!(Ok(fast), expr.interpret_value(&env, &vars));
}

// ---------------------------------------------------------------------------------------------
// Property test: random expressions over the subset, random data.

const KEYS: [&str; 4] = ["a", "b", "c", "d"];

fn json_number() -> BoxedStrategy<Value> {
    prop_oneof![
        8 => (-3i64..4).prop_map(Value::from),
        1 => prop_oneof![
            Just(i64::MAX),
            Just(i64::MIN),
            Just(i64::MAX - 1),
            any::<i64>()
        ]
        .prop_map(Value::from),
        1 => prop_oneof![
            Just(u64::MAX),
            Just(i64::MAX as u64 + 1),
            (i64::MAX as u64 + 1)..=u64::MAX
        ]
        .prop_map(Value::from),
        3 => prop_oneof![
            Just(0.0),
            Just(-0.0),
            Just(1.0),
            Just(2.5),
            Just(-1.5),
            Just(1e300),
            Just(i64::MAX as f64),
            (-10.0f64..10.0)
        ]
        .prop_map(Value::from),
    ]
    .boxed()
}

fn json_string() -> BoxedStrategy<Value> {
    prop::sample::select(vec!["", "a", "b", "ab", "B", "é", "1"])
        .prop_map(Value::from)
        .boxed()
}

fn json_leaf() -> BoxedStrategy<Value> {
    prop_oneof![
        1 => Just(Value::Null),
        2 => any::<bool>().prop_map(Value::Bool),
        10 => json_number(),
        2 => json_string(),
    ]
    .boxed()
}

fn json_value() -> BoxedStrategy<Value> {
    let nested = json_leaf().prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            1 => prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            2 => prop::collection::btree_map(prop::sample::select(KEYS.to_vec()), inner, 1..5)
                .prop_map(|m| Value::Object(
                    m.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()
                )),
        ]
    });
    prop_oneof![3 => json_leaf(), 1 => nested].boxed()
}

/// An object over [`KEYS`], each present more often than not, loosely typed: `a` and `b`
/// mostly numbers, `c` mostly a string, `d` anything.
fn json_object() -> BoxedStrategy<Map<String, Value>> {
    let typed = |typical: BoxedStrategy<Value>| prop_oneof![9 => typical, 1 => json_value()];
    (
        prop::option::weighted(0.85, typed(json_number())),
        prop::option::weighted(0.85, typed(json_number())),
        prop::option::weighted(0.85, typed(json_string())),
        prop::option::weighted(0.85, json_value()),
    )
        .prop_map(|(a, b, c, d)| {
            KEYS.iter()
                .zip([a, b, c, d])
                .filter_map(|(k, v)| Some(((*k).to_owned(), v?)))
                .collect()
        })
        .boxed()
}

/// An event payload: mostly an object.
fn payload() -> BoxedStrategy<Value> {
    prop_oneof![4 => json_object().prop_map(Value::Object), 1 => json_value()].boxed()
}

fn literal() -> BoxedStrategy<String> {
    prop_oneof![
        1 => Just("null".to_owned()),
        1 => Just("true".to_owned()),
        1 => Just("false".to_owned()),
        6 => (-3i64..4).prop_map(|i| i.to_string()),
        1 => Just("9223372036854775807".to_owned()),
        1 => Just("-9223372036854775808".to_owned()),
        1 => (0u64..4).prop_map(|u| format!("{u}u")),
        1 => Just("18446744073709551615u".to_owned()),
        2 => prop::sample::select(vec!["0.0", "1.0", "2.5", "-1.5", "1e300"]).prop_map(str::to_owned),
        2 => prop::sample::select(vec!["''", "'a'", "'b'", "'é'"]).prop_map(str::to_owned),
    ]
    .boxed()
}

fn path() -> BoxedStrategy<String> {
    let key = prop::sample::select(KEYS.to_vec());
    let root = prop::sample::select(vec!["data", "event", "data", "event"]);
    prop_oneof![
        6 => (root.clone(), key.clone()).prop_map(|(r, k)| format!("{r}.{k}")),
        2 => (root.clone(), key.clone(), key.clone()).prop_map(|(r, k, l)| format!("{r}.{k}.{l}")),
        1 => (root.clone(), key.clone()).prop_map(|(r, k)| format!("{r}['{k}']")),
        1 => (root, key, 0i64..3).prop_map(|(r, k, i)| format!("{r}.{k}[{i}]")),
        1 => prop::sample::select(vec![
            "instance.version",
            "instance.state",
            "instance.id",
            "instance.labels.team",
            "instance.labels",
            "data",
            "event",
        ])
        .prop_map(str::to_owned),
    ]
    .boxed()
}

fn leaf() -> BoxedStrategy<String> {
    prop_oneof![
        2 => literal(),
        3 => path(),
        1 => path().prop_filter_map("has() takes a field selection", |p| {
            p.rfind('.').filter(|_| !p.ends_with(']')).map(|_| format!("has({p})"))
        }),
    ]
    .boxed()
}

/// Any expression of the subset, mostly ill-typed.
fn any_expression() -> BoxedStrategy<String> {
    leaf()
        .prop_recursive(4, 32, 3, |inner| {
            let binary = prop::sample::select(vec![
                "==", "!=", "<", "<=", ">", ">=", "&&", "||", "+", "-", "*", "/", "%",
            ]);
            prop_oneof![
                4 => (inner.clone(), binary, inner.clone())
                    .prop_map(|(a, op, b)| format!("({a} {op} {b})")),
                1 => inner.clone().prop_map(|a| format!("!({a})")),
                1 => inner.clone().prop_map(|a| format!("-({a})")),
                1 => inner.clone().prop_map(|a| format!("size({a})")),
                1 => (inner.clone(), inner.clone(), inner)
                    .prop_map(|(c, a, b)| format!("({c} ? {a} : {b})")),
            ]
        })
        .boxed()
}

/// A number, probably: a numeric literal, a path to a mostly numeric key, arithmetic on two.
fn number_operand() -> BoxedStrategy<String> {
    let root = prop::sample::select(vec!["data", "event", "data.d", "event.d"]);
    let leaf = prop_oneof![
        2 => literal(),
        4 => (root, prop::sample::select(vec!["a", "b"])).prop_map(|(r, k)| format!("{r}.{k}")),
        1 => Just("instance.version".to_owned()),
        1 => prop::sample::select(vec!["data.c", "event.c", "data.d", "data"])
            .prop_map(|p| format!("size({p})")),
    ]
    .boxed();
    let arith = prop::sample::select(vec!["+", "-", "*", "/", "%"]);
    prop_oneof![
        4 => leaf.clone(),
        1 => (leaf.clone(), arith, leaf.clone()).prop_map(|(a, op, b)| format!("({a} {op} {b})")),
        1 => leaf.prop_map(|a| format!("-{a}")),
    ]
    .boxed()
}

/// A string, probably.
fn string_operand() -> BoxedStrategy<String> {
    let leaf = prop_oneof![
        1 => prop::sample::select(vec!["''", "'a'", "'b'", "'é'", "'B'"]).prop_map(str::to_owned),
        2 => prop::sample::select(vec![
            "data.c", "event.c", "data.d.c", "instance.state", "instance.labels.team",
        ])
        .prop_map(str::to_owned),
    ]
    .boxed();
    prop_oneof![
        3 => leaf.clone(),
        1 => (leaf.clone(), leaf).prop_map(|(a, b)| format!("({a} + {b})")),
    ]
    .boxed()
}

/// A guard-shaped expression: logic over comparisons.
fn guard_expression() -> BoxedStrategy<String> {
    let compare = || prop::sample::select(vec!["==", "!=", "<", "<=", ">", ">="]);
    let equality = prop::sample::select(vec!["==", "!="]);
    let comparison = prop_oneof![
        4 => (number_operand(), compare(), number_operand())
            .prop_map(|(a, op, b)| format!("{a} {op} {b}")),
        2 => (string_operand(), compare(), string_operand())
            .prop_map(|(a, op, b)| format!("{a} {op} {b}")),
        2 => (leaf(), equality, leaf()).prop_map(|(a, op, b)| format!("{a} {op} {b}")),
        1 => (prop::sample::select(vec!["data", "event", "data.d", "event.d"]),
              prop::sample::select(KEYS.to_vec()))
            .prop_map(|(r, k)| format!("has({r}.{k})")),
    ];
    comparison
        .prop_recursive(2, 8, 3, |inner| {
            let logic = prop::sample::select(vec!["&&", "||"]);
            prop_oneof![
                4 => (inner.clone(), logic, inner.clone())
                    .prop_map(|(a, op, b)| format!("({a}) {op} ({b})")),
                1 => inner.clone().prop_map(|a| format!("!({a})")),
                1 => (inner.clone(), inner.clone(), inner)
                    .prop_map(|(c, a, b)| format!("({c}) ? ({a}) : ({b})")),
            ]
        })
        .boxed()
}

fn expression() -> BoxedStrategy<String> {
    prop_oneof![1 => any_expression(), 2 => guard_expression()].boxed()
}

#[test]
fn fast_path_agrees_with_the_interpreter() {
    let env = env();
    let evaluated = Cell::new(0u32);
    let fast_guards = Cell::new(0u32);
    let fast_values = Cell::new(0u32);
    let deferred_answered = Cell::new(0u32);
    // `PROPTEST_CASES` runs more.
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3000);
    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    });
    let strategy = (
        expression(),
        json_object(),
        prop::option::of(json_object()),
        payload(),
        any::<u64>(),
    );
    runner
        .run(&strategy, |(source, data, pending, event, version)| {
            let Ok(expr) = Expr::compile(&source) else {
                return Ok(());
            };
            prop_assert!(expr.has_fast_path(), "`{}` has no fast path", source);
            let labels = BTreeMap::from([("team".to_owned(), "a".to_owned())]);
            let fixture = Fixture {
                data,
                pending,
                event,
                labels,
                version: version % 4,
            };
            let vars = fixture.vars();
            evaluated.set(evaluated.get() + 1);
            let context = format!(
                "data {:?} pending {:?} event {}",
                fixture.data, fixture.pending, fixture.event
            );
            // Whenever the fast path answers, it is the interpreter's answer; and on this subset
            // it defers only when the interpreter fails.
            let fast = expr.fast_guard(&vars);
            let slow = expr.interpret_guard(&env, &vars);
            match fast {
                Some(b) => {
                    fast_guards.set(fast_guards.get() + 1);
                    prop_assert_eq!(slow, Ok(b), "guard `{}` on {}", source, context);
                }
                // On this subset the fast path defers only where the interpreter fails, or
                // where its answer depends on a `HashMap`'s order (a list plus a map of keys).
                None if slow.is_ok() => {
                    deferred_answered.set(deferred_answered.get() + 1);
                    eprintln!(
                        "guard `{source}` deferred, the interpreter gave {slow:?} on {context}"
                    );
                }
                None => {}
            }
            let fast = expr.fast_value(&vars);
            let slow = expr.interpret_value(&env, &vars);
            match fast {
                Some(value) => {
                    fast_values.set(fast_values.get() + 1);
                    prop_assert_eq!(slow, Ok(value), "value `{}` on {}", source, context);
                }
                // On this subset the fast path defers only where the interpreter fails, or
                // where its answer depends on a `HashMap`'s order (a list plus a map of keys).
                None if slow.is_ok() => {
                    deferred_answered.set(deferred_answered.get() + 1);
                    eprintln!(
                        "value `{source}` deferred, the interpreter gave {slow:?} on {context}"
                    );
                }
                None => {}
            }
            Ok(())
        })
        .unwrap();
    let (n, guards, values) = (evaluated.get(), fast_guards.get(), fast_values.get());
    let deferred = deferred_answered.get();
    eprintln!(
        "{n} expressions: {guards} fast guards, {values} fast values, \
         {deferred} deferred though the interpreter answered"
    );
    assert!(n > cases / 2, "only {n} generated expressions compiled");
    assert!(deferred * 200 <= n, "{deferred} needless deferrals");
    // Many random expressions are type errors, which the fast path leaves to the interpreter;
    // a good share must still be answered on the fast path.
    assert!(guards * 6 > n, "fast guards: {guards} of {n}");
    assert!(values * 6 > n, "fast values: {values} of {n}");
}

// ---------------------------------------------------------------------------------------------
// The engine: what guards and assignments see.

fn machine(yaml: &str) -> Machine {
    let definition = admit_str(yaml, None)
        .into_result()
        .unwrap_or_else(|problems| panic!("invalid machine: {problems:?}"));
    Machine::compile(definition)
        .expect("compiles")
        .with_revision(1)
}

fn start(machine: &Machine, data: Value) -> Instance {
    let record = machine
        .create(NewInstance {
            namespace: "default",
            id: "i-1",
            data: object(data),
            labels: BTreeMap::new(),
            now_ms: 1,
            actor: "test",
        })
        .expect("create");
    let hash = record.seal().hash;
    Instance::from_genesis(&record, hash).expect("genesis")
}

fn send(machine: &Machine, instance: &mut Instance, event: &str, payload: Value) {
    let input = Input::new(
        Trigger::Event {
            name: event,
            payload: &payload,
        },
        2,
        "test",
    );
    let record = machine.apply(instance, &input).expect("transition");
    instance
        .apply_record(&record, record.seal().hash)
        .expect("applies");
}

/// Every assignment sees the data as it was before the transition, whichever path evaluates
/// it; choice guards after it see the assigned data.
#[test]
fn assignments_see_pre_transition_data_and_choices_see_assigned_data() {
    for (copy, pick) in [
        // fast path
        ("data.a", "data.a == 2 && data.b == 1"),
        // the interpreter (`int()` is outside the fast path)
        ("int(data.a)", "int(data.a) == 2 && int(data.b) == 1"),
    ] {
        let yaml = format!(
            r#"
apiVersion: statemachine.cn/v1alpha1
kind: StateMachine
metadata: {{name: assign}}
spec:
  initialState: start
  states:
  - name: start
    type: task
    timeoutSeconds: 60
    onEvent:
    - event: go
      target: pick
      assign:
        a: "event.x"
        b: "{copy}"
  - name: pick
    type: choice
    timeoutSeconds: 60
    choices:
    - {{guard: "{pick}", target: good}}
    default: bad
  - {{name: good, type: final}}
  - {{name: bad, type: final, outcome: failed}}
"#
        );
        let machine = machine(&yaml);
        let mut instance = start(&machine, json!({"a": 1}));
        send(&machine, &mut instance, "go", json!({"x": 2}));
        assert_eq!(&*instance.state, "good", "with `{copy}`");
        assert_eq!(instance.status, Status::Succeeded);
        assert_eq!(instance.data["a"], json!(2));
        assert_eq!(instance.data["b"], json!(1), "with `{copy}`");
    }
}
