//! The Kubernetes `[sig-network] Services` conformance cases weir supports
//! (upstream: test/e2e/network/service.go, and the DNS case of
//! test/e2e/network/dns.go), ported to weir's harness: one two-node
//! cluster (weir-control + two weir-agents), busybox httpd backends that
//! answer their pod name (`alt-<name>` on a second port), a client pod for
//! in-cluster traffic and DNS, and a client netns on the nodes' bridge for
//! `NodePort` traffic. Each section is named after the upstream case.
//! Needs root.

use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use serde_json::{Value, json};
use weir_tests::api::{Api, condition_status, name, ready_addresses, uid};
use weir_tests::{BridgeClient, ControlCluster, http_get_in, udp_bind_in, wait_for};

const CONTROL_ARGS: &[&str] = &["--heartbeat-interval", "1s"];
const TAG: &str = "cf";
const SUBNET: u8 = 62;
/// How long pods may take to be scheduled, started and reported.
const START: Duration = Duration::from_mins(1);
/// How long a store change may take to reach slices, maps and DNS.
const PROGRAMMED: Duration = Duration::from_secs(20);
/// The backends' UDP port (a socket the test binds in each pod's netns).
const UDP_PORT: u16 = 8080;

/// The backends: httpd on 8080 (`http`, the pod name) and 8081 (`alt`,
/// `alt-<pod name>`), optionally never Ready.
fn backend_pod(pod: &str, app: &str, node: &str, never_ready: bool) -> Value {
    let mut container = json!({
        "name": "web",
        "image": "busybox",
        "command": ["sh", "-c", "mkdir -p /srv /alt && hostname > /srv/index.html \
            && echo alt-$(hostname) > /alt/index.html && httpd -p 8081 -h /alt \
            && exec httpd -f -p 8080 -h /srv"],
        "ports": [
            {"name": "http", "containerPort": 8080},
            {"name": "alt", "containerPort": 8081},
        ],
    });
    if never_ready {
        container["readinessProbe"] = json!({"exec": {"command": ["false"]}, "periodSeconds": 1});
    }
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": pod, "labels": {"app": app}},
        "spec": {"nodeName": node, "terminationGracePeriodSeconds": 1, "containers": [container]},
    })
}

fn client_pod(node: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "client", "labels": {"app": "client"}},
        "spec": {"nodeName": node, "terminationGracePeriodSeconds": 1,
            "containers": [{"name": "c", "image": "busybox", "command": ["sleep", "3600"]}]},
    })
}

/// A Service `name` in `ns` selecting `app`, with `spec` merged in.
fn service(ns: &str, svc: &str, app: &str, spec: &Value) -> Value {
    let mut s = json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": svc, "namespace": ns},
        "spec": {"selector": {"app": app}},
    });
    if let (Some(dst), Some(src)) = (s["spec"].as_object_mut(), spec.as_object()) {
        for (k, v) in src {
            dst.insert(k.clone(), v.clone());
        }
    }
    s
}

fn http_svc(svc: &str, app: &str) -> Value {
    service(
        "default",
        svc,
        app,
        &json!({"ports": [{"name": "http", "port": 80, "targetPort": "http"}]}),
    )
}

fn node_port_svc(svc: &str, node_port: Option<u16>) -> Value {
    let mut port = json!({"name": "http", "port": 80, "targetPort": "http"});
    if let Some(np) = node_port {
        port["nodePort"] = np.into();
    }
    service(
        "default",
        svc,
        "conf",
        &json!({"type": "NodePort", "ports": [port]}),
    )
}

struct Env {
    c: ControlCluster,
    api: Api,
    /// The client pod's netns.
    client: PathBuf,
    /// The client pod's containerd namespace and container id (for exec).
    client_exec: (String, String),
    /// The client on the bridge, outside the cluster.
    outside: BridgeClient,
    /// The node IPs.
    node_ips: Vec<Ipv4Addr>,
}

fn pod_ip(p: &Value) -> Option<Ipv4Addr> {
    p["status"]["podIP"].as_str()?.parse().ok()
}

