//! `weirctl map [-n NS | -A] [-o wide|json|dot]`: the cluster service map
//! (`ServiceMap.Get`): who talks to whom, on which port, how often, how
//! much, and what was dropped.
//!
//! ```text
//! SOURCE     DESTINATION      PORT     CONNECTIONS   BYTES   DROPS
//! x/client   service:x/web    80/TCP   120           48213   0
//! x/intruder x/server         8080/TCP 0             0       14
//! ```
//!
//! Ends print as `namespace/name` for workloads and `kind:name` otherwise
//! (`service:x/web`, `pod:x/web-b5c7d-xk2lp`, `host:node-1`,
//! `world:1.2.3.4`). `-o dot` prints a Graphviz digraph: boxes for
//! workloads, ellipses for services, edges labelled with port and counts,
//! drops as red edges.

use std::fmt::Write as _;

use anyhow::Context as _;
use serde_json::{Value, json};
use tonic::transport::Endpoint as Channel;
use weir_proto::v1::{self, service_map_client::ServiceMapClient};

use crate::client::ServerError;

/// The command line of `map`.
#[derive(clap::Args, Debug)]
pub struct MapArgs {
    /// Edges of every namespace (default: those with an end in -n's
    /// namespace, `default` without it).
    #[arg(short = 'A', long)]
    all_namespaces: bool,
    /// Output format: wide (adds BACKEND and LAST SEEN), json, or dot
    /// (Graphviz).
    #[arg(short, long, value_parser = ["wide", "json", "dot"])]
    output: Option<String>,
}

/// Fetches the map from `server` and prints it.
pub async fn run(server: &str, namespace: &str, args: &MapArgs) -> anyhow::Result<()> {
    let namespace = if args.all_namespaces { "" } else { namespace };
    let channel = Channel::from_shared(server.to_owned())
        .with_context(|| format!("invalid server address {server:?}"))?
        .connect_lazy();
    let edges = ServiceMapClient::new(channel)
        .get(v1::GetServiceMapRequest {
            namespace: namespace.to_owned(),
        })
        .await
        .map_err(|status| ServerError {
            server: server.to_owned(),
            status,
        })?
        .into_inner()
        .edges;
    let out = match args.output.as_deref() {
        Some("json") => serde_json::to_string_pretty(&to_json(&edges))? + "\n",
        Some("dot") => dot(&edges),
        Some("wide") => table(&edges, true),
        _ if edges.is_empty() => {
            eprintln!("No edges found.");
            return Ok(());
        }
        _ => table(&edges, false),
    };
    print!("{out}");
    Ok(())
}

/// An end as the table and the dot labels name it.
fn end_name(e: Option<&v1::Endpoint>) -> String {
    let Some(e) = e else {
        return "-".to_owned();
    };
    let name = if e.namespace.is_empty() {
        e.name.clone()
    } else {
        format!("{}/{}", e.namespace, e.name)
    };
    if e.kind == "workload" {
        name
    } else {
        format!("{}:{name}", e.kind)
    }
}

fn end_json(e: Option<&v1::Endpoint>) -> Value {
    e.map_or(
        Value::Null,
        |e| json!({"kind": e.kind, "namespace": e.namespace, "name": e.name}),
    )
}

/// `{"edges": [...]}` with camelCase fields.
fn to_json(edges: &[v1::Edge]) -> Value {
    let items: Vec<Value> = edges
        .iter()
        .map(|e| {
            let mut o = json!({
                "source": end_json(e.source.as_ref()),
                "destination": end_json(e.destination.as_ref()),
                "port": e.port,
                "protocol": e.protocol,
                "connections": e.connections,
                "bytes": e.bytes,
                "drops": e.drops,
                "lastSeenMs": e.last_seen_ms,
            });
            if let Some(b) = &e.backend {
                o["backend"] = end_json(Some(b));
            }
            o
        })
        .collect();
    json!({ "edges": items })
}

fn last_seen(ms: i64) -> String {
    k8s_openapi::jiff::Timestamp::from_millisecond(ms)
        .map_or_else(|_| "-".to_owned(), |t| t.to_string())
}

