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

/// One change to the desired services, for [`plan_changes`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// The service with this spec's key is to be exactly this (added or
    /// changed; an unchanged spec plans no writes).
    Put(ServiceSpec),
    /// The service with this key is to go (absent: nothing to do).
    Remove(SvcKey),
}

impl Change {
    /// The service key the change is about.
    pub fn key(&self) -> SvcKey {
        match self {
            Self::Put(s) => s.key(),
            Self::Remove(k) => *k,
        }
    }
}

/// The writes that turn `cur` into `desired`, and the desired state itself.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// The writes, in order.
    pub ops: Vec<Op>,
    /// The state after the writes: all of it for [`plan`], only the
    /// changed services' entries for [`plan_changes`].
    pub after: Current,
    /// Backend ids removed (affinity entries pointing at them must go).
    pub removed_backends: BTreeSet<u32>,
    /// Whether affinity entries may point at a removed backend (one of
    /// its services had affinity, or it is not known).
    pub purge_affinity: bool,
    /// Specs whose backend list was cut to [`MAX_BACKENDS_PER_SERVICE`].
    pub truncated: Vec<SvcKey>,
}

/// Smallest ids ≥ `next` (wrapping, never 0) not in use, handed out one at
/// a time; in use means in `used` or taken before.
struct Ids<'a> {
    used: &'a dyn Fn(u32) -> bool,
    taken: BTreeSet<u32>,
    next: u32,
}

impl<'a> Ids<'a> {
    fn new(used: &'a dyn Fn(u32) -> bool, next: u32) -> Self {
        Self {
            used,
            taken: BTreeSet::new(),
            next,
        }
    }

    fn take(&mut self) -> u32 {
        while self.next == 0 || (self.used)(self.next) || self.taken.contains(&self.next) {
            self.next = self.next.wrapping_add(1);
        }
        self.taken.insert(self.next);
        self.next
    }
}

/// The part shared by [`plan`] and [`plan_changes`]: plans one service's
/// backends, slots and entry.
struct Planner<'c> {
    cur: &'c Current,
    p: Plan,
    slot_ops: Vec<Op>,
}

impl Planner<'_> {
    /// Plans `spec` (new or changed); returns the backend ids it keeps
    /// using.
    fn put(
        &mut self,
        spec: &ServiceSpec,
        svc_alloc: &mut dyn FnMut() -> u32,
        backend_alloc: &mut dyn FnMut() -> u32,
    ) -> (u32, Vec<u32>) {
        let cur = self.cur;
        let key = spec.key();
        let old = cur.svcs.get(&key).copied();
        let id = old.map_or_else(&mut *svc_alloc, |v| v.id);
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
            self.p.truncated.push(key);
        }
        let slots = layout(&old_slots, &want, backend_alloc);
        for &(bid, b) in &slots {
            if cur.backends.get(&bid) != Some(&b) {
                self.p.ops.push(Op::PutBackend(bid, b));
            }
            self.p.after.backends.insert(bid, b);
        }
        for (slot, &(bid, _)) in (0u32..).zip(&slots) {
            let sk = SlotKey { id, slot };
            if cur.slots.get(&sk) != Some(&bid) {
                self.slot_ops.push(Op::PutSlot(sk, bid));
            }
            self.p.after.slots.insert(sk, bid);
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
            self.slot_ops.push(Op::PutSvc(key, value));
        }
        self.p.after.svcs.insert(key, value);
        (id, slots.into_iter().map(|(bid, _)| bid).collect())
    }
}

/// The slots a service id has in `cur` (any slot number).
fn slots_of(cur: &Current, id: u32) -> impl Iterator<Item = (&SlotKey, &u32)> {
    cur.slots
        .range(SlotKey { id, slot: 0 }..=SlotKey { id, slot: u32::MAX })
}

/// Computes the writes from `cur` to `desired` (later specs with a key
/// already seen are ignored).
pub fn plan(cur: &Current, desired: &[ServiceSpec]) -> Plan {
    let svc_ids: BTreeSet<u32> = cur.svcs.values().map(|v| v.id).collect();
    let svc_used = |id| svc_ids.contains(&id);
    let backend_used = |id| cur.backends.contains_key(&id);
    // One cursor each for the whole plan (ids only get used up within it):
    // restarting at 1 for every service made a sync from empty quadratic.
    let mut svc_alloc = Ids::new(&svc_used, 1);
    let mut backend_alloc = Ids::new(&backend_used, 1);
    let mut pl = Planner {
        cur,
        p: Plan::default(),
        slot_ops: Vec::new(),
    };
    let mut seen = BTreeSet::new();
    for spec in desired {
        if !seen.insert(spec.key()) {
            continue;
        }
        pl.put(spec, &mut || svc_alloc.take(), &mut || backend_alloc.take());
    }
    let Planner {
        mut p, slot_ops, ..
    } = pl;
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
    p.purge_affinity = !p.removed_backends.is_empty();
    p
}

