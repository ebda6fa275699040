//! The pure part of [`super::Dataplane::sync`]: from the maps' current
//! contents and the desired services, the ordered list of map writes.
//!
//! Order (so no connect ever reads a half-written service):
//! 1. new backends;
//! 2. per service: its slots, then its service entry (a growing service's
//!    new slots exist before its count covers them; a shrinking one's
//!    remaining slots are rewritten before the count drops);
//! 3. services that go; 4. slots no longer covered; 5. backends no longer used.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::Ipv4Addr,
    time::Duration,
};

use weir_common::{
    Backend, MAX_BACKENDS_PER_SERVICE, PROTO_TCP, PROTO_UDP, SVC_FLAG_AFFINITY, SlotKey, SvcKey,
    SvcValue,
};

/// A service's transport protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
}

impl Protocol {
    /// The IP protocol number.
    pub fn number(self) -> u8 {
        match self {
            Self::Tcp => PROTO_TCP,
            Self::Udp => PROTO_UDP,
        }
    }
}

/// One desired service port: a VIP, a port, a protocol and its ready backends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceSpec {
    /// The virtual IP (a `ClusterIP`).
    pub vip: Ipv4Addr,
    /// The service port.
    pub port: u16,
    /// The protocol.
    pub proto: Protocol,
    /// Ready backends (pod IP, target port); duplicates are ignored. Empty:
    /// connects fail with `ECONNREFUSED`.
    pub backends: Vec<(Ipv4Addr, u16)>,
    /// `ClientIP` session affinity with this timeout, if any.
    pub affinity: Option<Duration>,
}

impl ServiceSpec {
    /// The service's key in `weir_svc_v1`.
    pub fn key(&self) -> SvcKey {
        SvcKey {
            ip: u32::from(self.vip).to_be(),
            port: self.port.to_be(),
            proto: self.proto.number(),
            pad: 0,
        }
    }
}

/// The backend map value for a pod IP and port.
pub fn backend(ip: Ipv4Addr, port: u16) -> Backend {
    Backend {
        ip: u32::from(ip).to_be(),
        port: port.to_be(),
        pad: 0,
    }
}

/// What the maps hold now.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Current {
    /// `weir_svc_v1`.
    pub svcs: BTreeMap<SvcKey, SvcValue>,
    /// `weir_svc_slots_v1`.
    pub slots: BTreeMap<SlotKey, u32>,
    /// `weir_backends_v1`.
    pub backends: BTreeMap<u32, Backend>,
}

/// One map write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// Insert or overwrite a backend.
    PutBackend(u32, Backend),
    /// Insert or overwrite a slot.
    PutSlot(SlotKey, u32),
    /// Insert or overwrite a service.
    PutSvc(SvcKey, SvcValue),
    /// Remove a service.
    DelSvc(SvcKey),
    /// Remove a slot.
    DelSlot(SlotKey),
    /// Remove a backend.
    DelBackend(u32),
}

/// The writes that turn `cur` into `desired`, and the desired state itself.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// The writes, in order.
    pub ops: Vec<Op>,
    /// The state after the writes.
    pub after: Current,
    /// Backend ids removed (affinity entries pointing at them must go).
    pub removed_backends: BTreeSet<u32>,
    /// Specs whose backend list was cut to [`MAX_BACKENDS_PER_SERVICE`].
    pub truncated: Vec<SvcKey>,
}

/// Smallest ids ≥ 1 not in `used`, handed out one at a time.
struct Ids<'a> {
    used: &'a mut BTreeSet<u32>,
    next: u32,
}

impl Ids<'_> {
    fn take(&mut self) -> u32 {
        while self.used.contains(&self.next) || self.next == 0 {
            self.next = self.next.wrapping_add(1);
        }
        self.used.insert(self.next);
        self.next
    }
}

