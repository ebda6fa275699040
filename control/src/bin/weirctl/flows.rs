//! `weirctl flows [-f] [--namespace N] [--pod P] [--verdict allowed|denied]
//! [--port N] [--node N] [-o json]`: the flow records of every node's agent
//! (`GET http://<node InternalIP>:<agent port>/flows?...`, JSON lines),
//! printed like `hubble observe`:
//!
//! ```text
//! Nov 25 19:30:01.123 [node-1]: x/a:40000 (ID:300) -> y/b:80 (ID:1000) TCP SYN ingress DENIED (POLICY_DENIED_INGRESS) by default-deny of y/deny-all, y/allow-z
//! Nov 25 19:30:02.456 [node-1]: x/a:40001 (ID:300) -> y/b:80 (ID:1000) via service 10.96.0.20:80 TCP SYN egress ALLOWED by policy y/allow-x
//! ```

use std::fmt::Write as _;

use anyhow::{Context as _, bail};
use serde::Deserialize;
use tokio::io::{
    AsyncBufRead, AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader,
};

use crate::client::Api;
use crate::printers::node_address;
use crate::resource::Resource;

/// The command line of `flows`.
#[derive(clap::Args, Debug)]
pub struct FlowArgs {
    /// Keep streaming new flows.
    #[arg(short, long)]
    follow: bool,
    /// Either end is this pod (NAME, or NAMESPACE/NAME).
    #[arg(long)]
    pod: Option<String>,
    /// Only allowed or only denied flows.
    #[arg(long, value_parser = ["allowed", "denied"])]
    verdict: Option<String>,
    /// Either port (or the service port) is this one.
    #[arg(long)]
    port: Option<u16>,
    /// Only this node's flows.
    #[arg(long)]
    node: Option<String>,
    /// Output format: json (the agents' JSON lines).
    #[arg(short, long, value_parser = ["json"])]
    output: Option<String>,
    /// Past flows per node to show first (default 20; 0 with -f).
    #[arg(long)]
    last: Option<usize>,
    /// The agents' HTTP port.
    #[arg(long, default_value_t = 10250)]
    agent_port: u16,
}

impl FlowArgs {
    /// The options, with the global `-n` as the namespace filter.
    pub fn options(self, namespace: Option<String>) -> FlowOptions {
        FlowOptions {
            follow: self.follow,
            namespace,
            pod: self.pod,
            verdict: self.verdict,
            port: self.port,
            node: self.node,
            json: self.output.is_some(),
            last: self.last,
            agent_port: self.agent_port,
        }
    }
}

/// Options of `flows`.
#[derive(Debug, Clone, Default)]
pub struct FlowOptions {
    /// `-f`: keep streaming new flows.
    pub follow: bool,
    /// Either end is a pod of this namespace.
    pub namespace: Option<String>,
    /// Either end is this pod (`NAME` or `NAMESPACE/NAME`).
    pub pod: Option<String>,
    /// `allowed` or `denied`.
    pub verdict: Option<String>,
    /// Either port (or the service port).
    pub port: Option<u16>,
    /// Only this node's agent.
    pub node: Option<String>,
    /// `-o json`: the agents' JSON lines as they are.
    pub json: bool,
    /// How many past flows each agent sends (default 20 without -f, 0 with).
    pub last: Option<usize>,
    /// The agents' HTTP port.
    pub agent_port: u16,
}

/// One end of a flow, as the agent serves it.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct Peer {
    /// Address.
    pub ip: String,
    /// Port.
    pub port: u16,
    /// Security identity.
    pub identity: u32,
    /// The pod's namespace, if known.
    pub namespace: Option<String>,
    /// The pod's name, if known.
    pub pod: Option<String>,
}

/// The service the client connected to.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct Service {
    /// VIP.
    pub ip: String,
    /// Service port.
    pub port: u16,
}

