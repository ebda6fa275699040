//! Debian's real Prometheus scraping a weir node's agent every second, then
//! answering `PromQL` about a pod: the rate of a pod burning CPU agrees with
//! the agent's own per-second gauge, and the series carry the node,
//! namespace and pod labels and their types. Needs root and the
//! `prometheus` package (`cargo xtask setup`).
//!
//! TODO(lead): add the control's `/metrics` (`--metrics-listen`) as a second
//! scrape job once it is on main.

use std::{
    net::{SocketAddr, TcpListener},
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::Duration,
};

use anyhow::{Context as _, ensure};
use serde_json::Value;
use weir_tests::{Cluster, http_get, wait_for};

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
    /// Starts Prometheus scraping `targets` (job `weir-agent`) every second.
    fn start(tag: &str, targets: &[SocketAddr]) -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(format!("weir-prom-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let list: Vec<String> = targets.iter().map(|t| format!("'{t}'")).collect();
        let config = format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 900ms\nscrape_configs:\n- job_name: weir-agent\n  static_configs:\n  - targets: [{}]\n",
            list.join(", ")
        );
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

#[test]
fn prometheus_scrapes_the_agent_and_answers_promql_about_a_pod() -> anyhow::Result<()> {
    let mut cluster = Cluster::new("mp", 62, 1)?;
    let n = cluster.node(0);
    n.start_agent()?;
    n.apply("burn.yaml", BURN)?;
    n.wait_running("burn", START)?;
    let prom = Prometheus::start("mp", &[n.api()])?;

    wait_for("the agent's target up", Duration::from_secs(30), || {
        prom.query("up{job=\"weir-agent\"}")
            .ok()
            .and_then(|r| r.first().and_then(sample_value))
            .filter(|v| (*v - 1.0).abs() < f64::EPSILON)
    })
    .with_context(|| prom.log())?;

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
    Ok(())
}
