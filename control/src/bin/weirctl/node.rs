//! `weirctl cordon|uncordon|drain`: `spec.unschedulable` by read-modify-apply,
//! and evicting a node's pods (graceful Delete) the way kubectl drain does.

use std::time::{Duration, Instant};

use anyhow::bail;
use serde_json::Value;

use crate::client::{Api, name_of, ns_of, uid_of};
use crate::describe::controller_ref;
use crate::resource::Resource;
use crate::rollout::modify;

/// Sets (cordon) or clears (uncordon) `spec.unschedulable`; prints
/// `node/<name> cordoned` or `already cordoned`.
pub async fn cordon(api: &Api, name: &str, on: bool) -> anyhow::Result<()> {
    let wrote = modify(api, Resource::Node, "", name, |v| {
        if (v["spec"]["unschedulable"] == true) == on {
            return Ok(false);
        }
        if on {
            v["spec"]["unschedulable"] = Value::Bool(true);
        } else if let Some(spec) = v["spec"].as_object_mut() {
            spec.remove("unschedulable");
        }
        Ok(true)
    })
    .await?;
    let verb = if on { "cordoned" } else { "uncordoned" };
    if wrote {
        println!("node/{name} {verb}");
    } else {
        println!("node/{name} already {verb}");
    }
    Ok(())
}

/// Options of `drain`.
#[derive(Debug, Clone)]
pub struct DrainOptions {
    /// Leave DaemonSet pods in place instead of refusing.
    pub ignore_daemonsets: bool,
    /// Evict pods with emptyDir volumes (their data is lost).
    pub delete_emptydir_data: bool,
    /// Evict pods no controller will recreate.
    pub force: bool,
    /// Grace period for each pod (None: the pod's own).
    pub grace_period: Option<i64>,
    /// How long to wait for the pods to go (zero: forever).
    pub timeout: Duration,
}

/// What drain does with each pod on the node.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct DrainPlan {
    /// `ns/name` of the pods to evict.
    pub evict: Vec<(String, String)>,
    /// DaemonSet pods left alone (warned about).
    pub ignored: Vec<String>,
    /// Reasons drain refuses, each `<why>: ns/a, ns/b`.
    pub errors: Vec<String>,
}

/// kubectl drain's filters: mirror pods are skipped; finished pods are
/// always deleted; DaemonSet pods need `--ignore-daemonsets`; pods without
/// a controller need `--force`; pods with emptyDir need
/// `--delete-emptydir-data`.
pub fn plan(pods: &[Value], o: &DrainOptions) -> DrainPlan {
    let mut p = DrainPlan::default();
    let (mut daemon, mut unmanaged, mut local) = (Vec::new(), Vec::new(), Vec::new());
    for pod in pods {
        let id = format!("{}/{}", ns_of(pod), name_of(pod));
        if pod["metadata"]["annotations"]["kubernetes.io/config.mirror"].is_string() {
            continue;
        }
        let finished = matches!(
            pod["status"]["phase"].as_str(),
            Some("Succeeded" | "Failed")
        );
        let owner = controller_ref(pod);
        if !finished && owner.is_some_and(|o| o["kind"] == "DaemonSet") {
            if o.ignore_daemonsets {
                p.ignored.push(id);
            } else {
                daemon.push(id);
            }
            continue;
        }
        if !finished && owner.is_none() && !o.force {
            unmanaged.push(id.clone());
        }
        let empty_dir = pod["spec"]["volumes"]
            .as_array()
            .is_some_and(|v| v.iter().any(|v| v["emptyDir"].is_object()));
        if !finished && empty_dir && !o.delete_emptydir_data {
            local.push(id.clone());
        }
        p.evict
            .push((ns_of(pod).to_owned(), name_of(pod).to_owned()));
    }
    for (list, why) in [
        (
            daemon,
            "cannot delete DaemonSet-managed Pods (use --ignore-daemonsets to ignore)",
        ),
        (
            unmanaged,
            "cannot delete Pods that declare no controller (use --force to override)",
        ),
        (
            local,
            "cannot delete Pods with local storage (use --delete-emptydir-data to override)",
        ),
    ] {
        if !list.is_empty() {
            p.errors.push(format!("{why}: {}", list.join(", ")));
        }
    }
    p
}

async fn pods_on(api: &Api, node: &str) -> anyhow::Result<Vec<Value>> {
    let (pods, _) = api.list(Resource::Pod, "", "").await?;
    Ok(pods
        .into_iter()
        .filter(|p| p["spec"]["nodeName"] == node)
        .collect())
}

