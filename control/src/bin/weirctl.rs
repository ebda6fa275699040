//! weirctl: the command line for weir-control, shaped like kubectl.

use std::{io::Read as _, path::Path};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand, ValueEnum};
use weir_proto::{
    manifest,
    v1::{
        ApplyRequest, DeleteRequest, ListRequest, Object, ObjectRef, objects_client::ObjectsClient,
    },
};

/// weir's command line: apply, get and delete objects on weir-control.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    /// weir-control's address.
    #[arg(
        long,
        env = "WEIR_SERVER",
        default_value = "http://127.0.0.1:7443",
        global = true
    )]
    server: String,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Create or update objects from manifests (a file, a directory of
    /// .yaml/.yml/.json files, or - for stdin; multi-document YAML).
    Apply {
        /// The manifests.
        #[arg(short = 'f', long = "filename", required = true)]
        files: Vec<String>,
    },
    /// List objects of a kind, or show one.
    Get {
        /// pods (po, pod) or namespaces (ns, namespace).
        kind: String,
        /// One object's name.
        name: Option<String>,
        /// Namespace.
        #[arg(short, long, default_value = "default")]
        namespace: String,
        /// All namespaces.
        #[arg(short = 'A', long)]
        all_namespaces: bool,
        /// Label selector (`a=b,c!=d,e in (x,y)`).
        #[arg(short = 'l', long)]
        selector: Option<String>,
        /// Output format.
        #[arg(short, long)]
        output: Option<Output>,
    },
    /// Delete an object.
    Delete {
        /// pods or namespaces.
        kind: String,
        /// Its name.
        name: String,
        /// Namespace.
        #[arg(short, long, default_value = "default")]
        namespace: String,
    },
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Output {
    Json,
    Yaml,
    Wide,
}

/// (API kind, lower-case plural, namespaced) of a kind as typed.
fn kind(arg: &str) -> anyhow::Result<(&'static str, &'static str, bool)> {
    Ok(match arg.to_ascii_lowercase().as_str() {
        "po" | "pod" | "pods" => ("Pod", "pods", true),
        "ns" | "namespace" | "namespaces" => ("Namespace", "namespaces", false),
        other => bail!("the server doesn't have a resource type \"{other}\""),
    })
}

fn main() {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: start runtime: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = rt.block_on(run(cli)) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let mut client = ObjectsClient::connect(cli.server.clone())
        .await
        .with_context(|| {
            format!(
                "the connection to the server {} was refused - is weir-control running?",
                cli.server
            )
        })?;
    match cli.cmd {
        Cmd::Apply { files } => apply(&mut client, &files).await,
        Cmd::Get {
            kind: k,
            name,
            namespace,
            all_namespaces,
            selector,
            output,
        } => {
            let (api_kind, plural, namespaced) = kind(&k)?;
            let ns = if all_namespaces || !namespaced {
                String::new()
            } else {
                namespace
            };
            let mut items = if let Some(name) = name {
                let r = ObjectRef {
                    api_version: "v1".into(),
                    kind: api_kind.into(),
                    namespace: ns.clone(),
                    name: name.clone(),
                };
                vec![client.get(r).await.map_err(status)?.into_inner()]
            } else {
                let req = ListRequest {
                    kind: api_kind.into(),
                    namespace: ns.clone(),
                    label_selector: selector.unwrap_or_default(),
                };
                client.list(req).await.map_err(status)?.into_inner().items
            };
            items.sort_by_key(key);
            print_objects(&items, plural, namespaced && all_namespaces, output)
        }
        Cmd::Delete {
            kind: k,
            name,
            namespace,
        } => {
            let (api_kind, plural, namespaced) = kind(&k)?;
            let ns = if namespaced { namespace } else { String::new() };
            let r = ObjectRef {
                api_version: "v1".into(),
                kind: api_kind.into(),
                namespace: ns,
                name: name.clone(),
            };
            client
                .delete(DeleteRequest {
                    r#ref: Some(r),
                    propagation: "Background".into(),
                    grace_period_seconds: None,
                })
                .await
                .map_err(status)?;
            println!("{} \"{name}\" deleted", plural.trim_end_matches('s'));
            Ok(())
        }
    }
}

#[expect(clippy::needless_pass_by_value, reason = "used as map_err(status)")]
fn status(s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{}", s.message())
}

fn key(o: &Object) -> (String, String) {
    o.meta
        .as_ref()
        .map(|m| (m.namespace.clone(), m.name.clone()))
        .unwrap_or_default()
}

/// Reads every manifest document named by `files` as (source, JSON text).
fn read_manifests(files: &[String]) -> anyhow::Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    for f in files {
        if f == "-" {
            let mut text = String::new();
            std::io::stdin()
                .read_to_string(&mut text)
                .context("read stdin")?;
            push_docs("-", &text, &mut out)?;
            continue;
        }
        let path = Path::new(f);
        if path.is_dir() {
            let mut entries: Vec<_> = std::fs::read_dir(path)
                .with_context(|| format!("read directory {f}"))?
                .flatten()
                .map(|e| e.path())
                .filter(|p| {
                    p.extension()
                        .is_some_and(|e| e == "yaml" || e == "yml" || e == "json")
                })
                .collect();
            entries.sort();
            for p in entries {
                let text =
                    std::fs::read_to_string(&p).with_context(|| format!("read {}", p.display()))?;
                push_docs(&p.display().to_string(), &text, &mut out)?;
            }
        } else {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("the path \"{f}\" does not exist"))?;
            push_docs(f, &text, &mut out)?;
        }
    }
    Ok(out)
}

