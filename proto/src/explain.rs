//! What `GET /policy/explain` on an agent answers and `weirctl policy
//! explain` prints: one step per side of a connection (the source pod's
//! Egress, the destination pod's Ingress), as the node's pinned maps decide
//! it.

use serde::{Deserialize, Serialize};

/// One end as a step shows it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Party {
    /// Its address.
    pub ip: String,
    /// Its security identity as the dataplane sees it (the endpoint's own,
    /// or the ipcache's for the peer: 2 = world when unknown).
    pub identity: u32,
    /// The pod's namespace, if it is a known pod.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// The pod's name, if it is a known pod.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
}

/// The policy map key that allowed the connection.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct MatchedKey {
    /// The endpoint's host-side veth ifindex.
    pub ep: u32,
    /// The peer identity of the key (0 = any peer).
    pub identity: u32,
    /// The port of the key (0 = any).
    pub port: u16,
    /// `TCP`, `UDP` or `any`.
    pub protocol: String,
    /// `ingress` / `egress`.
    pub direction: String,
}

/// One side's verdict: the source pod's Egress or the destination pod's
/// Ingress, at the node it runs on.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct Step {
    /// The node that judged it.
    pub node: String,
    /// `egress` (at the source pod) or `ingress` (at the destination pod).
    pub direction: String,
    /// The local pod whose policy this is.
    pub endpoint: Party,
    /// Its host-side veth ifindex (the policy map's `ep`).
    pub ifindex: u32,
    /// The other end.
    pub peer: Party,
    /// The peer's `ipBlock` identity (the longest ipBlock prefix holding
    /// it; 0 if none).
    pub peer_cidr_identity: u32,
    /// Whether the direction is enforced (some policy selects the pod).
    pub enforced: bool,
    /// The policies that isolate the pod in this direction.
    pub isolated_by: Vec<String>,
    /// `ALLOWED` or `DENIED`.
    pub verdict: String,
    /// The allowing policy (`namespace/name`, `<host>`, `rule-N`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    /// The policy map key that matched.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub matched_key: Option<MatchedKey>,
}

impl Step {
    /// Whether this side lets the connection through.
    #[must_use]
    pub fn allowed(&self) -> bool {
        self.verdict == "ALLOWED"
    }
}
