//! A model of the kernel's decision, for tests: the LPM ipcache lookup
//! (miss → world) and the constant-time policy lookup order of
//! `weir_pol_v1` from the dataplane contract.

use std::net::Ipv4Addr;

use super::compile::{Direction, EndpointPolicy};
use super::{ID_ANY, ID_WORLD};
use crate::net::Cidr;

/// The kernel's verdict on a flow's first packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Passes.
    Allow,
    /// Dropped by policy.
    Deny,
}

/// The identity the LPM ipcache gives `ip`.
pub fn identity_of(lpm: &[(Cidr, u32)], ip: Ipv4Addr) -> u32 {
    lpm.iter()
        .filter(|(c, _)| c.contains(ip))
        .max_by_key(|(c, _)| c.prefix)
        .map_or(ID_WORLD, |(_, id)| *id)
}

/// The endpoint's verdict on a new flow with the peer `peer_ip`, to
/// destination `port`/`proto` (the endpoint's port for ingress, the
/// peer's for egress), in direction `dir`.
pub fn verdict(
    ep: &EndpointPolicy,
    lpm: &[(Cidr, u32)],
    peer_ip: Ipv4Addr,
    port: u16,
    proto: u8,
    dir: Direction,
) -> Verdict {
    let enforced = match dir {
        Direction::Ingress => ep.ingress_enforced,
        Direction::Egress => ep.egress_enforced,
    };
    if !enforced {
        return Verdict::Allow;
    }
    verdict_for_identity(ep, identity_of(lpm, peer_ip), port, proto, dir)
}

/// The lookup order of the contract, on an already resolved identity.
pub fn verdict_for_identity(
    ep: &EndpointPolicy,
    id: u32,
    port: u16,
    proto: u8,
    dir: Direction,
) -> Verdict {
    let keys = ep.map_entries();
    let order = [
        (id, port, proto),
        (id, 0, proto),
        (id, 0, 0),
        (ID_ANY, port, proto),
        (ID_ANY, 0, proto),
        (ID_ANY, 0, 0),
    ];
    if order
        .iter()
        .any(|(i, p, pr)| keys.contains_key(&(dir, *i, *p, *pr)))
    {
        Verdict::Allow
    } else {
        Verdict::Deny
    }
}
