//! Cluster DNS end to end: two weir-agents in control mode, each answering
//! the cluster domain on its node IP (hickory-server) and sending the
//! conventional DNS service IP 10.96.0.10:53 there through its socket load
//! balancer; pods get `/etc/resolv.conf` with the Kubernetes search path.
//! busybox `nslookup` and `wget` inside client pods (run with `ctr tasks
//! exec`) are the observers. Needs root.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{Context as _, ensure};
use serde_json::Value;
use weir_tests::api::{Api, condition_status, ready_addresses, uid};
use weir_tests::{ControlCluster, wait_for};

/// Short heartbeats, so nodes are Ready soon.
const CONTROL_ARGS: &[&str] = &["--heartbeat-interval", "1s"];
/// How long pods may take to be scheduled, started and reported Ready.
const START: Duration = Duration::from_secs(90);
/// How long a service change may take to show in every node's answers.
const PROGRAMMED: Duration = Duration::from_secs(15);

/// `ClusterIP` Service `web`: TCP 80 → `http`.
const WEB_SVC: &str = r"apiVersion: v1
kind: Service
metadata:
  name: web
spec:
  selector: {app: web}
  ports:
  - {name: http, port: 80, targetPort: http, protocol: TCP}
";

/// Headless Service over the same pods.
const HEADLESS_SVC: &str = r"apiVersion: v1
kind: Service
metadata:
  name: web-pods
spec:
  clusterIP: None
  selector: {app: web}
  ports:
  - {name: http, port: 8080, targetPort: http, protocol: TCP}
";

/// A Service created late (and deleted) to see answers follow changes.
const LATE_SVC: &str = r"apiVersion: v1
kind: Service
metadata:
  name: late
spec:
  selector: {app: web}
  ports:
  - {name: http, port: 80, targetPort: http}
";

fn running_ready(p: &Value) -> bool {
    !p["metadata"]["deletionTimestamp"].is_string()
        && p["status"]["phase"] == "Running"
        && condition_status(p, "Ready") == "True"
        && p["status"]["podIP"].is_string()
}

/// Waits until exactly `n` pods match `selector`, all Running and Ready.
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

/// containerd's id of a pod's container (the first 6 bytes of
/// sha256(uid) in hex, `-`, the container name).
fn container_id(pod_uid: &str, container: &str) -> anyhow::Result<String> {
    let out = weir_tests::sh("sh", &["-c", &format!("printf %s {pod_uid} | sha256sum")])?;
    let hex = out.get(..12).context("sha256sum output")?;
    Ok(format!("{hex}-{container}"))
}

/// A client pod: where to exec in it.
struct Client {
    node: String,
    containerd_ns: String,
    cid: String,
}

static EXEC: AtomicUsize = AtomicUsize::new(0);

impl Client {
    /// Runs `script` with `sh -c` in the client's container; (exit code,
    /// stdout+stderr).
    fn run(&self, c: &ControlCluster, script: &str) -> anyhow::Result<(i32, String)> {
        let id = format!("dns-{}", EXEC.fetch_add(1, Ordering::Relaxed));
        let wrapped = format!("({script}) 2>&1; echo \"rc=$?\"");
        let out = c.cluster.containerd.ctr(
            &self.containerd_ns,
            &[
                "tasks",
                "exec",
                "--exec-id",
                &id,
                &self.cid,
                "sh",
                "-c",
                &wrapped,
            ],
        )?;
        let (body, rc) = out
            .trim_end()
            .rsplit_once("rc=")
            .with_context(|| format!("no exit code in {out:?}"))?;
        Ok((rc.trim().parse()?, body.to_owned()))
    }

    /// `nslookup name` until `ok(code, output)` holds (the zone follows the
    /// store within [`PROGRAMMED`]); the last output.
    fn lookup_until(
        &self,
        c: &ControlCluster,
        name: &str,
        what: &str,
        ok: impl Fn(i32, &str) -> bool,
    ) -> anyhow::Result<String> {
        let mut last = String::new();
        let got = wait_for(&format!("{what} from {}", self.node), PROGRAMMED, || {
            let (code, out) = self.run(c, &format!("nslookup {name}")).ok()?;
            let pass = ok(code, &out);
            last.clone_from(&out);
            pass.then_some(out)
        });
        got.with_context(|| format!("last nslookup {name} output: {last}"))
    }
}

