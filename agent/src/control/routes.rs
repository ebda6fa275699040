//! Routes to the other nodes' pod CIDRs: `<peer pod CIDR> via <peer
//! address>` in the node netns, through the agent's netlink socket there.
//!
//! The routes carry weir's own route protocol number, so after an agent
//! restart the full peer list replaces exactly the routes weir put there
//! (and no one else's). The node's own CIDR is never routed away.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use futures::TryStreamExt as _;
use netlink_packet_route::route::{RouteAttribute, RouteHeader, RouteMessage, RouteProtocol};
use rtnetlink::{Handle, RouteMessageBuilder};

use crate::net::Cidr;

/// The route protocol number marking weir's peer routes.
pub const PROTOCOL: u8 = 201;

/// One peer's route: its pod CIDR via its address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerRoute {
    /// The peer's pod CIDR.
    pub cidr: Cidr,
    /// The peer node's address.
    pub via: Ipv4Addr,
}

/// Why a peer route could not be changed.
#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    /// The netlink socket could not be opened.
    #[error("open netlink socket in the node netns: {0}")]
    Open(std::io::Error),
    /// The kernel refused a route change.
    #[error("{action}: {source}")]
    Netlink {
        /// What was being done.
        action: String,
        /// The kernel's answer.
        source: rtnetlink::Error,
    },
}

/// The peer routes of this node.
pub struct PeerRoutes {
    handle: Handle,
    own: Cidr,
    /// node name → its route, as installed.
    installed: BTreeMap<String, PeerRoute>,
}

fn message(route: PeerRoute) -> RouteMessage {
    RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(route.cidr.addr, route.cidr.prefix)
        .gateway(route.via)
        .protocol(RouteProtocol::Other(PROTOCOL))
        .build()
}

impl PeerRoutes {
    /// Opens a netlink socket in this thread's netns (the node's: every
    /// agent thread runs there). `own` is this node's pod CIDR.
    pub fn open(own: Cidr) -> Result<Self, RouteError> {
        let (connection, handle, _) = rtnetlink::new_connection().map_err(RouteError::Open)?;
        tokio::spawn(connection);
        Ok(Self {
            handle,
            own,
            installed: BTreeMap::new(),
        })
    }

    /// Adds or replaces the route to `node`'s pods.
    pub async fn set(&mut self, node: &str, route: PeerRoute) -> Result<(), RouteError> {
        if route.cidr == self.own {
            return Ok(());
        }
        if self.installed.get(node) == Some(&route) {
            return Ok(());
        }
        if let Some(old) = self.installed.get(node).copied()
            && old.cidr != route.cidr
        {
            self.del(old).await?;
        }
        self.handle
            .route()
            .add(message(route))
            .replace()
            .execute()
            .await
            .map_err(|source| RouteError::Netlink {
                action: format!("add route {} via {} to node {node}", route.cidr, route.via),
                source,
            })?;
        tracing::info!(node, cidr = %route.cidr, via = %route.via, "route to peer");
        self.installed.insert(node.to_owned(), route);
        Ok(())
    }

    /// Removes the route to `node`'s pods.
    pub async fn remove(&mut self, node: &str) -> Result<(), RouteError> {
        if let Some(old) = self.installed.remove(node) {
            self.del(old).await?;
            tracing::info!(node, cidr = %old.cidr, "peer route removed");
        }
        Ok(())
    }

    async fn del(&self, route: PeerRoute) -> Result<(), RouteError> {
        match self.handle.route().del(message(route)).execute().await {
            Ok(()) => Ok(()),
            // Already gone (ESRCH).
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ESRCH => Ok(()),
            Err(source) => Err(RouteError::Netlink {
                action: format!("delete route {} via {}", route.cidr, route.via),
                source,
            }),
        }
    }

    /// Makes the routes exactly `peers` (node → route): adds what is
    /// missing, removes weir routes of nodes no longer there, also those
    /// an earlier agent left.
    pub async fn sync(&mut self, peers: &BTreeMap<String, PeerRoute>) -> Result<(), RouteError> {
        let stale = self.weir_routes().await?;
        for route in stale {
            if !peers.values().any(|p| *p == route) || route.cidr == self.own {
                self.del(route).await?;
            }
        }
        self.installed.clear();
        for (node, route) in peers {
            self.set(node, *route).await?;
        }
        Ok(())
    }

    /// The routes weir installed in the main table.
    async fn weir_routes(&self) -> Result<Vec<PeerRoute>, RouteError> {
        let action = || "list peer routes".to_owned();
        let mut out = Vec::new();
        let mut routes = self
            .handle
            .route()
            .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
            .execute();
        while let Some(r) = routes
            .try_next()
            .await
            .map_err(|source| RouteError::Netlink {
                action: action(),
                source,
            })?
        {
            if r.header.protocol != RouteProtocol::Other(PROTOCOL)
                || r.header.table != RouteHeader::RT_TABLE_MAIN
            {
                continue;
            }
            let dst = r.attributes.iter().find_map(|a| match a {
                RouteAttribute::Destination(netlink_packet_route::route::RouteAddress::Inet(
                    ip,
                )) => Some(*ip),
                _ => None,
            });
            let via = r.attributes.iter().find_map(|a| match a {
                RouteAttribute::Gateway(netlink_packet_route::route::RouteAddress::Inet(ip)) => {
                    Some(*ip)
                }
                _ => None,
            });
            if let (Some(dst), Some(via)) = (dst, via)
                && let Ok(cidr) = Cidr::new(dst, r.header.destination_prefix_length)
            {
                out.push(PeerRoute { cidr, via });
            }
        }
        Ok(out)
    }
}
