//! Canary rollout: new instances of a machine are routed between a stable and a canary revision
//! by weight. Routing is a fractional flag over the instance's targeting key (its id), bucketed
//! the way flagd's `fractional` does (MurmurHash3 x86-32 of `flagKey + targetingKey`, scaled
//! to the total weight), so it is sticky per key and the decision is recorded in the genesis
//! record like any other flag decision.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::record::FlagDecision;

/// The rollout state of one machine (owned by cnsm, stored beside its revisions).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Rollout {
    /// The revision most new instances get.
    pub stable: u32,
    /// The revision `weight` percent of new instances get.
    pub canary: u32,
    /// 0 to 100.
    pub weight: u8,
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
            ..rollout
        };
        assert!((0..100).all(|i| all.route("order", &format!("x{i}")).0 == 2));
        let none = Rollout {
            weight: 0,
            ..rollout
        };
        assert!((0..100).all(|i| none.route("order", &format!("x{i}")).0 == 1));
    }
}
