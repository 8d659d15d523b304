//! The file provider's reload, the flag model's per-flag errors, and the gate status mapping.

use std::time::Duration;

use cnsm_core::flags::{FlagQuery, FlagValueType};
use cnsm_flags::{FlagSet, FlagdFileProvider, Flags, GateStatus, gate_status};
use open_feature::EvaluationReason;
use serde_json::json;

fn query(key: &str, targeting_key: &str) -> FlagQuery {
    FlagQuery {
        key: key.into(),
        targeting_key: targeting_key.into(),
        targeting_key_error: None,
        context: Default::default(),
        value_type: FlagValueType::Bool,
    }
}

fn flag_file(default_variant: &str) -> String {
    json!({"flags": {"gate": {
        "state": "ENABLED",
        "variants": {"on": true, "off": false},
        "defaultVariant": default_variant,
    }}})
    .to_string()
}

/// Waits until `check` holds (the poll runs every 50 ms here), up to 5 s.
async fn eventually(mut check: impl AsyncFnMut() -> bool) -> bool {
    for _ in 0..100 {
        if check().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

#[tokio::test]
async fn file_provider_reloads_on_change_and_keeps_the_last_good_set() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("flags.json");
    std::fs::write(&path, flag_file("off")).expect("write");
    let provider =
        FlagdFileProvider::open_with_interval(&path, Duration::from_millis(50)).expect("loads");
    let flags = Flags::new(provider.clone()).await;
    assert_eq!(
        flags.evaluate_one(&query("gate", "a")).await.value,
        json!(false)
    );

    // A change is picked up by the poll.
    std::fs::write(&path, flag_file("on")).expect("write");
    assert!(
        eventually(async || flags.evaluate_one(&query("gate", "a")).await.value == json!(true))
            .await
    );
    assert_eq!(provider.n_loads(), 2);

    // A broken file keeps the last good flags and reports the error.
    std::fs::write(&path, "{ not json").expect("write");
    assert!(
        eventually(async || cnsm_runtime::FlagEvaluator::provider_error(&flags).is_some()).await
    );
    let error = cnsm_runtime::FlagEvaluator::provider_error(&flags).unwrap_or_default();
    assert!(error.contains("not valid JSON"), "{error}");
    assert_eq!(
        flags.evaluate_one(&query("gate", "a")).await.value,
        json!(true)
    );

    // A fixed file heals it.
    std::fs::write(&path, flag_file("off")).expect("write");
    assert!(
        eventually(async || cnsm_runtime::FlagEvaluator::provider_error(&flags).is_none()).await
    );
    assert_eq!(
        flags.evaluate_one(&query("gate", "a")).await.value,
        json!(false)
    );

    // Evaluations keep running while the file is rewritten over and over.
    let writer = {
        let path = path.clone();
        tokio::task::spawn_blocking(move || {
            for i in 0..40 {
                let text = if i % 3 == 2 {
                    "{ torn".to_owned()
                } else {
                    flag_file(if i % 2 == 0 { "on" } else { "off" })
                };
                std::fs::write(&path, text).expect("write");
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };
    for _ in 0..400 {
        let decision = flags.evaluate_one(&query("gate", "a")).await;
        assert!(
            decision.error.is_none(),
            "an evaluation was dropped: {decision:?}"
        );
    }
    writer.await.expect("writer");
}

#[tokio::test]
async fn a_missing_or_unparsable_file_is_refused_at_open() {
    let dir = tempfile::tempdir().expect("tempdir");
    assert!(FlagdFileProvider::open(dir.path().join("nope.json")).is_err());
    let path = dir.path().join("flags.json");
    std::fs::write(&path, r#"{"no": "flags"}"#).expect("write");
    let error = FlagdFileProvider::open(&path).expect_err("refused");
    assert!(error.to_string().contains("no `flags` object"), "{error}");
}

#[test]
fn one_bad_flag_does_not_spoil_the_others() {
    let set = FlagSet::parse(
        &json!({
            "$evaluators": {"vip": {"in": [{"var": "tier"}, ["gold"]]}},
            "flags": {
                "good": {"state": "ENABLED", "variants": {"on": true}, "defaultVariant": "on"},
                "dangling": {"state": "ENABLED", "variants": {"on": true}, "defaultVariant": "on",
                             "targeting": {"if": [{"$ref": "nope"}, "on", null]}},
                "wrong-default": {"state": "ENABLED", "variants": {"on": true}, "defaultVariant": "off"},
                "bad-state": {"state": "MAYBE", "variants": {"on": true}},
                "uses-ref": {"state": "ENABLED", "variants": {"on": true, "off": false},
                             "defaultVariant": "off", "targeting": {"if": [{"$ref": "vip"}, "on", null]}}
            }
        })
        .to_string(),
    )
    .expect("the file parses");
    let context = open_feature::EvaluationContext::default().with_custom_field("tier", "gold");
    let resolve = |key| set.resolve(key, FlagValueType::Bool, &context);
    assert_eq!(resolve("good").expect("good").value, Some(json!(true)));
    for bad in ["dangling", "wrong-default", "bad-state"] {
        let error = resolve(bad).expect_err(bad);
        assert_eq!(
            error.code,
            open_feature::EvaluationErrorCode::ParseError,
            "{bad}"
        );
    }
    let hit = resolve("uses-ref").expect("uses-ref");
    assert_eq!(
        (hit.value, hit.reason),
        (Some(json!(true)), EvaluationReason::TargetingMatch)
    );
    assert_eq!(
        resolve("absent").expect_err("absent").code,
        open_feature::EvaluationErrorCode::FlagNotFound
    );
}

#[test]
fn reasons_map_to_gate_statuses() {
    for (reason, status) in [
        (EvaluationReason::TargetingMatch, GateStatus::Active),
        (EvaluationReason::Split, GateStatus::Active),
        (EvaluationReason::Static, GateStatus::Stable),
        (EvaluationReason::Default, GateStatus::Stable),
        (EvaluationReason::Disabled, GateStatus::Disabled),
        (EvaluationReason::Error, GateStatus::Degraded),
        (EvaluationReason::Unknown, GateStatus::Unknown),
    ] {
        assert_eq!(gate_status(&reason), status, "{reason}");
    }
}

#[test]
fn validate_lists_gate_keys_the_flag_file_lacks() {
    let yaml = std::fs::read_to_string(
        crate::gherkin_support::shared_dir().join("examples/checkout-canary.yaml"),
    )
    .expect("example");
    let machine = cnsm_core::admission::admit_str(&yaml, None)
        .into_result()
        .expect("admitted");
    let empty = FlagSet::parse(r#"{"flags": {}}"#).expect("parses");
    assert_eq!(
        cnsm_flags::undefined_flag_keys(&machine, &empty),
        vec![(
            "one-click-checkout".to_owned(),
            "spec.states[0].onEvent[0].flag".to_owned()
        )]
    );
    let full = FlagSet::parse(
        &std::fs::read_to_string(crate::gherkin_support::shared_dir().join("examples/flags.json"))
            .expect("flags"),
    )
    .expect("parses");
    assert!(cnsm_flags::undefined_flag_keys(&machine, &full).is_empty());
}
