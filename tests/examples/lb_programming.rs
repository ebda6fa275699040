//! Service programming latency end to end, on real processes: a change
//! written to the store through weir-control's Objects API → `WatchNode` →
//! weir-agent (control mode, in its own node netns, with containerd as the
//! harness starts it) → the node's pinned eBPF maps, observed by reading
//! those maps (`/sys/fs/bpf/weir/<node>/weir_svc_v1`, `weir_svc_slots_v1`,
//! `weir_backends_v1`) from here. `cargo xtask bench lb-programming` runs
//! it; it prints one line of JSON on stdout (progress on stderr).
//!
//! Services: `--services` selectorless Services `lp-<i>` (port 80/TCP →
//! 8080, `clusterIP` 10.96.0.0 + 1024 + i), each with a user-written
//! `EndpointSlice` of 4 ready endpoints 10.200.0.0 + 4i + j (never routed:
//! no traffic is sent). Phases, each bounded:
//!
//! 1. load: every slice and Service applied (`IN_FLIGHT` at a time) while
//!    the agent runs; until the maps hold every service with its backends;
//! 2. `--changes` single endpoint changes (alternately one endpoint IP
//!    replaced, and a 5th endpoint added or removed), each timed from the
//!    Apply call to the maps holding the new backend set;
//! 3. Services created (slice, then Service) and deleted, timed to the
//!    entry appearing with its backends / disappearing;
//! 4. the agent killed (SIGKILL), a slice changed and a Service created while it
//!    is down, the agent restarted: process start → both visible, with the
//!    service entry count sampled all along (a flush would show);
//! 5. a second node's agent started against the full store: process start
//!    → every service in its (empty) maps.
//!
//! At the end both nodes' maps are compared with the expected table.
//! Everything (processes, netns, links, pins, temp dirs) goes when the
//! cluster guard drops, also on error or SIGINT/SIGTERM.

use std::{
    fmt::Write as _,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, bail, ensure};
use aya::maps::{HashMap, Map, MapData};
use serde_json::{Value, json};
use tonic::transport::Channel;
use weir_common::{
    BACKENDS_MAP, Backend, PROTO_TCP, SLOTS_MAP, SVC_MAP, SlotKey, SvcKey, SvcValue,
};
use weir_proto::v1::{self, objects_client::ObjectsClient};
use weir_tests::{ControlCluster, tail};

/// Harness tag and bridge subnet (10.250.63.0/24) of this bench's cluster.
const TAG: &str = "lp";
const SUBNET: u8 = 63;
const NAMESPACE: &str = "default";
/// Applies in flight while loading.
const IN_FLIGHT: usize = 32;
/// Bound on one change becoming visible.
const VISIBLE: Duration = Duration::from_secs(30);
/// Bound on the load (applies and programming).
const LOAD_LIMIT: Duration = Duration::from_mins(30);
/// Bound on a restarted or new agent programming its maps.
const START_LIMIT: Duration = Duration::from_mins(5);
/// Pause between two reads of a map while waiting for one change.
const POLL: Duration = Duration::from_micros(200);
/// Most services: VIPs 10.96.4.0 up to the end of 10.96.0.0/16.
const MAX_SERVICES: usize = 60_000;

/// Command-line options.
struct Args {
    services: usize,
    changes: usize,
}

impl Args {
    fn parse() -> anyhow::Result<Self> {
        let mut me = Self {
            services: 10_000,
            changes: 200,
        };
        let mut it = std::env::args().skip(1);
        while let Some(a) = it.next() {
            let mut value = |name: &str| -> anyhow::Result<usize> {
                let v = it.next().with_context(|| format!("{name} needs a value"))?;
                v.parse()
                    .with_context(|| format!("{name} {v:?} is not a count"))
            };
            match a.as_str() {
                "--services" => me.services = value("--services")?,
                "--changes" => me.changes = value("--changes")?,
                other => bail!("unknown argument {other:?} (--services N, --changes N)"),
            }
        }
        ensure!(me.services >= 1, "--services must be at least 1");
        ensure!(me.changes >= 1, "--changes must be at least 1");
        ensure!(
            me.services + me.changes <= MAX_SERVICES,
            "--services + --changes must be at most {MAX_SERVICES} (VIPs in 10.96.0.0/16)"
        );
        Ok(me)
    }
}

