//! Services on a real weir cluster, end to end: weir-control allocating
//! clusterIPs and keeping `EndpointSlice`s, three weir-agents in control
//! mode programming the eBPF socket load balancer (cgroup connect4 /
//! sendmsg4 / recvmsg4 / getpeername4 at the cgroup2 root, pinned maps),
//! and real TCP/UDP traffic to the VIPs from client pods on every node and
//! from a node's host netns. busybox httpd backends answer with their
//! hostname (the pod name), so every answer says which backend served it.
//! The pinned maps and links are read with `bpftool` as an observer.
//! Needs root.

use std::{
    collections::{BTreeMap, BTreeSet},
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, UdpSocket},
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use serde_json::Value;
use weir_tests::api::{Api, condition_status, name, ready_addresses, uid};
use weir_tests::{ControlCluster, Node, http_get_in, tcp_connect_in, udp_bind_in, wait_for};

/// Short heartbeats, so nodes are Ready soon.
const CONTROL_ARGS: &[&str] = &["--heartbeat-interval", "1s"];
/// How long pods may take to be scheduled, started and reported Ready.
const START: Duration = Duration::from_secs(90);
/// How long a store change may take to reach every node's maps.
const PROGRAMMED: Duration = Duration::from_secs(15);
/// The backends' UDP port (served by the test inside each pod's netns).
const UDP_PORT: u16 = 5353;
/// Requests per client in a spread check.
const N: usize = 30;

/// `ClusterIP` Service `web`: TCP 80 → `http`, UDP 53 → 5353.
const WEB_SVC: &str = r"apiVersion: v1
kind: Service
metadata:
  name: web
spec:
  selector: {app: web}
  ports:
  - {name: http, port: 80, targetPort: http, protocol: TCP}
  - {name: echo, port: 53, targetPort: 5353, protocol: UDP}
";

/// A Service whose selector matches no pod.
const NOBODY_SVC: &str = r"apiVersion: v1
kind: Service
metadata:
  name: nobody
spec:
  selector: {app: nobody}
  ports:
  - {name: http, port: 80, targetPort: 8080}
";

/// The `web` pods behind `ClientIP` session affinity.
const STICKY_SVC: &str = r"apiVersion: v1
kind: Service
metadata:
  name: sticky
spec:
  selector: {app: web}
  sessionAffinity: ClientIP
  sessionAffinityConfig: {clientIP: {timeoutSeconds: 600}}
  ports:
  - {name: http, port: 80, targetPort: http}
";

/// A `web` pod (selected by the Services, owned by nothing) whose readiness
/// probe wants `/ready`, which does not exist until the test makes it.
const PROBE_POD: &str = r#"apiVersion: v1
kind: Pod
metadata:
  name: probe
  labels: {app: web}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: web
    image: busybox
    command: ["sh", "-c", "mkdir -p /srv && hostname > /srv/index.html && exec httpd -f -p 8080 -h /srv"]
    ports:
    - {name: http, containerPort: 8080}
    readinessProbe:
      httpGet: {path: /ready, port: http}
      periodSeconds: 1
      failureThreshold: 1
"#;