fn spec_ip(s: &Value) -> anyhow::Result<Ipv4Addr> {
    s["spec"]["clusterIP"]
        .as_str()
        .with_context(|| format!("no clusterIP in {s}"))?
        .parse()
        .context("clusterIP")
}

fn node_ports(s: &Value) -> Vec<Option<u16>> {
    s["spec"]["ports"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| p["nodePort"].as_u64().and_then(|n| u16::try_from(n).ok()))
        .collect()
}

impl Env {
    fn apply(&self, v: &Value) -> anyhow::Result<Value> {
        let o = self.api.apply(v)?;
        Ok(serde_json::from_str(&o.json)?)
    }

    fn svc(&self, ns: &str, svc: &str) -> anyhow::Result<Value> {
        self.api
            .get("Service", ns, svc)
            .with_context(|| format!("service {ns}/{svc}"))
    }

    /// Waits until `svc`'s slice (namespace default) lists exactly `ips`
    /// as ready.
    fn wait_endpoints(&self, svc: &str, ips: &[Ipv4Addr]) -> anyhow::Result<Value> {
        let mut want: Vec<String> = ips.iter().map(ToString::to_string).collect();
        want.sort();
        wait_for(&format!("slice {svc} ready = {want:?}"), PROGRAMMED, || {
            self.api
                .get("EndpointSlice", "default", svc)
                .filter(|s| ready_addresses(s) == want)
        })
        .with_context(|| {
            format!(
                "last slice: {}",
                self.api
                    .get("EndpointSlice", "default", svc)
                    .unwrap_or_default()
            )
        })
    }

    /// GETs `addr` from `netns` until `ok(body)` (the balancer follows the
    /// store within [`PROGRAMMED`]).
    fn get_until(
        netns: &Path,
        addr: SocketAddr,
        what: &str,
        ok: impl Fn(&anyhow::Result<(u16, String)>) -> bool,
    ) -> anyhow::Result<()> {
        let mut last = String::new();
        wait_for(&format!("{addr}: {what}"), PROGRAMMED, || {
            let r = http_get_in(netns, addr, "/", Duration::from_secs(1));
            last = format!("{r:?}");
            ok(&r).then_some(())
        })
        .with_context(|| format!("last answer: {last}"))
    }

    /// `n` GETs of `addr` from `netns`, all 200; the bodies seen.
    fn bodies(netns: &Path, addr: SocketAddr, n: usize) -> anyhow::Result<Vec<String>> {
        (0..n)
            .map(|i| {
                let (code, body) = http_get_in(netns, addr, "/", Duration::from_secs(2))
                    .with_context(|| format!("request {i} to {addr}"))?;
                ensure!(code == 200, "request {i} to {addr}: {code} {body}");
                Ok(body.trim().to_owned())
            })
            .collect()
    }

    /// Waits until every one of `want` answers at `addr` from `netns`.
    fn reach_all(netns: &Path, addr: SocketAddr, want: &[&str]) -> anyhow::Result<()> {
        let want: BTreeSet<String> = want.iter().map(|s| (*s).to_owned()).collect();
        let mut seen = BTreeSet::new();
        wait_for(&format!("{addr} answered by {want:?}"), PROGRAMMED, || {
            if let Ok((200, body)) = http_get_in(netns, addr, "/", Duration::from_secs(1)) {
                seen.insert(body.trim().to_owned());
            }
            want.is_subset(&seen).then_some(())
        })
        .with_context(|| format!("answered: {seen:?}"))?;
        ensure!(seen == want, "{addr} answered by {seen:?}, want {want:?}");
        Ok(())
    }

    /// `nslookup name` in the client pod: exit code and output.
    fn nslookup(&self, name: &str) -> anyhow::Result<(i32, String)> {
        static EXEC: AtomicUsize = AtomicUsize::new(0);
        let id = format!("conf-{}", EXEC.fetch_add(1, Ordering::Relaxed));
        let script = format!("(nslookup {name}) 2>&1; echo \"rc=$?\"");
        let (ns, cid) = &self.client_exec;
        let out = self.c.cluster.containerd.ctr(
            ns,
            &["tasks", "exec", "--exec-id", &id, cid, "sh", "-c", &script],
        )?;
        let (body, rc) = out
            .trim_end()
            .rsplit_once("rc=")
            .with_context(|| format!("no exit code in {out:?}"))?;
        Ok((rc.trim().parse()?, body.to_owned()))
    }