fn ip_plus(base: [u8; 4], i: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::from(base)) + u32::try_from(i).unwrap_or(u32::MAX >> 8))
}

/// Service `i`'s `ClusterIP`.
fn vip(i: usize) -> Ipv4Addr {
    ip_plus([10, 96, 4, 0], i)
}

/// Service `i`'s initial endpoints.
fn initial_endpoints(i: usize) -> Vec<Ipv4Addr> {
    (0..4)
        .map(|j| ip_plus([10, 200, 0, 0], 4 * i + j))
        .collect()
}

/// The `k`th replacement endpoint IP.
fn fresh(k: usize) -> Ipv4Addr {
    ip_plus([10, 201, 0, 0], k)
}

/// Service `i`'s 5th endpoint.
fn fifth(i: usize) -> Ipv4Addr {
    ip_plus([10, 202, 0, 0], i)
}

fn name(i: usize) -> String {
    format!("lp-{i}")
}

fn service_manifest(i: usize) -> String {
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name(i), "namespace": NAMESPACE},
        "spec": {
            "clusterIP": vip(i).to_string(),
            "ports": [{"port": 80, "protocol": "TCP", "targetPort": 8080}],
        },
    })
    .to_string()
}

fn slice_manifest(i: usize, endpoints: &[Ipv4Addr]) -> String {
    let eps: Vec<Value> = endpoints
        .iter()
        .map(|ip| json!({"addresses": [ip.to_string()], "conditions": {"ready": true}}))
        .collect();
    json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": name(i),
            "namespace": NAMESPACE,
            "labels": {
                "kubernetes.io/service-name": name(i),
                "endpointslice.kubernetes.io/managed-by": "lb-programming-bench",
            },
        },
        "addressType": "IPv4",
        "endpoints": eps,
        "ports": [{"name": "", "port": 8080, "protocol": "TCP"}],
    })
    .to_string()
}

type Client = ObjectsClient<Channel>;

async fn apply(mut c: Client, manifest: String) -> anyhow::Result<Instant> {
    c.apply(v1::ApplyRequest {
        manifest_json: manifest,
        field_manager: "lb-programming".into(),
    })
    .await
    .map_err(|s| anyhow::anyhow!("apply: {}", s.message()))?;
    Ok(Instant::now())
}

async fn delete(mut c: Client, kind: &str, name: String) -> anyhow::Result<Instant> {
    c.delete(v1::DeleteRequest {
        r#ref: Some(v1::ObjectRef {
            kind: kind.into(),
            namespace: NAMESPACE.into(),
            name: name.clone(),
            ..Default::default()
        }),
        ..Default::default()
    })
    .await
    .map_err(|s| anyhow::anyhow!("delete {kind} {name}: {}", s.message()))?;
    Ok(Instant::now())
}

/// Applies service `i`'s slice, then the Service (so the Service's event
/// carries its endpoints).
async fn create(c: Client, i: usize, endpoints: Vec<Ipv4Addr>) -> anyhow::Result<Instant> {
    apply(c.clone(), slice_manifest(i, &endpoints)).await?;
    apply(c, service_manifest(i)).await
}

/// A node's pinned service maps, opened read only.
struct Maps {
    svcs: HashMap<MapData, SvcKey, SvcValue>,
    slots: HashMap<MapData, SlotKey, u32>,
    backends: HashMap<MapData, u32, Backend>,
}

fn open_map<K: aya::Pod, V: aya::Pod>(
    dir: &Path,
    name: &str,
) -> anyhow::Result<HashMap<MapData, K, V>> {
    let pin = dir.join(name);
    let data = MapData::from_pin(&pin).with_context(|| format!("open {}", pin.display()))?;
    let map = Map::from_map_data(data).with_context(|| format!("map {}", pin.display()))?;
    HashMap::try_from(map).with_context(|| format!("hash map {}", pin.display()))
}

fn svc_key(vip: Ipv4Addr) -> SvcKey {
    SvcKey {
        ip: u32::from(vip).to_be(),
        port: 80u16.to_be(),
        proto: PROTO_TCP,
        pad: 0,
    }
}

