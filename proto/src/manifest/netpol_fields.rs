//! The field table of `networking.k8s.io/v1` `NetworkPolicy` (kept apart
//! from `fields.rs` so the tables grow independently).

use std::sync::LazyLock;

use super::fields::{LABEL_SELECTOR_PARTS, OBJECT_META, dropped, required, used};
use super::table::{FieldRule, Part, Shape, Table};

/// The rows of the `NetworkPolicy` itself.
#[rustfmt::skip]
static NETWORK_POLICY_ROWS: &[FieldRule] = &[
    required("apiVersion", Shape::String, "must be `networking.k8s.io/v1`"),
    required("kind", Shape::String, "must be `NetworkPolicy`"),
    dropped("status", "a NetworkPolicy has no status"),
    used("spec", Shape::Object, ""),
    used("spec.podSelector", Shape::Object, "the pods of the policy's namespace it applies to; empty (or absent) selects them all"),
    used("spec.policyTypes", Shape::StringList, "`Ingress` and/or `Egress`; default `Ingress`, plus `Egress` if there are egress rules"),
    used("spec.ingress", Shape::ObjectList, "allowed incoming connections; a rule allows what any peer in `from` sends to any of `ports`"),
    used("spec.ingress[].from", Shape::ObjectList, "empty or absent: from anywhere"),
    used("spec.ingress[].ports", Shape::ObjectList, "empty or absent: every port"),
    used("spec.egress", Shape::ObjectList, "allowed outgoing connections; a rule allows what goes to any peer in `to` on any of `ports`"),
    used("spec.egress[].to", Shape::ObjectList, "empty or absent: to anywhere"),
    used("spec.egress[].ports", Shape::ObjectList, "empty or absent: every port"),
];

/// A `NetworkPolicyPeer` (`from[]`, `to[]`).
#[rustfmt::skip]
static PEER_ROWS: &[FieldRule] = &[
    used("podSelector", Shape::Object, "pods in the policy's namespace, or in the namespaces namespaceSelector selects"),
    used("namespaceSelector", Shape::Object, "namespaces by their labels (every namespace has `kubernetes.io/metadata.name`); empty selects all"),
    used("ipBlock", Shape::Object, "not together with podSelector or namespaceSelector"),
    required("ipBlock.cidr", Shape::String, "an IPv4 CIDR (IPv6 CIDRs are accepted with a warning and match nothing: weir pods are IPv4 only)"),
    used("ipBlock.except", Shape::StringList, "CIDRs strictly inside `cidr`"),
];

static PEER_PARTS: &[Part] = &[
    Part::Rows(PEER_ROWS),
    Part::Mount("podSelector", LABEL_SELECTOR_PARTS),
    Part::Mount("namespaceSelector", LABEL_SELECTOR_PARTS),
];

/// A `NetworkPolicyPort` (`ports[]`).
#[rustfmt::skip]
static PORT_ROWS: &[FieldRule] = &[
    used("protocol", Shape::String, "`TCP` (default) or `UDP`; `SCTP` is refused: weir's dataplane does not handle it"),
    used("port", Shape::IntOrString, "1-65535 or a container port name; absent: every port of the protocol"),
    used("endPort", Shape::I32, "the last port of a range starting at `port` (a number); `port`-65535"),
];

static PORT_PARTS: &[Part] = &[Part::Rows(PORT_ROWS)];

/// The `networking.k8s.io/v1` `NetworkPolicy` table.
pub(super) static NETWORK_POLICY: LazyLock<Table> = LazyLock::new(|| {
    Table::new(
        "NetworkPolicy",
        &[
            Part::Rows(NETWORK_POLICY_ROWS),
            Part::Rows(OBJECT_META),
            Part::Mount("spec.podSelector", LABEL_SELECTOR_PARTS),
            Part::Mount("spec.ingress[].from[]", PEER_PARTS),
            Part::Mount("spec.ingress[].ports[]", PORT_PARTS),
            Part::Mount("spec.egress[].to[]", PEER_PARTS),
            Part::Mount("spec.egress[].ports[]", PORT_PARTS),
        ],
        &[],
    )
});
