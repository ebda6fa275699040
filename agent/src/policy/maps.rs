//! The policy maps and the agent's mirrors of what it wrote to them.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use aya::{
    Ebpf,
    maps::{HashMap, MapData, MapError, PerCpuArray, lpm_trie::Key, lpm_trie::LpmTrie},
    sys::SyscallError,
};
use weir_common::{
    CT_MAP, CT_MAP_V1, CtKey, CtValue, DROPS_MAP, DropReason, EndpointConfig, ID_ANY, ID_WORLD,
    IPCACHE_MAP, IpCacheValue, POL_EP_MAP, POL_MAP, PROTO_ICMP, PolicyKey, PolicyValue,
};

use super::{
    Cidr, Direction, Endpoint, PolicyEntry, PolicyError,
    ipcache::{IpCacheMirror, Write},
};

/// What the programs decide for the first packet of a flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// The endpoint has no entry or does not enforce the direction.
    Unenforced,
    /// A policy entry allows it.
    Allowed {
        /// The entry that matched (lookup order: the peer's identity, its
        /// CIDR identity, any peer; each by port+proto, proto, anything).
        entry: PolicyEntry,
        /// The peer's identity (world if the ipcache has no prefix for it).
        peer_identity: u32,
        /// The CIDR identity of the longest `ipBlock` prefix holding the peer.
        cidr_identity: u32,
    },
    /// No policy entry allows it.
    Denied {
        /// The peer's identity.
        peer_identity: u32,
        /// The CIDR identity of the longest `ipBlock` prefix holding the peer.
        cidr_identity: u32,
    },
}

/// What one [`super::PolicyDataplane::set_policy`] changed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PolicyDiff {
    /// Entries written that were not there.
    pub added: usize,
    /// Entries whose rule changed (updated in place).
    pub changed: usize,
    /// Entries removed.
    pub removed: usize,
    /// Entries left alone.
    pub kept: usize,
}

pub(crate) struct Maps {
    ipcache: LpmTrie<MapData, u32, IpCacheValue>,
    eps: HashMap<MapData, u32, EndpointConfig>,
    pol: HashMap<MapData, PolicyKey, PolicyValue>,
    ct: HashMap<MapData, CtKey, CtValue>,
    drops: PerCpuArray<MapData, u64>,
    mirror: IpCacheMirror,
    /// Policy entries by endpoint, as written (read back once at load).
    policies: BTreeMap<u32, BTreeMap<PolicyKey, PolicyValue>>,
}

fn map_err(what: &'static str, map: &'static str) -> impl FnOnce(MapError) -> PolicyError {
    move |source| PolicyError::Map {
        what,
        map,
        source: Box::new(source),
    }
}

fn take<M: TryFrom<aya::maps::Map, Error = MapError>>(
    ebpf: &mut Ebpf,
    name: &'static str,
) -> Result<M, PolicyError> {
    let map = ebpf.take_map(name).ok_or_else(|| PolicyError::Map {
        what: "find",
        map: name,
        source: Box::new(MapError::InvalidName { name: name.into() }),
    })?;
    M::try_from(map).map_err(map_err("open", name))
}

fn is_missing(e: &MapError) -> bool {
    match e {
        MapError::KeyNotFound => true,
        MapError::SyscallError(SyscallError { io_error, .. }) => {
            io_error.raw_os_error() == Some(libc::ENOENT)
        }
        _ => false,
    }
}

/// `Ok(None)` for a missing key.
fn found<V>(r: Result<V, MapError>) -> Result<Option<V>, MapError> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(e) if is_missing(&e) => Ok(None),
        Err(e) => Err(e),
    }
}

/// A missing key is already removed.
fn gone(r: Result<(), MapError>) -> Result<(), MapError> {
    match r {
        Err(e) if !is_missing(&e) => Err(e),
        _ => Ok(()),
    }
}

fn lpm_key(c: Cidr) -> Key<u32> {
    Key::new(u32::from(c.prefix), u32::from(c.addr).to_be())
}