impl Maps {
    fn open(dir: &Path) -> anyhow::Result<Self> {
        Ok(Self {
            svcs: open_map(dir, SVC_MAP)?,
            slots: open_map(dir, SLOTS_MAP)?,
            backends: open_map(dir, BACKENDS_MAP)?,
        })
    }

    /// The backends (IPs, sorted) the programs would choose from for
    /// `vip`:80/TCP, None without an entry. A slot or backend missing
    /// mid-write leaves its IP out (so the set differs from any expected).
    fn backends_of(&self, vip: Ipv4Addr) -> Option<Vec<Ipv4Addr>> {
        let v = self.svcs.get(&svc_key(vip), 0).ok()?;
        let mut ips: Vec<Ipv4Addr> = (0..v.count)
            .filter_map(|slot| {
                let id = self.slots.get(&SlotKey { id: v.id, slot }, 0).ok()?;
                let b = self.backends.get(&id, 0).ok()?;
                Some(Ipv4Addr::from(u32::from_be(b.ip)))
            })
            .collect();
        ips.sort_unstable();
        Some(ips)
    }

    /// Entries for services `0..n` (VIPs in that range, port 80/TCP).
    fn entries_in(&self, n: usize) -> usize {
        let (first, last) = (u32::from(vip(0)), u32::from(vip(n.saturating_sub(1))));
        self.svcs
            .keys()
            .filter_map(Result::ok)
            .filter(|k| {
                let ip = u32::from_be(k.ip);
                (first..=last).contains(&ip) && k.port == 80u16.to_be() && k.proto == PROTO_TCP
            })
            .count()
    }

    /// The services of `want` (index → expected sorted backends, None:
    /// absent) whose entry differs.
    fn mismatches(&self, want: &[(usize, Option<&[Ipv4Addr]>)]) -> Vec<usize> {
        want.iter()
            .filter(|(i, w)| self.backends_of(vip(*i)).as_deref() != *w)
            .map(|(i, _)| *i)
            .collect()
    }
}

/// Set on SIGINT/SIGTERM: every loop stops and the guards clean up.
static STOP: AtomicBool = AtomicBool::new(false);

fn check_stop() -> anyhow::Result<()> {
    if STOP.load(Ordering::Relaxed) {
        bail!("interrupted");
    }
    Ok(())
}

