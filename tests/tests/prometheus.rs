//! Debian's real Prometheus scraping a weir cluster every second — the
//! node's agent and weir-control (`--metrics-listen`) — then answering
//! `PromQL` about a pod: the rate of a pod burning CPU agrees with the
//! agent's own per-second gauge, the series carry the node, namespace and
//! pod labels and their types, and the control's series count the pod and
//! the node's metric reports. The same pod read back through the control's
//! gRPC Metrics service (`weirctl top pods|nodes`) burns about a core.
//! Needs root and the `prometheus` package (`cargo xtask setup`).

use std::{
    fmt::Write as _,
    net::{SocketAddr, TcpListener},
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::Duration,
};

use anyhow::{Context as _, ensure};
use serde_json::Value;
use weir_tests::api::Api;
use weir_tests::{ControlCluster, http_get, wait_for};

const START: Duration = Duration::from_mins(1);

const BURN: &str = r#"apiVersion: v1
kind: Pod
metadata:
  name: burn
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: burn
    image: busybox
    command: ["sh", "-c", "while :; do :; done"]
"#;

/// A Prometheus server with its own config and storage, killed (and its
/// directory removed) on drop.
struct Prometheus {
    child: Child,
    dir: PathBuf,
    addr: SocketAddr,
}

impl Prometheus {
    /// Starts Prometheus scraping every second each `(job, targets)`.
    fn start(tag: &str, jobs: &[(&str, &[SocketAddr])]) -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(format!("weir-prom-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let mut config =
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 900ms\nscrape_configs:\n".to_owned();
        for (job, targets) in jobs {
            let list: Vec<String> = targets.iter().map(|t| format!("'{t}'")).collect();
            let _ = write!(
                config,
                "- job_name: {job}\n  static_configs:\n  - targets: [{}]\n",
                list.join(", ")
            );
        }
        std::fs::write(dir.join("prometheus.yml"), config)?;
        // A free loopback port.
        let addr = TcpListener::bind("127.0.0.1:0")?.local_addr()?;
        let log = std::fs::File::create(dir.join("prometheus.log"))?;
        let child = Command::new("prometheus")
            .arg(format!(
                "--config.file={}",
                dir.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("start prometheus (apt-get install prometheus, or cargo xtask setup)")?;
        let p = Self { child, dir, addr };
        wait_for("prometheus ready", Duration::from_secs(30), || {
            http_get(p.addr, "/-/ready", Duration::from_secs(1))
                .ok()
                .filter(|r| r.0 == 200)
        })
        .with_context(|| p.log())?;
        Ok(p)
    }

    fn log(&self) -> String {
        weir_tests::tail(
            &std::fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default(),
            20,
        )
    }

    /// The result vector of an instant `PromQL` query.
    fn query(&self, promql: &str) -> anyhow::Result<Vec<Value>> {
        let (code, body) = http_get(
            self.addr,
            &format!("/api/v1/query?query={}", encode(promql)),
            Duration::from_secs(5),
        )?;
        ensure!(code == 200, "query {promql}: HTTP {code}: {body}");
        let v: Value = serde_json::from_str(&body)?;
        Ok(v["data"]["result"].as_array().cloned().unwrap_or_default())
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Percent-encodes a query parameter.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The number in an instant-vector sample (`"value": [ts, "1.23"]`).
fn sample_value(v: &Value) -> Option<f64> {
    v["value"][1].as_str()?.parse().ok()
}

/// The agent's own gauge for `pod` in its metrics text.
fn agent_gauge(metrics: &str, name: &str, pod: &str) -> Option<f64> {
    metrics
        .lines()
        .find(|l| l.starts_with(&format!("{name}{{")) && l.contains(&format!("pod=\"{pod}\"")))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// `up` of `job`'s first target is 1.
fn target_up(prom: &Prometheus, job: &str) -> anyhow::Result<f64> {
    wait_for(
        &format!("the {job} target up"),
        Duration::from_secs(30),
        || {
            prom.query(&format!("up{{job=\"{job}\"}}"))
                .ok()
                .and_then(|r| r.first().and_then(sample_value))
                .filter(|v| (*v - 1.0).abs() < f64::EPSILON)
        },
    )
    .with_context(|| prom.log())
}

/// The CPU column (millicores) of `name`'s row in a `weirctl top` table.
fn top_millicores(table: &str, name: &str) -> Option<f64> {
    table
        .lines()
        .find(|l| l.split_whitespace().any(|w| w == name))?
        .split_whitespace()
        .find_map(|w| w.strip_suffix('m')?.parse().ok())
}

#[test]
fn prometheus_scrapes_agent_and_control_and_answers_promql_about_a_pod() -> anyhow::Result<()> {
    let mut c = ControlCluster::new(
        "mp",
        62,
        1,
        &[
            "--heartbeat-interval",
            "1s",
            "--metrics-listen",
            "10.250.62.1:7449",
        ],
    )?;
    c.start_agents()?;
    let r = scrape_and_query(&c);
    r.map_err(|e| e.context(c.log_tails(30)))
}

#[expect(clippy::too_many_lines, reason = "one scenario, read top to bottom")]
fn scrape_and_query(c: &ControlCluster) -> anyhow::Result<()> {
    let api = Api::connect(&c.control.url())?;
    c.weirctl_apply(BURN)?;
    api.wait_running("burn", START)?;
    let n = c.cluster.nodes.first().context("a node")?;
    let prom = Prometheus::start(
        "mp",
        &[
            ("weir-agent", &[n.api()]),
            ("weir-control", &[c.control.metrics_addr]),
        ],
    )?;
    target_up(&prom, "weir-agent")?;
    target_up(&prom, "weir-control")?;

    let rate_q = "rate(weir_pod_cpu_usage_seconds_total{pod=\"burn\"}[5s])";
    let result = wait_for("a CPU rate for burn", Duration::from_secs(30), || {
        prom.query(rate_q).ok().filter(|r| !r.is_empty())
    })
    .with_context(|| prom.log())?;
    ensure!(result.len() == 1, "one series for burn: {result:?}");
    let labels = &result[0]["metric"];
    ensure!(
        labels["node"] == n.name.as_str()
            && labels["namespace"] == "default"
            && labels["pod"] == "burn",
        "node, namespace and pod labels: {labels}"
    );
    // Let the 5 s range fill with scrapes first.
    std::thread::sleep(Duration::from_secs(6));
    // Compare the PromQL rate with the agent's own 1 s gauge a few times
    // (both follow what the kernel gives the loop).
    let mut pairs = Vec::new();
    for _ in 0..5 {
        std::thread::sleep(Duration::from_secs(1));
        let from_prom = prom
            .query(rate_q)?
            .first()
            .and_then(sample_value)
            .context("rate")?;
        let from_agent =
            agent_gauge(&n.metrics()?, "weir_pod_cpu_cores", "burn").context("gauge")?;
        pairs.push((from_prom, from_agent));
    }
    #[expect(clippy::cast_precision_loss, reason = "five readings")]
    let (promql, agent) = (
        pairs.iter().map(|x| x.0).sum::<f64>() / pairs.len() as f64,
        pairs.iter().map(|x| x.1).sum::<f64>() / pairs.len() as f64,
    );
    eprintln!("burn: PromQL rate {promql:.3}, agent gauge {agent:.3} ({pairs:?})");
    ensure!(
        (0.5..=1.3).contains(&promql),
        "about one core: {rate_q} = {promql}"
    );
    ensure!(
        (0.8..=1.2).contains(&(promql / agent)),
        "PromQL {promql} vs the agent's weir_pod_cpu_cores {agent}"
    );

    // Types as Prometheus understood them.
    let (code, body) = http_get(
        prom.addr,
        // OpenMetrics names a counter family without `_total`.
        "/api/v1/metadata?metric=weir_pod_cpu_usage_seconds",
        Duration::from_secs(5),
    )?;
    ensure!(code == 200, "metadata: {body}");
    let meta: Value = serde_json::from_str(&body)?;
    let kinds = meta["data"]
        .as_object()
        .and_then(|m| m.values().next())
        .and_then(Value::as_array)
        .and_then(|a| a.first())
        .map(|m| m["type"].clone());
    ensure!(
        kinds == Some(Value::from("counter")),
        "weir_pod_cpu_usage_seconds(_total) is a counter: {body}"
    );
    let sum = prom.query("sum by (node) (weir_pod_memory_working_set_bytes)")?;
    ensure!(
        sum.first().and_then(sample_value).is_some_and(|v| v > 0.0),
        "memory working set summed by node: {sum:?}"
    );

    // The control's series: the pod is stored, and the node's agent
    // reports its samples (about one a second).
    let pods = prom.query("weir_control_objects{kind=\"Pod\"}")?;
    ensure!(
        pods.first().and_then(sample_value) == Some(1.0),
        "weir_control_objects{{kind=\"Pod\"}}: {pods:?}"
    );
    let reports_q = format!(
        "rate(weir_control_metrics_reports_total{{node=\"{}\"}}[5s])",
        n.name
    );
    let reports = prom.query(&reports_q)?;
    ensure!(
        reports
            .first()
            .and_then(sample_value)
            .is_some_and(|v| (0.5..=2.0).contains(&v)),
        "{reports_q}: {reports:?}"
    );

    // The same pod through the control's gRPC Metrics service.
    let top = c.weirctl(&["top", "pods"])?;
    let milli =
        top_millicores(&top, "burn").with_context(|| format!("weirctl top pods:\n{top}"))?;
    ensure!(
        (500.0..=1300.0).contains(&milli),
        "burn uses about a core: {milli}m\n{top}"
    );
    let nodes = c.weirctl(&["top", "nodes"])?;
    let node_milli =
        top_millicores(&nodes, &n.name).with_context(|| format!("weirctl top nodes:\n{nodes}"))?;
    ensure!(
        node_milli >= milli * 0.8,
        "the node's CPU {node_milli}m holds the pod's {milli}m\n{nodes}"
    );
    Ok(())
}
