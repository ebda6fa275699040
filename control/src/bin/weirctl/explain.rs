//! `weirctl policy explain <src> <dst> <port> [--protocol TCP|UDP] [-o json]`:
//! whether a new connection from `src` to `dst:port` is allowed, and by
//! which policy, as the nodes' policy maps see it (like `cilium policy
//! trace`). `src`/`dst` are `namespace/pod`, a pod name (in `-n`), or an
//! IPv4 address (an address outside the cluster: no policy of its own).
//!
//! The source pod's Egress is judged by the agent of its node and the
//! destination pod's Ingress by the agent of its node
//! (`GET http://<node InternalIP>:<agent port>/policy/explain?...&direction=egress|ingress`):
//! each agent reads its pinned maps (endpoint, ipcache, policy map) and
//! runs the programs' lookups. The connection is allowed when both sides
//! allow it. Exit code 0 when allowed, 1 when denied (or on an error).
//!
//! ```text
//! Tracing x/a (10.244.1.5) -> y/b (10.244.2.7) port 80/TCP
//!
//! Egress from x/a on node n1 (identity 300, ifindex 12):
//!   peer y/b 10.244.2.7: identity 400
//!   not isolated for egress (no policy selects x/a for egress): ALLOWED
//! Ingress to y/b on node n2 (identity 400, ifindex 14):
//!   peer x/a 10.244.1.5: identity 300
//!   isolated for ingress by y/deny-all, y/allow-from-x
//!   key {ep 14, identity 300, port 80, TCP, ingress} matched: ALLOWED by y/allow-from-x
//!
//! Final verdict: ALLOWED
//! ```

use std::fmt::Write as _;
use std::net::Ipv4Addr;

use anyhow::{Context as _, bail};
use serde::Deserialize;
use tokio::io::{AsyncWriteExt as _, BufReader};

use crate::client::Api;
use crate::flows::{identity_name, read_body, read_head};
use crate::printers::node_address;
use crate::resource::Resource;

/// The command line of `policy explain`.
#[derive(clap::Args, Debug)]
pub struct ExplainArgs {
    /// The client: NAMESPACE/POD, POD (in -n), or an IPv4 address.
    src: String,
    /// The server: NAMESPACE/POD, POD (in -n), or an IPv4 address.
    dst: String,
    /// The destination port.
    port: u16,
    /// TCP or UDP.
    #[arg(long, default_value = "TCP")]
    protocol: String,
    /// Output format: json (the verdict and the agents' steps).
    #[arg(short, long, value_parser = ["json"])]
    output: Option<String>,
    /// The agents' HTTP port.
    #[arg(long, default_value_t = 10250)]
    agent_port: u16,
}

pub use weir_proto::explain::{MatchedKey, Party, Step};

#[derive(Deserialize)]
struct Answer {
    steps: Vec<Step>,
}

/// One end of the question, resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum End {
    /// A pod: `namespace/name`, its node and IP.
    Pod {
        /// `namespace/name`.
        key: String,
        /// Its node.
        node: String,
        /// Its IP (empty if it has none yet).
        ip: String,
    },
    /// An address.
    Ip(Ipv4Addr),
}

impl End {
    fn label(&self) -> String {
        match self {
            Self::Pod { key, ip, .. } if ip.is_empty() => key.clone(),
            Self::Pod { key, ip, .. } => format!("{key} ({ip})"),
            Self::Ip(ip) => ip.to_string(),
        }
    }

    fn query(&self) -> String {
        match self {
            Self::Pod { key, .. } => key.clone(),
            Self::Ip(ip) => ip.to_string(),
        }
    }
}