/// Polls until service `i`'s entry holds `want` (None: no entry); when.
fn wait_visible(
    maps: &Maps,
    i: usize,
    want: Option<&[Ipv4Addr]>,
    t0: Instant,
) -> anyhow::Result<Instant> {
    loop {
        if maps.backends_of(vip(i)).as_deref() == want {
            return Ok(Instant::now());
        }
        check_stop()?;
        if t0.elapsed() > VISIBLE {
            bail!(
                "service {i} ({}) not programmed as {want:?} within {VISIBLE:?}: maps hold {:?}",
                vip(i),
                maps.backends_of(vip(i))
            );
        }
        std::thread::sleep(POLL);
    }
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

/// Nearest-rank percentiles of `v` (ms), with the count.
fn summary(v: &[Duration]) -> Value {
    let mut v = v.to_vec();
    v.sort();
    let pct = |p: usize| {
        if v.is_empty() {
            return 0.0;
        }
        ms(v[((p * v.len()).div_ceil(100)).clamp(1, v.len()) - 1])
    };
    json!({
        "n": v.len(),
        "p50_ms": pct(50),
        "p90_ms": pct(90),
        "p99_ms": pct(99),
        "max_ms": v.last().copied().map_or(0.0, ms),
    })
}

/// One timed change: the API call's latency and apply-start → visible.
#[derive(Default)]
struct Timings {
    e2e: Vec<Duration>,
    api: Vec<Duration>,
}

impl Timings {
    fn json(&self) -> Value {
        let mut v = summary(&self.e2e);
        v["api_call"] = summary(&self.api);
        v
    }
}

/// Runs `call` on the runtime while polling the maps for service `i` to
/// hold `want`; records both latencies.
fn timed(
    rt: &tokio::runtime::Runtime,
    maps: &Maps,
    i: usize,
    want: Option<&[Ipv4Addr]>,
    call: impl std::future::Future<Output = anyhow::Result<Instant>> + Send + 'static,
    into: &mut Timings,
) -> anyhow::Result<()> {
    let t0 = Instant::now();
    let call = rt.spawn(call);
    let seen = wait_visible(maps, i, want, t0);
    let done = rt.block_on(call).context("API call task")??;
    let seen = seen?;
    into.e2e.push(seen - t0);
    into.api.push(done - t0);
    Ok(())
}

/// The bench's state: the cluster guard, the API client, and the table as
/// it should be.
struct Bench {
    rt: tokio::runtime::Runtime,
    cluster: ControlCluster,
    client: Client,
    /// Expected sorted backends per service index (None: deleted).
    table: Vec<Option<Vec<Ipv4Addr>>>,
    /// Replacement IPs handed out.
    fresh: usize,
}

impl Bench {
    fn pin_dir(&self, node: usize) -> PathBuf {
        Path::new("/sys/fs/bpf/weir").join(&self.cluster.cluster.nodes[node].name)
    }

    /// Waits until node `node`'s service maps are pinned and opens them.
    fn maps(&self, node: usize, limit: Duration) -> anyhow::Result<Maps> {
        let dir = self.pin_dir(node);
        let t0 = Instant::now();
        loop {
            match Maps::open(&dir) {
                Ok(m) => return Ok(m),
                Err(e) if t0.elapsed() > limit => {
                    return Err(e).context(format!("maps not pinned within {limit:?}"));
                }
                Err(_) => {}
            }
            check_stop()?;
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn expected(&self) -> Vec<(usize, Option<&[Ipv4Addr]>)> {
        self.table
            .iter()
            .enumerate()
            .map(|(i, w)| (i, w.as_deref()))
            .collect()
    }

    /// Phase 1: loads services `0..n`; the figures.
    fn load(&mut self, maps: &Maps, n: usize) -> anyhow::Result<Value> {
        eprintln!("lb-programming: loading {n} services × 4 endpoints");
        let next = Arc::new(AtomicUsize::new(0));
        let t0 = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..IN_FLIGHT {
            let (c, next) = (self.client.clone(), next.clone());
            tasks.push(self.rt.spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= n || STOP.load(Ordering::Relaxed) {
                        return anyhow::Ok(());
                    }
                    create(c.clone(), i, initial_endpoints(i)).await?;
                }
            }));
        }
        for i in 0..n {
            self.table.push(Some(initial_endpoints(i)));
        }
        let mut applied = None;
        let mut last_report = Instant::now();
        let visible = loop {
            if applied.is_none() && tasks.iter().all(tokio::task::JoinHandle::is_finished) {
                for t in tasks.drain(..) {
                    self.rt.block_on(t).context("load task")??;
                }
                applied = Some(t0.elapsed());
            }
            let entries = maps.entries_in(n);
            if entries == n && maps.mismatches(&self.expected()).is_empty() {
                break t0.elapsed();
            }
            check_stop()?;
            ensure!(
                t0.elapsed() < LOAD_LIMIT,
                "after {LOAD_LIMIT:?} the maps hold {entries} of {n} services"
            );
            if last_report.elapsed() > Duration::from_secs(10) {
                eprintln!(
                    "lb-programming:   {:.0} s: {} of {n} applied, {entries} in the maps",
                    t0.elapsed().as_secs_f64(),
                    next.load(Ordering::Relaxed).min(n)
                );
                last_report = Instant::now();
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        // The maps can be complete just before the last apply returns.
        for t in tasks {
            self.rt.block_on(t).context("load task")??;
        }
        let applied = applied.unwrap_or_else(|| t0.elapsed());
        let secs = applied.as_secs_f64().max(1e-9);
        #[expect(clippy::cast_precision_loss, reason = "counts far below 2^52")]
        let per_s = (2 * n) as f64 / secs;
        eprintln!(
            "lb-programming:   applied in {:.1} s, all in the maps after {:.1} s",
            applied.as_secs_f64(),
            visible.as_secs_f64()
        );
        Ok(json!({
            "applies": 2 * n,
            "in_flight": IN_FLIGHT,
            "applies_done_ms": ms(applied),
            "applies_per_s": (per_s * 10.0).round() / 10.0,
            "all_programmed_ms": ms(visible),
        }))
    }

    /// Phase 2: `changes` single endpoint changes; (replace, grow/shrink).
    fn endpoint_changes(
        &mut self,
        maps: &Maps,
        n: usize,
        changes: usize,
    ) -> anyhow::Result<(Timings, Timings)> {
        eprintln!("lb-programming: {changes} single endpoint changes");
        let (mut replace, mut resize) = (Timings::default(), Timings::default());
        for c in 0..changes {
            check_stop()?;
            let i = (c * 7919) % n;
            let mut eps = self.table[i].clone().context("service gone")?;
            let into = if c % 2 == 0 {
                let k = self.fresh;
                self.fresh += 1;
                eps[0] = fresh(k);
                &mut replace
            } else {
                if eps.len() > 4 {
                    eps.retain(|ip| *ip != fifth(i));
                } else {
                    eps.push(fifth(i));
                }
                &mut resize
            };
            eps.sort_unstable();
            let call = apply(self.client.clone(), slice_manifest(i, &eps));
            timed(&self.rt, maps, i, Some(&eps), call, into)
                .with_context(|| format!("endpoint change {c} (service {i})"))?;
            self.table[i] = Some(eps);
        }
        Ok((replace, resize))
    }

    /// Phase 3: `m` Services created, then deleted.
    fn service_changes(&mut self, maps: &Maps, m: usize) -> anyhow::Result<(Timings, Timings)> {
        eprintln!("lb-programming: {m} services created and deleted");
        let (mut created, mut deleted) = (Timings::default(), Timings::default());
        let first = self.table.len();
        for i in first..first + m {
            check_stop()?;
            let mut eps = initial_endpoints(i);
            eps.sort_unstable();
            let call = create(self.client.clone(), i, eps.clone());
            timed(&self.rt, maps, i, Some(&eps), call, &mut created)
                .with_context(|| format!("create service {i}"))?;
            self.table.push(Some(eps));
        }
        for i in first..first + m {
            check_stop()?;
            let call = delete(self.client.clone(), "Service", name(i));
            timed(&self.rt, maps, i, None, call, &mut deleted)
                .with_context(|| format!("delete service {i}"))?;
            self.table[i] = None;
            self.rt
                .block_on(delete(self.client.clone(), "EndpointSlice", name(i)))?;
        }
        Ok((created, deleted))
    }

    /// Phase 4: agent killed (SIGKILL), changes made while it is down, restarted.
    fn restart(&mut self, n: usize) -> anyhow::Result<Value> {
        eprintln!("lb-programming: agent restart with changes made while it was down");
        let j = (self.fresh * 7919 + 1) % n;
        let mut eps = self.table[j].clone().context("service gone")?;
        eps[1] = fresh(self.fresh);
        self.fresh += 1;
        eps.sort_unstable();
        let new = self.table.len();
        let mut new_eps = initial_endpoints(new);
        new_eps.sort_unstable();

        self.cluster.node(0).kill_agent();
        let dir = self.pin_dir(0);
        let before = Maps::open(&dir)?.entries_in(n);
        self.rt
            .block_on(apply(self.client.clone(), slice_manifest(j, &eps)))?;
        self.rt
            .block_on(create(self.client.clone(), new, new_eps.clone()))?;
        self.table[j] = Some(eps.clone());
        self.table.push(Some(new_eps.clone()));

        // Sample from before the start until both changes are visible.
        let sampler = {
            let want = vec![(j, eps), (new, new_eps)];
            std::thread::spawn(move || watch_restart(&dir, n, &want))
        };
        let (t0, wall) = (Instant::now(), SystemTime::now());
        let started = self.cluster.node(0).start_agent();
        let healthz = t0.elapsed();
        let watched = sampler
            .join()
            .map_err(|_| anyhow::anyhow!("the restart watcher panicked"))?;
        started?;
        let w = watched?;
        let visible = w
            .visible
            .context("the changes made while the agent was down never showed")?
            - t0;
        eprintln!(
            "lb-programming:   visible {:.1} ms after the restart (API up at {:.1} ms), entries never below {}",
            ms(visible),
            ms(healthz),
            w.min_entries
        );
        Ok(json!({
            "process_start_to_changes_visible_ms": ms(visible),
            "process_start_to_healthz_ms": ms(healthz),
            "entries_before": before,
            "min_entries_seen": w.min_entries,
            "samples": w.samples,
            "flushed": w.min_entries < before,
            "agent_log": milestones(&self.cluster.cluster.nodes[0].agent_log_text(), wall),
            "agent_lb_sync_since_start": lb_sync_metric(&self.cluster.cluster.nodes[0]),
        }))
    }

    /// Phase 5: a second node joins a cluster with the full table.
    fn new_node(&mut self) -> anyhow::Result<Value> {
        let want = self.table.iter().filter(|w| w.is_some()).count();
        eprintln!("lb-programming: a new node's agent programming {want} services from the store");
        let (t0, wall) = (Instant::now(), SystemTime::now());
        self.cluster.start_agent(1)?;
        let healthz = t0.elapsed();
        let maps = self.maps(1, START_LIMIT)?;
        let expected = self.expected();
        let visible = loop {
            if maps.mismatches(&expected).is_empty() {
                break t0.elapsed();
            }
            check_stop()?;
            ensure!(
                t0.elapsed() < START_LIMIT,
                "the new node's maps are incomplete after {START_LIMIT:?}"
            );
            std::thread::sleep(Duration::from_millis(5));
        };
        eprintln!(
            "lb-programming:   all programmed {:.1} ms after the start",
            ms(visible)
        );
        Ok(json!({
            "services": want,
            "process_start_to_all_programmed_ms": ms(visible),
            "process_start_to_healthz_ms": ms(healthz),
            "agent_log": milestones(&self.cluster.cluster.nodes[1].agent_log_text(), wall),
            "agent_lb_sync_since_start": lb_sync_metric(&self.cluster.cluster.nodes[1]),
        }))
    }

    /// Both nodes' maps hold exactly the expected table.
    fn verify(&self, nodes: usize) -> anyhow::Result<()> {
        for node in 0..nodes {
            let maps = self.maps(node, Duration::from_secs(5))?;
            let bad = maps.mismatches(&self.expected());
            ensure!(
                bad.is_empty(),
                "node {node}: {} services differ from the store, e.g. {:?}: {:?}",
                bad.len(),
                bad[0],
                maps.backends_of(vip(bad[0]))
            );
        }
        Ok(())
    }

    fn logs(&self) -> String {
        let mut out = format!(
            "control log tail:\n{}\n",
            tail(&self.cluster.control.log_text(), 20)
        );
        for n in &self.cluster.cluster.nodes {
            let _ = write!(
                out,
                "{} agent log tail:\n{}\n",
                n.name,
                tail(&n.agent_log_text(), 20)
            );
        }
        out
    }
}

/// Seconds since midnight (UTC) of a tracing log line's timestamp
/// (`2026-11-25T18:22:01.123456Z  INFO …`, colour codes ignored).
fn log_time_of_day(line: &str) -> Option<f64> {
    let mut plain = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c == 'm' {
                    break;
                }
            }
        } else {
            plain.push(c);
        }
    }
    let time = plain.trim_start().get(11..)?.split(['Z', ' ']).next()?;
    let mut parts = time.split(':');
    let h: f64 = parts.next()?.parse().ok()?;
    let m: f64 = parts.next()?.parse().ok()?;
    let s: f64 = parts.next()?.parse().ok()?;
    Some(h * 3600.0 + m * 60.0 + s)
}