fn node_of(p: &Value) -> String {
    p["spec"]["nodeName"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

fn pod_ip(p: &Value) -> Option<Ipv4Addr> {
    p["status"]["podIP"].as_str()?.parse().ok()
}

fn running_ready(p: &Value) -> bool {
    !p["metadata"]["deletionTimestamp"].is_string()
        && p["status"]["phase"] == "Running"
        && condition_status(p, "Ready") == "True"
        && pod_ip(p).is_some()
        && !node_of(p).is_empty()
}

/// Waits until exactly `n` pods match `selector`, all Running and Ready
/// on a node and none terminating; returns them.
fn wait_settled(api: &Api, selector: &str, n: usize) -> anyhow::Result<Vec<Value>> {
    wait_for(
        &format!("exactly {n} Running+Ready pods {selector}"),
        START,
        || {
            let pods = api.pods(selector).ok()?;
            (pods.len() == n && pods.iter().all(running_ready)).then_some(pods)
        },
    )
}

/// A client pod per node (by node name): its netns.
struct Clients(BTreeMap<String, PathBuf>);

fn clients(c: &ControlCluster, api: &Api) -> anyhow::Result<Clients> {
    let n = c.cluster.nodes.len();
    let pods = wait_settled(api, "app=client", n)?;
    let mut m = BTreeMap::new();
    for p in &pods {
        let node = node_of(p);
        let netns = c
            .node_named(&node)
            .with_context(|| format!("client on unknown node {node}"))?
            .pod_netns(&uid(p));
        m.insert(node, netns);
    }
    ensure!(m.len() == n, "clients not one per node: {m:?}");
    Ok(Clients(m))
}

/// Service `svc`'s clusterIP.
fn cluster_ip(api: &Api, svc: &str) -> anyhow::Result<Ipv4Addr> {
    let s = wait_for(&format!("service {svc}"), Duration::from_secs(10), || {
        api.get("Service", "default", svc)
    })?;
    let ip = s["spec"]["clusterIP"]
        .as_str()
        .with_context(|| format!("{svc} has no clusterIP: {s}"))?;
    Ok(ip.parse()?)
}

/// Waits until Service `svc`'s slice lists exactly `ips` as ready.
fn wait_slice_ready(api: &Api, svc: &str, ips: &BTreeSet<Ipv4Addr>) -> anyhow::Result<Value> {
    let want: Vec<String> = ips.iter().map(ToString::to_string).collect();
    wait_for(
        &format!("slice {svc} ready = {want:?}"),
        Duration::from_secs(30),
        || {
            api.get("EndpointSlice", "default", svc)
                .filter(|s| ready_addresses(s) == want)
        },
    )
    .with_context(|| {
        format!(
            "last slice: {}",
            api.get("EndpointSlice", "default", svc).unwrap_or_default()
        )
    })
}

/// One service entry of a `weir_svc_v1` dump: (VIP, port, proto) → (id, count).
type SvcEntry = ((Ipv4Addr, u16, u8), (u32, u32));

fn svc_entries(node: &Node) -> anyhow::Result<Vec<SvcEntry>> {
    node.lb_map("weir_svc_v1")?
        .into_iter()
        .map(|(k, v)| {
            ensure!(k.len() == 8 && v.len() == 16, "svc entry {k:?} → {v:?}");
            let u32_at = |i: usize| u32::from_ne_bytes([v[i], v[i + 1], v[i + 2], v[i + 3]]);
            Ok((
                (
                    Ipv4Addr::new(k[0], k[1], k[2], k[3]),
                    u16::from_be_bytes([k[4], k[5]]),
                    k[6],
                ),
                (u32_at(0), u32_at(4)),
            ))
        })
        .collect()
}

/// The backend count node `node` has programmed for `vip:port/proto`.
fn programmed_count(node: &Node, vip: Ipv4Addr, port: u16, proto: u8) -> Option<u32> {
    svc_entries(node)
        .ok()?
        .into_iter()
        .find(|(k, _)| *k == (vip, port, proto))
        .map(|(_, (_, count))| count)
}

/// Waits until every node's `weir_svc_v1` has `vip:port/proto` with `count`
/// backends.
fn wait_programmed(
    c: &ControlCluster,
    vip: Ipv4Addr,
    port: u16,
    proto: u8,
    count: u32,
) -> anyhow::Result<()> {
    for n in &c.cluster.nodes {
        wait_for(
            &format!("{}: {vip}:{port}/{proto} with {count} backends", n.name),
            PROGRAMMED,
            || (programmed_count(n, vip, port, proto) == Some(count)).then_some(()),
        )
        .with_context(|| format!("{} svc map: {:?}", n.name, svc_entries(n)))?;
    }
    Ok(())
}

/// `n` GETs of `http://vip/` from `netns`; every one must answer 200.
/// Returns how many each backend (body) served.
fn spread(netns: &Path, vip: SocketAddr, n: usize) -> anyhow::Result<BTreeMap<String, usize>> {
    let mut seen = BTreeMap::new();
    for i in 0..n {
        let (code, body) = http_get_in(netns, vip, "/", Duration::from_secs(2))
            .with_context(|| format!("request {i} to {vip} from {}", netns.display()))?;
        ensure!(code == 200, "request {i} to {vip}: {code} {body}");
        *seen.entry(body.trim().to_owned()).or_insert(0) += 1;
    }
    Ok(seen)
}

fn names(pods: &[Value]) -> BTreeSet<String> {
    pods.iter().map(name).collect()
}

fn ips(pods: &[Value]) -> BTreeSet<Ipv4Addr> {
    pods.iter().filter_map(pod_ip).collect()
}

/// Serves UDP on [`UDP_PORT`] inside each pod's netns, answering the pod's
/// name, until dropped.
struct UdpBackends {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl UdpBackends {
    fn start(c: &ControlCluster, pods: &[Value]) -> anyhow::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for p in pods {
            let node = c.node_named(&node_of(p)).context("the pod's node")?;
            let sock = udp_bind_in(
                &node.pod_netns(&uid(p)),
                SocketAddr::from(([0, 0, 0, 0], UDP_PORT)),
            )?;
            sock.set_read_timeout(Some(Duration::from_millis(100)))?;
            let (stop, me) = (Arc::clone(&stop), name(p));
            threads.push(std::thread::spawn(move || {
                let mut buf = [0u8; 512];
                while !stop.load(Ordering::Relaxed) {
                    if let Ok((_, from)) = sock.recv_from(&mut buf) {
                        let _ = sock.send_to(me.as_bytes(), from);
                    }
                }
            }));
        }
        Ok(Self { stop, threads })
    }
}

impl Drop for UdpBackends {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// `n` UDP requests from an unconnected socket in `netns` to `vip`: each
/// reply must come from `vip` (recvmsg4 shows the VIP, not the backend).
/// Returns how many each backend served.
fn udp_spread(netns: &Path, vip: SocketAddr, n: usize) -> anyhow::Result<BTreeMap<String, usize>> {
    let sock = udp_bind_in(netns, SocketAddr::from(([0, 0, 0, 0], 0)))?;
    sock.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut seen = BTreeMap::new();
    for i in 0..n {
        // One unconnected socket: the backend is chosen per sendmsg.
        let s: &UdpSocket = &sock;
        s.send_to(format!("ping {i}").as_bytes(), vip)?;
        let mut buf = [0u8; 512];
        let (len, from) = s
            .recv_from(&mut buf)
            .with_context(|| format!("UDP reply {i} from {vip}"))?;
        ensure!(
            from == vip,
            "UDP reply {i} came from {from}, not the VIP {vip}"
        );
        let body = String::from_utf8_lossy(&buf[..len]).into_owned();
        *seen.entry(body).or_insert(0) += 1;
    }
    Ok(seen)
}

/// Scenario 1 (and UDP): clusterIP allocated, slice lists the pods, TCP
/// and UDP through the VIP from every node's client and the node's host
/// netns, spread over every backend. Returns the web pods and the VIP.
fn cluster_ip_spreads(
    c: &ControlCluster,
    api: &Api,
    clients: &Clients,
) -> anyhow::Result<(Vec<Value>, Ipv4Addr)> {
    c.weirctl_apply(&weir_tests::web_deployment(3))?;
    c.weirctl_apply(WEB_SVC)?;
    let web = wait_settled(api, "app=web", 3)?;
    let vip = cluster_ip(api, "web")?;
    ensure!(
        vip.octets()[..2] == [10, 96] && vip != Ipv4Addr::new(10, 96, 0, 1),
        "clusterIP {vip} is not in 10.96.0.0/16 (or is the reserved .1)"
    );
    let slice = wait_slice_ready(api, "web", &ips(&web))?;
    let ports: BTreeSet<(String, i64)> = slice["ports"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| {
            (
                p["name"].as_str().unwrap_or_default().to_owned(),
                p["port"].as_i64().unwrap_or_default(),
            )
        })
        .collect();
    ensure!(
        ports == BTreeSet::from([("http".into(), 8080), ("echo".into(), 5353)]),
        "slice ports {ports:?}"
    );
    wait_programmed(c, vip, 80, 6, 3)?;
    wait_programmed(c, vip, 53, 17, 3)?;
    let want = names(&web);
    let addr = SocketAddr::from((vip, 80));
    for (node, netns) in &clients.0 {
        let seen = spread(netns, addr, N)?;
        let got: BTreeSet<String> = seen.keys().cloned().collect();
        ensure!(
            got == want,
            "from the client on {node}: {seen:?}, want all of {want:?}"
        );
    }
    let host = c.cluster.nodes[0].netns_path();
    let seen = spread(Path::new(&host), addr, N)?;
    ensure!(
        seen.keys().cloned().collect::<BTreeSet<_>>() == want,
        "from {host}: {seen:?}, want all of {want:?}"
    );

    let udp = UdpBackends::start(c, &web)?;
    let uaddr = SocketAddr::from((vip, 53));
    for (node, netns) in &clients.0 {
        let seen = udp_spread(netns, uaddr, N)?;
        ensure!(
            seen.keys().cloned().collect::<BTreeSet<_>>() == want,
            "UDP from the client on {node}: {seen:?}, want all of {want:?}"
        );
    }
    drop(udp);
    Ok((web, vip))
}

/// Scenario 3: a Service with no endpoints refuses at once.
fn no_endpoints_refuse_at_once(
    c: &ControlCluster,
    api: &Api,
    clients: &Clients,
) -> anyhow::Result<()> {
    c.weirctl_apply(NOBODY_SVC)?;
    let vip = cluster_ip(api, "nobody")?;
    wait_programmed(c, vip, 80, 6, 0)?;
    let addr = SocketAddr::from((vip, 80));
    for (node, netns) in &clients.0 {
        for _ in 0..5 {
            let (r, took) = tcp_connect_in(netns, addr, Duration::from_secs(5))?;
            match r {
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {}
                Err(e) => bail!("connect {addr} from {node}: {e}, not connection refused"),
                Ok(_) => bail!("connect {addr} from {node} succeeded without endpoints"),
            }
            ensure!(
                took < Duration::from_secs(1),
                "refusal from {node} took {took:?}"
            );
        }
    }
    Ok(())
}

/// Scenario 6: `ClientIP` affinity sends each client to one backend.
fn client_ip_affinity(
    c: &ControlCluster,
    api: &Api,
    clients: &Clients,
    web: &[Value],
) -> anyhow::Result<()> {
    c.weirctl_apply(STICKY_SVC)?;
    let vip = cluster_ip(api, "sticky")?;
    wait_slice_ready(api, "sticky", &ips(web))?;
    wait_programmed(c, vip, 80, 6, 3)?;
    for (node, netns) in &clients.0 {
        let seen = spread(netns, SocketAddr::from((vip, 80)), 20)?;
        ensure!(
            seen.len() == 1,
            "ClientIP affinity from {node} reached {seen:?}"
        );
    }
    // (weirctl doesn't know Services yet: delete through the API.)
    api.delete("Service", "default", "sticky")?;
    Ok(())
}

/// containerd's id of a pod's container (as the agent names it: the first
/// 6 bytes of sha256(uid) in hex, `-`, the container name).
fn container_id(pod_uid: &str, container: &str) -> anyhow::Result<String> {
    let out = weir_tests::sh("sh", &["-c", &format!("printf %s {pod_uid} | sha256sum")])?;
    let hex = out.get(..12).context("sha256sum output")?;
    Ok(format!("{hex}-{container}"))
}

/// Scenario 4: a pod failing readiness gets no traffic; once the probe
/// passes it does. Returns the probe pod.
fn readiness_drives_rotation(
    c: &ControlCluster,
    api: &Api,
    clients: &Clients,
    web: &[Value],
    vip: Ipv4Addr,
) -> anyhow::Result<Value> {
    c.weirctl_apply(PROBE_POD)?;
    let probe = api.wait_pod("probe", "Running, not Ready, with an IP", START, |p| {
        p["status"]["phase"] == "Running"
            && pod_ip(p).is_some()
            && condition_status(p, "Ready") == "False"
    })?;
    // Long enough for several failing probes.
    std::thread::sleep(Duration::from_secs(2));
    let p = api.get("Pod", "default", "probe").context("probe pod")?;
    ensure!(
        condition_status(&p, "Ready") == "False",
        "probe became Ready without /ready"
    );
    let slice = api
        .get("EndpointSlice", "default", "web")
        .context("slice web")?;
    let probe_ip = pod_ip(&probe).context("probe IP")?;
    ensure!(
        !ready_addresses(&slice).contains(&probe_ip.to_string()),
        "not-ready {probe_ip} is a ready endpoint: {slice}"
    );
    wait_programmed(c, vip, 80, 6, 3)?;
    let addr = SocketAddr::from((vip, 80));
    for (node, netns) in &clients.0 {
        let seen = spread(netns, addr, N)?;
        ensure!(
            !seen.contains_key("probe"),
            "not-ready probe got traffic from {node}: {seen:?}"
        );
    }

    let node = c.node_named(&node_of(&probe)).context("probe's node")?;
    let cid = container_id(&uid(&probe), "web")?;
    c.cluster.containerd.ctr(
        &node.containerd_ns(),
        &[
            "tasks",
            "exec",
            "--exec-id",
            "make-ready",
            &cid,
            "sh",
            "-c",
            "echo ok > /srv/ready",
        ],
    )?;
    api.wait_running("probe", Duration::from_secs(20))?;
    let mut all = ips(web);
    all.insert(probe_ip);
    wait_slice_ready(api, "web", &all)?;
    wait_programmed(c, vip, 80, 6, 4)?;
    let mut want = names(web);
    want.insert("probe".into());
    for (node, netns) in &clients.0 {
        // 40 requests over 4 backends: missing one has odds 4·(3/4)^40 < 1e-4.
        let seen = spread(netns, addr, 40)?;
        ensure!(
            seen.keys().cloned().collect::<BTreeSet<_>>() == want,
            "after readiness from {node}: {seen:?}, want {want:?}"
        );
    }
    api.get("Pod", "default", "probe")
        .context("probe pod after readiness")
}

/// The peer (as the kernel socket has it: the backend) of the established
/// TCP connection from `local` in `netns` (`ss` as an observer).
fn kernel_peer(netns: &Path, local: SocketAddr) -> anyhow::Result<Ipv4Addr> {
    let out = weir_tests::sh(
        "nsenter",
        &[
            &format!("--net={}", netns.display()),
            "ss",
            "-Htn",
            "state",
            "established",
        ],
    )?;
    let mine = format!(":{}", local.port());
    for line in out.lines() {
        let cols: Vec<&str> = line.split_whitespace().collect();
        if let [.., l, peer] = cols.as_slice()
            && l.ends_with(&mine)
        {
            let ip = peer.rsplit_once(':').map_or(*peer, |(ip, _)| ip);
            return Ok(ip.parse()?);
        }
    }
    bail!("no established connection from {local} in:\n{out}")
}

/// Scenario 5: a backend taken out of the Service (label change, not
/// killed) gets no new connections; a connection opened to it before
/// keeps working.
fn removed_backend_keeps_open_connections(
    c: &ControlCluster,
    api: &Api,
    clients: &Clients,
    web: &[Value],
    vip: Ipv4Addr,
) -> anyhow::Result<()> {
    let probe = api.get("Pod", "default", "probe").context("probe pod")?;
    let probe_ip = pod_ip(&probe).context("probe IP")?;
    let (node, netns) = clients.0.iter().next().context("a client")?;
    let addr = SocketAddr::from((vip, 80));
    // Connections through the VIP until one lands on the probe pod.
    let mut open = None;
    for _ in 0..200 {
        let (r, _) = tcp_connect_in(netns, addr, Duration::from_secs(2))?;
        let s = r.with_context(|| format!("connect {addr} from {node}"))?;
        if kernel_peer(netns, s.local_addr()?)? == probe_ip {
            open = Some(s);
            break;
        }
    }
    let mut s = open.context("no connection via the VIP landed on the probe pod")?;
    ensure!(
        s.peer_addr()? == addr,
        "getpeername shows {} not the VIP",
        s.peer_addr()?
    );
    s.write_all(b"GET / HTTP/1.0\r\n")?;

    let mut p = probe.clone();
    p["metadata"]["labels"]["app"] = "out".into();
    if let Some(o) = p.as_object_mut() {
        o.remove("status");
    }
    api.apply(&p)?;
    wait_slice_ready(api, "web", &ips(web))?;
    wait_programmed(c, vip, 80, 6, 3)?;
    for n in &c.cluster.nodes {
        let backends = n.lb_map("weir_backends_v1")?;
        ensure!(
            backends.iter().all(|(_, v)| v[..4] != probe_ip.octets()),
            "{} still has backend {probe_ip}: {backends:?}",
            n.name
        );
    }

    s.write_all(b"Host: web\r\n\r\n")?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)
        .context("read the open connection's answer")?;
    ensure!(
        resp.starts_with("HTTP/1.") && resp.contains(" 200 ") && resp.trim_end().ends_with("probe"),
        "the open connection to the removed backend answered {resp:?}"
    );
    for (node, netns) in &clients.0 {
        let seen = spread(netns, addr, N)?;
        ensure!(
            !seen.contains_key("probe"),
            "removed backend got a new connection from {node}: {seen:?}"
        );
    }
    c.weirctl(&["delete", "pod", "probe"])?;
    Ok(())
}

/// Scenario 7: SIGKILL the agent of a client's node while 200 requests
/// run through the VIP: none fails; the restarted agent adopts the pinned
/// links and maps (same link ids, same service entry) and the VIP works.
fn agent_kill_under_load(
    c: &mut ControlCluster,
    clients: &Clients,
    web: &[Value],
    vip: Ipv4Addr,
) -> anyhow::Result<Duration> {
    let i = 0;
    let node_name = c.cluster.nodes[i].name.clone();
    let netns = clients
        .0
        .get(&node_name)
        .context("a client on node 0")?
        .clone();
    let links = c.cluster.nodes[i].lb_link_ids()?;
    ensure!(links.len() == 4, "pinned links: {links:?}");
    let entry = |n: &Node| svc_entries(n).map(|e| e.into_iter().find(|(k, _)| *k == (vip, 80, 6)));
    let before = entry(&c.cluster.nodes[i])?.context("web in the svc map")?;
    let addr = SocketAddr::from((vip, 80));
    let load = std::thread::spawn(move || {
        let mut failures = Vec::new();
        for r in 0..200 {
            match http_get_in(&netns, addr, "/", Duration::from_secs(2)) {
                Ok((200, _)) => {}
                other => failures.push(format!("request {r}: {other:?}")),
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        failures
    });
    std::thread::sleep(Duration::from_millis(800));
    c.node(i).kill_agent();
    let killed = Instant::now();
    std::thread::sleep(Duration::from_millis(500));
    c.start_agent(i)?;
    let back = killed.elapsed();
    let failures = load
        .join()
        .map_err(|_| anyhow::anyhow!("the load thread panicked"))?;
    ensure!(
        failures.is_empty(),
        "{} of 200 requests failed across the agent restart: {failures:?}",
        failures.len()
    );
    // Give the restarted agent its resync, then: adopted, not re-made.
    std::thread::sleep(Duration::from_secs(2));
    let node = &c.cluster.nodes[i];
    let after_links = node.lb_link_ids()?;
    ensure!(
        after_links == links,
        "links re-made: {links:?} → {after_links:?}"
    );
    let after = entry(node)?.context("web gone from the svc map")?;
    ensure!(after == before, "svc entry changed: {before:?} → {after:?}");
    let seen = spread(clients.0.get(&node_name).context("client")?, addr, N)?;
    ensure!(
        seen.keys().cloned().collect::<BTreeSet<_>>() == names(web),
        "after the restart: {seen:?}"
    );
    Ok(back)
}

/// Scenario 8: deleting the Services empties every node's service, slot,
/// backend and affinity maps, and the old VIP fails fast (unreachable).
fn delete_empties_the_maps(
    c: &ControlCluster,
    api: &Api,
    clients: &Clients,
    vip: Ipv4Addr,
) -> anyhow::Result<()> {
    api.delete("Service", "default", "web")?;
    api.delete("Service", "default", "nobody")?;
    for n in &c.cluster.nodes {
        // Only the node's own cluster DNS entry (10.96.0.10:53 UDP and TCP →
        // the node's DNS server on port 53, one slot each) may stay.
        let dns_only = |map: &str, e: &[(Vec<u8>, Vec<u8>)]| match map {
            "weir_svc_v1" => e
                .iter()
                .all(|(k, _)| k.starts_with(&[10, 96, 0, 10, 0, 53])),
            "weir_svc_slots_v1" => e.len() <= 2,
            "weir_backends_v1" => e.iter().all(|(_, v)| v.get(4..6) == Some(&[0, 53][..])),
            _ => e.is_empty(),
        };
        for map in [
            "weir_svc_v1",
            "weir_svc_slots_v1",
            "weir_backends_v1",
            "weir_affinity_v1",
        ] {
            wait_for(&format!("{}: {map} empty", n.name), PROGRAMMED, || {
                n.lb_map(map).ok().filter(|e| dns_only(map, e))
            })
            .with_context(|| format!("{map} holds {:?}", n.lb_map(map)))?;
        }
    }
    let addr = SocketAddr::from((vip, 80));
    for (node, netns) in &clients.0 {
        let (r, took) = tcp_connect_in(netns, addr, Duration::from_secs(5))?;
        match r {
            Ok(_) => bail!("connect {addr} from {node} succeeded after the delete"),
            Err(e) => ensure!(
                e.kind() != std::io::ErrorKind::ConnectionRefused,
                "{addr} from {node} still refused by the balancer"
            ),
        }
        ensure!(
            took < Duration::from_secs(1),
            "{addr} from {node} took {took:?} to fail"
        );
    }
    Ok(())
}

#[test]
fn cluster_ip_services_balance_real_traffic() -> anyhow::Result<()> {
    let mut c = ControlCluster::new("se", 57, 3, CONTROL_ARGS)?;
    c.start_agents()?;
    let api = Api::connect(&c.control.url())?;
    api.wait_nodes_ready(&c.node_names())?;
    c.weirctl_apply(weir_tests::CLIENT_DS)?;
    let clients = clients(&c, &api)?;

    let t = Instant::now();
    let (web, vip) = cluster_ip_spreads(&c, &api, &clients)?;
    eprintln!("clusterIP spread (TCP, UDP, host): {:?}", t.elapsed());
    let t = Instant::now();
    no_endpoints_refuse_at_once(&c, &api, &clients)?;
    eprintln!("no endpoints refused: {:?}", t.elapsed());
    let t = Instant::now();
    client_ip_affinity(&c, &api, &clients, &web)?;
    eprintln!("ClientIP affinity: {:?}", t.elapsed());
    let t = Instant::now();
    readiness_drives_rotation(&c, &api, &clients, &web, vip)?;
    eprintln!("readiness in and out of rotation: {:?}", t.elapsed());
    let t = Instant::now();
    removed_backend_keeps_open_connections(&c, &api, &clients, &web, vip)?;
    eprintln!("removed backend, open connection kept: {:?}", t.elapsed());
    let t = Instant::now();
    let back = agent_kill_under_load(&mut c, &clients, &web, vip)?;
    eprintln!(
        "agent SIGKILL under load (agent back after {back:?}): {:?}",
        t.elapsed()
    );
    let t = Instant::now();
    delete_empties_the_maps(&c, &api, &clients, vip)?;
    eprintln!("service delete empties the maps: {:?}", t.elapsed());
    Ok(())
}
