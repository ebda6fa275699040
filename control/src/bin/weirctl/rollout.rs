//! `weirctl rollout status|undo|history` and `scale`: read-modify-apply
//! of Deployments with the resource version read, and the waits on their
//! status.

use std::time::Duration;

use anyhow::bail;
use futures::StreamExt as _;
use serde_json::Value;
use weir_proto::v1::EventType;

use crate::client::{Api, ServerError, decode, name_of, ns_of, uid_of};
use crate::describe::controller_uid;
use crate::doc::Doc;
use crate::format::int;
use crate::resource::Resource;

/// The label a Deployment adds to its ReplicaSets' selector and template.
pub const HASH_LABEL: &str = "pod-template-hash";
/// The annotation carrying a Deployment's (and its ReplicaSets') revision.
pub const REVISION: &str = "deployment.kubernetes.io/revision";
/// How often a read-modify-apply is retried on a conflict.
const ATTEMPTS: usize = 5;

/// The revision annotation of a Deployment or ReplicaSet.
pub fn revision_of(v: &Value) -> Option<i64> {
    v["metadata"]["annotations"][REVISION]
        .as_str()?
        .parse()
        .ok()
}

/// The ReplicaSets a Deployment controls, oldest revision first.
pub async fn owned_replicasets(api: &Api, deployment: &Value) -> anyhow::Result<Vec<Value>> {
    let (items, _) = api
        .list(Resource::ReplicaSet, ns_of(deployment), "")
        .await?;
    let uid = uid_of(deployment);
    let mut owned: Vec<Value> = items
        .into_iter()
        .filter(|rs| controller_uid(rs) == Some(uid))
        .collect();
    owned.sort_by_key(|rs| revision_of(rs).unwrap_or(0));
    Ok(owned)
}

/// Why `rollout undo` has nothing to apply.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum UndoError {
    /// Only one (or no) revision exists.
    #[error("no rollout history found for deployment {0:?}")]
    NoHistory(String),
    /// `--to-revision` names no ReplicaSet.
    #[error("unable to find specified revision {0} in history")]
    NoRevision(i64),
}

/// What undo will do: apply `template` (from revision `revision`), or
/// nothing because the Deployment already runs it.
#[derive(Debug, PartialEq)]
pub enum Undo {
    /// Apply this pod template.
    Apply {
        /// The revision it comes from.
        revision: i64,
        /// The template, `pod-template-hash` removed.
        template: Value,
    },
    /// The current template already is that revision's.
    Skip(i64),
}

/// kubectl's rollback choice: revision `to` (0: the one before the latest)
/// among the Deployment's ReplicaSets; its template without the
/// `pod-template-hash` label.
pub fn undo_template(deployment: &Value, rss: &[Value], to: i64) -> Result<Undo, UndoError> {
    let mut revisions: Vec<i64> = rss.iter().filter_map(revision_of).collect();
    revisions.sort_unstable();
    revisions.dedup();
    let target = if to == 0 {
        match revisions.len() {
            0 | 1 => return Err(UndoError::NoHistory(name_of(deployment).to_owned())),
            n => revisions[n - 2],
        }
    } else {
        to
    };
    let Some(rs) = rss.iter().find(|rs| revision_of(rs) == Some(target)) else {
        return Err(UndoError::NoRevision(target));
    };
    let mut template = rs["spec"]["template"].clone();
    if let Some(labels) = template["metadata"]["labels"].as_object_mut() {
        labels.remove(HASH_LABEL);
    }
    if template == deployment["spec"]["template"] {
        return Ok(Undo::Skip(target));
    }
    Ok(Undo::Apply {
        revision: target,
        template,
    })
}

/// The object as a manifest for a read-modify-apply: status dropped,
/// `metadata.resourceVersion` kept so a concurrent change is a conflict.
fn as_manifest(mut v: Value) -> Value {
    if let Some(o) = v.as_object_mut() {
        o.remove("status");
    }
    v
}

