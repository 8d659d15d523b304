//! Canary rollout: new instances of a machine are routed between a stable and a canary revision
//! by weight. Routing is a fractional flag over the instance's targeting key (its id), bucketed
//! the way flagd's `fractional` does (MurmurHash3 x86-32 of `flagKey + targetingKey`, scaled
//! to the total weight), so it is sticky per key and the decision is recorded in the genesis
//! record like any other flag decision.
//!
//! A rollout may instead name a flag (`Rollout::flag`): new instances are then routed by that
//! flag's value, evaluated by the runtime's OpenFeature provider; the value names the revision
//! (an integer, or a string of digits). [`Rollout::route_by_flag`] turns the provider's answer
//! into the revision and the decision to record, falling back to the stable revision when the
//! answer names no revision that exists.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::record::FlagDecision;

/// The rollout state of one machine (owned by cnsm, stored beside its revisions).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Rollout {
    /// The revision most new instances get (with a flag: the fallback revision).
    pub stable: u32,
    /// The revision `weight` percent of new instances get (with a flag: equal to `stable`).
    pub canary: u32,
    /// 0 to 100 (with a flag: 0).
    pub weight: u8,
    /// Route by this flag instead of by weight: its value names the revision. Absent in
    /// rollouts stored before flag routing existed, which therefore still read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flag: Option<String>,
}

/// How a flag's value names a revision: an integer, or a string of ASCII digits.
pub fn revision_of(value: &Value) -> Option<u32> {
    match value {
        Value::Number(n) => n.as_u64().and_then(|n| u32::try_from(n).ok()),
        Value::String(s)
            if !s.is_empty() && s.len() <= 10 && s.bytes().all(|b| b.is_ascii_digit()) =>
        {
            s.parse().ok()
        }
        _ => None,
    }
    .filter(|n| *n > 0)
}

impl Rollout {
    /// The routing flag's key for a machine.
    pub fn flag_key(machine: &str) -> String {
        format!("cnsm.rollout.{machine}")
    }

    /// The revision a new instance with this targeting key gets, and the decision to record.
    pub fn route(&self, machine: &str, targeting_key: &str) -> (u32, FlagDecision) {
        let key = Rollout::flag_key(machine);
        let bucket = bucket(&key, targeting_key, 100);
        let revision = if bucket < u32::from(self.weight) {
            self.canary
        } else {
            self.stable
        };
        let reason = if self.weight == 0 || self.weight >= 100 || self.stable == self.canary {
            "STATIC"
        } else {
            "SPLIT"
        };
        let decision = FlagDecision {
            key,
            variant: Some(format!("revision-{revision}")),
            value: Value::from(revision),
            reason: reason.into(),
            error: None,
            allowed: true,
        };
        (revision, decision)
    }

    /// Routes by the provider's `answer` for [`Rollout::flag`]: the revision its value names
    /// when `exists` says that revision exists, else the stable revision. The decision recorded
    /// keeps the provider's key, variant and reason, with `value` set to the revision taken; a
    /// fallback is recorded with reason `ERROR` and an error naming why (the provider's error,
    /// `TYPE_MISMATCH` for a value that names no revision, `REVISION_NOT_FOUND`), except an
    /// answer without a value (reason `DEFAULT` or `DISABLED`: the flag chose nothing), which
    /// keeps its reason.
    pub fn route_by_flag<E>(
        &self,
        answer: FlagDecision,
        mut exists: impl FnMut(u32) -> Result<bool, E>,
    ) -> Result<(u32, FlagDecision), E> {
        let stable = self.stable;
        let mut decision = FlagDecision {
            allowed: true,
            ..answer
        };
        let fallback = |mut decision: FlagDecision, reason: &str, error: Option<String>| {
            decision.value = Value::from(stable);
            decision.reason = reason.into();
            if error.is_some() {
                decision.error = error;
            }
            (stable, decision)
        };
        if decision.error.is_some() || decision.reason == "ERROR" {
            return Ok(fallback(decision, "ERROR", None));
        }
        if decision.value.is_null() {
            let reason = decision.reason.clone();
            let reason = if reason.is_empty() {
                "DEFAULT"
            } else {
                &reason
            };
            return Ok(fallback(decision.clone(), reason, None));
        }
        let Some(revision) = revision_of(&decision.value) else {
            let error = format!(
                "TYPE_MISMATCH: the value {} names no revision (an integer or a string of digits)",
                decision.value
            );
            return Ok(fallback(decision, "ERROR", Some(error)));
        };
        if !exists(revision)? {
            let error = format!(
                "REVISION_NOT_FOUND: the value names revision {revision}, which does not exist"
            );
            return Ok(fallback(decision, "ERROR", Some(error)));
        }
        decision.value = Value::from(revision);
        Ok((revision, decision))
    }
}

/// flagd's fractional bucket: `(murmur3_x86_32(flag_key + targeting_key) * total) >> 32`.
pub fn bucket(flag_key: &str, targeting_key: &str, total: u32) -> u32 {
    let mut input = Vec::with_capacity(flag_key.len() + targeting_key.len());
    input.extend_from_slice(flag_key.as_bytes());
    input.extend_from_slice(targeting_key.as_bytes());
    ((u64::from(murmur3_x86_32(&input, 0)) * u64::from(total)) >> 32) as u32
}