/// Resolves `arg` (`ns/pod`, `pod` in `ns`, or an IP) with the API.
async fn resolve(api: &Api, ns: &str, arg: &str) -> anyhow::Result<End> {
    if let Ok(ip) = arg.parse::<Ipv4Addr>() {
        return Ok(End::Ip(ip));
    }
    let (pns, name) = arg.split_once('/').unwrap_or((ns, arg));
    if pns.is_empty() || name.is_empty() || name.contains('/') {
        bail!("{arg:?} is neither NAMESPACE/POD, POD nor an IPv4 address");
    }
    let pod = api.get(Resource::Pod, pns, name).await?;
    let Some(node) = pod["spec"]["nodeName"].as_str().filter(|n| !n.is_empty()) else {
        bail!("pod {pns}/{name} is not scheduled to a node yet");
    };
    Ok(End::Pod {
        key: format!("{pns}/{name}"),
        node: node.to_owned(),
        ip: pod["status"]["podIP"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
    })
}

fn protocol_of(s: &str) -> anyhow::Result<&'static str> {
    match s.to_ascii_uppercase().as_str() {
        "TCP" => Ok("TCP"),
        "UDP" => Ok("UDP"),
        _ => bail!("invalid protocol {s:?}: use TCP or UDP"),
    }
}

/// The agent's query path for one side.
pub fn query_path(src: &End, dst: &End, port: u16, protocol: &str, direction: &str) -> String {
    format!(
        "/policy/explain?src={}&dst={}&port={port}&protocol={protocol}&direction={direction}",
        src.query(),
        dst.query()
    )
}