/// Computes the writes from `cur` to `desired` (later specs with a key
/// already seen are ignored).
pub fn plan(cur: &Current, desired: &[ServiceSpec]) -> Plan {
    let mut p = Plan::default();
    let mut svc_ids: BTreeSet<u32> = cur.svcs.values().map(|v| v.id).collect();
    let mut backend_ids: BTreeSet<u32> = cur.backends.keys().copied().collect();
    // One cursor each for the whole plan (ids only get used up within it):
    // restarting at 1 for every service made a sync from empty quadratic.
    let mut svc_alloc = Ids {
        used: &mut svc_ids,
        next: 1,
    };
    let mut backend_alloc = Ids {
        used: &mut backend_ids,
        next: 1,
    };
    let mut seen = BTreeSet::new();
    let mut slot_ops = Vec::new();
    for spec in desired {
        let key = spec.key();
        if !seen.insert(key) {
            continue;
        }
        let old = cur.svcs.get(&key).copied();
        let id = old.map_or_else(|| svc_alloc.take(), |v| v.id);
        let old_slots: Vec<(u32, Backend)> = (0..old.map_or(0, |v| v.count))
            .filter_map(|slot| {
                let b = *cur.slots.get(&SlotKey { id, slot })?;
                Some((b, *cur.backends.get(&b)?))
            })
            .collect();
        let mut want: Vec<Backend> = Vec::new();
        for &(ip, port) in &spec.backends {
            let b = backend(ip, port);
            if !want.contains(&b) {
                want.push(b);
            }
        }
        if want.len() > MAX_BACKENDS_PER_SERVICE as usize {
            want.truncate(MAX_BACKENDS_PER_SERVICE as usize);
            p.truncated.push(key);
        }
        let slots = layout(&old_slots, &want, || backend_alloc.take());
        for &(bid, b) in &slots {
            if cur.backends.get(&bid) != Some(&b) {
                p.ops.push(Op::PutBackend(bid, b));
            }
            p.after.backends.insert(bid, b);
        }
        for (slot, &(bid, _)) in (0u32..).zip(&slots) {
            let sk = SlotKey { id, slot };
            if cur.slots.get(&sk) != Some(&bid) {
                slot_ops.push(Op::PutSlot(sk, bid));
            }
            p.after.slots.insert(sk, bid);
        }
        let value = SvcValue {
            id,
            count: u32::try_from(slots.len()).unwrap_or(MAX_BACKENDS_PER_SERVICE),
            flags: if spec.affinity.is_some() {
                SVC_FLAG_AFFINITY
            } else {
                0
            },
            affinity_timeout_s: spec
                .affinity
                .map_or(0, |d| u32::try_from(d.as_secs().max(1)).unwrap_or(u32::MAX)),
        };
        if old != Some(value) {
            slot_ops.push(Op::PutSvc(key, value));
        }
        p.after.svcs.insert(key, value);
    }
    p.ops.extend(slot_ops);
    p.ops.extend(
        cur.svcs
            .keys()
            .filter(|k| !p.after.svcs.contains_key(k))
            .map(|k| Op::DelSvc(*k)),
    );
    p.ops.extend(
        cur.slots
            .keys()
            .filter(|k| !p.after.slots.contains_key(k))
            .map(|k| Op::DelSlot(*k)),
    );
    for id in cur.backends.keys() {
        if !p.after.backends.contains_key(id) {
            p.ops.push(Op::DelBackend(*id));
            p.removed_backends.insert(*id);
        }
    }
    p
}

