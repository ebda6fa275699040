//! The policy state follows `WatchNode` events: add, modify, delete,
//! resync, and the ipcache's "only if it still names that pod" rule.

use std::net::Ipv4Addr;

use weir_proto::v1;
use weir_proto::v1::node_event::Event;

use super::*;

fn ns(t: v1::EventType, name: &str, labels: &[(&str, &str)]) -> Event {
    Event::Namespace(v1::NamespaceEvent {
        r#type: t as i32,
        name: name.into(),
        labels: labels
            .iter()
            .map(|(k, v)| ((*k).into(), (*v).into()))
            .collect(),
    })
}

fn ident(t: v1::EventType, id: u32, namespace: &str, app: &str) -> Event {
    Event::Identity(v1::IdentityEvent {
        r#type: t as i32,
        id,
        namespace: namespace.into(),
        labels: [("app".to_owned(), app.to_owned())].into(),
    })
}

fn ipc(t: v1::EventType, ip: &str, id: u32, pod: &str) -> Event {
    Event::Ipcache(v1::IpCacheEvent {
        r#type: t as i32,
        ip: ip.into(),
        identity: id,
        namespace: "x".into(),
        pod_name: pod.into(),
        node_name: "n1".into(),
        named_ports: vec![
            v1::NamedPort {
                name: "http".into(),
                port: 8080,
                protocol: "TCP".into(),
            },
            v1::NamedPort {
                name: "bad".into(),
                port: 70000,
                protocol: "TCP".into(),
            },
        ],
    })
}

fn pol(t: v1::EventType, name: &str, cidr: &str) -> Event {
    let json = serde_json::json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"namespace": "x", "name": name},
        "spec": {"podSelector": {}, "policyTypes": ["Egress"],
                 "egress": [{"to": [{"ipBlock": {"cidr": cidr, "except": ["10.9.9.0/24"]}}]}]}
    });
    Event::Policy(v1::PolicyEvent {
        r#type: t as i32,
        policy: Some(v1::Object {
            meta: Some(v1::ObjectMeta {
                name: name.into(),
                ..Default::default()
            }),
            json: json.to_string(),
        }),
    })
}

use v1::EventType::{Added, Deleted, Modified};

#[test]
fn events_add_modify_and_delete_every_kind() {
    let mut d = PolicyData::default();
    assert!(d.apply(&ns(Added, "x", &[("team", "a")])).unwrap());
    assert!(!d.apply(&ns(Modified, "x", &[("team", "a")])).unwrap());
    assert!(d.apply(&ns(Modified, "x", &[("team", "b")])).unwrap());
    assert_eq!(d.namespaces()["x"]["team"], "b");
    assert!(d.apply(&ident(Added, 300, "x", "web")).unwrap());
    assert_eq!(d.identities()[&300].labels["app"], "web");
    assert!(d.apply(&ipc(Added, "10.244.1.5", 300, "web-1")).unwrap());
    let e = &d.ipcache()[&Ipv4Addr::new(10, 244, 1, 5)];
    assert_eq!(
        (e.identity, e.pod.as_str(), e.node.as_str()),
        (300, "web-1", "n1")
    );
    // The out-of-range port is dropped, not truncated.
    assert_eq!(
        e.named_ports,
        vec![NamedPort {
            name: "http".into(),
            port: 8080,
            proto: PROTO_TCP
        }]
    );
    assert!(d.apply(&ipc(Modified, "10.244.1.5", 301, "web-1")).unwrap());
    assert_eq!(d.ipcache()[&Ipv4Addr::new(10, 244, 1, 5)].identity, 301);
    assert!(d.apply(&pol(Added, "p", "10.0.0.0/8")).unwrap());
    assert_eq!(d.policies().len(), 1);
    assert_eq!(
        d.cidr_ids().len(),
        2,
        "cidr and except each get an identity"
    );
    assert!(d.apply(&pol(Deleted, "p", "10.0.0.0/8")).unwrap());
    assert!(d.policies().is_empty());
    assert!(d.cidr_ids().is_empty(), "unused prefixes are released");
    assert!(d.apply(&ident(Deleted, 300, "x", "web")).unwrap());
    assert!(d.apply(&ns(Deleted, "x", &[])).unwrap());
    assert!(d.namespaces().is_empty() && d.identities().is_empty());
    // Other events are not the policy state's.
    assert!(!d.apply(&Event::Bookmark(v1::Bookmark {})).unwrap());
}

#[test]
fn an_ipcache_delete_only_removes_the_pod_it_names() {
    let mut d = PolicyData::default();
    d.apply(&ipc(Added, "10.244.1.5", 300, "old")).unwrap();
    // The IP went to a new pod before the old pod's DELETED arrived.
    d.apply(&ipc(Added, "10.244.1.5", 302, "new")).unwrap();
    assert!(!d.apply(&ipc(Deleted, "10.244.1.5", 300, "old")).unwrap());
    assert_eq!(d.ipcache()[&Ipv4Addr::new(10, 244, 1, 5)].pod, "new");
    assert!(d.apply(&ipc(Deleted, "10.244.1.5", 302, "new")).unwrap());
    assert!(d.ipcache().is_empty());
    let bad = d
        .apply(&ipc(Added, "nope", 1, "p"))
        .unwrap_err()
        .to_string();
    assert!(bad.contains("x/p") && bad.contains("nope"), "{bad}");
}