/// `drain <node>`: cordon, check, evict, wait.
pub async fn drain(api: &Api, node: &str, o: &DrainOptions) -> anyhow::Result<()> {
    api.get(Resource::Node, "", node).await?;
    cordon(api, node, true).await?;
    let pods = pods_on(api, node).await?;
    let p = plan(&pods, o);
    if !p.errors.is_empty() {
        eprintln!(
            "error: unable to drain node {node:?} due to error: {}, continuing command...",
            p.errors.join(", ")
        );
        eprintln!("There are pending nodes to be drained:\n {node}");
        for e in &p.errors {
            eprintln!("{e}");
        }
        return Err(crate::Reported.into());
    }
    if !p.ignored.is_empty() {
        eprintln!(
            "Warning: ignoring DaemonSet-managed Pods: {}",
            p.ignored.join(", ")
        );
    }
    if o.force {
        let unmanaged: Vec<String> = pods
            .iter()
            .filter(|pod| controller_ref(pod).is_none())
            .map(|pod| format!("{}/{}", ns_of(pod), name_of(pod)))
            .collect();
        if !unmanaged.is_empty() {
            eprintln!(
                "Warning: deleting Pods that declare no controller: {}",
                unmanaged.join(", ")
            );
        }
    }
    let mut waiting = Vec::new();
    for (ns, name) in &p.evict {
        println!("evicting pod {ns}/{name}");
        match api
            .delete(Resource::Pod, ns, name, "Background", o.grace_period)
            .await
        {
            Ok(last) => waiting.push((ns.clone(), name.clone(), uid_of(&last).to_owned())),
            Err(e)
                if e.downcast_ref::<crate::client::ServerError>()
                    .is_some_and(|s| s.code() == tonic::Code::NotFound) =>
            {
                println!("pod/{name} evicted");
            }
            Err(e) => return Err(e),
        }
    }
    let start = Instant::now();
    while !waiting.is_empty() {
        let mut still = Vec::new();
        for (ns, name, uid) in waiting {
            match api.try_get(Resource::Pod, &ns, &name).await? {
                Some(v) if uid_of(&v) == uid => still.push((ns, name, uid)),
                _ => println!("pod/{name} evicted"),
            }
        }
        waiting = still;
        if waiting.is_empty() {
            break;
        }
        if !o.timeout.is_zero() && start.elapsed() > o.timeout {
            let left: Vec<String> = waiting
                .iter()
                .map(|(ns, n, _)| format!("{ns}/{n}"))
                .collect();
            bail!(
                "unable to drain node {node:?} due to error: global timeout reached: {:?}, pods still on the node: {}",
                o.timeout,
                left.join(", ")
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    println!("node/{node} drained");
    Ok(())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn pod(name: &str, owner: Option<&str>) -> Value {
        let mut p = json!({"metadata": {"name": name, "namespace": "default"}, "spec": {"nodeName": "n1"},
            "status": {"phase": "Running"}});
        if let Some(kind) = owner {
            p["metadata"]["ownerReferences"] =
                json!([{"kind": kind, "name": "o", "uid": "u", "controller": true}]);
        }
        p
    }

    fn opts() -> DrainOptions {
        DrainOptions {
            ignore_daemonsets: false,
            delete_emptydir_data: false,
            force: false,
            grace_period: None,
            timeout: Duration::ZERO,
        }
    }

    #[test]
    fn drain_refuses_like_kubectl_and_evicts_the_rest() {
        let mut scratch = pod("scratch", Some("ReplicaSet"));
        scratch["spec"]["volumes"] = json!([{"name": "tmp", "emptyDir": {}}]);
        let mut mirror = pod("static", None);
        mirror["metadata"]["annotations"] = json!({"kubernetes.io/config.mirror": "x"});
        let mut done = pod("job", None);
        done["status"]["phase"] = json!("Succeeded");
        let pods = [
            pod("web", Some("ReplicaSet")),
            pod("ds", Some("DaemonSet")),
            pod("bare", None),
            scratch,
            mirror,
            done,
        ];
        let p = plan(&pods, &opts());
        assert_eq!(
            p.errors,
            vec![
                "cannot delete DaemonSet-managed Pods (use --ignore-daemonsets to ignore): default/ds",
                "cannot delete Pods that declare no controller (use --force to override): default/bare",
                "cannot delete Pods with local storage (use --delete-emptydir-data to override): default/scratch",
            ]
        );
        let p = plan(
            &pods,
            &DrainOptions {
                ignore_daemonsets: true,
                delete_emptydir_data: true,
                force: true,
                ..opts()
            },
        );
        assert!(p.errors.is_empty());
        assert_eq!(p.ignored, vec!["default/ds"]);
        let names: Vec<&str> = p.evict.iter().map(|(_, n)| n.as_str()).collect();
        assert_eq!(names, vec!["web", "bare", "scratch", "job"]);
    }
}
