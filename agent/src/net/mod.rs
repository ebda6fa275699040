//! Pod networking through netlink: netns, veth, addresses, routes, IPAM.
//!
//! [`Network`] owns one node's pod networks. It must be opened on a thread
//! that is in the node's netns (every thread of the agent is: `main` enters
//! it before the runtime starts); its netlink socket stays bound to that
//! netns. Work inside a pod netns runs on short-lived threads of its own
//! ([`netns`]). Everything is idempotent and converges after a crash at any
//! point: IP leases are written before an address is configured, and each
//! step checks what is already there.

mod error;
mod host;
mod ipam;
mod link;
mod netns;
mod podns;
#[cfg(test)]
mod roottest;

use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

pub use error::NetError;
use ipam::Ipam;
pub use podns::GATEWAY;
pub use weir_proto::cidr::{Cidr, CidrError};

/// What a node's pod networking needs to know.
#[derive(Clone, Debug)]
pub struct NodeNetConfig {
    /// The node's name (for messages).
    pub node_name: String,
    /// The node's share of the cluster CIDR, e.g. 10.244.1.0/24.
    pub pod_cidr: Cidr,
    /// All pod addresses of the cluster, e.g. 10.244.0.0/16.
    pub cluster_cidr: Cidr,
    /// All service VIPs, e.g. 10.96.0.0/16.
    pub service_cidr: Cidr,
    /// Local state of this node, e.g. /var/lib/weir/<node>/ (holds ipam.json).
    pub state_dir: PathBuf,
    /// Where pod netns files are bind-mounted, e.g. /run/weir/netns/<node>/.
    pub netns_dir: PathBuf,
}

/// One pod's network as set up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodNet {
    /// The pod's address (a /32 on its eth0).
    pub ip: Ipv4Addr,
    /// Host-side veth name in the node netns.
    pub host_veth: String,
    /// Host-side veth ifindex in the node netns (where TC programs attach).
    pub host_ifindex: u32,
    /// The pod's netns file, for containers to join by path.
    pub netns_path: PathBuf,
}

/// The pod networks of one node.
pub struct Network {
    cfg: NodeNetConfig,
    /// Netlink socket in the node netns.
    handle: rtnetlink::Handle,
    ipam: Arc<Mutex<Ipam>>,
    mtu: u32,
    /// One lock per pod UID, so concurrent calls for the same pod serialize.
    pod_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl Network {
    /// Opens IPAM state, installs node-level routes: `unreachable` routes for
    /// `cluster_cidr` and `service_cidr` in the node netns (idempotent: an
    /// existing identical route is fine). Does NOT touch the machine's root
    /// netns. Must run on a runtime whose threads are in the node netns.
    pub async fn open(cfg: NodeNetConfig) -> Result<Self, NetError> {
        std::fs::create_dir_all(&cfg.state_dir).map_err(|e| {
            NetError::io(
                format!("create state directory {}", cfg.state_dir.display()),
                e,
            )
        })?;
        netns::prepare_dir(&cfg.netns_dir)?;
        let (state_dir, pod_cidr) = (cfg.state_dir.clone(), cfg.pod_cidr);
        let ipam = tokio::task::spawn_blocking(move || Ipam::open(&state_dir, pod_cidr))
            .await
            .map_err(|_| NetError::WorkerPanicked {
                action: "open IPAM state".to_owned(),
            })??;

        // Created on this thread, so the socket belongs to the node netns.
        let (connection, handle, _) = rtnetlink::new_connection()
            .map_err(|e| NetError::io("open netlink socket in node netns", e))?;
        tokio::spawn(connection);

        host::install_unreachable(&handle, cfg.cluster_cidr).await?;
        host::install_unreachable(&handle, cfg.service_cidr).await?;
        let mtu = host::uplink_mtu(&handle).await?.unwrap_or_else(|| {
            // Proxy ARP answers for 169.254.1.1 only if the node routes it
            // somewhere other than the asking veth.
            tracing::warn!(node = %cfg.node_name, "no IPv4 default route in the node netns: pods' gateway 169.254.1.1 will not answer");
            host::DEFAULT_MTU
        });
        // This thread is in the node netns, and /proc/sys/net follows the
        // reading thread's netns.
        if std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").is_ok_and(|v| v.trim() == "0") {
            tracing::warn!(node = %cfg.node_name, "ip_forward is off in the node netns: pods cannot reach each other");
        }
        tracing::info!(node = %cfg.node_name, pod_cidr = %cfg.pod_cidr, mtu, "pod network ready");

        Ok(Network {
            cfg,
            handle,
            ipam: Arc::new(Mutex::new(ipam)),
            mtu,
            pod_locks: Mutex::new(HashMap::new()),
        })
    }