    /// An apply that must be refused with an error naming `field`.
    fn refused(&self, v: &Value, field: &str) -> anyhow::Result<String> {
        match self.api.apply(v) {
            Ok(o) => bail!("apply was accepted, want refused on {field}: {}", o.json),
            Err(e) => {
                let msg = format!("{e:#}");
                ensure!(msg.contains(field), "refused, but not on {field}: {msg}");
                Ok(msg)
            }
        }
    }
}

/// containerd's id of a pod's container: the first 6 bytes of
/// sha256(uid) in hex, `-`, the container name.
fn container_id(pod_uid: &str, container: &str) -> anyhow::Result<String> {
    let out = weir_tests::sh("sh", &["-c", &format!("printf %s {pod_uid} | sha256sum")])?;
    let hex = out.get(..12).context("sha256sum output")?;
    Ok(format!("{hex}-{container}"))
}

fn running(p: &Value) -> bool {
    p["status"]["phase"] == "Running" && pod_ip(p).is_some()
}

fn ready(p: &Value) -> bool {
    running(p) && condition_status(p, "Ready") == "True"
}

/// UDP servers in pods' netns answering their pod name; stopped on drop.
struct UdpBackends(Arc<AtomicBool>, Vec<std::thread::JoinHandle<()>>);

impl UdpBackends {
    fn start(pods: &[(String, PathBuf)]) -> anyhow::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for (pod, netns) in pods {
            let sock = udp_bind_in(netns, SocketAddr::from(([0, 0, 0, 0], UDP_PORT)))?;
            sock.set_read_timeout(Some(Duration::from_millis(100)))?;
            let (stop, me) = (Arc::clone(&stop), pod.clone());
            threads.push(std::thread::spawn(move || {
                let mut buf = [0u8; 256];
                while !stop.load(Ordering::Relaxed) {
                    if let Ok((_, from)) = sock.recv_from(&mut buf) {
                        let _ = sock.send_to(me.as_bytes(), from);
                    }
                }
            }));
        }
        Ok(Self(stop, threads))
    }
}

impl Drop for UdpBackends {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
        for t in self.1.drain(..) {
            let _ = t.join();
        }
    }
}

/// One UDP exchange from `netns` with `to`: who answered, and from where.
fn udp_ask(netns: &Path, to: SocketAddr) -> anyhow::Result<(String, SocketAddr)> {
    let sock = udp_bind_in(netns, SocketAddr::from(([0, 0, 0, 0], 0)))?;
    sock.set_read_timeout(Some(Duration::from_secs(1)))?;
    sock.send_to(b"who", to)?;
    let mut buf = [0u8; 256];
    let (n, from) = sock
        .recv_from(&mut buf)
        .with_context(|| format!("no UDP answer from {to}"))?;
    Ok((String::from_utf8_lossy(&buf[..n]).into_owned(), from))
}

fn timed(what: &str, f: impl FnOnce() -> anyhow::Result<()>) -> anyhow::Result<()> {
    let t = Instant::now();
    f().with_context(|| format!("[sig-network] Services {what}"))?;
    eprintln!("ok {:>6.1?}  {what}", t.elapsed());
    Ok(())
}

#[test]
fn sig_network_services_conformance() -> anyhow::Result<()> {
    let started = Instant::now();
    let mut c = ControlCluster::new(TAG, SUBNET, 2, CONTROL_ARGS)?;
    c.start_agents()?;
    let api = Api::connect(&c.control.url())?;
    let nodes = c.node_names();
    api.wait_nodes_ready(&nodes)?;
    let node_ips = c.cluster.nodes.iter().map(|n| n.ip).collect();
    let outside = BridgeClient::new(&c.cluster, Ipv4Addr::new(10, 250, SUBNET, 200))?;
    let mut env = Env {
        c,
        api,
        client: PathBuf::new(),
        client_exec: (String::new(), String::new()),
        outside,
        node_ips,
    };
    let result = cases(&mut env, &nodes);
    if result.is_ok() {
        eprintln!("all Services conformance cases: {:?}", started.elapsed());
    }
    result.map_err(|e| e.context(env.c.log_tails(40)))
}

