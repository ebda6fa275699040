//! `weirctl get`: tables, `-o wide|yaml|json|name`, `all`, and `-w`.

use anyhow::{Context as _, bail};
use futures::StreamExt as _;
use serde_json::{Value, json};
use weir_proto::v1::EventType;

use crate::client::{Api, name_of};
use crate::format::{Table, line};
use crate::printers::{self, Options, event_time};
use crate::resource::{Resource, targets};

/// Output formats of `-o`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    /// The table plus more columns.
    Wide,
    /// The objects as YAML.
    Yaml,
    /// The objects as JSON.
    Json,
    /// `kind/name` per object.
    Name,
}

/// What `get` was asked for.
#[derive(Debug, Clone)]
pub struct GetArgs {
    /// Kind and names as typed.
    pub args: Vec<String>,
    /// `-n`.
    pub namespace: String,
    /// `-A`.
    pub all_namespaces: bool,
    /// `-l`.
    pub selector: String,
    /// `-o`.
    pub output: Option<Output>,
    /// `-w`.
    pub watch: bool,
    /// `--no-headers`.
    pub no_headers: bool,
}

/// The kinds `get all` shows, in kubectl's order.
const ALL: [Resource; 6] = [
    Resource::Pod,
    Resource::Service,
    Resource::DaemonSet,
    Resource::Deployment,
    Resource::ReplicaSet,
    Resource::HorizontalPodAutoscaler,
];

/// Runs `get`.
pub async fn run(api: &Api, a: &GetArgs) -> anyhow::Result<()> {
    let all = a.args.first().is_some_and(|k| k == "all");
    let wanted: Vec<(Resource, Option<String>)> = if all {
        if a.args.len() > 1 {
            bail!("names cannot be given with \"all\"");
        }
        ALL.iter().map(|r| (*r, None)).collect()
    } else {
        targets(&a.args)?
    };
    let ns = if a.all_namespaces {
        ""
    } else {
        a.namespace.as_str()
    };
    if a.watch {
        let kinds: Vec<Resource> = wanted.iter().map(|(r, _)| *r).collect();
        if all || kinds.windows(2).any(|w| w[0] != w[1]) {
            bail!("you may only specify a single resource type with --watch");
        }
        let names: Vec<String> = wanted.iter().filter_map(|(_, n)| n.clone()).collect();
        return watch(api, a, kinds[0], ns, &names).await;
    }
    let named = wanted.iter().any(|(_, n)| n.is_some());
    // Group by kind, keeping the order typed.
    let mut groups: Vec<(Resource, Vec<Value>)> = Vec::new();
    let mut failed = None;
    for (r, name) in &wanted {
        let items = if let Some(n) = name {
            match api.get(*r, ns_for(*r, a), n).await {
                Ok(v) => vec![v],
                Err(e) => {
                    eprintln!("{e}");
                    failed = Some(e);
                    continue;
                }
            }
        } else {
            let (mut items, _) = api.list(*r, ns, &a.selector).await?;
            if *r == Resource::Event {
                items.sort_by_key(event_time);
            }
            items
        };
        match groups.iter_mut().find(|(k, _)| k == r) {
            Some((_, v)) => v.extend(items),
            None => groups.push((*r, items)),
        }
    }
    print_groups(&groups, a, all || groups.len() > 1, named)?;
    match failed {
        // Already printed: exit 1 without a second line.
        Some(_) => Err(crate::Reported.into()),
        None => Ok(()),
    }
}

fn ns_for(r: Resource, a: &GetArgs) -> &str {
    if r.namespaced() {
        a.namespace.as_str()
    } else {
        ""
    }
}

fn options(a: &GetArgs, r: Resource, with_kind: bool) -> Options {
    Options {
        wide: a.output == Some(Output::Wide),
        with_namespace: a.all_namespaces && r.namespaced(),
        with_kind,
        now: crate::format::now(),
    }
}

fn print_groups(
    groups: &[(Resource, Vec<Value>)],
    a: &GetArgs,
    with_kind: bool,
    named: bool,
) -> anyhow::Result<()> {
    let total: usize = groups.iter().map(|(_, v)| v.len()).sum();
    match a.output {
        Some(Output::Json | Output::Yaml) => {
            let items: Vec<&Value> = groups.iter().flat_map(|(_, v)| v).collect();
            let doc = if named && items.len() == 1 {
                items[0].clone()
            } else {
                json!({"apiVersion": "v1", "kind": "List", "items": items, "metadata": {"resourceVersion": ""}})
            };
            print!("{}", encode(&doc, a.output)?);
            return Ok(());
        }
        Some(Output::Name) => {
            for (r, items) in groups {
                for v in items {
                    println!("{}/{}", r.qualified(), name_of(v));
                }
            }
            return Ok(());
        }
        Some(Output::Wide) | None => {}
    }
    if total == 0 {
        if !named {
            no_resources(a);
        }
        return Ok(());
    }
    let mut first = true;
    for (r, items) in groups.iter().filter(|(_, v)| !v.is_empty()) {
        if !first {
            println!();
        }
        first = false;
        print!(
            "{}",
            printers::table(*r, items, &options(a, *r, with_kind)).render(!a.no_headers)
        );
    }
    Ok(())
}