/// A flow, as the agent serves it (one JSON object per line).
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(default, rename_all = "camelCase")]
pub struct Flow {
    /// RFC 3339.
    pub time: String,
    /// The agent's node.
    pub node: String,
    /// `ALLOWED` / `DENIED`.
    pub verdict: String,
    /// Why it was dropped.
    pub drop_reason: Option<String>,
    /// `ingress` / `egress` of the endpoint pod.
    pub direction: String,
    /// `TCP`, `UDP`, `ICMP`...
    pub protocol: String,
    /// Sender.
    pub source: Peer,
    /// Receiver.
    pub destination: Peer,
    /// The service VIP the socket LB translated.
    pub service: Option<Service>,
    /// The allowing policy.
    pub policy: Option<String>,
    /// A policy denial's isolating policies.
    pub policies: Vec<String>,
    /// TCP flags.
    pub tcp_flags: String,
    /// Denials folded into this record.
    pub suppressed: u32,
    /// `unenforced`, `untracked`.
    pub flags: Vec<String>,
}

/// The agent's query path for `o`.
pub fn query_path(o: &FlowOptions) -> anyhow::Result<String> {
    let mut q = vec![];
    let (ns, pod) = match o.pod.as_deref().and_then(|p| p.split_once('/')) {
        Some((ns, pod)) => (Some(ns), Some(pod)),
        None => (o.namespace.as_deref(), o.pod.as_deref()),
    };
    for (key, value) in [("namespace", ns), ("pod", pod)] {
        if let Some(v) = value.filter(|v| !v.is_empty()) {
            q.push(format!("{key}={}", encode(v)));
        }
    }
    if let Some(v) = &o.verdict {
        match v.to_ascii_lowercase().as_str() {
            "allowed" | "denied" => q.push(format!("verdict={}", v.to_ascii_lowercase())),
            _ => bail!("invalid verdict {v:?}: use allowed or denied"),
        }
    }
    if let Some(p) = o.port {
        q.push(format!("port={p}"));
    }
    let last = o.last.unwrap_or(if o.follow { 0 } else { 20 });
    q.push(format!("limit={last}"));
    if o.follow {
        q.push("follow=true".to_owned());
    }
    Ok(format!("/flows?{}", q.join("&")))
}

/// Percent-encodes a query value (names are DNS labels; be safe anyway).
fn encode(v: &str) -> String {
    v.bytes().fold(String::new(), |mut s, b| {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            s.push(char::from(b));
        } else {
            let _ = write!(s, "%{b:02X}");
        }
        s
    })
}

/// How an identity is named when the address is not a known pod.
pub fn identity_name(id: u32) -> Option<&'static str> {
    match id {
        1 => Some("host"),
        2 => Some("world"),
        3 => Some("remote-node"),
        id if id >= 1 << 24 => Some("cidr"),
        _ => None,
    }
}

fn peer_text(p: &Peer) -> String {
    let who = match (&p.namespace, &p.pod) {
        (Some(ns), Some(pod)) => format!("{ns}/{pod}"),
        _ => p.ip.clone(),
    };
    let port = if p.port == 0 {
        String::new()
    } else {
        format!(":{}", p.port)
    };
    let id = match identity_name(p.identity) {
        Some(name) => format!(" ({name})"),
        None if p.identity != 0 => format!(" (ID:{})", p.identity),
        None => String::new(),
    };
    format!("{who}{port}{id}")
}

/// `Nov 25 19:30:01.123` of an RFC 3339 time (as is if it doesn't parse).
fn short_time(t: &str) -> String {
    t.parse::<k8s_openapi::jiff::Timestamp>().map_or_else(
        |_| t.to_owned(),
        |ts| ts.strftime("%b %d %H:%M:%S%.3f").to_string(),
    )
}