fn table(edges: &[v1::Edge], wide: bool) -> String {
    let mut rows = vec![
        [
            "SOURCE",
            "DESTINATION",
            "PORT",
            "CONNECTIONS",
            "BYTES",
            "DROPS",
        ]
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>(),
    ];
    if wide {
        rows[0].extend(["BACKEND".to_owned(), "LAST SEEN".to_owned()]);
    }
    for e in edges {
        let mut row = vec![
            end_name(e.source.as_ref()),
            end_name(e.destination.as_ref()),
            format!("{}/{}", e.port, e.protocol),
            e.connections.to_string(),
            e.bytes.to_string(),
            e.drops.to_string(),
        ];
        if wide {
            row.push(end_name(e.backend.as_ref()));
            row.push(last_seen(e.last_seen_ms));
        }
        rows.push(row);
    }
    let cols = rows[0].len();
    let widths: Vec<usize> = (0..cols)
        .map(|c| rows.iter().map(|r| r[c].len()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        let _ = writeln!(out, "{}", line.join("   ").trim_end());
    }
    out
}

/// A dot double-quoted string (a newline becomes dot's `\n`).
fn quoted(s: &str) -> String {
    let escaped = s
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n");
    format!("\"{escaped}\"")
}

/// A Graphviz digraph of the map.
fn dot(edges: &[v1::Edge]) -> String {
    let mut out = String::from(
        "digraph servicemap {\n  rankdir=LR;\n  node [shape=box, fontname=\"sans-serif\"];\n  edge [fontname=\"sans-serif\", fontsize=10];\n",
    );
    let mut nodes = std::collections::BTreeMap::new();
    for e in edges {
        for end in [&e.source, &e.destination].into_iter().flatten() {
            let shape = match end.kind.as_str() {
                "service" => "ellipse",
                "world" | "host" => "diamond",
                _ => "box",
            };
            nodes.insert(end_name(Some(end)), shape);
        }
    }
    for (name, shape) in &nodes {
        let _ = writeln!(out, "  {} [shape={shape}];", quoted(name));
    }
    for e in edges {
        let (from, to) = (
            quoted(&end_name(e.source.as_ref())),
            quoted(&end_name(e.destination.as_ref())),
        );
        let port = format!("{}/{}", e.port, e.protocol);
        if e.connections > 0 || e.drops == 0 {
            let mut label = format!("{port}\n{} conns", e.connections);
            if e.bytes > 0 {
                let _ = write!(label, ", {} bytes", e.bytes);
            }
            let _ = writeln!(out, "  {from} -> {to} [label={}];", quoted(&label));
        }
        if e.drops > 0 {
            let label = format!("{port}\n{} drops", e.drops);
            let _ = writeln!(
                out,
                "  {from} -> {to} [label={}, color=red, fontcolor=red];",
                quoted(&label)
            );
        }
    }
    out.push_str("}\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[expect(clippy::unnecessary_wraps, reason = "the proto fields are options")]
    fn ep(kind: &str, ns: &str, name: &str) -> Option<v1::Endpoint> {
        Some(v1::Endpoint {
            kind: kind.into(),
            namespace: ns.into(),
            name: name.into(),
        })
    }

    fn edges() -> Vec<v1::Edge> {
        vec![
            v1::Edge {
                source: ep("workload", "x", "client"),
                destination: ep("service", "x", "web"),
                backend: ep("workload", "x", "server"),
                port: 80,
                protocol: "TCP".into(),
                connections: 12,
                bytes: 3400,
                drops: 0,
                last_seen_ms: 1_700_000_000_000,
            },
            v1::Edge {
                source: ep("workload", "x", "in\"truder"),
                destination: ep("workload", "x", "server"),
                backend: None,
                port: 8080,
                protocol: "TCP".into(),
                connections: 0,
                bytes: 0,
                drops: 5,
                last_seen_ms: 0,
            },
        ]
    }

    #[test]
    fn tables_name_ends_by_kind() {
        let t = table(&edges(), true);
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[0].starts_with("SOURCE"), "{t}");
        assert!(lines[0].ends_with("LAST SEEN"), "{t}");
        assert!(lines[1].contains("service:x/web"), "{t}");
        assert!(lines[1].contains("80/TCP"), "{t}");
        assert!(lines[1].contains("2023-11-14T22:13:20Z"), "{t}");
        assert!(lines[2].contains("x/server"), "{t}");
    }

    #[test]
    fn dot_is_a_digraph_with_red_drops() {
        let d = dot(&edges());
        assert!(d.starts_with("digraph servicemap {"), "{d}");
        assert!(d.trim_end().ends_with('}'), "{d}");
        assert!(
            d.contains(
                "\"x/client\" -> \"service:x/web\" [label=\"80/TCP\\n12 conns, 3400 bytes\"];"
            ),
            "{d}"
        );
        assert!(
            d.contains(
                "\"x/in\\\"truder\" -> \"x/server\" [label=\"8080/TCP\\n5 drops\", color=red"
            ),
            "{d}"
        );
        assert!(d.contains("\"service:x/web\" [shape=ellipse];"), "{d}");
    }

    #[test]
    fn json_lists_edges() {
        let j = to_json(&edges());
        assert_eq!(j["edges"][0]["backend"]["name"], "server");
        assert_eq!(j["edges"][0]["connections"], 12);
        assert!(j["edges"][1].get("backend").is_none());
    }
}