impl Maps {
    /// Takes the maps out of a loaded object and reads back the ipcache and
    /// the policy entries (an adopted node keeps them).
    pub fn take(ebpf: &mut Ebpf) -> Result<Self, PolicyError> {
        let ipcache: LpmTrie<MapData, u32, IpCacheValue> = take(ebpf, IPCACHE_MAP)?;
        let pol: HashMap<MapData, PolicyKey, PolicyValue> = take(ebpf, POL_MAP)?;
        let mut cached = Vec::new();
        for r in &ipcache {
            let (k, v) = r.map_err(map_err("read", IPCACHE_MAP))?;
            let len = u8::try_from(k.prefix_len()).unwrap_or(32);
            cached.push((Cidr::new(Ipv4Addr::from(u32::from_be(k.data())), len)?, v));
        }
        let mut policies: BTreeMap<u32, BTreeMap<PolicyKey, PolicyValue>> = BTreeMap::new();
        for r in &pol {
            let (k, v) = r.map_err(map_err("read", POL_MAP))?;
            policies.entry(k.ep).or_default().insert(k, v);
        }
        Ok(Self {
            eps: take(ebpf, POL_EP_MAP)?,
            ct: take(ebpf, CT_MAP)?,
            drops: take(ebpf, DROPS_MAP)?,
            mirror: IpCacheMirror::from_values(cached),
            ipcache,
            pol,
            policies,
        })
    }

    pub fn set_endpoint(&mut self, ifindex: u32, cfg: EndpointConfig) -> Result<(), PolicyError> {
        let old = self.endpoint(ifindex)?;
        if old == Some(cfg) {
            return Ok(());
        }
        if old.map(|o| o.pod_ip) != Some(cfg.pod_ip) {
            self.flush_conntrack(ifindex)?;
        }
        self.eps
            .insert(ifindex, cfg, 0)
            .map_err(map_err("insert into", POL_EP_MAP))
    }

    pub fn remove_endpoint(&mut self, ifindex: u32) -> Result<(), PolicyError> {
        // The endpoint first: from then on nothing consults the rest.
        gone(self.eps.remove(&ifindex)).map_err(map_err("remove from", POL_EP_MAP))?;
        self.set_policy(ifindex, &[])?;
        self.flush_conntrack(ifindex)
    }

    pub fn endpoint(&self, ifindex: u32) -> Result<Option<EndpointConfig>, PolicyError> {
        found(self.eps.get(&ifindex, 0)).map_err(map_err("read", POL_EP_MAP))
    }

    pub fn endpoints(&self) -> Result<Vec<(u32, EndpointConfig)>, PolicyError> {
        self.eps
            .iter()
            .collect::<Result<_, _>>()
            .map_err(map_err("read", POL_EP_MAP))
    }

    pub fn upsert_ipcache(&mut self, cidr: Cidr, identity: u32) -> Result<(), PolicyError> {
        let writes = self.mirror.upsert(cidr, identity);
        self.write_ipcache(&writes)
    }

    pub fn remove_ipcache(&mut self, cidr: Cidr, identity: u32) -> Result<bool, PolicyError> {
        let held = self
            .mirror
            .slots()
            .any(|(c, s)| *c == cidr && (s.node == Some(identity) || s.cidr == Some(identity)));
        let writes = self.mirror.remove(cidr, identity);
        self.write_ipcache(&writes)?;
        Ok(held)
    }

    fn write_ipcache(&mut self, writes: &[Write]) -> Result<(), PolicyError> {
        for (c, v) in writes {
            match v {
                Some(v) => self
                    .ipcache
                    .insert(&lpm_key(*c), v, 0)
                    .map_err(map_err("insert into", IPCACHE_MAP))?,
                None => gone(self.ipcache.remove(&lpm_key(*c)))
                    .map_err(map_err("remove from", IPCACHE_MAP))?,
            }
        }
        Ok(())
    }

    pub fn ipcache_entries(&self) -> Result<Vec<(Cidr, IpCacheValue)>, PolicyError> {
        let mut out = Vec::new();
        for r in &self.ipcache {
            let (k, v) = r.map_err(map_err("read", IPCACHE_MAP))?;
            let len = u8::try_from(k.prefix_len()).unwrap_or(32);
            out.push((Cidr::new(Ipv4Addr::from(u32::from_be(k.data())), len)?, v));
        }
        out.sort_by_key(|(c, _)| *c);
        Ok(out)
    }