    /// Creates (or adopts) the pod's netns, IP lease, veth pair, addresses
    /// and routes; converges whatever part already exists. Same IP again for
    /// the same UID.
    pub async fn setup_pod(&self, pod_uid: &str) -> Result<PodNet, NetError> {
        check_uid(pod_uid)?;
        let lock = self.pod_lock(pod_uid);
        let _guard = lock.lock().await;

        let netns_path = self.netns_path(pod_uid);
        if !netns::is_netns(&netns_path)? {
            netns::create(&netns_path, pod_uid).await?;
        }
        let ip = self.with_ipam(pod_uid, Ipam::allocate).await?;

        let host_veth = host::veth_name(pod_uid);
        let host_link = link::by_name(&self.handle, &host_veth).await.map_err(|e| {
            NetError::netlink(format!("look up veth {host_veth} of pod {pod_uid}"), e)
        })?;
        let pod_side = self.inspect_pod_side(&netns_path, pod_uid).await?;
        let paired = match (&host_link, pod_side.eth0) {
            (Some(h), Some((_, Some(peer)))) => peer == h.header.index,
            _ => false,
        };
        if !paired {
            // A half-made or foreign pair: start the pair over. Deleting one
            // end of a veth deletes the other.
            if let Some(h) = &host_link {
                link::delete(&self.handle, h.header.index)
                    .await
                    .map_err(|e| {
                        NetError::netlink(
                            format!("delete stale veth {host_veth} of pod {pod_uid}"),
                            e,
                        )
                    })?;
            }
            if let Some((index, _)) = pod_side.eth0 {
                let uid = pod_uid.to_owned();
                netns::run_in(
                    &netns_path,
                    format!("delete stray eth0 of pod {pod_uid}"),
                    move |h| async move { podns::delete_eth0(&h, index, &uid).await },
                )
                .await?;
            }
            let ns = File::open(&netns_path).map_err(|e| {
                NetError::io(
                    format!("open netns {} of pod {pod_uid}", netns_path.display()),
                    e,
                )
            })?;
            host::create_veth(&self.handle, &host_veth, &ns, self.mtu, pod_uid).await?;
        }
        let host_ifindex = link::by_name(&self.handle, &host_veth)
            .await
            .map_err(|e| {
                NetError::netlink(format!("look up veth {host_veth} of pod {pod_uid}"), e)
            })?
            .ok_or_else(|| NetError::Inconsistent {
                pod: pod_uid.to_owned(),
                reason: format!("veth {host_veth} vanished right after creation"),
            })?
            .header
            .index;
        host::configure_veth(&self.handle, &host_veth, host_ifindex, ip, pod_uid).await?;

        let uid = pod_uid.to_owned();
        netns::run_in(
            &netns_path,
            format!("configure network inside pod {pod_uid}"),
            move |h| async move { podns::configure(&h, ip, &uid).await },
        )
        .await?;

        Ok(PodNet {
            ip,
            host_veth,
            host_ifindex,
            netns_path,
        })
    }

    /// Looks up an existing pod network without changing anything (for
    /// adoption after an agent restart): Ok(None) if it is not there, or
    /// only partly (then `setup_pod` repairs it).
    pub async fn inspect_pod(&self, pod_uid: &str) -> Result<Option<PodNet>, NetError> {
        check_uid(pod_uid)?;
        let netns_path = self.netns_path(pod_uid);
        if !netns::is_netns(&netns_path)? {
            return Ok(None);
        }
        let Some(ip) = self
            .ipam
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(pod_uid)
        else {
            return Ok(None);
        };
        let host_veth = host::veth_name(pod_uid);
        let Some(host_link) = link::by_name(&self.handle, &host_veth).await.map_err(|e| {
            NetError::netlink(format!("look up veth {host_veth} of pod {pod_uid}"), e)
        })?
        else {
            return Ok(None);
        };
        let host_ifindex = host_link.header.index;
        let pod_side = self.inspect_pod_side(&netns_path, pod_uid).await?;
        let paired = matches!(pod_side.eth0, Some((_, Some(peer))) if peer == host_ifindex);
        if !paired || !pod_side.addrs.contains(&ip) {
            return Ok(None);
        }
        Ok(Some(PodNet {
            ip,
            host_veth,
            host_ifindex,
            netns_path,
        }))
    }

