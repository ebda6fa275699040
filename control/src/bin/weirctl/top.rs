//! `weirctl top nodes|pods`: the newest CPU and memory samples from the
//! `Metrics` API, printed as kubectl prints them (millicores `250m`,
//! memory in `Mi`, node percentages of allocatable).

use anyhow::{Context as _, bail};
use serde_json::Value;
use tonic::transport::Endpoint;
use weir_proto::manifest::{parse_cpu_millis, parse_memory_bytes};
use weir_proto::v1::metrics_client::MetricsClient;
use weir_proto::v1::{ListNodeMetricsRequest, ListPodMetricsRequest, NodeMetrics, PodMetrics};

use crate::client::{Api, ServerError, name_of};
use crate::format::Table;
use crate::resource::Resource;

/// What `top pods` lists.
#[derive(Debug, Clone)]
pub struct PodOptions {
    /// The namespace; ignored with `all_namespaces`.
    pub namespace: String,
    /// Every namespace (adds a NAMESPACE column).
    pub all_namespaces: bool,
    /// Label selector on the pods.
    pub selector: String,
    /// One row per container.
    pub containers: bool,
}

fn metrics_client(server: &str) -> anyhow::Result<MetricsClient<tonic::transport::Channel>> {
    let endpoint = Endpoint::from_shared(server.to_owned())
        .with_context(|| format!("invalid server address {server:?}"))?;
    Ok(MetricsClient::new(endpoint.connect_lazy()))
}

fn server_error(server: &str, status: tonic::Status) -> anyhow::Error {
    ServerError {
        server: server.to_owned(),
        status,
    }
    .into()
}

/// `top nodes`.
pub async fn nodes(api: &Api, server: &str) -> anyhow::Result<()> {
    let samples = metrics_client(server)?
        .list_nodes(ListNodeMetricsRequest {})
        .await
        .map_err(|s| server_error(server, s))?
        .into_inner()
        .items;
    if samples.is_empty() {
        bail!("metrics not available yet");
    }
    let (nodes, _) = api.list(Resource::Node, "", "").await?;
    print!("{}", nodes_table(&nodes, &samples).render(true));
    Ok(())
}

/// `top pods`.
pub async fn pods(server: &str, o: &PodOptions) -> anyhow::Result<()> {
    let namespace = if o.all_namespaces {
        String::new()
    } else {
        o.namespace.clone()
    };
    let samples = metrics_client(server)?
        .list_pods(ListPodMetricsRequest {
            namespace: namespace.clone(),
            label_selector: o.selector.clone(),
        })
        .await
        .map_err(|s| server_error(server, s))?
        .into_inner()
        .items;
    if samples.is_empty() {
        if o.all_namespaces {
            bail!("no pod metrics found");
        }
        bail!("no pod metrics found in {namespace} namespace");
    }
    print!("{}", pods_table(&samples, o).render(true));
    Ok(())
}

/// kubectl's CPU cell: whole millicores.
pub fn cpu_cell(cores: f64) -> String {
    format!("{}m", millis(cores))
}

/// kubectl's memory cell: whole mebibytes.
pub fn memory_cell(bytes: u64) -> String {
    format!("{}Mi", bytes / (1024 * 1024))
}

#[expect(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    reason = "a CPU rate in cores is small and non-negative; rounded to millicores"
)]
fn millis(cores: f64) -> u64 {
    (cores.max(0.0) * 1000.0).round() as u64
}

/// `part` as a whole percentage of `whole`.
fn percent(part: u64, whole: u64) -> String {
    if whole == 0 {
        return "<unknown>".to_owned();
    }
    format!("{}%", part.saturating_mul(100) / whole)
}

fn allocatable<T>(node: Option<&Value>, resource: &str, parse: fn(&str) -> Result<u64, T>) -> u64 {
    node.and_then(|n| n["status"]["allocatable"][resource].as_str())
        .and_then(|q| parse(q).ok())
        .unwrap_or(0)
}

/// The `top nodes` table: every node that has a sample, with its usage as
/// a share of the node's allocatable.
pub fn nodes_table(nodes: &[Value], samples: &[NodeMetrics]) -> Table {
    let mut table = Table::new(&["NAME", "CPU(cores)", "CPU%", "MEMORY(bytes)", "MEMORY%"]);
    for sample in samples {
        let node = nodes.iter().find(|n| name_of(n) == sample.name);
        let cpu = millis(sample.cpu_cores);
        let memory = sample.memory_working_set_bytes;
        table.rows.push(vec![
            sample.name.clone(),
            format!("{cpu}m"),
            percent(cpu, allocatable(node, "cpu", parse_cpu_millis)),
            memory_cell(memory),
            percent(memory, allocatable(node, "memory", parse_memory_bytes)),
        ]);
    }
    table
}