/// New slot contents (backend id, backend) for a service whose slots were
/// `old` and whose backends are to be `want`: kept backends stay in their
/// slot, new ones fill the holes of removed ones and then append; leftover
/// holes are filled from the end.
fn layout(
    old: &[(u32, Backend)],
    want: &[Backend],
    mut new_id: impl FnMut() -> u32,
) -> Vec<(u32, Backend)> {
    let mut kept: HashMap<Backend, u32> = HashMap::new();
    let mut slots: Vec<Option<(u32, Backend)>> = old
        .iter()
        .map(|&(id, b)| {
            (want.contains(&b) && !kept.contains_key(&b)).then(|| {
                kept.insert(b, id);
                (id, b)
            })
        })
        .collect();
    let mut fresh = want
        .iter()
        .filter(|b| !kept.contains_key(b))
        .map(|&b| (new_id(), b));
    for s in &mut slots {
        if s.is_none() {
            *s = fresh.next();
        }
    }
    slots.extend(fresh.map(Some));
    // Fill remaining holes with the last entries.
    let mut i = 0;
    while i < slots.len() {
        if slots[i].is_none() {
            let last = slots.pop().flatten();
            if i < slots.len() {
                slots[i] = last;
            }
            continue;
        }
        i += 1;
    }
    slots.into_iter().flatten().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, 244, 1, last)
    }

    fn spec(backends: &[u8]) -> ServiceSpec {
        ServiceSpec {
            vip: Ipv4Addr::new(10, 96, 0, 20),
            port: 80,
            proto: Protocol::Tcp,
            backends: backends.iter().map(|&b| (ip(b), 8080)).collect(),
            affinity: None,
        }
    }

    /// Applies a plan's ops to a state, as the maps would.
    fn apply(mut s: Current, ops: &[Op]) -> Current {
        for op in ops {
            match *op {
                Op::PutBackend(k, v) => {
                    s.backends.insert(k, v);
                }
                Op::PutSlot(k, v) => {
                    s.slots.insert(k, v);
                }
                Op::PutSvc(k, v) => {
                    s.svcs.insert(k, v);
                }
                Op::DelSvc(k) => {
                    s.svcs.remove(&k);
                }
                Op::DelSlot(k) => {
                    s.slots.remove(&k);
                }
                Op::DelBackend(k) => {
                    s.backends.remove(&k);
                }
            }
        }
        s
    }

    /// Every prefix of the ops leaves every service readable: all slots
    /// `0..count` exist and point at existing backends.
    fn assert_consistent_throughout(cur: &Current, ops: &[Op]) {
        for n in 0..=ops.len() {
            let s = apply(cur.clone(), &ops[..n]);
            for (k, v) in &s.svcs {
                for slot in 0..v.count {
                    let b = s.slots.get(&SlotKey { id: v.id, slot });
                    assert!(
                        b.is_some_and(|b| s.backends.contains_key(b)),
                        "after {n} ops service {k:?} slot {slot} is unreadable: {:?}",
                        &ops[..n]
                    );
                }
            }
        }
    }

    fn backends_of(s: &Current, spec: &ServiceSpec) -> BTreeSet<Backend> {
        let v = s.svcs[&spec.key()];
        (0..v.count)
            .map(|slot| s.backends[&s.slots[&SlotKey { id: v.id, slot }]])
            .collect()
    }

    #[test]
    fn new_service_writes_slots_before_the_service() {
        let desired = [spec(&[1, 2])];
        let p = plan(&Current::default(), &desired);
        assert_consistent_throughout(&Current::default(), &p.ops);
        let after = apply(Current::default(), &p.ops);
        assert_eq!(after, p.after);
        assert_eq!(after.svcs[&desired[0].key()].count, 2);
        assert!(matches!(p.ops.last(), Some(Op::PutSvc(..))));
    }

    #[test]
    fn unchanged_state_plans_nothing() {
        let desired = [spec(&[1, 2, 3])];
        let p = plan(&Current::default(), &desired);
        let again = plan(&p.after, &desired);
        assert!(again.ops.is_empty(), "{:?}", again.ops);
    }

    #[test]
    fn shrink_and_grow_stay_consistent_and_keep_slots() {
        let s1 = [spec(&[1, 2, 3, 4])];
        let cur = plan(&Current::default(), &s1).after;
        let id_of_4 = cur
            .backends
            .iter()
            .find(|(_, b)| **b == backend(ip(4), 8080))
            .map(|(id, _)| *id);
        // Remove 2 (a middle slot): 4 moves into its hole or stays; count drops.
        let s2 = [spec(&[1, 3, 4])];
        let p = plan(&cur, &s2);
        assert_consistent_throughout(&cur, &p.ops);
        let after = apply(cur.clone(), &p.ops);
        assert_eq!(after, p.after);
        assert_eq!(backends_of(&after, &s2[0]).len(), 3);
        assert!(!backends_of(&after, &s2[0]).contains(&backend(ip(2), 8080)));
        assert!(after.backends.iter().any(|(id, _)| Some(*id) == id_of_4));
        assert_eq!(p.removed_backends.len(), 1);
        // Swap one and add two.
        let s3 = [spec(&[1, 5, 4, 6, 7])];
        let p = plan(&after, &s3);
        assert_consistent_throughout(&after, &p.ops);
        let after3 = apply(after.clone(), &p.ops);
        assert_eq!(backends_of(&after3, &s3[0]).len(), 5);
        // Slots of kept backends did not move.
        for (k, v) in &after.slots {
            if after3.backends.get(v) == after.backends.get(v) && after3.slots.contains_key(k) {
                assert_eq!(after3.slots[k], *v);
            }
        }
        // To zero backends: the service stays with count 0.
        let s4 = [spec(&[])];
        let p = plan(&after3, &s4);
        assert_consistent_throughout(&after3, &p.ops);
        let after4 = apply(after3, &p.ops);
        assert_eq!(after4.svcs[&s4[0].key()].count, 0);
        assert!(after4.slots.is_empty() && after4.backends.is_empty());
    }

    #[test]
    fn removed_service_goes_before_its_slots_and_backends() {
        let mut other = spec(&[9]);
        other.port = 53;
        other.proto = Protocol::Udp;
        let cur = plan(&Current::default(), &[spec(&[1, 2]), other.clone()]).after;
        let p = plan(&cur, std::slice::from_ref(&other));
        assert_consistent_throughout(&cur, &p.ops);
        assert_eq!(p.ops.first(), Some(&Op::DelSvc(spec(&[]).key())));
        let after = apply(cur.clone(), &p.ops);
        assert_eq!(after.svcs.len(), 1);
        assert_eq!(after.svcs[&other.key()], cur.svcs[&other.key()]);
        assert_eq!(after.backends.len(), 1);
    }

    #[test]
    fn affinity_and_duplicates() {
        let mut s = spec(&[1, 1, 2]);
        s.affinity = Some(Duration::from_hours(3));
        let p = plan(&Current::default(), &[s.clone(), spec(&[7])]);
        let v = p.after.svcs[&s.key()];
        assert_eq!(v.count, 2);
        assert_eq!(v.flags, SVC_FLAG_AFFINITY);
        assert_eq!(v.affinity_timeout_s, 10_800);
        assert_eq!(p.after.svcs.len(), 1, "a repeated key is ignored");
    }

    #[test]
    fn service_ids_are_distinct_and_kept() {
        let mut b = spec(&[1]);
        b.port = 81;
        let cur = plan(&Current::default(), &[spec(&[1]), b.clone()]).after;
        let ids: BTreeSet<u32> = cur.svcs.values().map(|v| v.id).collect();
        assert_eq!(ids.len(), 2);
        let p = plan(&cur, &[b.clone()]);
        assert_eq!(p.after.svcs[&b.key()].id, cur.svcs[&b.key()].id);
        // Backends are per service: the same pod in two services has two ids.
        assert_eq!(cur.backends.len(), 2);
    }
}