/// One flow as `hubble observe` prints it.
pub fn format_flow(f: &Flow) -> String {
    let mut line = format!(
        "{} [{}]: {} -> {}",
        short_time(&f.time),
        f.node,
        peer_text(&f.source),
        peer_text(&f.destination)
    );
    if let Some(s) = &f.service {
        let _ = write!(line, " via service {}:{}", s.ip, s.port);
    }
    for part in [&f.protocol, &f.tcp_flags, &f.direction, &f.verdict] {
        if !part.is_empty() {
            line.push(' ');
            line.push_str(part);
        }
    }
    if let Some(r) = &f.drop_reason {
        let _ = write!(line, " ({r})");
    }
    match &f.policy {
        _ if !f.policies.is_empty() => {
            let _ = write!(line, " by default-deny of {}", f.policies.join(", "));
        }
        Some(p) => {
            let _ = write!(line, " by policy {p}");
        }
        None if f
            .flags
            .iter()
            .any(|x| x == "unenforced" || x == "untracked") =>
        {
            line.push_str(" (no policy)");
        }
        None => {}
    }
    if f.suppressed > 0 {
        let _ = write!(line, " (+{} more)", f.suppressed);
    }
    line
}

/// What to print for one JSON line: itself with `-o json`, else the
/// formatted flow (None for a line that is not a flow).
pub fn render_line(line: &str, json: bool) -> Option<String> {
    let line = line.trim();
    if line.is_empty() {
        return None;
    }
    if json {
        return Some(line.to_owned());
    }
    serde_json::from_str::<Flow>(line)
        .ok()
        .map(|f| format_flow(&f))
}

/// The agents to ask: (node name, host:port).
async fn agents(api: &Api, o: &FlowOptions) -> anyhow::Result<Vec<(String, String)>> {
    let nodes = match &o.node {
        Some(n) => vec![api.get(Resource::Node, "", n).await?],
        None => api.list(Resource::Node, "", "").await?.0,
    };
    let mut out = Vec::new();
    for node in &nodes {
        let name = node["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let Some(ip) = node_address(node, "InternalIP") else {
            eprintln!("warning: node {name} has no InternalIP address: its flows are not shown");
            continue;
        };
        out.push((name, format!("{ip}:{}", o.agent_port)));
    }
    if out.is_empty() {
        bail!("no node to read flows from");
    }
    Ok(out)
}

/// Runs `flows`.
pub async fn run(api: &Api, o: &FlowOptions) -> anyhow::Result<()> {
    let path = query_path(o)?;
    let agents = agents(api, o).await?;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    let mut tasks = tokio::task::JoinSet::new();
    for (node, host) in agents {
        let (tx, path) = (tx.clone(), path.clone());
        tasks.spawn(async move {
            if let Err(e) = stream(&host, &path, &tx).await {
                eprintln!("warning: flows of node {node} ({host}): {e:#}");
            }
        });
    }
    drop(tx);
    if o.follow {
        while let Some(line) = rx.recv().await {
            if let Some(out) = render_line(&line, o.json) {
                println!("{out}");
            }
        }
        return Ok(());
    }
    // Past flows of all nodes, in time order.
    let mut lines: Vec<(String, String)> = Vec::new();
    while let Some(line) = rx.recv().await {
        let time = serde_json::from_str::<Flow>(&line)
            .map(|f| f.time)
            .unwrap_or_default();
        lines.push((time, line));
    }
    lines.sort();
    for (_, line) in lines {
        if let Some(out) = render_line(&line, o.json) {
            println!("{out}");
        }
    }
    Ok(())
}

/// Sends each body line of `GET path` on `host` to `tx`.
async fn stream(
    host: &str,
    path: &str,
    tx: &tokio::sync::mpsc::UnboundedSender<String>,
) -> anyhow::Result<()> {
    let conn = tokio::net::TcpStream::connect(host)
        .await
        .with_context(|| format!("connect to the agent at {host}"))?;
    let mut r = BufReader::new(conn);
    r.get_mut()
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .context("send the flows request")?;
    let (code, chunked) = read_head(&mut r).await?;
    let mut body = Lines::default();
    if code != 200 {
        let mut text = Vec::new();
        read_body(&mut r, chunked, |b| text.extend_from_slice(b)).await?;
        bail!("HTTP {code}: {}", String::from_utf8_lossy(&text).trim());
    }
    read_body(&mut r, chunked, |b| {
        for line in body.push(b) {
            // The printer only goes away when weirctl ends.
            let _ = tx.send(line);
        }
    })
    .await
}