fn time_of_day(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
        % 86_400.0
}

/// When the agent started at `since` logged its milestones, in ms after
/// `since` (from its log; the last occurrence of each).
fn milestones(log: &str, since: SystemTime) -> Value {
    let start = time_of_day(since);
    let mut out = serde_json::Map::new();
    for (key, text) in [
        ("registered_ms", "registered with the control"),
        ("containerd_up_ms", "containerd is up"),
        (
            "service_list_received_ms",
            "desired pods listed from the control",
        ),
    ] {
        let at = log
            .lines()
            .rev()
            .find(|l| l.contains(text))
            .and_then(log_time_of_day)
            .map(|t| (t - start).rem_euclid(86_400.0))
            .filter(|d| *d < 3600.0);
        if let Some(d) = at {
            out.insert(key.into(), json!((d * 1e4).round() / 10.0));
        }
    }
    Value::Object(out)
}

/// The agent's own account of its map programming since it started
/// (`weir_lb_sync_duration_seconds`: count and total), once it has
/// observed its first sync (the maps can show the changes before the sync
/// that wrote them returns); Null if it does not say within 10 s.
fn lb_sync_metric(node: &weir_tests::Node) -> Value {
    let t0 = Instant::now();
    loop {
        let v = lb_sync_once(node);
        if v["count"].as_f64().is_some_and(|c| c >= 1.0) || t0.elapsed() > Duration::from_secs(10) {
            return v;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn lb_sync_once(node: &weir_tests::Node) -> Value {
    let Ok(text) = node.metrics() else {
        return Value::Null;
    };
    let field = |suffix: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("weir_lb_sync_duration_seconds_{suffix} ")))
            .and_then(|v| v.trim().parse::<f64>().ok())
    };
    match (field("count"), field("sum")) {
        (Some(count), Some(sum)) => json!({"count": count, "sum_ms": (sum * 1e6).round() / 1e3}),
        _ => Value::Null,
    }
}

