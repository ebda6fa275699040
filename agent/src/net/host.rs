//! The node-netns side of pod networking: unreachable routes for the
//! cluster's ranges, the host end of each pod's veth, its proxy ARP and its
//! `/32` route. All through the node's netlink socket, which was opened on
//! a thread in the node netns and stays bound to it.

use std::fmt::Write as _;
use std::fs::File;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;

use futures::TryStreamExt;
use netlink_packet_route::link::{
    AfSpecInet, AfSpecUnspec, InetDevConf, InfoData, InfoKind, InfoVeth, LinkAttribute,
};
use netlink_packet_route::route::{RouteAttribute, RouteHeader, RouteScope, RouteType};
use rtnetlink::{Handle, LinkMessageBuilder, LinkUnspec, LinkVeth, RouteMessageBuilder};
use sha2::{Digest, Sha256};

use super::{Cidr, NetError, link};

/// MTU for pod veths when the node's uplink cannot be found.
pub(crate) const DEFAULT_MTU: u32 = 1500;

/// The pod-side interface name.
pub(crate) const POD_IFNAME: &str = "eth0";

/// Host-side veth name of a pod: `weir` + 11 hex digits of sha256(uid),
/// 15 bytes, the most a Linux interface name can hold.
pub(crate) fn veth_name(pod_uid: &str) -> String {
    let digest = Sha256::digest(pod_uid.as_bytes());
    let mut name = String::from("weir");
    for b in digest.iter().take(6) {
        // Writing to a String cannot fail.
        let _ = write!(name, "{b:02x}");
    }
    name.truncate(15);
    name
}

/// Routes `cidr` to `unreachable`, replacing whatever route had exactly that
/// prefix, so traffic for it that no more specific route claims never leaves.
pub(crate) async fn install_unreachable(handle: &Handle, cidr: Cidr) -> Result<(), NetError> {
    let route = RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(cidr.addr, cidr.prefix)
        .kind(RouteType::Unreachable)
        .build();
    handle
        .route()
        .add(route)
        .replace()
        .execute()
        .await
        .map_err(|e| NetError::netlink(format!("add unreachable route {cidr}"), e))
}

/// MTU of the interface the node's IPv4 default route leaves through, or
/// `None` if the node has no default route.
pub(crate) async fn uplink_mtu(handle: &Handle) -> Result<Option<u32>, NetError> {
    let action = "find MTU of the node's default route";
    let mut routes = handle
        .route()
        .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
        .execute();
    let mut oif = None;
    while let Some(route) = routes
        .try_next()
        .await
        .map_err(|e| NetError::netlink(action, e))?
    {
        let table = route
            .attributes
            .iter()
            .find_map(|a| match a {
                RouteAttribute::Table(t) => Some(*t),
                _ => None,
            })
            .unwrap_or(u32::from(route.header.table));
        if route.header.destination_prefix_length == 0
            && route.header.kind == RouteType::Unicast
            && table == u32::from(RouteHeader::RT_TABLE_MAIN)
        {
            oif = route.attributes.iter().find_map(|a| match a {
                RouteAttribute::Oif(i) => Some(*i),
                _ => None,
            });
            if oif.is_some() {
                break;
            }
        }
    }
    let Some(oif) = oif else {
        return Ok(None);
    };
    let uplink = link::by_index(handle, oif)
        .await
        .map_err(|e| NetError::netlink(action, e))?;
    Ok(Some(
        uplink.as_ref().and_then(link::mtu).unwrap_or(DEFAULT_MTU),
    ))
}

/// Creates the pod's veth pair: `host_name` here, `eth0` directly inside the
/// pod netns (no window where the pod end sits in the node netns).
pub(crate) async fn create_veth(
    handle: &Handle,
    host_name: &str,
    pod_netns: &File,
    mtu: u32,
    pod: &str,
) -> Result<(), NetError> {
    let peer = LinkMessageBuilder::<LinkUnspec>::new()
        .name(POD_IFNAME)
        .mtu(mtu)
        .setns_by_fd(pod_netns.as_raw_fd())
        .build();
    let veth = LinkMessageBuilder::<LinkVeth>::new_with_info_kind(InfoKind::Veth)
        .name(host_name)
        .mtu(mtu)
        .set_info_data(InfoData::Veth(InfoVeth::Peer(peer)))
        .build();
    handle
        .link()
        .add(veth)
        .execute()
        .await
        .map_err(|e| NetError::netlink(format!("create veth {host_name} for pod {pod}"), e))
}

/// Brings the host end up with proxy ARP on (so it answers the pod's ARP for
/// 169.254.1.1) and routes the pod's address to it.
pub(crate) async fn configure_veth(
    handle: &Handle,
    host_name: &str,
    index: u32,
    ip: Ipv4Addr,
    pod: &str,
) -> Result<(), NetError> {
    // Through netlink (IFLA_INET_CONF) rather than /proc/sys, which resolves
    // against the netns of whichever thread opens it.
    let mut devconf = InetDevConf::default();
    devconf.proxy_arp = 1;
    let up = LinkUnspec::new_with_index(index)
        .up()
        .append_extra_attribute(LinkAttribute::AfSpecUnspec(vec![AfSpecUnspec::Inet(vec![
            AfSpecInet::DevConfRequest(devconf),
        ])]))
        .build();
    handle.link().set(up).execute().await.map_err(|e| {
        NetError::netlink(
            format!("set veth {host_name} of pod {pod} up with proxy_arp"),
            e,
        )
    })?;
    // Proxy ARP replies are delayed by a random 0-0.8 s by default
    // (neigh.proxy_delay): a pod's first packet would wait that long for
    // its gateway's MAC. This thread runs in the node netns, so /proc/sys
    // resolves to the node's view of the veth.
    let delay = format!("/proc/sys/net/ipv4/neigh/{host_name}/proxy_delay");
    std::fs::write(&delay, "0")
        .map_err(|e| NetError::io(format!("set {delay} for pod {pod}"), e))?;
    let route = RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(ip, 32)
        .output_interface(index)
        .scope(RouteScope::Link)
        .build();
    handle
        .route()
        .add(route)
        .replace()
        .execute()
        .await
        .map_err(|e| {
            NetError::netlink(
                format!("add route {ip}/32 dev {host_name} for pod {pod}"),
                e,
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn veth_names_fit_ifnamsiz_and_differ() {
        let a = veth_name("4b1e7c1e-0000-4000-8000-000000000001");
        let b = veth_name("4b1e7c1e-0000-4000-8000-000000000002");
        assert_eq!(a.len(), 15);
        assert!(a.starts_with("weir"));
        assert_ne!(a, b);
        // sha256("abc") = ba7816bf8f01cfea...
        assert_eq!(veth_name("abc"), "weirba7816bf8f0");
    }
}
