//! `weirctl delete`: by kind and names, by `-l`, or by the objects in
//! manifests (`-f`), with kubectl's grace period, force and cascade flags.

use std::time::{Duration, Instant};

use anyhow::bail;
use serde_json::Value;

use crate::apply::{locate, read_manifests};
use crate::client::{Api, ServerError, name_of, uid_of};
use crate::resource::{Resource, targets};

/// Options of `delete`.
#[derive(Debug, Clone)]
pub struct DeleteOptions {
    /// `--grace-period` (negative: the object's own).
    pub grace_period: i64,
    /// `--force`: no graceful termination.
    pub force: bool,
    /// `--cascade`: background, foreground or orphan.
    pub cascade: String,
    /// `--wait`: return once the objects are gone.
    pub wait: bool,
    /// `--timeout` for `--wait` (zero: forever).
    pub timeout: Duration,
    /// `--ignore-not-found`.
    pub ignore_not_found: bool,
}

/// The propagation policy of a `--cascade` value.
pub fn propagation(cascade: &str) -> anyhow::Result<&'static str> {
    Ok(match cascade {
        "background" | "true" => "Background",
        "foreground" => "Foreground",
        "orphan" | "false" => "Orphan",
        other => bail!(
            "invalid cascade value ({other}). Must be \"background\", \"foreground\", or \"orphan\""
        ),
    })
}

/// The grace period to send: `--force` alone is 0; 0 without `--force` is
/// kubectl's 1 (immediate deletion needs `--force`); negative is unset.
pub fn grace(o: &DeleteOptions) -> Option<i64> {
    match (o.grace_period, o.force) {
        (g, true) if g < 0 => Some(0),
        (0, false) => Some(1),
        (g, _) if g < 0 => None,
        (g, _) => Some(g),
    }
}

/// Runs `delete`.
pub async fn run(
    api: &Api,
    args: &[String],
    files: &[String],
    ns: &str,
    selector: &str,
    all: bool,
    o: &DeleteOptions,
) -> anyhow::Result<()> {
    let propagation = propagation(&o.cascade)?;
    let objects = collect(api, args, files, ns, selector, all).await?;
    if o.force {
        eprintln!(
            "Warning: Immediate deletion does not wait for confirmation that the running resource has been terminated. The resource may continue to run on the cluster indefinitely."
        );
    }
    let grace = grace(o);
    let mut failed = false;
    let mut deleted: Vec<(Resource, String, String, String)> = Vec::new();
    for (r, ns, name) in objects {
        match api.delete(r, &ns, &name, propagation, grace).await {
            Ok(last) => {
                let verb = if grace == Some(0) {
                    "force deleted"
                } else {
                    "deleted"
                };
                println!("{} \"{name}\" {verb}", r.qualified());
                deleted.push((r, ns, name, uid_of(&last).to_owned()));
            }
            Err(e)
                if o.ignore_not_found
                    && e.downcast_ref::<ServerError>()
                        .is_some_and(|s| s.code() == tonic::Code::NotFound) => {}
            Err(e) => {
                eprintln!("{e}");
                failed = true;
            }
        }
    }
    if o.wait {
        wait_gone(api, &deleted, o.timeout).await?;
    }
    if failed {
        return Err(crate::Reported.into());
    }
    Ok(())
}

/// The (resource, namespace, name) of every object to delete.
async fn collect(
    api: &Api,
    args: &[String],
    files: &[String],
    ns: &str,
    selector: &str,
    all: bool,
) -> anyhow::Result<Vec<(Resource, String, String)>> {
    let mut objects = Vec::new();
    if files.is_empty() {
        if args.is_empty() {
            bail!("You must provide one or more resources by argument or filename.");
        }
        for (r, name) in targets(args)? {
            let ns = if r.namespaced() { ns } else { "" };
            match name {
                Some(n) => objects.push((r, ns.to_owned(), n)),
                None if selector.is_empty() && !all => {
                    bail!("resource(s) were provided, but no name was specified")
                }
                None => {
                    let (items, _) = api.list(r, ns, selector).await?;
                    if items.is_empty() {
                        eprintln!("No resources found");
                    }
                    objects.extend(
                        items
                            .iter()
                            .map(|v| (r, ns.to_owned(), name_of(v).to_owned())),
                    );
                }
            }
        }
    } else {
        for mut d in read_manifests(files)? {
            let Some((r, ns)) = locate(&mut d.value, ns) else {
                bail!("{}: kind {:?} is not supported", d.source, d.value["kind"]);
            };
            objects.push((r, ns, name_of(&d.value).to_owned()));
        }
    }
    Ok(objects)
}

/// Waits until each deleted object (by uid) is gone.
async fn wait_gone(
    api: &Api,
    deleted: &[(Resource, String, String, String)],
    timeout: Duration,
) -> anyhow::Result<()> {
    let start = Instant::now();
    for (r, ns, name, uid) in deleted {
        loop {
            let still: Option<Value> = api.try_get(*r, ns, name).await?;
            if still.as_ref().is_none_or(|v| uid_of(v) != uid) {
                break;
            }
            if !timeout.is_zero() && start.elapsed() > timeout {
                bail!(
                    "timed out waiting for the condition on {}/{name}",
                    r.plural()
                );
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grace_and_cascade_follow_kubectl() {
        let o = |grace_period, force| DeleteOptions {
            grace_period,
            force,
            cascade: "background".into(),
            wait: false,
            timeout: Duration::ZERO,
            ignore_not_found: false,
        };
        assert_eq!(grace(&o(-1, false)), None);
        assert_eq!(grace(&o(-1, true)), Some(0));
        assert_eq!(grace(&o(0, false)), Some(1));
        assert_eq!(grace(&o(0, true)), Some(0));
        assert_eq!(grace(&o(10, false)), Some(10));
        assert_eq!(propagation("orphan").expect("ok"), "Orphan");
        assert_eq!(propagation("false").expect("ok"), "Orphan");
        assert!(propagation("sideways").is_err());
    }
}
