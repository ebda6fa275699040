//! Pushes the node's service map edges ([`crate::flows::edges`]) to the
//! control: one `EdgeReport` every [`REPORT_INTERVAL`] on one long-lived
//! `ServiceMap.Report` stream, each with the totals since the agent
//! started (a lost report loses nothing), reconnecting with backoff.
//! Before each report the connections' bytes are read from the policy
//! conntrack and the service VIPs named from the service table.

use std::{
    collections::HashMap,
    net::Ipv4Addr,
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant},
};

use futures::{SinkExt as _, channel::mpsc};
use tokio_util::sync::CancellationToken;
use weir_proto::v1::{self, service_map_client::ServiceMapClient};

use super::{BACKOFF_INITIAL, Shared, next_backoff, policy::enforce::Enforcer};
use crate::flows::edges::{EdgeTable, Tuple};

/// How often the node reports its edges.
pub const REPORT_INTERVAL: Duration = Duration::from_secs(5);

/// A stream that lasted this long was healthy: the backoff starts over.
const HEALTHY: Duration = Duration::from_secs(30);

/// Every conntrack entry's byte count by 5-tuple (the largest where two
/// endpoints of this node track the same connection).
fn conntrack_bytes(enforcer: &Enforcer) -> HashMap<Tuple, u64> {
    let entries = match enforcer.dataplane().conntrack(None) {
        Ok(e) => e,
        Err(e) => {
            tracing::debug!(error = %e, "service map: cannot read conntrack bytes");
            return HashMap::new();
        }
    };
    let mut out = HashMap::with_capacity(entries.len());
    for (k, v) in entries {
        let t = Tuple {
            saddr: Ipv4Addr::from(u32::from_be(k.saddr)),
            daddr: Ipv4Addr::from(u32::from_be(k.daddr)),
            sport: u16::from_be(k.sport),
            dport: u16::from_be(k.dport),
            proto: k.proto,
        };
        let b = out.entry(t).or_insert(0u64);
        *b = (*b).max(v.bytes);
    }
    out
}

/// Service VIP → (namespace, name), from the service table.
fn service_names(sh: &Shared) -> HashMap<Ipv4Addr, (String, String)> {
    let records = sh
        .services
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .dns_records();
    records
        .into_iter()
        .filter_map(|(name, r)| r.cluster_ip.map(|ip| (ip, name)))
        .collect()
}

/// The report to send now.
fn build(sh: &Shared, table: &Mutex<EdgeTable>, enforcer: Option<&Enforcer>) -> v1::EdgeReport {
    let bytes = enforcer.map(conntrack_bytes);
    let names = service_names(sh);
    let lookup = |ip: Ipv4Addr, _port: u16, _proto: &str| names.get(&ip).cloned();
    let mut table = table.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(b) = &bytes {
        table.add_bytes(b);
    }
    v1::EdgeReport {
        node_name: sh.node().to_owned(),
        edges: table.report(&lookup),
    }
}

/// Reports until `cancel`.
pub(crate) async fn run(
    sh: Arc<Shared>,
    table: Arc<Mutex<EdgeTable>>,
    enforcer: Option<Arc<Enforcer>>,
    cancel: CancellationToken,
) {
    let mut delay = BACKOFF_INITIAL;
    loop {
        let started = Instant::now();
        let why = stream_once(&sh, &table, enforcer.as_deref(), &cancel).await;
        if cancel.is_cancelled() {
            return;
        }
        if started.elapsed() >= HEALTHY {
            delay = BACKOFF_INITIAL;
        }
        tracing::debug!(reason = %why, retry_in = ?delay, "service map report stream ended");
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(delay) => {}
        }
        delay = next_backoff(delay);
    }
}

/// One `Report` stream: a report every [`REPORT_INTERVAL`] until the call
/// ends or `cancel`; why it ended.
async fn stream_once(
    sh: &Shared,
    table: &Mutex<EdgeTable>,
    enforcer: Option<&Enforcer>,
    cancel: &CancellationToken,
) -> String {
    let (mut tx, rx) = mpsc::channel::<v1::EdgeReport>(1);
    let mut client = ServiceMapClient::new(sh.control.channel.clone());
    let call = client.report(rx);
    tokio::pin!(call);
    let mut every = tokio::time::interval(REPORT_INTERVAL);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = cancel.cancelled() => return "stopped".to_owned(),
            r = &mut call => return match r {
                Ok(_) => "the control closed it".to_owned(),
                Err(s) => s.message().to_owned(),
            },
            _ = every.tick() => {}
        }
        let report = build(sh, table, enforcer);
        // The channel holds one report: a control that stopped reading
        // makes this wait, and the call's end above tells why.
        tokio::select! {
            () = cancel.cancelled() => return "stopped".to_owned(),
            r = &mut call => return match r {
                Ok(_) => "the control closed it".to_owned(),
                Err(s) => s.message().to_owned(),
            },
            sent = tx.send(report) => if sent.is_err() {
                return "the stream closed".to_owned();
            },
        }
    }
}