/// Reads an object, changes it with `change` (which returns false to stop
/// without writing), applies it with the resource version read, and
/// retries on a conflict. Returns whether it wrote.
pub async fn modify(
    api: &Api,
    r: Resource,
    ns: &str,
    name: &str,
    mut change: impl FnMut(&mut Value) -> anyhow::Result<bool>,
) -> anyhow::Result<bool> {
    for attempt in 1..=ATTEMPTS {
        let mut v = as_manifest(api.get(r, ns, name).await?);
        if !change(&mut v)? {
            return Ok(false);
        }
        match api.apply(&v).await {
            Ok(_) => return Ok(true),
            Err(e)
                if attempt < ATTEMPTS
                    && e.downcast_ref::<ServerError>()
                        .is_some_and(|s| s.code() == tonic::Code::Aborted) =>
            {
                tokio::time::sleep(Duration::from_millis(50 * attempt as u64)).await;
            }
            Err(e) => return Err(e),
        }
    }
    unreachable!("the last attempt returns")
}

/// `scale <kind>/<name> --replicas N`.
pub async fn scale(
    api: &Api,
    r: Resource,
    ns: &str,
    name: &str,
    replicas: i64,
) -> anyhow::Result<()> {
    if !matches!(r, Resource::Deployment | Resource::ReplicaSet) {
        bail!(
            "cannot scale {}: only deployments and replicasets can be scaled",
            r.plural()
        );
    }
    if replicas < 0 {
        bail!(
            "The --replicas=COUNT flag is required, and COUNT must be greater than or equal to 0"
        );
    }
    modify(api, r, ns, name, |v| {
        v["spec"]["replicas"] = Value::from(replicas);
        Ok(true)
    })
    .await?;
    println!("{}/{name} scaled", r.qualified());
    Ok(())
}

/// kubectl's rollout status message for a Deployment, and whether it is done.
pub fn deployment_status(v: &Value) -> Result<(String, bool), String> {
    let name = name_of(v);
    let (spec, status) = (&v["spec"], &v["status"]);
    let generation = int(&v["metadata"]["generation"]);
    if generation > int(&status["observedGeneration"]) {
        return Ok((
            "Waiting for deployment spec update to be observed...".to_owned(),
            false,
        ));
    }
    let progressing = crate::printers::condition(status, "Progressing");
    if progressing.is_some_and(|c| c["reason"] == "ProgressDeadlineExceeded") {
        return Err(format!(
            "deployment {name:?} exceeded its progress deadline"
        ));
    }
    let desired = spec["replicas"].as_i64().unwrap_or(1);
    let updated = int(&status["updatedReplicas"]);
    let total = int(&status["replicas"]);
    let available = int(&status["availableReplicas"]);
    Ok(if updated < desired {
        (
            format!(
                "Waiting for deployment {name:?} rollout to finish: {updated} out of {desired} new replicas have been updated..."
            ),
            false,
        )
    } else if total > updated {
        (
            format!(
                "Waiting for deployment {name:?} rollout to finish: {} old replicas are pending termination...",
                total - updated
            ),
            false,
        )
    } else if available < updated {
        (
            format!(
                "Waiting for deployment {name:?} rollout to finish: {available} of {updated} updated replicas are available..."
            ),
            false,
        )
    } else {
        (format!("deployment {name:?} successfully rolled out"), true)
    })
}

/// kubectl's rollout status message for a `DaemonSet`.
#[expect(
    clippy::unnecessary_wraps,
    reason = "the same signature as deployment_status: rollout status picks one"
)]
pub fn daemonset_status(v: &Value) -> Result<(String, bool), String> {
    let name = name_of(v);
    let s = &v["status"];
    if int(&v["metadata"]["generation"]) > int(&s["observedGeneration"]) {
        return Ok((
            "Waiting for daemon set spec update to be observed...".to_owned(),
            false,
        ));
    }
    let desired = int(&s["desiredNumberScheduled"]);
    let updated = int(&s["updatedNumberScheduled"]);
    let available = int(&s["numberAvailable"]);
    Ok(if updated < desired {
        (
            format!(
                "Waiting for daemon set {name:?} rollout to finish: {updated} out of {desired} new pods have been updated..."
            ),
            false,
        )
    } else if available < desired {
        (
            format!(
                "Waiting for daemon set {name:?} rollout to finish: {available} of {desired} updated pods are available..."
            ),
            false,
        )
    } else {
        (format!("daemon set {name:?} successfully rolled out"), true)
    })
}