/// What the restart watcher saw.
struct Watched {
    visible: Option<Instant>,
    min_entries: usize,
    samples: usize,
}

/// Samples `dir`'s service maps (re-opened every time, so recreated maps
/// would be seen) until every service of `want` holds its backends.
fn watch_restart(dir: &Path, n: usize, want: &[(usize, Vec<Ipv4Addr>)]) -> anyhow::Result<Watched> {
    let t0 = Instant::now();
    let mut w = Watched {
        visible: None,
        min_entries: usize::MAX,
        samples: 0,
    };
    let want: Vec<(usize, Option<&[Ipv4Addr]>)> =
        want.iter().map(|(i, e)| (*i, Some(e.as_slice()))).collect();
    loop {
        let maps = Maps::open(dir);
        let entries = maps.as_ref().map_or(0, |m| m.entries_in(n));
        w.min_entries = w.min_entries.min(entries);
        w.samples += 1;
        if let Ok(m) = &maps
            && m.mismatches(&want).is_empty()
        {
            w.visible = Some(Instant::now());
            return Ok(w);
        }
        if STOP.load(Ordering::Relaxed) || t0.elapsed() > START_LIMIT {
            return Ok(w);
        }
        std::thread::sleep(POLL);
    }
}

fn run(bench: &mut Bench, args: &Args) -> anyhow::Result<Value> {
    bench.cluster.start_agent(0)?;
    let maps = bench.maps(0, START_LIMIT)?;
    let n = args.services;
    let load = bench.load(&maps, n)?;
    let (replace, resize) = bench.endpoint_changes(&maps, n, args.changes)?;
    let mut all = Timings::default();
    for t in [&replace, &resize] {
        all.e2e.extend(&t.e2e);
        all.api.extend(&t.api);
    }
    let (created, deleted) = bench.service_changes(&maps, (args.changes / 4).max(1))?;
    let restart = bench.restart(n)?;
    let new_node = bench.new_node()?;
    bench.verify(2)?;
    Ok(json!({
        "services": n,
        "endpoints": 4 * n,
        "binaries": if cfg!(debug_assertions) { "dev" } else { "release" },
        "load": load,
        "endpoint_change": all.json(),
        "endpoint_replace": replace.json(),
        "endpoint_add_remove": resize.json(),
        "service_create": created.json(),
        "service_delete": deleted.json(),
        "restart": restart,
        "new_node": new_node,
    }))
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    weir_tests::stop_on_signal("lb-programming", &STOP);
    let cluster = ControlCluster::new(TAG, SUBNET, 2, &[])?;
    let client = {
        let _g = rt.enter();
        let channel = tonic::transport::Endpoint::from_shared(cluster.control.url())?
            .connect_timeout(Duration::from_secs(2))
            .timeout(Duration::from_secs(30))
            .connect_lazy();
        ObjectsClient::new(channel)
    };
    let mut bench = Bench {
        rt,
        cluster,
        client,
        table: Vec::new(),
        fresh: 0,
    };
    match run(&mut bench, &args) {
        Ok(v) => {
            println!("{v}");
            Ok(())
        }
        Err(e) => {
            eprintln!("{}", bench.logs());
            Err(e)
        }
    }
}