/// The `top pods` table (per container with `containers`).
pub fn pods_table(samples: &[PodMetrics], o: &PodOptions) -> Table {
    let mut header = Vec::new();
    if o.all_namespaces {
        header.push("NAMESPACE");
    }
    if o.containers {
        header.push("POD");
    }
    header.extend(["NAME", "CPU(cores)", "MEMORY(bytes)"]);
    let mut table = Table::new(&header);
    for pod in samples {
        let mut lead = Vec::new();
        if o.all_namespaces {
            lead.push(pod.namespace.clone());
        }
        if o.containers {
            for c in &pod.containers {
                let mut row = lead.clone();
                row.extend([
                    pod.name.clone(),
                    c.name.clone(),
                    cpu_cell(c.cpu_cores),
                    memory_cell(c.memory_working_set_bytes),
                ]);
                table.rows.push(row);
            }
        } else {
            lead.extend([
                pod.name.clone(),
                cpu_cell(pod.cpu_cores),
                memory_cell(pod.memory_working_set_bytes),
            ]);
            table.rows.push(lead);
        }
    }
    table
}

#[cfg(test)]
mod tests {
    use serde_json::json;
    use weir_proto::v1::ContainerMetrics;

    use super::*;

    fn pod(ns: &str, name: &str, cpu: f64, mem: u64) -> PodMetrics {
        PodMetrics {
            namespace: ns.into(),
            name: name.into(),
            cpu_cores: cpu,
            memory_working_set_bytes: mem,
            containers: vec![
                ContainerMetrics {
                    name: "app".into(),
                    cpu_cores: cpu * 0.75,
                    memory_working_set_bytes: mem / 2,
                },
                ContainerMetrics {
                    name: "sidecar".into(),
                    cpu_cores: cpu * 0.25,
                    memory_working_set_bytes: mem / 2,
                },
            ],
            ..PodMetrics::default()
        }
    }

    #[test]
    fn node_rows_are_shares_of_allocatable() {
        let nodes = vec![json!({
            "metadata": {"name": "n1"},
            "status": {"allocatable": {"cpu": "2", "memory": "4Gi"}}
        })];
        let samples = vec![
            NodeMetrics {
                name: "n1".into(),
                cpu_cores: 0.25,
                memory_working_set_bytes: 1024 * 1024 * 1024,
                ..NodeMetrics::default()
            },
            NodeMetrics {
                name: "gone".into(),
                cpu_cores: 1.0,
                ..NodeMetrics::default()
            },
        ];
        let text = nodes_table(&nodes, &samples).render(true);
        assert_eq!(
            text,
            "NAME   CPU(cores)   CPU%        MEMORY(bytes)   MEMORY%\n\
             n1     250m         12%         1024Mi          25%\n\
             gone   1000m        <unknown>   0Mi             <unknown>\n"
        );
    }

    #[test]
    fn pod_rows_per_pod_per_container_and_across_namespaces() {
        let samples = vec![pod("a", "web-1", 0.1234, 12 * 1024 * 1024)];
        let mut o = PodOptions {
            namespace: "a".into(),
            all_namespaces: false,
            selector: String::new(),
            containers: false,
        };
        assert_eq!(
            pods_table(&samples, &o).render(true),
            "NAME    CPU(cores)   MEMORY(bytes)\nweb-1   123m         12Mi\n"
        );
        o.containers = true;
        o.all_namespaces = true;
        let text = pods_table(&samples, &o).render(true);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0].split_whitespace().collect::<Vec<_>>(),
            ["NAMESPACE", "POD", "NAME", "CPU(cores)", "MEMORY(bytes)"]
        );
        assert_eq!(
            lines[1].split_whitespace().collect::<Vec<_>>(),
            ["a", "web-1", "app", "93m", "6Mi"]
        );
        assert_eq!(
            lines[2].split_whitespace().collect::<Vec<_>>(),
            ["a", "web-1", "sidecar", "31m", "6Mi"]
        );
    }
}