fn push_docs(source: &str, text: &str, out: &mut Vec<(String, String)>) -> anyhow::Result<()> {
    for doc in manifest::parse_documents(source, text)? {
        out.push((source.to_owned(), doc.to_string()));
    }
    Ok(())
}

async fn apply(
    client: &mut ObjectsClient<tonic::transport::Channel>,
    files: &[String],
) -> anyhow::Result<()> {
    let docs = read_manifests(files)?;
    let mut failed = 0;
    for (source, json) in docs {
        let req = ApplyRequest {
            manifest_json: json.clone(),
            field_manager: "weirctl".into(),
        };
        match client.apply(req).await {
            Ok(resp) => {
                let resp = resp.into_inner();
                for w in &resp.warnings {
                    eprintln!("Warning: {w}");
                }
                let meta = resp.object.and_then(|o| o.meta).unwrap_or_default();
                let verb = if resp.created {
                    "created"
                } else {
                    "configured"
                };
                println!("{}/{} {verb}", meta.kind.to_ascii_lowercase(), meta.name);
            }
            Err(s) => {
                failed += 1;
                eprintln!("error: {source}: {}", s.message());
            }
        }
    }
    if failed > 0 {
        bail!("{failed} object(s) not applied");
    }
    Ok(())
}

fn print_objects(
    items: &[Object],
    plural: &str,
    with_ns: bool,
    output: Option<Output>,
) -> anyhow::Result<()> {
    let values: Vec<serde_json::Value> = items
        .iter()
        .map(|o| serde_json::from_str(&o.json))
        .collect::<Result<_, _>>()
        .context("decode object")?;
    match output {
        Some(Output::Json) => {
            let v = if values.len() == 1 {
                values[0].clone()
            } else {
                serde_json::json!({"apiVersion": "v1", "kind": "List", "items": values})
            };
            println!("{}", serde_json::to_string_pretty(&v)?);
            return Ok(());
        }
        Some(Output::Yaml) => {
            for v in &values {
                println!(
                    "---\n{}",
                    serde_saphyr::to_string(v).context("encode YAML")?
                );
            }
            return Ok(());
        }
        Some(Output::Wide) | None => {}
    }
    print_table(
        &values,
        plural,
        with_ns,
        matches!(output, Some(Output::Wide)),
    );
    Ok(())
}

/// kubectl-style table of pods or namespaces.
fn print_table(values: &[serde_json::Value], plural: &str, with_ns: bool, wide: bool) {
    if values.is_empty() {
        eprintln!("No resources found");
        return;
    }
    let mut rows = Vec::new();
    let mut header = Vec::new();
    if with_ns {
        header.push("NAMESPACE");
    }
    header.push("NAME");
    if plural == "pods" {
        header.extend(["READY", "STATUS", "RESTARTS"]);
        if wide {
            header.extend(["IP", "NODE"]);
        }
    } else {
        header.push("STATUS");
    }
    for v in values {
        let mut row = Vec::new();
        if with_ns {
            row.push(v["metadata"]["namespace"].as_str().unwrap_or("").to_owned());
        }
        row.push(v["metadata"]["name"].as_str().unwrap_or("").to_owned());
        if plural == "pods" {
            let statuses = v["status"]["containerStatuses"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            let total = v["spec"]["containers"].as_array().map_or(0, Vec::len);
            let ready = statuses.iter().filter(|c| c["ready"] == true).count();
            let restarts: i64 = statuses
                .iter()
                .filter_map(|c| c["restartCount"].as_i64())
                .sum();
            row.push(format!("{ready}/{total}"));
            row.push(
                v["status"]["phase"]
                    .as_str()
                    .unwrap_or("Pending")
                    .to_owned(),
            );
            row.push(restarts.to_string());
            if wide {
                row.push(v["status"]["podIP"].as_str().unwrap_or("<none>").to_owned());
                row.push(
                    v["spec"]["nodeName"]
                        .as_str()
                        .unwrap_or("<none>")
                        .to_owned(),
                );
            }
        } else {
            row.push(v["status"]["phase"].as_str().unwrap_or("Active").to_owned());
        }
        rows.push(row);
    }
    let widths: Vec<usize> = (0..header.len())
        .map(|i| {
            rows.iter()
                .map(|r| r[i].len())
                .chain([header[i].len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |cells: Vec<&str>| {
        cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join("   ")
            .trim_end()
            .to_owned()
    };
    println!("{}", line(header.clone()));
    for r in &rows {
        println!("{}", line(r.iter().map(String::as_str).collect()));
    }
}