/// The conformance cases, in order, on `env` (two nodes named `nodes`).
fn cases(env: &mut Env, nodes: &[String]) -> anyhow::Result<()> {
    // "should serve a basic endpoint from pods": the Service first, no
    // endpoints; a pod appears in its endpoints, then a second.
    let t = Instant::now();
    let basic = env.apply(&http_svc("endpoint-test2", "conf"))?;
    let basic_ip = spec_ip(&basic)?;
    env.wait_endpoints("endpoint-test2", &[])?;
    env.apply(&backend_pod("pod1", "conf", &nodes[0], false))?;
    env.apply(&client_pod(&nodes[1]))?;
    env.apply(&backend_pod("unready", "unready", &nodes[0], true))?;
    let (_, ip1) = env.api.wait_running("pod1", START)?;
    env.wait_endpoints("endpoint-test2", &[ip1])?;
    env.apply(&backend_pod("pod2", "conf", &nodes[1], false))?;
    let (_, ip2) = env.api.wait_running("pod2", START)?;
    env.wait_endpoints("endpoint-test2", &[ip1, ip2])?;
    let (client, _) = env.api.wait_running("client", START)?;
    let node = env.c.node_named(&nodes[1]).context("client's node")?;
    let (netns, ns) = (node.pod_netns(&uid(&client)), node.containerd_ns());
    env.client = netns;
    env.client_exec = (ns, container_id(&uid(&client), "c")?);
    Env::reach_all(
        &env.client,
        SocketAddr::from((basic_ip, 80)),
        &["pod1", "pod2"],
    )
    .context("[sig-network] Services should serve a basic endpoint from pods")?;
    eprintln!(
        "ok {:>6.1?}  should serve a basic endpoint from pods (pods added)",
        t.elapsed()
    );

    timed("should serve multiport endpoints from pods", || {
        multiport(env, ip1, ip2)
    })?;
    timed(
        "should have session affinity work for service with type clusterIP",
        || session_affinity(env),
    )?;
    timed("should provide DNS for services", || dns(env, basic_ip))?;
    timed("should create endpoints for unready pods", || {
        unready_endpoints(env)
    })?;
    timed(
        "should be able to create a functioning NodePort service",
        || functioning_node_port(env),
    )?;
    timed(
        "should be able to change the type from ClusterIP to NodePort (and back)",
        || change_type(env),
    )?;
    timed("should release NodePorts on delete", || {
        release_on_delete(env)
    })?;
    timed("should prevent NodePort collisions", || collisions(env))?;
    timed("should check NodePort out-of-range", || out_of_range(env))?;
    timed(
        "should be able to update service type to NodePort listening on same port number but different protocols",
        || same_port_tcp_udp(env, ip1, ip2),
    )?;
    timed("should find a service from listing all namespaces", || {
        list_all_namespaces(env)
    })?;
    timed(
        "should delete a collection of services (endpoint slices follow)",
        || delete_collection(env),
    )?;
    timed(
        "should serve a basic endpoint from pods (pods deleted)",
        || {
            env.c.weirctl(&["delete", "pod", "pod1"])?;
            env.wait_endpoints("endpoint-test2", &[ip2])?;
            env.c.weirctl(&["delete", "pod", "pod2"])?;
            env.wait_endpoints("endpoint-test2", &[])?;
            Ok(())
        },
    )?;
    Ok(())
}