/// `rollout status`: prints each new status line until done; `timeout`
/// zero waits forever.
pub async fn status(
    api: &Api,
    r: Resource,
    ns: &str,
    name: &str,
    timeout: Duration,
    watch: bool,
) -> anyhow::Result<()> {
    let check = match r {
        Resource::Deployment => deployment_status,
        Resource::DaemonSet => daemonset_status,
        _ => bail!("no status viewer has been implemented for {}", r.plural()),
    };
    let wait = async {
        let mut last = String::new();
        loop {
            let (items, revision) = api.list(r, ns, "").await?;
            let Some(v) = items.into_iter().find(|v| name_of(v) == name) else {
                return Err(ServerError {
                    server: String::new(),
                    status: tonic::Status::not_found(format!(
                        "{} \"{name}\" not found",
                        r.plural()
                    )),
                }
                .into());
            };
            let mut current = v;
            let mut stream = api.watch(r, ns, "", revision).await?;
            loop {
                let (msg, done) = check(&current).map_err(anyhow::Error::msg)?;
                if msg != last {
                    println!("{msg}");
                    last = msg;
                }
                if done || !watch {
                    return Ok::<(), anyhow::Error>(());
                }
                let Some(event) = next_for(&mut stream, name, api).await? else {
                    break; // compacted: list again
                };
                if event.r#type() == EventType::Deleted {
                    bail!("object has been deleted");
                }
                if let Some(o) = event.object.as_ref() {
                    current = decode(o)?;
                }
            }
        }
    };
    if timeout.is_zero() {
        wait.await
    } else {
        match tokio::time::timeout(timeout, wait).await {
            Ok(r) => r,
            Err(_) => bail!("timed out waiting for the condition"),
        }
    }
}

/// The next watch event about `name`; `None` when the watch must re-list.
async fn next_for(
    stream: &mut tonic::Streaming<weir_proto::v1::WatchEvent>,
    name: &str,
    api: &Api,
) -> anyhow::Result<Option<weir_proto::v1::WatchEvent>> {
    while let Some(event) = stream.next().await {
        let event = event.map_err(|s| api.stream_error(s))?;
        if event.r#type() == EventType::Error {
            return Ok(None);
        }
        if event
            .object
            .as_ref()
            .and_then(|o| o.meta.as_ref())
            .is_some_and(|m| m.name == name)
        {
            return Ok(Some(event));
        }
    }
    bail!("the watch was closed by the server")
}

/// `rollout undo deployment/<name> [--to-revision N]`.
pub async fn undo(api: &Api, ns: &str, name: &str, to: i64) -> anyhow::Result<()> {
    let mut outcome = None;
    let d = api.get(Resource::Deployment, ns, name).await?;
    let rss = owned_replicasets(api, &d).await?;
    let wrote = modify(
        api,
        Resource::Deployment,
        ns,
        name,
        |v| match undo_template(v, &rss, to)? {
            Undo::Skip(rev) => {
                outcome = Some(rev);
                Ok(false)
            }
            Undo::Apply { template, .. } => {
                v["spec"]["template"] = template;
                Ok(true)
            }
        },
    )
    .await?;
    if wrote {
        println!("deployment.apps/{name} rolled back");
    } else if let Some(rev) = outcome {
        println!(
            "deployment.apps/{name} skipped rollback (current template already matches revision {rev})"
        );
    }
    Ok(())
}