fn no_resources(a: &GetArgs) {
    if a.all_namespaces {
        eprintln!("No resources found");
    } else {
        eprintln!("No resources found in {} namespace.", a.namespace);
    }
}

/// One object or a list as JSON or YAML text (ending in a newline).
pub fn encode(doc: &Value, output: Option<Output>) -> anyhow::Result<String> {
    if output == Some(Output::Yaml) {
        let text = serde_saphyr::to_string(doc).context("encode YAML")?;
        Ok(if text.ends_with('\n') {
            text
        } else {
            text + "\n"
        })
    } else {
        Ok(serde_json::to_string_pretty(doc).context("encode JSON")? + "\n")
    }
}

/// `get -w`: the list, then one line per change from the list's revision;
/// a compacted watch lists again and carries on.
async fn watch(
    api: &Api,
    args: &GetArgs,
    kind: Resource,
    ns: &str,
    names: &[String],
) -> anyhow::Result<()> {
    let keep = |v: &Value| names.is_empty() || names.iter().any(|n| n == name_of(v));
    let opts = options(args, kind, false);
    let table_output = matches!(args.output, Some(Output::Wide) | None);
    let mut widths: Vec<usize> = Vec::new();
    let mut header_done = args.no_headers;
    let mut first_list = true;
    loop {
        let (items, revision) = api.list(kind, ns, &args.selector).await?;
        let items: Vec<Value> = items.into_iter().filter(|v| keep(v)).collect();
        if first_list && !names.is_empty() && items.is_empty() {
            return Err(not_found(kind, &names[0]));
        }
        if table_output {
            let table = printers::table(kind, &items, &opts);
            widths = table.widths();
            if !items.is_empty() {
                print!("{}", table.render(!header_done));
                header_done = true;
            } else if first_list {
                no_resources(args);
            }
        } else {
            for item in &items {
                print_watched(kind, item, args.output, &opts, &mut widths)?;
            }
        }
        first_list = false;
        flush();
        let mut stream = api.watch(kind, ns, &args.selector, revision).await?;
        let mut relist = false;
        while let Some(event) = stream.next().await {
            let event = event.map_err(|s| api.stream_error(s))?;
            if event.r#type() == EventType::Error {
                relist = true;
                break;
            }
            let Some(object) = event.object.as_ref() else {
                continue;
            };
            let item = crate::client::decode(object)?;
            if !keep(&item) {
                continue;
            }
            if table_output && !header_done {
                let table = Table {
                    header: printers::header(kind, &opts)
                        .iter()
                        .map(|h| (*h).to_owned())
                        .collect(),
                    rows: vec![printers::row(kind, &item, &opts)],
                };
                widths = table.widths();
                println!("{}", line(&table.header, &widths));
                header_done = true;
            }
            print_watched(kind, &item, args.output, &opts, &mut widths)?;
            flush();
        }
        if !relist {
            bail!("the watch was closed by the server");
        }
    }
}

/// The server's NotFound for one object, as `get` of a name prints it.
fn not_found(kind: Resource, name: &str) -> anyhow::Error {
    crate::client::ServerError {
        server: String::new(),
        status: tonic::Status::not_found(format!("{} \"{name}\" not found", kind.plural())),
    }
    .into()
}

fn print_watched(
    kind: Resource,
    item: &Value,
    output: Option<Output>,
    opts: &Options,
    widths: &mut Vec<usize>,
) -> anyhow::Result<()> {
    let (r, v, o) = (kind, item, opts);
    match output {
        Some(Output::Json | Output::Yaml) => {
            if output == Some(Output::Yaml) {
                println!("---");
            }
            print!("{}", encode(v, output)?);
        }
        Some(Output::Name) => println!("{}/{}", r.qualified(), name_of(v)),
        Some(Output::Wide) | None => {
            let mut o = *o;
            o.now = crate::format::now();
            let cells = printers::row(r, v, &o);
            if widths.len() < cells.len() {
                widths.resize(cells.len(), 0);
            }
            println!("{}", line(&cells, widths));
        }
    }
    Ok(())
}

fn flush() {
    use std::io::Write as _;
    let _ = std::io::stdout().flush();
}
