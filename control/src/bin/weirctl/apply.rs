//! `weirctl apply -f`: manifests from files, directories or stdin
//! (multi-document YAML), each printed as `kind/name created|configured|unchanged`.

use std::{io::Read as _, path::Path};

use anyhow::Context as _;
use serde_json::Value;
use weir_proto::manifest;

use crate::client::{Api, ServerError, name_of};
use crate::resource::Resource;

/// One manifest document and the file it came from.
#[derive(Debug, Clone)]
pub struct Document {
    /// The file (or `-`).
    pub source: String,
    /// The object.
    pub value: Value,
}

/// Reads every document named by `files` (a file, a directory of
/// `.yaml`/`.yml`/`.json` files, or `-` for stdin).
pub fn read_manifests(files: &[String]) -> anyhow::Result<Vec<Document>> {
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

fn push_docs(source: &str, text: &str, out: &mut Vec<Document>) -> anyhow::Result<()> {
    for value in manifest::parse_documents(source, text)? {
        // A `kind: List` carries its objects in `items`.
        if value["kind"] == "List"
            && let Some(items) = value["items"].as_array()
        {
            out.extend(items.iter().map(|v| Document {
                source: source.to_owned(),
                value: v.clone(),
            }));
            continue;
        }
        out.push(Document {
            source: source.to_owned(),
            value,
        });
    }
    Ok(())
}

/// The resource of a manifest, and its namespace with `-n` applied.
pub fn locate(doc: &mut Value, namespace: &str) -> Option<(Resource, String)> {
    let r = Resource::from_kind(doc["kind"].as_str()?)?;
    if !r.namespaced() {
        return Some((r, String::new()));
    }
    let ns = match doc["metadata"]["namespace"].as_str() {
        Some(ns) if !ns.is_empty() => ns.to_owned(),
        _ => {
            if let Some(m) = doc["metadata"].as_object_mut() {
                m.insert("namespace".to_owned(), Value::from(namespace));
            }
            namespace.to_owned()
        }
    };
    Some((r, ns))
}

/// Applies every manifest; each failure is printed and the command fails
/// at the end, as kubectl does.
pub async fn run(api: &Api, files: &[String], namespace: &str) -> anyhow::Result<()> {
    let docs = read_manifests(files)?;
    let mut failed = false;
    for mut d in docs {
        let located = locate(&mut d.value, namespace);
        let before = match &located {
            Some((r, ns)) => api.try_get(*r, ns, name_of(&d.value)).await.ok().flatten(),
            None => None,
        };
        match api.apply(&d.value).await {
            Ok((object, created, warnings)) => {
                for w in warnings {
                    eprintln!("Warning: {w}");
                }
                let kind = object["kind"].as_str().unwrap_or_default();
                let qualified = Resource::from_kind(kind)
                    .map_or_else(|| kind.to_ascii_lowercase(), |r| r.qualified().to_owned());
                let unchanged = before.as_ref().is_some_and(|b| {
                    b["metadata"]["resourceVersion"] == object["metadata"]["resourceVersion"]
                });
                let verb = if created {
                    "created"
                } else if unchanged {
                    "unchanged"
                } else {
                    "configured"
                };
                println!("{qualified}/{} {verb}", name_of(&object));
            }
            Err(e) => {
                failed = true;
                match e.downcast_ref::<ServerError>() {
                    Some(s) if s.code() != tonic::Code::Unavailable => eprintln!(
                        "Error from server ({}): error when applying \"{}\": {}",
                        reason(s.code()),
                        d.source,
                        s.status.message()
                    ),
                    _ => eprintln!("{e}"),
                }
            }
        }
    }
    if failed {
        return Err(crate::Reported.into());
    }
    Ok(())
}

fn reason(code: tonic::Code) -> &'static str {
    match code {
        tonic::Code::NotFound => "NotFound",
        tonic::Code::Aborted => "Conflict",
        tonic::Code::InvalidArgument => "BadRequest",
        _ => "InternalError",
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn namespace_flag_fills_namespaced_manifests_only() {
        let mut pod = json!({"kind": "Pod", "metadata": {"name": "p"}});
        assert_eq!(
            locate(&mut pod, "shop"),
            Some((Resource::Pod, "shop".to_owned()))
        );
        assert_eq!(pod["metadata"]["namespace"], "shop");
        let mut node = json!({"kind": "Node", "metadata": {"name": "n"}});
        assert_eq!(
            locate(&mut node, "shop"),
            Some((Resource::Node, String::new()))
        );
        assert!(node["metadata"].get("namespace").is_none());
        let mut other = json!({"kind": "Widget", "metadata": {"name": "w"}});
        assert_eq!(locate(&mut other, "shop"), None);
    }
}