/// `rollout history deployment/<name> [--revision N]`.
pub async fn history(api: &Api, ns: &str, name: &str, revision: i64) -> anyhow::Result<()> {
    let d = api.get(Resource::Deployment, ns, name).await?;
    let rss = owned_replicasets(api, &d).await?;
    if revision > 0 {
        let Some(rs) = rss.iter().find(|rs| revision_of(rs) == Some(revision)) else {
            bail!("unable to find the specified revision");
        };
        println!("deployment.apps/{name} with revision #{revision}");
        let mut doc = Doc::default();
        let t = &rs["spec"]["template"];
        doc.line(0, &["Pod Template:"]);
        doc.map(1, "Labels", &t["metadata"]["labels"], "=");
        doc.line(1, &["Containers:"]);
        for c in t["spec"]["containers"].as_array().into_iter().flatten() {
            doc.line(
                1,
                &[&format!(" {}:", c["name"].as_str().unwrap_or_default())],
            );
            doc.kv(2, "Image", c["image"].as_str().unwrap_or_default());
        }
        print!("{}", doc.render());
        return Ok(());
    }
    println!("deployment.apps/{name} ");
    let mut t = crate::format::Table::new(&["REVISION", "CHANGE-CAUSE"]);
    for rs in &rss {
        if let Some(rev) = revision_of(rs) {
            let cause = rs["metadata"]["annotations"]["kubernetes.io/change-cause"]
                .as_str()
                .unwrap_or("<none>");
            t.rows.push(vec![rev.to_string(), cause.to_owned()]);
        }
    }
    print!("{}", t.render(true));
    Ok(())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn rs(rev: i64, image: &str) -> Value {
        json!({"metadata": {"name": format!("web-{rev}"), "annotations": {REVISION: rev.to_string()}},
            "spec": {"template": {"metadata": {"labels": {"app": "web", HASH_LABEL: format!("h{rev}")}},
                                  "spec": {"containers": [{"name": "c", "image": image}]}}}})
    }

    fn deploy(image: &str) -> Value {
        json!({"metadata": {"name": "web"}, "spec": {"template": {"metadata": {"labels": {"app": "web"}},
            "spec": {"containers": [{"name": "c", "image": image}]}}}})
    }

    #[test]
    fn undo_picks_the_previous_revision_without_the_hash_label() {
        let rss = [rs(1, "v1"), rs(3, "v3"), rs(2, "v2")];
        let Ok(Undo::Apply { revision, template }) = undo_template(&deploy("v3"), &rss, 0) else {
            panic!("expected an apply");
        };
        assert_eq!(revision, 2);
        assert_eq!(template["spec"]["containers"][0]["image"], "v2");
        assert_eq!(template["metadata"]["labels"], json!({"app": "web"}));
        let Ok(Undo::Apply { template, .. }) = undo_template(&deploy("v3"), &rss, 1) else {
            panic!("expected an apply");
        };
        assert_eq!(template["spec"]["containers"][0]["image"], "v1");
        assert_eq!(undo_template(&deploy("v3"), &rss, 3), Ok(Undo::Skip(3)));
        assert_eq!(
            undo_template(&deploy("v3"), &rss, 7),
            Err(UndoError::NoRevision(7))
        );
        assert_eq!(
            undo_template(&deploy("v1"), &[rs(1, "v1")], 0),
            Err(UndoError::NoHistory("web".to_owned()))
        );
    }

    #[test]
    fn rollout_status_messages_match_kubectl() {
        let mut d = json!({"metadata": {"name": "web", "generation": 2}, "spec": {"replicas": 6},
            "status": {"observedGeneration": 1}});
        assert_eq!(
            deployment_status(&d).expect("ok").0,
            "Waiting for deployment spec update to be observed..."
        );
        d["status"] = json!({"observedGeneration": 2, "replicas": 8, "updatedReplicas": 3, "availableReplicas": 5});
        assert_eq!(
            deployment_status(&d).expect("ok").0,
            "Waiting for deployment \"web\" rollout to finish: 3 out of 6 new replicas have been updated..."
        );
        d["status"] = json!({"observedGeneration": 2, "replicas": 8, "updatedReplicas": 6, "availableReplicas": 5});
        assert!(
            deployment_status(&d)
                .expect("ok")
                .0
                .ends_with("2 old replicas are pending termination...")
        );
        d["status"] = json!({"observedGeneration": 2, "replicas": 6, "updatedReplicas": 6, "availableReplicas": 2});
        assert_eq!(
            deployment_status(&d).expect("ok").0,
            "Waiting for deployment \"web\" rollout to finish: 2 of 6 updated replicas are available..."
        );
        d["status"]["availableReplicas"] = json!(6);
        assert_eq!(
            deployment_status(&d),
            Ok((
                "deployment \"web\" successfully rolled out".to_owned(),
                true
            ))
        );
    }
}