/// MurmurHash3, x86 32-bit variant.
pub fn murmur3_x86_32(data: &[u8], seed: u32) -> u32 {
    const C1: u32 = 0xcc9e_2d51;
    const C2: u32 = 0x1b87_3593;
    let mut h = seed;
    let mut chunks = data.chunks_exact(4);
    for chunk in &mut chunks {
        let mut k = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        k = k.wrapping_mul(C1).rotate_left(15).wrapping_mul(C2);
        h ^= k;
        h = h.rotate_left(13).wrapping_mul(5).wrapping_add(0xe654_6b64);
    }
    let tail = chunks.remainder();
    let mut k = 0u32;
    for (i, b) in tail.iter().enumerate() {
        k |= u32::from(*b) << (8 * i);
    }
    if !tail.is_empty() {
        k = k.wrapping_mul(C1).rotate_left(15).wrapping_mul(C2);
        h ^= k;
    }
    h ^= data.len() as u32;
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^= h >> 16;
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn murmur3_matches_reference_vectors() {
        // Reference values of MurmurHash3_x86_32.
        assert_eq!(murmur3_x86_32(b"", 0), 0);
        assert_eq!(murmur3_x86_32(b"", 1), 0x514e_28b7);
        assert_eq!(murmur3_x86_32(b"hello", 0), 0x248b_fa47);
        assert_eq!(murmur3_x86_32(b"Hello, world!", 1234), 0xfaf6_cdb3);
        assert_eq!(
            murmur3_x86_32(b"The quick brown fox jumps over the lazy dog", 0),
            0x2e4f_f723
        );
    }

    #[test]
    fn weights_hold_and_routing_is_sticky() {
        let rollout = Rollout {
            stable: 1,
            canary: 2,
            weight: 10,
            flag: None,
        };
        let n = 10_000;
        let canary = (0..n)
            .filter(|i| rollout.route("order", &format!("o-{i}")).0 == 2)
            .count();
        let share = canary as f64 / n as f64;
        assert!((share - 0.10).abs() <= 0.02, "{share}");
        for i in 0..100 {
            let id = format!("o-{i}");
            assert_eq!(rollout.route("order", &id), rollout.route("order", &id));
        }
        let all = Rollout {
            weight: 100,
            ..rollout.clone()
        };
        assert!((0..100).all(|i| all.route("order", &format!("x{i}")).0 == 2));
        let none = Rollout {
            weight: 0,
            ..rollout
        };
        assert!((0..100).all(|i| none.route("order", &format!("x{i}")).0 == 1));
    }
}

#[cfg(test)]
mod flag_tests {
    use super::*;

    fn answer(
        variant: Option<&str>,
        value: Value,
        reason: &str,
        error: Option<&str>,
    ) -> FlagDecision {
        FlagDecision {
            key: "order-revision".into(),
            variant: variant.map(str::to_owned),
            value,
            reason: reason.into(),
            error: error.map(str::to_owned),
            allowed: false,
        }
    }

    fn check(answer: FlagDecision, expected: (u32, &str, Option<&str>)) {
        let rollout = Rollout {
            stable: 1,
            canary: 1,
            weight: 0,
            flag: Some("order-revision".into()),
        };
        let (revision, decision) = rollout
            .route_by_flag(answer, |r| Ok::<_, ()>(r <= 2))
            .unwrap();
        assert_eq!(revision, expected.0);
        assert_eq!(decision.value, Value::from(revision));
        assert_eq!(decision.reason, expected.1);
        assert!(decision.allowed);
        match expected.2 {
            Some(prefix) => assert!(
                decision
                    .error
                    .as_deref()
                    .is_some_and(|e| e.starts_with(prefix)),
                "{decision:?}"
            ),
            None => assert_eq!(decision.error, None),
        }
    }

    #[test]
    fn the_flag_value_names_the_revision_or_falls_back_to_stable() {
        check(
            answer(Some("v2"), Value::from(2), "TARGETING_MATCH", None),
            (2, "TARGETING_MATCH", None),
        );
        check(
            answer(Some("v2"), Value::from("2"), "STATIC", None),
            (2, "STATIC", None),
        );
        check(
            answer(Some("v9"), Value::from(9), "TARGETING_MATCH", None),
            (1, "ERROR", Some("REVISION_NOT_FOUND")),
        );
        check(
            answer(Some("x"), Value::from("two"), "STATIC", None),
            (1, "ERROR", Some("TYPE_MISMATCH")),
        );
        check(
            answer(Some("x"), Value::from(-2), "STATIC", None),
            (1, "ERROR", Some("TYPE_MISMATCH")),
        );
        check(
            answer(Some("x"), Value::from("0"), "STATIC", None),
            (1, "ERROR", Some("TYPE_MISMATCH")),
        );
        check(
            answer(None, Value::Null, "ERROR", Some("FLAG_NOT_FOUND")),
            (1, "ERROR", Some("FLAG_NOT_FOUND")),
        );
        check(
            answer(None, Value::Null, "DEFAULT", None),
            (1, "DEFAULT", None),
        );
        check(
            answer(None, Value::Null, "DISABLED", None),
            (1, "DISABLED", None),
        );
    }

    #[test]
    fn rollouts_stored_without_a_flag_still_read() {
        let old: Rollout = serde_json::from_str(r#"{"stable":1,"canary":2,"weight":10}"#).unwrap();
        assert_eq!(old.flag, None);
        let flagged = Rollout {
            flag: Some("order-revision".into()),
            ..old.clone()
        };
        let text = serde_json::to_string(&flagged).unwrap();
        assert_eq!(
            text,
            r#"{"stable":1,"canary":2,"weight":10,"flag":"order-revision"}"#
        );
        assert_eq!(
            serde_json::to_string(&old).unwrap(),
            r#"{"stable":1,"canary":2,"weight":10}"#
        );
    }
}