    /// Idempotent teardown: deletes the host veth (and with it the pod's
    /// eth0 and the /32 route), unmounts and removes the netns file, then
    /// releases the IP lease. Anything already gone is success.
    pub async fn teardown_pod(&self, pod_uid: &str) -> Result<(), NetError> {
        check_uid(pod_uid)?;
        let lock = self.pod_lock(pod_uid);
        let guard = lock.lock().await;

        let host_veth = host::veth_name(pod_uid);
        let action = || format!("delete veth {host_veth} of pod {pod_uid}");
        if let Some(host_link) = link::by_name(&self.handle, &host_veth)
            .await
            .map_err(|e| NetError::netlink(action(), e))?
        {
            link::delete(&self.handle, host_link.header.index)
                .await
                .map_err(|e| NetError::netlink(action(), e))?;
        }
        netns::remove(&self.netns_path(pod_uid), pod_uid)?;
        // Last: the address is free only once nothing uses it.
        self.with_ipam(pod_uid, Ipam::release).await?;

        drop(guard);
        let mut locks = self
            .pod_locks
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        // Only this call and the map hold it: nobody else is waiting.
        if Arc::strong_count(&lock) == 2 {
            locks.remove(pod_uid);
        }
        Ok(())
    }

    /// UIDs with a lease or a netns file (for garbage collection of pods the
    /// agent no longer knows).
    pub fn known_pods(&self) -> Vec<String> {
        let mut uids: BTreeSet<String> = self
            .ipam
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .uids()
            .map(str::to_owned)
            .collect();
        match std::fs::read_dir(&self.cfg.netns_dir) {
            Ok(entries) => uids.extend(
                entries
                    .filter_map(Result::ok)
                    .filter_map(|e| e.file_name().into_string().ok())
                    .filter(|name| check_uid(name).is_ok()),
            ),
            Err(e) => tracing::warn!(
                dir = %self.cfg.netns_dir.display(),
                error = %e,
                "cannot list pod netns files"
            ),
        }
        uids.into_iter().collect()
    }

    /// The node configuration this network was opened with.
    pub fn config(&self) -> &NodeNetConfig {
        &self.cfg
    }

    fn netns_path(&self, pod_uid: &str) -> PathBuf {
        self.cfg.netns_dir.join(pod_uid)
    }

    fn pod_lock(&self, pod_uid: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.pod_locks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(pod_uid.to_owned())
            .or_default()
            .clone()
    }

    async fn inspect_pod_side(
        &self,
        netns_path: &Path,
        pod_uid: &str,
    ) -> Result<podns::PodSide, NetError> {
        let uid = pod_uid.to_owned();
        netns::run_in(
            netns_path,
            format!("inspect network inside pod {pod_uid}"),
            move |h| async move { podns::inspect(&h, &uid).await },
        )
        .await
    }

    /// Runs an IPAM change (which fsyncs) off the async threads. The IPAM
    /// only changes in memory after its file is written, so a poisoned lock
    /// still guards consistent state.
    async fn with_ipam<T: Send + 'static>(
        &self,
        pod_uid: &str,
        op: fn(&mut Ipam, &str) -> Result<T, NetError>,
    ) -> Result<T, NetError> {
        let ipam = Arc::clone(&self.ipam);
        let uid = pod_uid.to_owned();
        tokio::task::spawn_blocking(move || {
            op(
                &mut ipam.lock().unwrap_or_else(PoisonError::into_inner),
                &uid,
            )
        })
        .await
        .map_err(|_| NetError::WorkerPanicked {
            action: format!("update IP lease of pod {pod_uid}"),
        })?
    }
}

/// A pod UID names a file in the netns directory: keep it to a safe alphabet.
fn check_uid(uid: &str) -> Result<(), NetError> {
    let reason = if uid.is_empty() {
        Some("empty")
    } else if uid.len() > 253 {
        Some("longer than 253 bytes")
    } else if uid == "." || uid == ".." {
        Some("not a file name")
    } else if !uid
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        Some("only ASCII letters, digits, '-', '_' and '.' are allowed")
    } else {
        None
    };
    reason.map_or(Ok(()), |reason| {
        Err(NetError::InvalidPodUid {
            uid: uid.to_owned(),
            reason,
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_uids_are_checked() {
        check_uid("4b1e7c1e-0000-4000-8000-000000000001").unwrap();
        check_uid("web-0.default").unwrap();
        for bad in ["", ".", "..", "a/b", "../x", "a b", "ä"] {
            assert!(check_uid(bad).is_err(), "{bad:?} accepted");
        }
    }
}