/// Runs `policy explain`: prints the trace; `Ok(true)` when allowed.
pub async fn run(api: &Api, ns: &str, a: &ExplainArgs) -> anyhow::Result<bool> {
    let protocol = protocol_of(&a.protocol)?;
    if a.port == 0 {
        bail!("invalid port 0: use 1-65535");
    }
    let src = resolve(api, ns, &a.src).await?;
    let dst = resolve(api, ns, &a.dst).await?;
    if matches!((&src, &dst), (End::Ip(_), End::Ip(_))) {
        bail!("neither end is a pod: no network policy applies between two addresses");
    }
    let mut steps = Vec::new();
    for (end, direction) in [(&src, "egress"), (&dst, "ingress")] {
        let End::Pod { node, .. } = end else {
            continue;
        };
        let host = agent_host(api, node, a.agent_port).await?;
        let path = query_path(&src, &dst, a.port, protocol, direction);
        let body = get(&host, &path)
            .await
            .with_context(|| format!("ask the agent of node {node} ({host})"))?;
        let answer: Answer = serde_json::from_str(&body)
            .with_context(|| format!("the agent of node {node} answered {body:?}"))?;
        steps.extend(answer.steps);
    }
    let allowed = steps.iter().all(|s| s.verdict == "ALLOWED");
    if a.output.is_some() {
        let out = serde_json::json!({
            "source": src.query(),
            "destination": dst.query(),
            "port": a.port,
            "protocol": protocol,
            "verdict": if allowed { "ALLOWED" } else { "DENIED" },
            "steps": steps,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        print!("{}", format_trace(&src, &dst, a.port, protocol, &steps));
    }
    Ok(allowed)
}

async fn agent_host(api: &Api, node: &str, port: u16) -> anyhow::Result<String> {
    let obj = api.get(Resource::Node, "", node).await?;
    let Some(ip) = node_address(&obj, "InternalIP") else {
        bail!("node {node} has no InternalIP address in status.addresses");
    };
    Ok(format!("{ip}:{port}"))
}

/// `GET path` on `host`: the body (an error with it unless 200).
async fn get(host: &str, path: &str) -> anyhow::Result<String> {
    let conn = tokio::net::TcpStream::connect(host)
        .await
        .context("connect")?;
    let mut r = BufReader::new(conn);
    r.get_mut()
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .context("send the request")?;
    let (code, chunked) = read_head(&mut r).await?;
    let mut body = Vec::new();
    read_body(&mut r, chunked, |b| body.extend_from_slice(b)).await?;
    let text = String::from_utf8_lossy(&body).trim().to_owned();
    if code != 200 {
        bail!("HTTP {code}: {text}");
    }
    Ok(text)
}

fn party_text(p: &Party) -> String {
    let who = match (&p.namespace, &p.pod) {
        (Some(ns), Some(pod)) => format!("{ns}/{pod} {}", p.ip),
        _ => p.ip.clone(),
    };
    let id = match identity_name(p.identity) {
        Some(name) => format!("identity {} ({name})", p.identity),
        None => format!("identity {}", p.identity),
    };
    format!("{who}: {id}")
}

fn key_text(k: &MatchedKey) -> String {
    let identity = if k.identity == 0 {
        "any".to_owned()
    } else {
        k.identity.to_string()
    };
    let port = if k.port == 0 {
        "any".to_owned()
    } else {
        k.port.to_string()
    };
    format!(
        "{{ep {}, identity {identity}, port {port}, {}, {}}}",
        k.ep, k.protocol, k.direction
    )
}

/// One side as text.
fn format_step(s: &Step) -> String {
    let me = match (&s.endpoint.namespace, &s.endpoint.pod) {
        (Some(ns), Some(pod)) => format!("{ns}/{pod}"),
        _ => s.endpoint.ip.clone(),
    };
    let (title, prep) = if s.direction == "egress" {
        ("Egress", "from")
    } else {
        ("Ingress", "to")
    };
    let mut out = format!(
        "{title} {prep} {me} on node {} (identity {}, ifindex {}):\n  peer {}\n",
        s.node,
        s.endpoint.identity,
        s.ifindex,
        party_text(&s.peer)
    );
    if s.peer_cidr_identity != 0 {
        let _ = writeln!(out, "  peer ipBlock identity {}", s.peer_cidr_identity);
    }
    if !s.enforced {
        let _ = writeln!(
            out,
            "  not isolated for {} (no policy selects {me} for {}): {}",
            s.direction, s.direction, s.verdict
        );
        return out;
    }
    let _ = writeln!(
        out,
        "  isolated for {} by {}",
        s.direction,
        if s.isolated_by.is_empty() {
            "(unknown)".to_owned()
        } else {
            s.isolated_by.join(", ")
        }
    );
    match (&s.matched_key, &s.policy) {
        (Some(k), Some(p)) => {
            let _ = writeln!(out, "  key {} matched: {} by {p}", key_text(k), s.verdict);
        }
        _ if s.verdict == "DENIED" => {
            let _ = writeln!(
                out,
                "  no key matched: DENIED by default-deny of {}",
                s.isolated_by.join(", ")
            );
        }
        _ => {
            let _ = writeln!(out, "  {}", s.verdict);
        }
    }
    out
}

/// The whole trace as text.
pub fn format_trace(src: &End, dst: &End, port: u16, protocol: &str, steps: &[Step]) -> String {
    let mut out = format!(
        "Tracing {} -> {} port {port}/{protocol}\n\n",
        src.label(),
        dst.label()
    );
    for (end, direction) in [(src, "egress"), (dst, "ingress")] {
        if let End::Ip(ip) = end {
            let _ = writeln!(
                out,
                "{} {ip}: not a pod, no {direction} policy of its own",
                if direction == "egress" {
                    "Egress from"
                } else {
                    "Ingress to"
                }
            );
        }
        for s in steps.iter().filter(|s| s.direction == direction) {
            out.push_str(&format_step(s));
        }
    }
    let allowed = steps.iter().all(|s| s.verdict == "ALLOWED");
    let _ = writeln!(
        out,
        "\nFinal verdict: {}",
        if allowed { "ALLOWED" } else { "DENIED" }
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALLOWED: &str = r#"{"node":"n2","steps":[{"node":"n2","direction":"ingress","endpoint":{"ip":"10.244.2.7","identity":400,"namespace":"y","pod":"b"},"ifindex":14,"peer":{"ip":"10.244.1.5","identity":300,"namespace":"x","pod":"a"},"peerCidrIdentity":0,"enforced":true,"isolatedBy":["y/deny-all","y/allow-from-x"],"verdict":"ALLOWED","policy":"y/allow-from-x","matchedKey":{"ep":14,"identity":300,"port":80,"protocol":"TCP","direction":"ingress"}}]}"#;
    const EGRESS: &str = r#"{"node":"n1","steps":[{"node":"n1","direction":"egress","endpoint":{"ip":"10.244.1.5","identity":300,"namespace":"x","pod":"a"},"ifindex":12,"peer":{"ip":"10.244.2.7","identity":400,"namespace":"y","pod":"b"},"peerCidrIdentity":0,"enforced":false,"isolatedBy":[],"verdict":"ALLOWED"}]}"#;
    const DENIED: &str = r#"{"node":"n2","steps":[{"node":"n2","direction":"ingress","endpoint":{"ip":"10.244.2.7","identity":400,"namespace":"y","pod":"b"},"ifindex":14,"peer":{"ip":"192.0.2.1","identity":2},"peerCidrIdentity":0,"enforced":true,"isolatedBy":["y/deny-all","y/allow-from-x"],"verdict":"DENIED"}]}"#;

    fn steps(bodies: &[&str]) -> Vec<Step> {
        bodies
            .iter()
            .flat_map(|b| serde_json::from_str::<Answer>(b).expect("answer").steps)
            .collect()
    }

    fn pod(key: &str, ip: &str) -> End {
        End::Pod {
            key: key.into(),
            node: "n".into(),
            ip: ip.into(),
        }
    }

    #[test]
    fn an_allowed_trace_names_the_policy_and_key() {
        let (a, b) = (pod("x/a", "10.244.1.5"), pod("y/b", "10.244.2.7"));
        let text = format_trace(&a, &b, 80, "TCP", &steps(&[EGRESS, ALLOWED]));
        assert_eq!(
            text,
            "Tracing x/a (10.244.1.5) -> y/b (10.244.2.7) port 80/TCP\n\n\
             Egress from x/a on node n1 (identity 300, ifindex 12):\n  \
             peer y/b 10.244.2.7: identity 400\n  \
             not isolated for egress (no policy selects x/a for egress): ALLOWED\n\
             Ingress to y/b on node n2 (identity 400, ifindex 14):\n  \
             peer x/a 10.244.1.5: identity 300\n  \
             isolated for ingress by y/deny-all, y/allow-from-x\n  \
             key {ep 14, identity 300, port 80, TCP, ingress} matched: ALLOWED by y/allow-from-x\n\
             \nFinal verdict: ALLOWED\n"
        );
    }

    #[test]
    fn a_denied_trace_names_the_isolating_policies() {
        let src = End::Ip("192.0.2.1".parse().expect("ip"));
        let text = format_trace(&src, &pod("y/b", ""), 81, "UDP", &steps(&[DENIED]));
        assert!(
            text.starts_with("Tracing 192.0.2.1 -> y/b port 81/UDP\n"),
            "{text}"
        );
        assert!(
            text.contains("Egress from 192.0.2.1: not a pod, no egress policy of its own\n"),
            "{text}"
        );
        assert!(
            text.contains("  peer 192.0.2.1: identity 2 (world)\n"),
            "{text}"
        );
        assert!(
            text.contains(
                "  no key matched: DENIED by default-deny of y/deny-all, y/allow-from-x\n"
            ),
            "{text}"
        );
        assert!(text.ends_with("\nFinal verdict: DENIED\n"), "{text}");
    }

    #[test]
    fn the_query_names_both_ends_and_the_side() {
        let p = query_path(
            &pod("x/a", ""),
            &End::Ip("192.0.2.1".parse().expect("ip")),
            53,
            "UDP",
            "egress",
        );
        assert_eq!(
            p,
            "/policy/explain?src=x/a&dst=192.0.2.1&port=53&protocol=UDP&direction=egress"
        );
        assert!(protocol_of("sctp").is_err());
        assert_eq!(protocol_of("udp").expect("udp"), "UDP");
    }
}