#[test]
fn bad_policies_are_refused_with_their_name() {
    let mut d = PolicyData::default();
    let ev = Event::Policy(v1::PolicyEvent {
        r#type: Added as i32,
        policy: Some(v1::Object {
            meta: Some(v1::ObjectMeta {
                name: "broken".into(),
                ..Default::default()
            }),
            json: "{".into(),
        }),
    });
    assert!(d.apply(&ev).unwrap_err().to_string().contains("broken"));
    let none = Event::Policy(v1::PolicyEvent {
        r#type: Added as i32,
        policy: None,
    });
    assert!(d.apply(&none).is_err());
}

#[test]
fn a_resync_leaves_exactly_what_was_sent_and_bumps_the_generation() {
    let hub = PolicyHub::default();
    hub.set_host_ips(vec![Ipv4Addr::new(192, 168, 0, 1)]);
    let mut rx = hub.subscribe();
    for ev in [
        ns(Added, "x", &[]),
        ns(Added, "gone", &[]),
        ident(Added, 300, "x", "web"),
        ident(Added, 301, "gone", "old"),
        ipc(Added, "10.244.1.5", 300, "web-1"),
        ipc(Added, "10.244.1.6", 301, "stale"),
        pol(Added, "p", "10.0.0.0/8"),
        pol(Added, "stale", "172.16.0.0/12"),
    ] {
        hub.apply(&ev).unwrap();
    }
    assert!(rx.has_changed().unwrap());
    rx.mark_unchanged();
    let kept_id = hub.read(|d| d.cidr_ids()[&"10.0.0.0/8".parse().unwrap()]);

    let mut fresh = PolicyData::default();
    for ev in [
        ns(Added, "x", &[]),
        ident(Added, 300, "x", "web"),
        ipc(Added, "10.244.1.5", 300, "web-1"),
        pol(Added, "p", "10.0.0.0/8"),
    ] {
        fresh.apply(&ev).unwrap();
    }
    let mut expected = fresh.clone();
    expected.set_host_ips(vec![Ipv4Addr::new(192, 168, 0, 1)]);
    hub.replace(fresh.clone());
    assert!(
        rx.has_changed().unwrap(),
        "a resync that changed the state bumps"
    );
    rx.mark_unchanged();
    hub.read(|d| {
        assert_eq!(d.namespaces(), expected.namespaces());
        assert_eq!(d.identities(), expected.identities());
        assert_eq!(d.ipcache(), expected.ipcache());
        assert_eq!(d.policies(), expected.policies());
        assert_eq!(d.host_ips(), expected.host_ips());
        assert_eq!(
            d.cidr_ids().keys().collect::<Vec<_>>(),
            expected.cidr_ids().keys().collect::<Vec<_>>()
        );
        assert_eq!(
            d.cidr_ids()[&"10.0.0.0/8".parse().unwrap()],
            kept_id,
            "a prefix in use keeps its identity across the resync"
        );
    });
    hub.replace(fresh);
    assert!(
        !rx.has_changed().unwrap(),
        "the same list again is no change"
    );
}

#[test]
fn cidr_identities_are_local_stable_and_distinct() {
    let mut a = PolicyData::default();
    a.apply(&pol(Added, "p", "10.0.0.0/8")).unwrap();
    let mut b = PolicyData::default();
    b.apply(&pol(Added, "q", "172.16.0.0/12")).unwrap();
    b.apply(&pol(Added, "p", "10.0.0.0/8")).unwrap();
    let c: Cidr = "10.0.0.0/8".parse().unwrap();
    assert_eq!(a.cidr_ids()[&c], b.cidr_ids()[&c], "same prefix, same id");
    let ids: BTreeSet<u32> = b.cidr_ids().values().copied().collect();
    assert_eq!(ids.len(), b.cidr_ids().len());
    assert!(ids.iter().all(|id| *id >= CIDR_ID_BASE));
    let taken: BTreeSet<u32> = [cidr_identity(c, &BTreeSet::new())].into();
    assert_ne!(cidr_identity(c, &taken), cidr_identity(c, &BTreeSet::new()));
}

#[test]
fn block_cidrs_are_masked_and_ipv6_matches_nothing() {
    assert_eq!(
        parse_block_cidr("10.1.2.3/16").unwrap(),
        Some("10.1.0.0/16".parse().unwrap())
    );
    assert_eq!(parse_block_cidr("fd00::/8").unwrap(), None);
    assert!(
        parse_block_cidr("10.0.0.0/33")
            .unwrap_err()
            .contains("prefix")
    );
    assert!(
        parse_block_cidr("10.0.0.0")
            .unwrap_err()
            .contains("10.0.0.0")
    );
    assert_eq!(
        parse_block_cidr("0.0.0.0/0").unwrap(),
        Some("0.0.0.0/0".parse().unwrap())
    );
}

#[test]
fn the_lpm_holds_pods_host_and_prefixes_with_pods_winning_a_shared_slash_32() {
    let mut d = PolicyData::default();
    d.set_host_ips(vec![Ipv4Addr::new(192, 168, 0, 1)]);
    d.apply(&ipc(Added, "10.244.1.5", 300, "web-1")).unwrap();
    d.apply(&pol(Added, "p", "10.244.1.5/32")).unwrap();
    let lpm: BTreeMap<Cidr, u32> = d.lpm_entries().into_iter().collect();
    assert_eq!(lpm[&"10.244.1.5/32".parse().unwrap()], 300);
    assert_eq!(lpm[&"192.168.0.1/32".parse().unwrap()], ID_HOST);
    assert!(lpm[&"10.9.9.0/24".parse().unwrap()] >= CIDR_ID_BASE);
}
