//! The pod-netns side: `lo`, `eth0` with the pod's /32, and the routes via
//! the link-local gateway. These functions take a handle whose socket lives
//! in the pod netns (see [`super::netns::run_in`]).

use std::net::{IpAddr, Ipv4Addr};

use futures::TryStreamExt;
use netlink_packet_route::AddressFamily;
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::route::RouteScope;
use rtnetlink::{Handle, LinkUnspec, RouteMessageBuilder};

use super::host::POD_IFNAME;
use super::{NetError, link};

/// The gateway every pod routes through; the host veth answers ARP for it.
pub const GATEWAY: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);

/// What a pod netns holds of its network.
#[derive(Debug, Default)]
pub(crate) struct PodSide {
    /// `eth0`'s ifindex and its veth peer's ifindex in the node netns.
    pub(crate) eth0: Option<(u32, Option<u32>)>,
    /// IPv4 addresses on `eth0`.
    pub(crate) addrs: Vec<Ipv4Addr>,
}

/// Reads `eth0` and its addresses; changes nothing.
pub(crate) async fn inspect(handle: &Handle, pod: &str) -> Result<PodSide, NetError> {
    let action = || format!("inspect {POD_IFNAME} of pod {pod}");
    let Some(eth0) = link::by_name(handle, POD_IFNAME)
        .await
        .map_err(|e| NetError::netlink(action(), e))?
    else {
        return Ok(PodSide::default());
    };
    let index = eth0.header.index;
    let addrs = ipv4_addrs(handle, index)
        .await
        .map_err(|e| NetError::netlink(action(), e))?
        .into_iter()
        .map(|(ip, _)| ip)
        .collect();
    Ok(PodSide {
        eth0: Some((index, link::peer_index(&eth0))),
        addrs,
    })
}

/// Deletes a stray `eth0` (one whose peer is not the pod's host veth).
pub(crate) async fn delete_eth0(handle: &Handle, index: u32, pod: &str) -> Result<(), NetError> {
    link::delete(handle, index)
        .await
        .map_err(|e| NetError::netlink(format!("delete stray {POD_IFNAME} of pod {pod}"), e))
}

/// Brings `lo` and `eth0` up, gives `eth0` exactly `ip/32` and points the
/// default route at [`GATEWAY`] on-link. Safe to repeat.
pub(crate) async fn configure(handle: &Handle, ip: Ipv4Addr, pod: &str) -> Result<(), NetError> {
    let lo = link::by_name(handle, "lo")
        .await
        .map_err(|e| NetError::netlink(format!("find lo of pod {pod}"), e))?
        .ok_or_else(|| NetError::Inconsistent {
            pod: pod.to_owned(),
            reason: "netns has no lo".to_owned(),
        })?;
    handle
        .link()
        .set(LinkUnspec::new_with_index(lo.header.index).up().build())
        .execute()
        .await
        .map_err(|e| NetError::netlink(format!("set lo of pod {pod} up"), e))?;

    let eth0 = link::by_name(handle, POD_IFNAME)
        .await
        .map_err(|e| NetError::netlink(format!("find {POD_IFNAME} of pod {pod}"), e))?
        .ok_or_else(|| NetError::Inconsistent {
            pod: pod.to_owned(),
            reason: format!("{POD_IFNAME} vanished from the pod netns"),
        })?;
    let index = eth0.header.index;

    let addr_action = || format!("set address {ip}/32 on {POD_IFNAME} of pod {pod}");
    let mut have = false;
    for (addr, msg) in ipv4_addrs(handle, index)
        .await
        .map_err(|e| NetError::netlink(addr_action(), e))?
    {
        if addr == ip && msg.header.prefix_len == 32 {
            have = true;
        } else {
            // Left from an earlier lease: a pod has exactly one address.
            link::ignoring(
                handle.address().del(msg).execute().await,
                &[libc::EADDRNOTAVAIL],
            )
            .map_err(|e| NetError::netlink(addr_action(), e))?;
        }
    }
    if !have {
        link::ignoring(
            handle
                .address()
                .add(index, IpAddr::V4(ip), 32)
                .execute()
                .await,
            &[libc::EEXIST],
        )
        .map_err(|e| NetError::netlink(addr_action(), e))?;
    }

    handle
        .link()
        .set(LinkUnspec::new_with_index(index).up().build())
        .execute()
        .await
        .map_err(|e| NetError::netlink(format!("set {POD_IFNAME} of pod {pod} up"), e))?;

    let gateway_route = RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(GATEWAY, 32)
        .output_interface(index)
        .scope(RouteScope::Link)
        .build();
    handle
        .route()
        .add(gateway_route)
        .replace()
        .execute()
        .await
        .map_err(|e| {
            NetError::netlink(
                format!("add route {GATEWAY}/32 dev {POD_IFNAME} in pod {pod}"),
                e,
            )
        })?;
    let default_route = RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(Ipv4Addr::UNSPECIFIED, 0)
        .gateway(GATEWAY)
        .output_interface(index)
        .onlink()
        .build();
    handle
        .route()
        .add(default_route)
        .replace()
        .execute()
        .await
        .map_err(|e| {
            NetError::netlink(
                format!("add default route via {GATEWAY} dev {POD_IFNAME} in pod {pod}"),
                e,
            )
        })
}

/// IPv4 addresses on link `index`, with the messages that delete them.
async fn ipv4_addrs(
    handle: &Handle,
    index: u32,
) -> Result<Vec<(Ipv4Addr, AddressMessage)>, rtnetlink::Error> {
    let msgs: Vec<AddressMessage> = handle
        .address()
        .get()
        .set_link_index_filter(index)
        .execute()
        .try_collect()
        .await?;
    Ok(msgs
        .into_iter()
        // The dump filter is applied in userspace by rtnetlink; be explicit.
        .filter(|m| m.header.index == index && m.header.family == AddressFamily::Inet)
        .filter_map(|m| {
            let local = m.attributes.iter().find_map(|a| match a {
                AddressAttribute::Local(IpAddr::V4(ip)) => Some(*ip),
                _ => None,
            });
            let addr = m.attributes.iter().find_map(|a| match a {
                AddressAttribute::Address(IpAddr::V4(ip)) => Some(*ip),
                _ => None,
            });
            local.or(addr).map(|ip| (ip, m))
        })
        .collect())
}