/// Upstream "should serve multiport endpoints from pods": one Service, two
/// named ports to two container ports; each port reaches its own server
/// on every pod. (Upstream gives each pod only one of the ports, which
/// makes two slices; weir keeps one slice per Service, so each pod has
/// both ports here.)
fn multiport(env: &Env, ip1: Ipv4Addr, ip2: Ipv4Addr) -> anyhow::Result<()> {
    let svc = env.apply(&service(
        "default",
        "multi-endpoint-test",
        "conf",
        &json!({"ports": [
            {"name": "portname1", "port": 80, "targetPort": "http"},
            {"name": "portname2", "port": 81, "targetPort": "alt"},
        ]}),
    ))?;
    let vip = spec_ip(&svc)?;
    let slice = env.wait_endpoints("multi-endpoint-test", &[ip1, ip2])?;
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
        ports == BTreeSet::from([("portname1".into(), 8080), ("portname2".into(), 8081)]),
        "slice ports {ports:?}"
    );
    Env::reach_all(&env.client, SocketAddr::from((vip, 80)), &["pod1", "pod2"])?;
    Env::reach_all(
        &env.client,
        SocketAddr::from((vip, 81)),
        &["alt-pod1", "alt-pod2"],
    )?;
    env.api.delete("Service", "default", "multi-endpoint-test")
}