/// Computes the writes that apply `changes` to `cur`, touching only the
/// changed services' entries (the last change of a key wins). The same
/// order as [`plan`]: new backends, then per service its slots and then
/// its entry, then entries that go, then slots, then backends no longer
/// used. Relies on what [`plan`] guarantees: a backend id belongs to one
/// service.
pub fn plan_changes(cur: &Current, changes: &[Change]) -> Plan {
    let last: BTreeMap<SvcKey, &Change> = changes.iter().map(|c| (c.key(), c)).collect();
    // New ids go past the highest one in use (ids wrap after 2^32 - 1), so
    // no allocation scans the ids in use.
    let backend_used = |id| cur.backends.contains_key(&id);
    let backend_next = cur
        .backends
        .last_key_value()
        .map_or(1, |(id, _)| id.wrapping_add(1));
    let mut backend_alloc = Ids::new(&backend_used, backend_next);
    // Service ids are only indexed by key: the set is built (O(services))
    // only when a service is added.
    let svc_ids: std::cell::OnceCell<BTreeSet<u32>> = std::cell::OnceCell::new();
    let ids = || svc_ids.get_or_init(|| cur.svcs.values().map(|v| v.id).collect());
    let svc_used = |id| ids().contains(&id);
    let mut svc_alloc: Option<Ids<'_>> = None;
    let mut pl = Planner {
        cur,
        p: Plan::default(),
        slot_ops: Vec::new(),
    };
    let (mut del_svcs, mut del_slots, mut del_backends) = (Vec::new(), Vec::new(), Vec::new());
    for (key, change) in last {
        let old = cur.svcs.get(&key).copied();
        let (keep_slots, keep_backends): (u32, Vec<u32>) = match change {
            Change::Put(spec) => {
                let (_, kept) = pl.put(
                    spec,
                    &mut || {
                        svc_alloc
                            .get_or_insert_with(|| {
                                let next = ids().last().map_or(1, |id| id.wrapping_add(1));
                                Ids::new(&svc_used, next)
                            })
                            .take()
                    },
                    &mut || backend_alloc.take(),
                );
                (u32::try_from(kept.len()).unwrap_or(u32::MAX), kept)
            }
            Change::Remove(_) => {
                if old.is_some() {
                    del_svcs.push(Op::DelSvc(key));
                }
                (0, Vec::new())
            }
        };
        let Some(old) = old else { continue };
        for (sk, bid) in slots_of(cur, old.id) {
            if sk.slot >= keep_slots {
                del_slots.push(Op::DelSlot(*sk));
            }
            if !keep_backends.contains(bid)
                && cur.backends.contains_key(bid)
                && pl.p.removed_backends.insert(*bid)
            {
                del_backends.push(Op::DelBackend(*bid));
                pl.p.purge_affinity |= old.flags & SVC_FLAG_AFFINITY != 0;
            }
        }
    }
    let Planner {
        mut p, slot_ops, ..
    } = pl;
    p.ops.extend(slot_ops);
    p.ops.extend(del_svcs);
    p.ops.extend(del_slots);
    p.ops.extend(del_backends);
    p
}

/// Applies `op` to `state`, as the map write does to the map.
pub fn apply_op(state: &mut Current, op: Op) {
    match op {
        Op::PutBackend(k, v) => {
            state.backends.insert(k, v);
        }
        Op::PutSlot(k, v) => {
            state.slots.insert(k, v);
        }
        Op::PutSvc(k, v) => {
            state.svcs.insert(k, v);
        }
        Op::DelSvc(k) => {
            state.svcs.remove(&k);
        }
        Op::DelSlot(k) => {
            state.slots.remove(&k);
        }
        Op::DelBackend(k) => {
            state.backends.remove(&k);
        }
    }
}