/// Splits a byte stream into lines.
#[derive(Default)]
struct Lines(Vec<u8>);

impl Lines {
    fn push(&mut self, b: &[u8]) -> Vec<String> {
        self.0.extend_from_slice(b);
        let mut out = Vec::new();
        while let Some(i) = self.0.iter().position(|c| *c == b'\n') {
            let line: Vec<u8> = self.0.drain(..=i).collect();
            out.push(String::from_utf8_lossy(&line).trim_end().to_owned());
        }
        out
    }
}

/// Reads the status line and headers: (status code, chunked).
pub async fn read_head<R: AsyncBufRead + Unpin>(r: &mut R) -> anyhow::Result<(u16, bool)> {
    let mut line = String::new();
    r.read_line(&mut line)
        .await
        .context("read the agent's response")?;
    let code = line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("the agent's response is not HTTP: {line:?}"))?;
    let mut chunked = false;
    loop {
        line.clear();
        if r.read_line(&mut line).await? == 0 || line.trim().is_empty() {
            break;
        }
        let lower = line.to_ascii_lowercase();
        if lower.starts_with("transfer-encoding:") && lower.contains("chunked") {
            chunked = true;
        }
    }
    Ok((code, chunked))
}

/// Hands the body to `f` as it arrives (chunked or until EOF).
pub async fn read_body<R: AsyncBufRead + Unpin>(
    r: &mut R,
    chunked: bool,
    mut f: impl FnMut(&[u8]),
) -> anyhow::Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    if !chunked {
        loop {
            let n = r.read(&mut buf).await?;
            if n == 0 {
                return Ok(());
            }
            f(&buf[..n]);
        }
    }
    let mut line = String::new();
    loop {
        line.clear();
        if r.read_line(&mut line).await? == 0 {
            return Ok(());
        }
        let size_text = line.trim().split(';').next().unwrap_or_default();
        let mut size = usize::from_str_radix(size_text, 16)
            .with_context(|| format!("bad chunk size {size_text:?} from the agent"))?;
        if size == 0 {
            return Ok(());
        }
        while size > 0 {
            let want = size.min(buf.len());
            let n = r.read(&mut buf[..want]).await?;
            if n == 0 {
                return Ok(());
            }
            f(&buf[..n]);
            size -= n;
        }
        line.clear();
        r.read_line(&mut line).await?; // the CRLF after the chunk
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DENIED: &str = r#"{"time":"2026-11-25T19:30:01.123456789Z","node":"n1","verdict":"DENIED","dropReason":"POLICY_DENIED_INGRESS","direction":"ingress","protocol":"TCP","source":{"ip":"10.244.2.9","port":40000,"identity":300,"namespace":"x","pod":"a"},"destination":{"ip":"10.244.1.5","port":80,"identity":1000,"namespace":"y","pod":"b"},"rule":0,"tcpFlags":"SYN","suppressed":2}"#;
    const ALLOWED: &str = r#"{"time":"2026-11-25T19:30:02.456Z","node":"n2","verdict":"ALLOWED","direction":"egress","protocol":"TCP","source":{"ip":"10.244.2.9","port":40001,"identity":300,"namespace":"x","pod":"a"},"destination":{"ip":"10.244.1.5","port":8080,"identity":1000,"namespace":"y","pod":"b"},"service":{"ip":"10.96.0.20","port":80},"policy":"x/allow-egress","rule":3,"tcpFlags":"SYN"}"#;
    const DENIED_BY: &str = r#"{"time":"2026-11-25T19:30:04Z","node":"n1","verdict":"DENIED","dropReason":"POLICY_DENIED_INGRESS","direction":"ingress","protocol":"TCP","source":{"ip":"10.244.2.9","port":40000,"identity":300,"namespace":"x","pod":"a"},"destination":{"ip":"10.244.1.5","port":80,"identity":1000,"namespace":"y","pod":"b"},"policies":["y/deny-all","y/allow-z"],"rule":0,"tcpFlags":"SYN"}"#;
    const WORLD: &str = r#"{"time":"2026-11-25T19:30:03Z","node":"n1","verdict":"ALLOWED","direction":"egress","protocol":"UDP","source":{"ip":"10.244.2.9","port":5353,"identity":300,"namespace":"x","pod":"a"},"destination":{"ip":"192.0.2.7","port":53,"identity":2},"rule":0,"flags":["unenforced"]}"#;

    #[test]
    fn flows_print_like_hubble_observe() {
        assert_eq!(
            render_line(DENIED, false).expect("a flow"),
            "Nov 25 19:30:01.123 [n1]: x/a:40000 (ID:300) -> y/b:80 (ID:1000) TCP SYN ingress DENIED (POLICY_DENIED_INGRESS) (+2 more)"
        );
        assert_eq!(
            render_line(ALLOWED, false).expect("a flow"),
            "Nov 25 19:30:02.456 [n2]: x/a:40001 (ID:300) -> y/b:8080 (ID:1000) via service 10.96.0.20:80 TCP SYN egress ALLOWED by policy x/allow-egress"
        );
        assert_eq!(
            render_line(WORLD, false).expect("a flow"),
            "Nov 25 19:30:03.000 [n1]: x/a:5353 (ID:300) -> 192.0.2.7:53 (world) UDP egress ALLOWED (no policy)"
        );
        assert_eq!(
            render_line(DENIED_BY, false).expect("a flow"),
            "Nov 25 19:30:04.000 [n1]: x/a:40000 (ID:300) -> y/b:80 (ID:1000) TCP SYN ingress DENIED (POLICY_DENIED_INGRESS) by default-deny of y/deny-all, y/allow-z"
        );
        assert_eq!(render_line(DENIED, true).as_deref(), Some(DENIED));
        assert_eq!(render_line("", false), None);
        assert_eq!(render_line("not json", false), None);
    }

    #[test]
    fn the_query_carries_the_filters() {
        let o = FlowOptions {
            pod: Some("x/a".into()),
            verdict: Some("DENIED".into()),
            port: Some(80),
            follow: true,
            ..FlowOptions::default()
        };
        assert_eq!(
            query_path(&o).expect("path"),
            "/flows?namespace=x&pod=a&verdict=denied&port=80&limit=0&follow=true"
        );
        let o = FlowOptions {
            namespace: Some("team a".into()),
            ..FlowOptions::default()
        };
        assert_eq!(
            query_path(&o).expect("path"),
            "/flows?namespace=team%20a&limit=20"
        );
        let bad = FlowOptions {
            verdict: Some("maybe".into()),
            ..FlowOptions::default()
        };
        assert!(query_path(&bad).is_err());
    }

    #[tokio::test]
    async fn chunked_json_lines_are_split() {
        let raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n{\"a\":\r\n6\r\n1}\n{\"b\r\n5\r\n\":2}\n\r\n0\r\n\r\n";
        let mut r = BufReader::new(&raw[..]);
        let (code, chunked) = read_head(&mut r).await.expect("head");
        assert_eq!((code, chunked), (200, true));
        let mut lines = Lines::default();
        let mut got = Vec::new();
        read_body(&mut r, chunked, |b| got.extend(lines.push(b)))
            .await
            .expect("body");
        assert_eq!(got, ["{\"a\":1}", "{\"b\":2}"]);
    }
}