/// The `A` addresses an nslookup printed after its answer header (the
/// server's own address comes before it).
fn answered(out: &str) -> BTreeSet<Ipv4Addr> {
    let Some((_, answers)) = out.split_once("Name:") else {
        return BTreeSet::new();
    };
    answers
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Address:"))
        .filter_map(|a| a.trim().parse().ok())
        .collect()
}

fn clients(c: &ControlCluster, api: &Api) -> anyhow::Result<Vec<Client>> {
    let pods = wait_settled(api, "app=client", c.cluster.nodes.len())?;
    pods.iter()
        .map(|p| {
            let node = p["spec"]["nodeName"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            let containerd_ns = c
                .node_named(&node)
                .with_context(|| format!("client on unknown node {node}"))?
                .containerd_ns();
            Ok(Client {
                cid: container_id(&uid(p), "c")?,
                node,
                containerd_ns,
            })
        })
        .collect()
}

/// A raw DNS question (id 0x5157, recursion desired) of type `qtype`.
fn raw_query(name: &str, qtype: u16) -> Vec<u8> {
    let mut q = vec![0x51, 0x57, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    for l in name.split('.') {
        q.push(u8::try_from(l.len()).unwrap_or(63));
        q.extend_from_slice(l.as_bytes());
    }
    q.push(0);
    q.extend_from_slice(&qtype.to_be_bytes());
    q.extend_from_slice(&[0, 1]);
    q
}

/// Asks the node's DNS server at `server` (from the host, over UDP);
/// (rcode, answer count, authority count, the whole response).
fn ask(server: Ipv4Addr, name: &str, qtype: u16) -> anyhow::Result<(u8, u16, u16, Vec<u8>)> {
    let s = std::net::UdpSocket::bind("0.0.0.0:0")?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    s.send_to(&raw_query(name, qtype), (server, 53))?;
    let mut buf = [0u8; 1500];
    let n = s.recv(&mut buf)?;
    let m = buf[..n].to_vec();
    ensure!(n >= 12 && m[..2] == [0x51, 0x57], "not our answer: {m:?}");
    let count = |i: usize| u16::from_be_bytes([m[i], m[i + 1]]);
    Ok((m[3] & 0x0f, count(6), count(8), m))
}

/// NXDOMAIN and NODATA answers from each node's server carry the zone's
/// SOA (RFC 2308; the names `CoreDNS` uses, minimum 5 s); a positive answer none.
fn negative_answers_carry_the_soa(c: &ControlCluster) -> anyhow::Result<()> {
    for n in &c.cluster.nodes {
        for (name, qtype, rcode) in [
            ("nope.default.svc.cluster.local", 1, 3),
            ("web.default.svc.cluster.local", 28, 0),
        ] {
            let (code, answers, authorities, m) = ask(n.ip, name, qtype)?;
            ensure!(
                (code, answers, authorities) == (rcode, 0, 1),
                "{name} type {qtype} from {}: rcode {code}, {answers} answers, {authorities} authorities",
                n.name
            );
            let hostmaster = b"\x0ahostmaster";
            ensure!(
                m.windows(hostmaster.len()).any(|w| w == hostmaster),
                "no hostmaster SOA in {m:?}"
            );
            // The SOA is the last record: its last field is the minimum.
            ensure!(
                m.ends_with(&5u32.to_be_bytes()),
                "SOA minimum is not 5: {m:?}"
            );
        }
        let (code, answers, authorities, _) = ask(n.ip, "web.default.svc.cluster.local", 1)?;
        ensure!(
            (code, answers, authorities) == (0, 1, 0),
            "web A from {}: rcode {code}, {answers} answers, {authorities} authorities",
            n.name
        );
    }
    Ok(())
}

fn cluster_ip(api: &Api, svc: &str) -> anyhow::Result<Ipv4Addr> {
    let s = wait_for(&format!("service {svc}"), Duration::from_secs(10), || {
        api.get("Service", "default", svc)
    })?;
    let ip = s["spec"]["clusterIP"]
        .as_str()
        .with_context(|| format!("{svc} has no clusterIP: {s}"))?;
    Ok(ip.parse()?)
}

#[test]
fn pods_resolve_services_by_name() -> anyhow::Result<()> {
    let mut c = ControlCluster::new("dn", 59, 2, CONTROL_ARGS)?;
    c.start_agents()?;
    let api = Api::connect(&c.control.url())?;
    api.wait_nodes_ready(&c.node_names())?;
    c.weirctl_apply(weir_tests::CLIENT_DS)?;
    c.weirctl_apply(&weir_tests::web_deployment(2))?;
    c.weirctl_apply(WEB_SVC)?;
    c.weirctl_apply(HEADLESS_SVC)?;
    let clients = clients(&c, &api)?;
    let web = wait_settled(&api, "app=web", 2)?;
    let web_ips: BTreeSet<Ipv4Addr> = web
        .iter()
        .filter_map(|p| p["status"]["podIP"].as_str()?.parse().ok())
        .collect();
    let web_names: BTreeSet<String> = web
        .iter()
        .filter_map(|p| p["metadata"]["name"].as_str().map(str::to_owned))
        .collect();
    let vip = cluster_ip(&api, "web")?;
    let want: Vec<String> = web_ips.iter().map(ToString::to_string).collect();
    wait_for("slice web-pods ready", Duration::from_secs(30), || {
        api.get("EndpointSlice", "default", "web-pods")
            .filter(|s| ready_addresses(s) == want)
    })?;

    for cl in &clients {
        let (_, resolv) = cl.run(&c, "cat /etc/resolv.conf")?;
        ensure!(
            resolv.contains("nameserver 10.96.0.10")
                && resolv
                    .contains("search default.svc.cluster.local svc.cluster.local cluster.local")
                && resolv.contains("options ndots:5"),
            "resolv.conf on {}: {resolv}",
            cl.node
        );

        let out = cl.lookup_until(
            &c,
            "web.default.svc.cluster.local",
            "web's ClusterIP",
            |code, out| code == 0 && answered(out) == BTreeSet::from([vip]),
        )?;
        eprintln!("{}: {out}", cl.node);

        // The search path makes `web` the service; wget goes through the VIP.
        let (code, body) = cl.run(&c, "timeout 10 wget -qO- http://web/")?;
        ensure!(
            code == 0 && web_names.contains(body.trim()),
            "wget http://web/ from {}: rc {code}, {body:?} (backends {web_names:?})",
            cl.node
        );

        cl.lookup_until(
            &c,
            "web-pods.default.svc.cluster.local",
            "the headless service's pod IPs",
            |code, out| code == 0 && answered(out) == web_ips,
        )?;

        let out = cl.lookup_until(
            &c,
            "nope.default.svc.cluster.local",
            "NXDOMAIN for an unknown service",
            |code, out| code != 0 && out.contains("NXDOMAIN"),
        )?;
        ensure!(answered(&out).is_empty(), "unknown name answered: {out}");

        let out = cl.lookup_until(
            &c,
            "example.com",
            "a refusal for a name outside the cluster domain",
            |code, out| code != 0 && out.contains("REFUSED"),
        )?;
        ensure!(
            answered(&out).is_empty(),
            "outside name answered (forwarded?): {out}"
        );
    }

    negative_answers_carry_the_soa(&c)?;

    // Answers follow the service table: a new service resolves, a deleted
    // one stops resolving, on every node.
    c.weirctl_apply(LATE_SVC)?;
    let late = cluster_ip(&api, "late")?;
    for cl in &clients {
        cl.lookup_until(
            &c,
            "late.default.svc.cluster.local",
            "a new service",
            |code, out| code == 0 && answered(out) == BTreeSet::from([late]),
        )?;
    }
    api.delete("Service", "default", "late")?;
    for cl in &clients {
        cl.lookup_until(
            &c,
            "late.default.svc.cluster.local",
            "a deleted service gone",
            |code, out| code != 0 && out.contains("NXDOMAIN"),
        )?;
    }
    Ok(())
}