/// New slot contents (backend id, backend) for a service whose slots were
/// `old` and whose backends are to be `want`: kept backends stay in their
/// slot, new ones fill the holes of removed ones and then append; leftover
/// holes are filled from the end.
fn layout(
    old: &[(u32, Backend)],
    want: &[Backend],
    new_id: &mut dyn FnMut() -> u32,
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
            apply_op(&mut s, *op);
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

    fn svc(port: u16, backends: &[u8]) -> ServiceSpec {
        let mut s = spec(backends);
        s.port = port;
        s
    }

    /// The service ids, slot ids and backend ids an op touches.
    fn touched(op: &Op) -> (Option<SvcKey>, Option<u32>, Option<u32>) {
        match *op {
            Op::PutSvc(k, _) | Op::DelSvc(k) => (Some(k), None, None),
            Op::PutSlot(k, b) => (None, Some(k.id), Some(b)),
            Op::DelSlot(k) => (None, Some(k.id), None),
            Op::PutBackend(b, _) | Op::DelBackend(b) => (None, None, Some(b)),
        }
    }

    /// No slot or backend is left that no service uses.
    fn assert_no_orphans(s: &Current) {
        let ids: BTreeSet<u32> = s.svcs.values().map(|v| v.id).collect();
        for (k, b) in &s.slots {
            assert!(ids.contains(&k.id), "orphan slot {k:?}");
            let v = s.svcs.values().find(|v| v.id == k.id).unwrap();
            assert!(k.slot < v.count, "slot {k:?} beyond count {}", v.count);
            assert!(
                s.backends.contains_key(b),
                "slot {k:?} → missing backend {b}"
            );
        }
        let used: BTreeSet<u32> = s.slots.values().copied().collect();
        for b in s.backends.keys() {
            assert!(used.contains(b), "orphan backend {b}");
        }
    }

    #[test]
    fn a_change_touches_only_its_service() {
        let table: Vec<ServiceSpec> = (0..5).map(|i| svc(80 + i, &[1, 2, 3, 4])).collect();
        let cur = plan(&Current::default(), &table).after;
        let target = svc(82, &[1, 3, 4, 5, 6]);
        let id = cur.svcs[&target.key()].id;
        let own: BTreeSet<u32> = slots_of(&cur, id).map(|(_, b)| *b).collect();
        let p = plan_changes(&cur, &[Change::Put(target.clone())]);
        assert!(!p.ops.is_empty());
        assert_consistent_throughout(&cur, &p.ops);
        for op in &p.ops {
            let (k, slot_id, b) = touched(op);
            assert!(k.is_none_or(|k| k == target.key()), "{op:?}");
            assert!(slot_id.is_none_or(|i| i == id), "{op:?}");
            assert!(
                b.is_none_or(|b| own.contains(&b) || !cur.backends.contains_key(&b)),
                "{op:?} touches another service's backend"
            );
        }
        let after = apply(cur.clone(), &p.ops);
        assert_no_orphans(&after);
        assert_eq!(
            backends_of(&after, &target),
            target
                .backends
                .iter()
                .map(|&(i, p)| backend(i, p))
                .collect()
        );
        for other in table.iter().filter(|s| s.key() != target.key()) {
            assert_eq!(after.svcs[&other.key()], cur.svcs[&other.key()]);
            assert_eq!(backends_of(&after, other), backends_of(&cur, other));
        }
        // Unchanged specs and removals of absent keys write nothing.
        let again = plan_changes(
            &after,
            &[Change::Put(target), Change::Remove(svc(99, &[]).key())],
        );
        assert!(again.ops.is_empty(), "{:?}", again.ops);
    }

    #[test]
    fn incremental_changes_agree_with_a_full_plan() {
        let mut desired: Vec<ServiceSpec> = (0..6).map(|i| svc(80 + i, &[1, 2])).collect();
        desired[5].affinity = Some(Duration::from_mins(1));
        let mut state = plan(&Current::default(), &desired).after;
        let steps: Vec<Change> = vec![
            Change::Remove(desired[1].key()),
            Change::Put(svc(81, &[7, 8, 9])),
            Change::Put(svc(90, &[1, 2, 3])),
            Change::Put(svc(83, &[])),
            Change::Remove(desired[0].key()),
            Change::Put(svc(83, &[4, 5])),
            Change::Put(svc(91, &[4])),
            Change::Put(svc(80, &[1])),
        ];
        for (n, change) in steps.iter().enumerate() {
            let p = plan_changes(&state, std::slice::from_ref(change));
            assert_consistent_throughout(&state, &p.ops);
            state = apply(state, &p.ops);
            match change {
                Change::Put(s) => {
                    desired.retain(|d| d.key() != s.key());
                    desired.push(s.clone());
                }
                Change::Remove(k) => desired.retain(|d| d.key() != *k),
            }
            assert_no_orphans(&state);
            let full = plan(&state, &desired);
            assert!(
                full.ops.is_empty(),
                "step {n}: a full plan still writes {:?}",
                full.ops
            );
            let ids: BTreeSet<u32> = state.svcs.values().map(|v| v.id).collect();
            assert_eq!(ids.len(), state.svcs.len(), "service ids stay distinct");
        }
        // Affinity entries only need a purge when the service had affinity.
        let p = plan_changes(&state, &[Change::Put(svc(84, &[1]))]);
        assert!(!p.removed_backends.is_empty() && !p.purge_affinity);
        let mut sticky = svc(85, &[1]);
        sticky.affinity = Some(Duration::from_mins(1));
        let p = plan_changes(&state, &[Change::Put(sticky)]);
        assert!(!p.removed_backends.is_empty() && p.purge_affinity);
    }
}
