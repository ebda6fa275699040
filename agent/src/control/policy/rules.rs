//! Rule numbers: the `rule` field of a `weir_pol_v1` entry (and of the
//! conntrack entries and flow records it leads to) names the policy that
//! allowed the flow as a `u32`. This module hands out those numbers and
//! resolves them back to a [`PolicyRef`].
//!
//! A policy's number is derived from a hash of `namespace/name`, so it is
//! the same across agent restarts and on every node (a restarted agent
//! rewrites no entry; flow records from two nodes agree). Two policies
//! whose hashes collide get the next free number in the order they are
//! first seen (vanishingly rare with 32 bits; then only the later one's
//! number may differ after a restart). [`PolicyRef::Host`] is
//! [`HOST_RULE`]. Numbers below [`FIRST_POLICY_RULE`] are reserved and
//! `u32::MAX` is the dataplane's "no rule" (`CT_RULE_NONE`).
//!
//! The table is process-wide ([`rule_number`], [`rule_name`]) and never
//! forgets a number: conntrack entries and flow records may name a policy
//! after it is gone, and policies are few.

use std::collections::BTreeMap;
use std::sync::{Mutex, OnceLock};

use sha2::{Digest, Sha256};

use super::PolicyRef;

/// The rule number of weir's built-in allowance of the node to its pods.
pub const HOST_RULE: u32 = 1;
/// The first number a `NetworkPolicy` may get (below: reserved).
pub const FIRST_POLICY_RULE: u32 = 256;
/// The dataplane's "no rule" (`weir_common::CT_RULE_NONE`): never handed out.
pub const NO_RULE: u32 = u32::MAX;

/// Policy references and their numbers, both ways.
#[derive(Debug, Default)]
pub struct RuleTable {
    by_ref: BTreeMap<PolicyRef, u32>,
    by_number: BTreeMap<u32, PolicyRef>,
}

impl RuleTable {
    /// The number of `r`, assigning one if it has none yet.
    pub fn number(&mut self, r: &PolicyRef) -> u32 {
        if let Some(n) = self.by_ref.get(r) {
            return *n;
        }
        let n = match r {
            PolicyRef::Host => HOST_RULE,
            PolicyRef::Policy { namespace, name } => {
                let mut n = hashed(namespace, name);
                while self.by_number.contains_key(&n) {
                    n = next(n);
                }
                n
            }
        };
        self.by_ref.insert(r.clone(), n);
        self.by_number.insert(n, r.clone());
        n
    }

    /// The policy number `n` stands for, if it was handed out.
    pub fn name(&self, n: u32) -> Option<PolicyRef> {
        self.by_number.get(&n).cloned()
    }
}

/// A policy's preferred number: the first 4 bytes of SHA-256 of
/// `namespace/name`, folded into `FIRST_POLICY_RULE..NO_RULE`.
fn hashed(namespace: &str, name: &str) -> u32 {
    let digest = Sha256::digest(format!("{namespace}/{name}").as_bytes());
    let h = u32::from_be_bytes([digest[0], digest[1], digest[2], digest[3]]);
    FIRST_POLICY_RULE + h % (NO_RULE - FIRST_POLICY_RULE)
}

/// The number after `n` in the policy range, wrapping around.
fn next(n: u32) -> u32 {
    if n >= NO_RULE - 1 {
        FIRST_POLICY_RULE
    } else {
        n + 1
    }
}

fn table() -> std::sync::MutexGuard<'static, RuleTable> {
    static TABLE: OnceLock<Mutex<RuleTable>> = OnceLock::new();
    TABLE
        .get_or_init(Mutex::default)
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The process-wide number of `r` (assigned on first use).
pub fn rule_number(r: &PolicyRef) -> u32 {
    table().number(r)
}

/// The policy a rule number from the dataplane (a policy or conntrack
/// entry, a flow record) stands for; `None` for [`NO_RULE`] and numbers
/// this agent never handed out.
pub fn rule_name(n: u32) -> Option<PolicyRef> {
    table().name(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pol(ns: &str, name: &str) -> PolicyRef {
        PolicyRef::Policy {
            namespace: ns.to_owned(),
            name: name.to_owned(),
        }
    }

    #[test]
    fn numbers_are_stable_and_resolve_back() {
        let mut a = RuleTable::default();
        let mut b = RuleTable::default();
        let x = a.number(&pol("x", "deny-all"));
        // Another table (a restarted agent, another node), other order.
        b.number(&pol("y", "other"));
        assert_eq!(b.number(&pol("x", "deny-all")), x);
        assert_eq!(a.number(&pol("x", "deny-all")), x, "same number twice");
        assert!((FIRST_POLICY_RULE..NO_RULE).contains(&x));
        assert_eq!(a.number(&PolicyRef::Host), HOST_RULE);
        assert_eq!(a.name(x), Some(pol("x", "deny-all")));
        assert_eq!(a.name(HOST_RULE), Some(PolicyRef::Host));
        assert_eq!(a.name(NO_RULE), None);
        assert_eq!(a.name(7), None);
        // "ns/name" is the key: a policy "a/b" in "x" is not "x/a" "b".
        assert_ne!(a.number(&pol("x", "a/b")), a.number(&pol("x/a", "b")));
    }

    #[test]
    fn collisions_probe_to_a_free_number() {
        let mut t = RuleTable::default();
        let first = t.number(&pol("x", "a"));
        // Fake a policy that already holds the next number too.
        t.by_number.insert(next(first), pol("z", "squatter"));
        t.by_ref.insert(pol("z", "squatter"), next(first));
        // A second policy hashing to `first` (simulated by removing the
        // first's reverse entry and reinserting under another name).
        t.by_ref.remove(&pol("x", "a"));
        let holder = t.by_number.remove(&first).unwrap();
        t.by_number.insert(first, pol("q", "holder"));
        let again = t.number(&holder);
        assert_ne!(again, first);
        assert_ne!(again, next(first));
        assert_eq!(again, next(next(first)));
        assert_eq!(t.name(again), Some(holder));
        assert_eq!(next(NO_RULE - 1), FIRST_POLICY_RULE);
    }

    #[test]
    fn the_process_table_answers() {
        let n = rule_number(&pol("p", "q"));
        assert_eq!(rule_name(n), Some(pol("p", "q")));
        assert_eq!(rule_number(&PolicyRef::Host), HOST_RULE);
    }
}
