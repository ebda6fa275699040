//! Flow observation: the policy programs' flow records (`weir_flows_v1`)
//! read, enriched with pod names and policy names, kept in a bounded
//! in-memory ring for `GET /flows`, counted per policy and verdict for
//! Prometheus.
//!
//! The eBPF side writes one record per new flow verdict: an allowed flow
//! when its conntrack entry is created (or, at an endpoint that tracks
//! nothing, a TCP SYN without ACK), a denial at most once per
//! `deny_interval` per (endpoint, peer, port, proto, direction, reason)
//! with the number folded in between, everything capped by a per-CPU token
//! bucket. [`FlowSettings`] sets those knobs through `weir_flow_cfg_v1`.
//!
//! Wiring (the agent's startup): after [`crate::policy::PolicyDataplane::load`]
//! created the pinned maps, [`open`] them, build a [`FlowHub`] with the
//! enrichment lookups, spawn [`run`] and hand the hub to
//! [`crate::http::set_flow_hub`].

pub mod edges;
mod hub;
mod record;

use std::{path::Path, sync::Arc, time::Duration};

use aya::maps::{Array, Map, MapData, MapError, PerCpuArray, RingBuf};
use tokio::io::{Interest, unix::AsyncFd};
use tokio_util::sync::CancellationToken;
use weir_common::{
    DROP_REASONS, DROPS_MAP, DropReason, FLOW_CFG_DISABLED, FLOW_CFG_MAP, FLOW_LOST_AGGREGATED,
    FLOW_LOST_MAP, FLOW_LOST_RATE_LIMITED, FLOW_LOST_RING_FULL, FLOW_MAX_RATE_PER_CPU, FLOWS_MAP,
    FlowConfig, FlowRecord,
};

pub use self::hub::{Enricher, FlowHub};
pub use self::record::{Flow, FlowFilter, Peer, Service, Verdict};

/// A flow map that could not be opened, read or written.
#[derive(Debug, thiserror::Error)]
pub enum FlowError {
    /// A map operation failed.
    #[error("{what} {map}: {source}")]
    Map {
        /// What was being done.
        what: &'static str,
        /// The map.
        map: &'static str,
        /// The error.
        source: Box<MapError>,
    },
    /// The ring buffer could not be registered with the runtime.
    #[error("poll {FLOWS_MAP}: {0}")]
    Poll(#[source] std::io::Error),
}

fn map_err(what: &'static str, map: &'static str) -> impl FnOnce(MapError) -> FlowError {
    move |source| FlowError::Map {
        what,
        map,
        source: Box::new(source),
    }
}

/// How many flow records the programs may write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowSettings {
    /// Write records at all.
    pub enabled: bool,
    /// Records per second for the whole node, split evenly over the CPUs
    /// (each CPU has its own token bucket of one second's worth).
    pub node_rate: u32,
    /// Denials of one (endpoint, peer, port, proto, direction, reason) are
    /// recorded at most this often; the ones in between are counted.
    pub deny_interval: Duration,
}

impl Default for FlowSettings {
    /// 10 000 records/s per node, denials once a second per key.
    fn default() -> Self {
        Self {
            enabled: true,
            node_rate: 10_000,
            deny_interval: Duration::from_secs(1),
        }
    }
}

impl FlowSettings {
    /// The config map value for a node with `cpus` possible CPUs.
    #[must_use]
    pub fn to_raw(&self, cpus: usize) -> FlowConfig {
        let cpus = u32::try_from(cpus.max(1)).unwrap_or(u32::MAX);
        let per_cpu = self
            .node_rate
            .div_ceil(cpus)
            .clamp(1, FLOW_MAX_RATE_PER_CPU);
        FlowConfig {
            flags: if self.enabled { 0 } else { FLOW_CFG_DISABLED },
            rate_per_cpu: per_cpu,
            burst: per_cpu,
            deny_interval_ms: u32::try_from(self.deny_interval.as_millis())
                .unwrap_or(u32::MAX)
                .max(1),
        }
    }
}

/// Records not written, summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LostCounts {
    /// Denials folded into a later record of their key.
    pub aggregated: u64,
    /// Records refused by a CPU's token bucket.
    pub rate_limited: u64,
    /// Records that found the ring buffer full.
    pub ring_full: u64,
}

/// The counters the programs keep next to the records (read at scrape time).
pub struct FlowCounters {
    lost: PerCpuArray<MapData, u64>,
    drops: PerCpuArray<MapData, u64>,
}

impl FlowCounters {
    fn sum(arr: &PerCpuArray<MapData, u64>, i: u32, map: &'static str) -> Result<u64, FlowError> {
        let v = arr.get(&i, 0).map_err(map_err("read", map))?;
        Ok(v.iter().fold(0u64, |a, b| a.wrapping_add(*b)))
    }

    /// Records not written, by cause.
    pub fn lost(&self) -> Result<LostCounts, FlowError> {
        Ok(LostCounts {
            aggregated: Self::sum(&self.lost, FLOW_LOST_AGGREGATED, FLOW_LOST_MAP)?,
            rate_limited: Self::sum(&self.lost, FLOW_LOST_RATE_LIMITED, FLOW_LOST_MAP)?,
            ring_full: Self::sum(&self.lost, FLOW_LOST_RING_FULL, FLOW_LOST_MAP)?,
        })
    }