    pub fn set_policy(
        &mut self,
        ifindex: u32,
        entries: &[PolicyEntry],
    ) -> Result<PolicyDiff, PolicyError> {
        let desired: BTreeMap<PolicyKey, PolicyValue> = entries
            .iter()
            .map(|e| {
                (
                    e.key(ifindex),
                    PolicyValue {
                        rule: e.rule,
                        flags: 0,
                    },
                )
            })
            .collect();
        let current = self.policies.remove(&ifindex).unwrap_or_default();
        let mut diff = PolicyDiff::default();
        let mut written = BTreeMap::new();
        // Writes before removals: a flow allowed before and after never
        // meets a moment where neither entry is there.
        let mut result = Ok(());
        for (k, v) in &desired {
            match current.get(k) {
                Some(c) if c == v => diff.kept += 1,
                had => {
                    if let Err(e) = self.pol.insert(k, v, 0) {
                        result = Err(map_err("insert into", POL_MAP)(e));
                        break;
                    }
                    if had.is_some() {
                        diff.changed += 1;
                    } else {
                        diff.added += 1;
                    }
                }
            }
            written.insert(*k, *v);
        }
        if result.is_ok() {
            for k in current.keys().filter(|k| !desired.contains_key(k)) {
                if let Err(e) = gone(self.pol.remove(k)) {
                    result = Err(map_err("remove from", POL_MAP)(e));
                    break;
                }
                diff.removed += 1;
            }
        }
        // On failure the mirror holds what may be in the map: the old
        // entries plus those written, so the next call repairs it.
        if result.is_err() {
            for (k, v) in current {
                written.entry(k).or_insert(v);
            }
        }
        if !written.is_empty() {
            self.policies.insert(ifindex, written);
        }
        result.map(|()| diff)
    }

    pub fn policy(&self, ifindex: u32) -> Result<Vec<PolicyEntry>, PolicyError> {
        let mut out = Vec::new();
        for r in &self.pol {
            let (k, v) = r.map_err(map_err("read", POL_MAP))?;
            if k.ep != ifindex {
                continue;
            }
            if let Some(dir) = Direction::from_raw(k.dir) {
                out.push(PolicyEntry {
                    peer: k.identity,
                    port: k.port,
                    proto: k.proto,
                    dir,
                    rule: v.rule,
                });
            }
        }
        out.sort();
        Ok(out)
    }

    /// Deletes every conntrack entry of endpoint `ifindex`.
    fn flush_conntrack(&mut self, ifindex: u32) -> Result<(), PolicyError> {
        let keys: Vec<CtKey> = self
            .ct
            .keys()
            .filter_map(Result::ok)
            .filter(|k| k.ep == ifindex)
            .collect();
        for k in keys {
            gone(self.ct.remove(&k)).map_err(map_err("remove from", CT_MAP))?;
        }
        Ok(())
    }

    /// Copies the entries of a conntrack map pinned in `pin_dir` under its
    /// v1 name (an agent from before the byte counters) into the current
    /// map, then removes that pin: established flows keep passing after an
    /// upgrade. Flows the old programs start between the copy and their
    /// replacement on each link are judged again on their next packet.
    pub fn migrate_conntrack_v1(
        &mut self,
        pin_dir: &std::path::Path,
    ) -> Result<usize, PolicyError> {
        let pin = pin_dir.join(CT_MAP_V1);
        if !pin.exists() {
            return Ok(0);
        }
        let data = MapData::from_pin(&pin).map_err(map_err("open pinned", CT_MAP_V1))?;
        let map = aya::maps::Map::from_map_data(data).map_err(map_err("open pinned", CT_MAP_V1))?;
        let old: HashMap<MapData, CtKey, [u8; 24]> =
            HashMap::try_from(map).map_err(map_err("open", CT_MAP_V1))?;
        let mut copied = 0;
        for r in &old {
            let Ok((k, raw)) = r else { continue };
            if found(self.ct.get(&k, 0))
                .map_err(map_err("read", CT_MAP))?
                .is_some()
            {
                continue;
            }
            let u64_at = |i: usize| u64::from_ne_bytes(raw[i..i + 8].try_into().expect("8 bytes"));
            let u32_at = |i: usize| u32::from_ne_bytes(raw[i..i + 4].try_into().expect("4 bytes"));
            let v = CtValue {
                created_ns: u64_at(0),
                last_ns: u64_at(8),
                flags: u32_at(16),
                rule: u32_at(20),
                packets: 0,
                bytes: 0,
            };
            self.ct
                .insert(k, v, 0)
                .map_err(map_err("insert into", CT_MAP))?;
            copied += 1;
        }
        std::fs::remove_file(&pin).map_err(|source| PolicyError::Io {
            path: pin.clone(),
            source,
        })?;
        Ok(copied)
    }