/// Upstream "should have session affinity work for service with type
/// `clusterIP`": every request of one client lands on one backend.
fn session_affinity(env: &Env) -> anyhow::Result<()> {
    let svc = env.apply(&service(
        "default",
        "affinity-clusterip",
        "conf",
        &json!({"sessionAffinity": "ClientIP",
            "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}),
    ))?;
    let vip = SocketAddr::from((spec_ip(&svc)?, 80));
    Env::get_until(&env.client, vip, "answers", |r| matches!(r, Ok((200, _))))?;
    let host = PathBuf::from(env.c.cluster.nodes[0].netns_path());
    for from in [&env.client, &host] {
        let seen: BTreeSet<String> = Env::bodies(from, vip, 20)?.into_iter().collect();
        ensure!(
            seen.len() == 1,
            "ClientIP affinity from {} reached {seen:?}",
            from.display()
        );
    }
    env.api.delete("Service", "default", "affinity-clusterip")
}

/// Upstream (dns.go) "should provide DNS for services": the Service's name
/// resolves, from a pod, to its `clusterIP` (short name through the search
/// path and the full name).
fn dns(env: &Env, vip: Ipv4Addr) -> anyhow::Result<()> {
    for q in ["endpoint-test2", "endpoint-test2.default.svc.cluster.local"] {
        let mut last = String::new();
        wait_for(&format!("nslookup {q} → {vip}"), PROGRAMMED, || {
            let (code, out) = env.nslookup(q).ok()?;
            let answers: BTreeSet<Ipv4Addr> = out
                .split_once("Name:")
                .map(|(_, a)| a)
                .unwrap_or_default()
                .lines()
                .filter_map(|l| l.trim().strip_prefix("Address:"))
                .filter_map(|a| a.trim().parse().ok())
                .collect();
            last = out;
            // busybox nslookup tries every search domain for a short name and
            // exits 1 when any of them is NXDOMAIN: only the full name's code counts.
            (answers == BTreeSet::from([vip]) && (code == 0 || !q.contains('.'))).then_some(())
        })
        .with_context(|| format!("last output: {last}"))?;
    }
    let (code, out) = env.nslookup("no-such-service.default.svc.cluster.local")?;
    ensure!(code != 0, "an unknown service resolved: {out}");
    Ok(())
}

/// Upstream "should create endpoints for unready pods": with
/// `publishNotReadyAddresses` a never-Ready pod is an endpoint and serves
/// through the Service; without it, it is not.
fn unready_endpoints(env: &Env) -> anyhow::Result<()> {
    let pod = env
        .api
        .wait_pod("unready", "Running, not Ready", START, |p| {
            running(p) && condition_status(p, "Ready") == "False"
        })?;
    let ip = pod_ip(&pod).context("unready's IP")?;
    let plain = env.apply(&http_svc("unready-plain", "unready"))?;
    let svc = env.apply(&service(
        "default",
        "tolerate-unready",
        "unready",
        &json!({"publishNotReadyAddresses": true,
            "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}),
    ))?;
    env.wait_endpoints("tolerate-unready", &[ip])?;
    Env::reach_all(
        &env.client,
        SocketAddr::from((spec_ip(&svc)?, 80)),
        &["unready"],
    )?;
    env.wait_endpoints("unready-plain", &[])?;
    let plain_vip = SocketAddr::from((spec_ip(&plain)?, 80));
    Env::get_until(&env.client, plain_vip, "refused (no ready endpoint)", |r| {
        r.is_err()
    })?;
    let p = env
        .api
        .get("Pod", "default", "unready")
        .context("unready")?;
    ensure!(!ready(&p), "the never-ready pod became Ready");
    env.api.delete("Service", "default", "unready-plain")?;
    env.api.delete("Service", "default", "tolerate-unready")
}

fn allocated_node_port(s: &Value) -> anyhow::Result<u16> {
    let ports = node_ports(s);
    let [Some(np)] = ports.as_slice() else {
        bail!("want one allocated nodePort, have {ports:?}: {s}");
    };
    ensure!(
        (30000..=32767).contains(np),
        "nodePort {np} out of 30000-32767"
    );
    Ok(*np)
}

/// Every node answers `<node IP>:np` (both backends, from outside).
fn node_port_serves(env: &Env, np: u16) -> anyhow::Result<()> {
    for ip in &env.node_ips {
        Env::reach_all(
            &env.outside.netns(),
            SocketAddr::from((*ip, np)),
            &["pod1", "pod2"],
        )?;
    }
    Ok(())
}

/// No node answers `<node IP>:np` any more.
fn node_port_closed(env: &Env, np: u16) -> anyhow::Result<()> {
    for ip in &env.node_ips {
        Env::get_until(
            &env.outside.netns(),
            SocketAddr::from((*ip, np)),
            "no answer",
            Result::is_err,
        )?;
    }
    Ok(())
}

/// Upstream "should be able to create a functioning `NodePort` service".
fn functioning_node_port(env: &Env) -> anyhow::Result<()> {
    let svc = env.apply(&node_port_svc("nodeport-test", None))?;
    let np = allocated_node_port(&svc)?;
    node_port_serves(env, np)?;
    env.api.delete("Service", "default", "nodeport-test")
}

/// Upstream "should be able to change the type from `ClusterIP` to
/// `NodePort`" (and "... from `NodePort` to `ClusterIP`"): the `clusterIP` stays,
/// a `nodePort` is allocated and serves; back to `ClusterIP` it is released
/// (it stops answering, and another Service may claim it).
fn change_type(env: &Env) -> anyhow::Result<()> {
    let svc = env.apply(&http_svc("mutability-test", "conf"))?;
    let vip = spec_ip(&svc)?;
    ensure!(
        node_ports(&svc) == [None],
        "a ClusterIP service got a nodePort: {svc}"
    );
    let svc = env.apply(&node_port_svc("mutability-test", None))?;
    ensure!(
        spec_ip(&svc)? == vip,
        "the clusterIP changed with the type: {vip} → {svc}"
    );
    let np = allocated_node_port(&svc)?;
    node_port_serves(env, np)?;
    let svc = env.apply(&http_svc("mutability-test", "conf"))?;
    ensure!(
        spec_ip(&svc)? == vip && node_ports(&svc) == [None],
        "back to ClusterIP: {svc}"
    );
    node_port_closed(env, np)?;
    Env::reach_all(&env.client, SocketAddr::from((vip, 80)), &["pod1", "pod2"])?;
    env.apply(&node_port_svc("mutability-reuse", Some(np)))
        .context("claiming the released nodePort")?;
    env.api.delete("Service", "default", "mutability-reuse")?;
    env.api.delete("Service", "default", "mutability-test")
}

/// Upstream "should release `NodePorts` on delete": a deleted Service's
/// `nodePort` stops answering and can be given to a new Service.
fn release_on_delete(env: &Env) -> anyhow::Result<()> {
    let svc = env.apply(&node_port_svc("nodeport-reuse", None))?;
    let np = allocated_node_port(&svc)?;
    node_port_serves(env, np)?;
    env.api.delete("Service", "default", "nodeport-reuse")?;
    node_port_closed(env, np)?;
    let again = env.apply(&node_port_svc("nodeport-reuse", Some(np)))?;
    ensure!(
        node_ports(&again) == [Some(np)],
        "recreated with {np}: {again}"
    );
    node_port_serves(env, np)?;
    env.api.delete("Service", "default", "nodeport-reuse")
}

/// Upstream "should prevent `NodePort` collisions".
fn collisions(env: &Env) -> anyhow::Result<()> {
    let first = env.apply(&node_port_svc("nodeport-collision-1", None))?;
    let np = allocated_node_port(&first)?;
    let msg = env.refused(
        &node_port_svc("nodeport-collision-2", Some(np)),
        "spec.ports[0].nodePort",
    )?;
    ensure!(
        msg.contains(&np.to_string()),
        "the refusal does not name {np}: {msg}"
    );
    ensure!(
        env.api
            .not_found("Service", "default", "nodeport-collision-2"),
        "the refused service was stored"
    );
    env.api
        .delete("Service", "default", "nodeport-collision-1")?;
    let second = env.apply(&node_port_svc("nodeport-collision-2", Some(np)))?;
    ensure!(node_ports(&second) == [Some(np)], "{second}");
    env.api.delete("Service", "default", "nodeport-collision-2")
}

/// Upstream "should check `NodePort` out-of-range": an update to an
/// out-of-range `nodePort` is refused and changes nothing; so is a create.
fn out_of_range(env: &Env) -> anyhow::Result<()> {
    let svc = env.apply(&node_port_svc("nodeport-range-test", None))?;
    let np = allocated_node_port(&svc)?;
    for bad in [29_999, 32_768] {
        env.refused(
            &node_port_svc("nodeport-range-test", Some(bad)),
            "spec.ports[0].nodePort",
        )?;
        let now = env.svc("default", "nodeport-range-test")?;
        ensure!(
            node_ports(&now) == [Some(np)],
            "a refused update changed it: {now}"
        );
    }
    env.api
        .delete("Service", "default", "nodeport-range-test")?;
    env.refused(
        &node_port_svc("nodeport-range-test", Some(32_768)),
        "spec.ports[0].nodePort",
    )?;
    ensure!(
        env.api
            .not_found("Service", "default", "nodeport-range-test"),
        "an out-of-range service was stored"
    );
    Ok(())
}

/// Upstream "should be able to update service type to `NodePort` listening
/// on same port number but different protocols": a TCP/53 `ClusterIP`
/// Service becomes `NodePort` with TCP/53 and UDP/53; both get nodePorts
/// and serve (UDP replies come from `<node IP>:<`nodePort`>`). Then both
/// protocols share one `nodePort`.
fn same_port_tcp_udp(env: &Env, ip1: Ipv4Addr, ip2: Ipv4Addr) -> anyhow::Result<()> {
    let tcp = json!({"name": "tcp-port", "port": 53, "targetPort": 8080, "protocol": "TCP"});
    let udp = json!({"name": "udp-port", "port": 53, "targetPort": UDP_PORT, "protocol": "UDP"});
    env.apply(&service(
        "default",
        "nodeport-update-service",
        "conf",
        &json!({"ports": [tcp]}),
    ))?;
    let svc = env.apply(&service(
        "default",
        "nodeport-update-service",
        "conf",
        &json!({"type": "NodePort", "ports": [tcp, udp]}),
    ))?;
    let nps = node_ports(&svc);
    let [Some(tcp_np), Some(udp_np)] = nps.as_slice() else {
        bail!("want two nodePorts: {svc}");
    };
    env.wait_endpoints("nodeport-update-service", &[ip1, ip2])?;
    let pods: Vec<(String, PathBuf)> = ["pod1", "pod2"]
        .iter()
        .map(|p| {
            let o = env.api.get("Pod", "default", p).context("backend pod")?;
            let node = env
                .c
                .node_named(o["spec"]["nodeName"].as_str().unwrap_or_default())
                .context("pod's node")?;
            Ok((name(&o), node.pod_netns(&uid(&o))))
        })
        .collect::<anyhow::Result<_>>()?;
    let _udp = UdpBackends::start(&pods)?;
    let check = |tcp_np: u16, udp_np: u16| -> anyhow::Result<()> {
        node_port_serves(env, tcp_np)?;
        for ip in &env.node_ips {
            let to = SocketAddr::from((*ip, udp_np));
            let mut seen = BTreeSet::new();
            wait_for(&format!("UDP {to} answered by both"), PROGRAMMED, || {
                if let Ok((who, from)) = udp_ask(&env.outside.netns(), to)
                    && from == to
                {
                    seen.insert(who);
                }
                (seen.len() == 2).then_some(())
            })
            .with_context(|| format!("UDP answers: {seen:?}"))?;
        }
        Ok(())
    };
    check(*tcp_np, *udp_np)?;
    let shared = *tcp_np;
    let mut tcp = tcp;
    let mut udp = udp;
    tcp["nodePort"] = shared.into();
    udp["nodePort"] = shared.into();
    let svc = env.apply(&service(
        "default",
        "nodeport-update-service",
        "conf",
        &json!({"type": "NodePort", "ports": [tcp, udp]}),
    ))?;
    ensure!(
        node_ports(&svc) == [Some(shared), Some(shared)],
        "one nodePort for TCP and UDP: {svc}"
    );
    check(shared, shared)?;
    env.api
        .delete("Service", "default", "nodeport-update-service")
}

/// Upstream "should find a service from listing all namespaces".
fn list_all_namespaces(env: &Env) -> anyhow::Result<()> {
    let ns = "conf-other";
    env.apply(&json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}))?;
    env.apply(&service(
        ns,
        "find-me",
        "conf",
        &json!({"ports": [{"port": 80}]}),
    ))?;
    let all = env.api.list("Service", "", "")?;
    let found: Vec<(String, String)> = all
        .iter()
        .map(|s| {
            (
                s["metadata"]["namespace"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
                name(s),
            )
        })
        .collect();
    ensure!(
        found.contains(&(ns.into(), "find-me".into()))
            && found.contains(&("default".into(), "endpoint-test2".into())),
        "listing all namespaces: {found:?}"
    );
    let table = env.c.weirctl(&["get", "svc", "-A"])?;
    ensure!(
        table
            .lines()
            .any(|l| l.split_whitespace().take(2).eq([ns, "find-me"])),
        "weirctl get svc -A:\n{table}"
    );
    env.api.delete("Service", ns, "find-me")
}

/// Upstream "should delete a collection of services" (and the
/// `EndpointSlices` that belong to them go with them).
fn delete_collection(env: &Env) -> anyhow::Result<()> {
    let names = ["collection-a", "collection-b", "collection-c"];
    for n in names {
        let mut s = http_svc(n, "conf");
        s["metadata"]["labels"] = json!({"e2e-test-service": "collection"});
        env.apply(&s)?;
    }
    let sel = "e2e-test-service=collection";
    let listed = env.api.list("Service", "default", sel)?;
    ensure!(listed.len() == 3, "listed {} by {sel}", listed.len());
    for n in names {
        wait_for(&format!("slice {n}"), PROGRAMMED, || {
            env.api.get("EndpointSlice", "default", n)
        })?;
    }
    env.c.weirctl(&["delete", "svc", "-l", sel])?;
    ensure!(
        env.api.list("Service", "default", sel)?.is_empty(),
        "services left after the collection delete"
    );
    for n in names {
        wait_for(&format!("slice {n} gone"), PROGRAMMED, || {
            env.api
                .list(
                    "EndpointSlice",
                    "default",
                    &format!("kubernetes.io/service-name={n}"),
                )
                .ok()
                .filter(Vec::is_empty)
        })?;
    }
    ensure!(
        env.api
            .get("Service", "default", "endpoint-test2")
            .is_some(),
        "the collection delete took an unlabelled service"
    );
    Ok(())
}