    /// Packets the policy programs dropped, by reason.
    pub fn drops(&self) -> Result<Vec<(DropReason, u64)>, FlowError> {
        (1..DROP_REASONS)
            .filter_map(|i| DropReason::from_index(i).map(|r| (i, r)))
            .map(|(i, r)| Ok((r, Self::sum(&self.drops, i, DROPS_MAP)?)))
            .collect()
    }
}

/// The ring buffer, to hand to [`run`].
pub struct FlowReader {
    ring: RingBuf<MapData>,
}

fn open_map(pin_dir: &Path, name: &'static str) -> Result<Map, FlowError> {
    let data = MapData::from_pin(pin_dir.join(name)).map_err(map_err("open pinned", name))?;
    Map::from_map_data(data).map_err(map_err("open pinned", name))
}

/// Opens the flow maps pinned in `pin_dir` (created by loading the weir
/// object, e.g. [`crate::policy::PolicyDataplane::load`]) and writes
/// `settings` to the config map.
pub fn open(
    pin_dir: &Path,
    settings: &FlowSettings,
) -> Result<(FlowReader, FlowCounters), FlowError> {
    let ring =
        RingBuf::try_from(open_map(pin_dir, FLOWS_MAP)?).map_err(map_err("open", FLOWS_MAP))?;
    configure(pin_dir, settings)?;
    let lost = PerCpuArray::try_from(open_map(pin_dir, FLOW_LOST_MAP)?)
        .map_err(map_err("open", FLOW_LOST_MAP))?;
    let drops =
        PerCpuArray::try_from(open_map(pin_dir, DROPS_MAP)?).map_err(map_err("open", DROPS_MAP))?;
    Ok((FlowReader { ring }, FlowCounters { lost, drops }))
}

/// Writes `settings` to the config map pinned in `pin_dir`.
pub fn configure(pin_dir: &Path, settings: &FlowSettings) -> Result<(), FlowError> {
    let mut cfg: Array<MapData, FlowConfig> =
        Array::try_from(open_map(pin_dir, FLOW_CFG_MAP)?).map_err(map_err("open", FLOW_CFG_MAP))?;
    let cpus = aya::util::nr_cpus().unwrap_or(1);
    cfg.set(0, settings.to_raw(cpus), 0)
        .map_err(map_err("write", FLOW_CFG_MAP))
}

impl FlowReader {
    /// Takes every record waiting in the ring buffer.
    pub fn drain(&mut self) -> Vec<FlowRecord> {
        let mut out = Vec::new();
        self.drain_into(&mut out);
        out
    }

    /// Appends every record waiting in the ring buffer to `out`.
    pub fn drain_into(&mut self, out: &mut Vec<FlowRecord>) {
        while let Some(item) = self.ring.next() {
            if let Some(r) = record::parse(&item) {
                out.push(r);
            }
        }
    }
}

/// After a drain, how long [`run`] lets records gather before it waits for
/// the next: the reader wakes at most 1 / `BATCH_WAIT` times a second
/// whatever the record rate (one wakeup per record cost more than naming
/// the record). The ring buffer holds ~3 s of records at the default
/// rate, and `weirctl flows --follow` sees a flow at most this much later.
pub const BATCH_WAIT: Duration = Duration::from_millis(20);

/// Reads records until `cancel` and feeds them to `hub`, a batch per
/// wakeup.
pub async fn run(
    reader: FlowReader,
    hub: Arc<FlowHub>,
    cancel: CancellationToken,
) -> Result<(), FlowError> {
    // SAFETY: the fd is the ring buffer map's, owned by the reader the
    // AsyncFd owns: open and the same for the AsyncFd's whole life.
    let mut fd = unsafe { AsyncFd::register_with_interest(reader, Interest::READABLE) }
        .map_err(|e| FlowError::Poll(e.into_parts().1))?;
    let mut batch = Vec::new();
    loop {
        let mut guard = tokio::select! {
            () = cancel.cancelled() => return Ok(()),
            g = fd.readable_mut() => g.map_err(FlowError::Poll)?,
        };
        // Clear first: a record committed after the drain wakes us again
        // (the kernel notifies when the first record after the consumer
        // position is committed).
        guard.clear_ready();
        batch.clear();
        guard.get_inner_mut().drain_into(&mut batch);
        drop(guard);
        hub.ingest_batch(&batch);
        tokio::select! {
            () = cancel.cancelled() => return Ok(()),
            () = tokio::time::sleep(BATCH_WAIT) => {}
        }
    }
}

impl std::os::fd::AsRawFd for FlowReader {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.ring.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_split_the_node_rate_over_cpus() {
        let s = FlowSettings::default();
        let raw = s.to_raw(4);
        assert_eq!(raw.rate_per_cpu, 2500);
        assert_eq!(raw.burst, 2500);
        assert_eq!(raw.deny_interval_ms, 1000);
        assert_eq!(raw.flags, 0);
        assert_eq!(s.to_raw(3).rate_per_cpu, 3334, "rounded up");
        let off = FlowSettings {
            enabled: false,
            node_rate: 0,
            deny_interval: Duration::ZERO,
        };
        let raw = off.to_raw(0);
        assert_eq!(raw.flags, FLOW_CFG_DISABLED);
        assert_eq!(
            raw.rate_per_cpu, 1,
            "never 0 (which would mean the default)"
        );
        assert_eq!(raw.deny_interval_ms, 1);
    }
}