    pub fn conntrack(&self, ifindex: Option<u32>) -> Result<Vec<(CtKey, CtValue)>, PolicyError> {
        let mut out = Vec::new();
        for r in &self.ct {
            match r {
                Ok((k, v)) if ifindex.is_none_or(|i| i == k.ep) => out.push((k, v)),
                Ok(_) => {}
                // An LRU entry evicted between listing and reading it.
                Err(e) if is_missing(&e) => {}
                Err(e) => return Err(map_err("read", CT_MAP)(e)),
            }
        }
        out.sort_by_key(|(k, _)| *k);
        Ok(out)
    }

    pub fn prune_conntrack(&mut self, ifindex: Option<u32>) -> Result<usize, PolicyError> {
        let entries = self.conntrack(ifindex)?;
        let eps: BTreeSet<u32> = entries.iter().map(|(k, _)| k.ep).collect();
        let mut cfgs = BTreeMap::new();
        for ep in eps {
            cfgs.insert(ep, self.endpoint(ep)?);
        }
        let mut pruned = 0;
        for (k, _) in entries {
            let keep = match (
                cfgs.get(&k.ep).copied().flatten(),
                Direction::from_raw(k.dir),
            ) {
                (Some(cfg), Some(dir)) => {
                    let peer = if dir == Direction::Ingress {
                        k.saddr
                    } else {
                        k.daddr
                    };
                    let port = if k.proto == PROTO_ICMP {
                        0
                    } else {
                        u16::from_be(k.dport)
                    };
                    let peer = Ipv4Addr::from(u32::from_be(peer));
                    !matches!(
                        self.decide_with(k.ep, cfg, dir, peer, port, k.proto)?,
                        Decision::Denied { .. }
                    )
                }
                _ => false,
            };
            if !keep {
                gone(self.ct.remove(&k)).map_err(map_err("remove from", CT_MAP))?;
                pruned += 1;
            }
        }
        Ok(pruned)
    }

    pub fn decide(
        &self,
        ifindex: u32,
        dir: Direction,
        peer: Ipv4Addr,
        port: u16,
        proto: u8,
    ) -> Result<Decision, PolicyError> {
        match self.endpoint(ifindex)? {
            Some(cfg) => self.decide_with(ifindex, cfg, dir, peer, port, proto),
            None => Ok(Decision::Unenforced),
        }
    }

    /// The programs' decision, made with the same lookups in the same order.
    fn decide_with(
        &self,
        ifindex: u32,
        cfg: EndpointConfig,
        dir: Direction,
        peer: Ipv4Addr,
        port: u16,
        proto: u8,
    ) -> Result<Decision, PolicyError> {
        if !Endpoint::from_raw(cfg).enforces(dir) {
            return Ok(Decision::Unenforced);
        }
        let v = found(self.ipcache.get(&Key::new(32, u32::from(peer).to_be()), 0))
            .map_err(map_err("look up in", IPCACHE_MAP))?;
        let (id, cidr) = v.map_or((ID_WORLD, 0), |v| (v.identity, v.cidr_identity));
        let mut ids = vec![id];
        if cidr != 0 && cidr != id {
            ids.push(cidr);
        }
        ids.push(ID_ANY);
        for identity in ids {
            for (port, proto) in [(port, proto), (0, proto), (0, 0)] {
                let k = PolicyKey {
                    ep: ifindex,
                    identity,
                    port,
                    proto,
                    dir: dir.raw(),
                };
                if let Some(v) = found(self.pol.get(&k, 0)).map_err(map_err("read", POL_MAP))? {
                    return Ok(Decision::Allowed {
                        entry: PolicyEntry {
                            peer: identity,
                            port,
                            proto,
                            dir,
                            rule: v.rule,
                        },
                        peer_identity: id,
                        cidr_identity: cidr,
                    });
                }
            }
        }
        Ok(Decision::Denied {
            peer_identity: id,
            cidr_identity: cidr,
        })
    }

    pub fn drops(&self) -> Result<Vec<(DropReason, u64)>, PolicyError> {
        DropReason::ALL
            .iter()
            .map(|r| {
                let v = self
                    .drops
                    .get(&(*r as u32), 0)
                    .map_err(map_err("read", DROPS_MAP))?;
                Ok((*r, v.iter().copied().fold(0u64, u64::wrapping_add)))
            })
            .collect()
    }
}
