//! weir-control end to end: the real binary, its embedded store, gRPC over
//! loopback, and a SIGKILL in between.

use std::{
    net::{SocketAddr, TcpListener},
    process::{Child, Command, Stdio},
    time::Duration,
};

use weir_proto::v1::{ApplyRequest, ObjectRef, objects_client::ObjectsClient};

struct Control {
    child: Child,
    addr: SocketAddr,
}

impl Control {
    fn start(store: &std::path::Path, addr: SocketAddr) -> anyhow::Result<Self> {
        // The API alone: these tests write what controllers and agents
        // would report themselves, to check weirctl's output against it.
        let child = Command::new(weir_tests::control_bin())
            .args(["--listen", &addr.to_string(), "--disable-controllers"])
            .arg("--store")
            .arg(store)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        weir_tests::wait_for("weir-control listening", Duration::from_secs(20), || {
            std::net::TcpStream::connect(addr).ok()
        })?;
        Ok(Self { child, addr })
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Control {
    fn drop(&mut self) {
        self.kill();
    }
}

fn free_addr() -> anyhow::Result<SocketAddr> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

const POD: &str = r#"{"apiVersion":"v1","kind":"Pod","metadata":{"name":"web","labels":{"app":"web"}},"spec":{"containers":[{"name":"c","image":"busybox"}]}}"#;

#[tokio::test(flavor = "multi_thread")]
async fn applied_objects_survive_a_sigkill_of_weir_control() -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("weir-control-e2e-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let store = dir.join("weir.redb");
    let addr = free_addr()?;
    let mut control = Control::start(&store, addr)?;
    let mut client = ObjectsClient::connect(format!("http://{}", control.addr)).await?;
    let created = client
        .apply(ApplyRequest {
            manifest_json: POD.into(),
            field_manager: "e2e".into(),
        })
        .await?
        .into_inner();
    assert!(created.created);
    let meta = created
        .object
        .and_then(|o| o.meta)
        .expect("applied object has metadata");
    assert_eq!(
        (meta.namespace.as_str(), meta.name.as_str()),
        ("default", "web")
    );
    assert!(!meta.uid.is_empty() && meta.resource_version > 0);
    // Bad input is refused with the field named, and nothing is stored.
    let bad = POD
        .replace(
            r#""image":"busybox""#,
            r#""image":"busybox","resources":{"limits":{"cpu":"lots"}}"#,
        )
        .replace("\"web\"", "\"bad\"");
    let err = client
        .apply(ApplyRequest {
            manifest_json: bad,
            field_manager: "e2e".into(),
        })
        .await
        .expect_err("cpu: lots is refused");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(
        err.message()
            .contains("spec.containers[0].resources.limits.cpu"),
        "{}",
        err.message()
    );

    control.kill();
    let mut control = Control::start(&store, addr)?;
    let mut client = ObjectsClient::connect(format!("http://{}", control.addr)).await?;
    let get = |name: &str| ObjectRef {
        api_version: "v1".into(),
        kind: "Pod".into(),
        namespace: "default".into(),
        name: name.into(),
    };
    let after = client
        .get(get("web"))
        .await?
        .into_inner()
        .meta
        .expect("metadata");
    assert_eq!(
        after.uid, meta.uid,
        "the pod's uid changed across a SIGKILL"
    );
    assert_eq!(after.resource_version, meta.resource_version);
    let missing = client
        .get(get("bad"))
        .await
        .expect_err("the refused pod was not stored");
    assert_eq!(missing.code(), tonic::Code::NotFound);
    control.kill();
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

/// Runs weirctl against `server`; returns (success, stdout, stderr).
fn weirctl(server: SocketAddr, args: &[&str]) -> anyhow::Result<(bool, String, String)> {
    weir_tests::weirctl(&format!("http://{server}"), args, None)
}

#[test]
fn weirctl_applies_gets_and_deletes_like_kubectl() -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("weir-weirctl-e2e-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("m"))?;
    let control = Control::start(&dir.join("weir.redb"), free_addr()?)?;
    let s = control.addr;
    std::fs::write(
        dir.join("m/app.yaml"),
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: shop\n---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: web\n  namespace: shop\n  labels: {app: web}\nspec:\n  containers:\n  - name: c\n    image: busybox\n",
    )?;
    let m = dir.join("m").display().to_string();
    let (ok, out, err) = weirctl(s, &["apply", "-f", &m])?;
    assert!(ok, "{err}");
    assert_eq!(out, "namespace/shop created\npod/web created\n");
    let (ok, out, _) = weirctl(s, &["apply", "-f", &m])?;
    assert!(ok);
    assert_eq!(out, "namespace/shop unchanged\npod/web unchanged\n");
    std::fs::write(
        dir.join("m/app.yaml"),
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: shop\n---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: web\n  namespace: shop\n  labels: {app: web, tier: front}\nspec:\n  containers:\n  - name: c\n    image: busybox\n",
    )?;
    let (ok, out, _) = weirctl(s, &["apply", "-f", &m])?;
    assert!(ok);
    assert_eq!(out, "namespace/shop unchanged\npod/web configured\n");

    let (ok, out, _) = weirctl(s, &["get", "pods", "-A"])?;
    assert!(ok);
    let lines: Vec<&str> = out.lines().collect();
    assert!(
        lines[0].starts_with("NAMESPACE") && lines[0].contains("STATUS"),
        "{out}"
    );
    assert!(
        lines[1].starts_with("shop") && lines[1].contains("web") && lines[1].contains("0/1"),
        "{out}"
    );
    let (ok, out, _) = weirctl(s, &["get", "pod", "web", "-n", "shop", "-o", "json"])?;
    assert!(ok);
    let v: serde_json::Value = serde_json::from_str(&out)?;
    assert_eq!(
        v["spec"]["restartPolicy"], "Always",
        "defaults applied: {out}"
    );
    let (ok, out, _) = weirctl(s, &["get", "pods", "-n", "shop", "-l", "app!=web"])?;
    assert!(ok && out.is_empty(), "{out}");

    // Bad input: one line naming the file and the field, non-zero exit.
    std::fs::write(
        dir.join("bad.yaml"),
        "apiVersion: v1\nkind: Pod\nmetadata: {name: bad}\nspec:\n  containers:\n  - {name: c, image: busybox, ports: [{containerPort: 0}]}\n",
    )?;
    let (ok, _, err) = weirctl(
        s,
        &["apply", "-f", &dir.join("bad.yaml").display().to_string()],
    )?;
    assert!(!ok);
    assert!(
        err.contains("bad.yaml") && err.contains("spec.containers[0].ports[0].containerPort"),
        "{err}"
    );
    let (ok, _, err) = weirctl(s, &["get", "widgets"])?;
    assert!(
        !ok && err.contains("doesn't have a resource type \"widgets\""),
        "{err}"
    );

    let (ok, out, _) = weirctl(s, &["delete", "pod", "web", "-n", "shop"])?;
    assert!(ok);
    assert_eq!(out, "pod \"web\" deleted\n");
    let (ok, _, err) = weirctl(s, &["get", "pod", "web", "-n", "shop"])?;
    assert_eq!(
        (ok, err.as_str()),
        (
            false,
            "Error from server (NotFound): pods \"web\" not found\n"
        )
    );
    drop(control);
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

/// A weir-control on a free port over a private store, removed on drop,
/// and the weirctl calls the tests make against it.
struct Env {
    control: Control,
    dir: std::path::PathBuf,
    files: std::cell::Cell<u32>,
}

impl Env {
    fn start(tag: &str) -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(format!("weir-ctl-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let control = Control::start(&dir.join("weir.redb"), free_addr()?)?;
        Ok(Self {
            control,
            dir,
            files: std::cell::Cell::new(0),
        })
    }

    /// weirctl with `args`: (success, stdout, stderr).
    fn ctl(&self, args: &[&str]) -> anyhow::Result<(bool, String, String)> {
        weirctl(self.control.addr, args)
    }

    /// weirctl with `args` in the background: stdout piped, stderr as given.
    fn spawn(&self, args: &[&str], stderr: Stdio) -> anyhow::Result<Child> {
        Ok(Command::new(weir_tests::weirctl_bin())
            .args(["--server", &format!("http://{}", self.control.addr)])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()?)
    }

    /// weirctl that must succeed; its stdout.
    fn ok(&self, args: &[&str]) -> anyhow::Result<String> {
        let (ok, out, err) = self.ctl(args)?;
        anyhow::ensure!(ok, "weirctl {args:?} failed: {err}{out}");
        Ok(out)
    }

    /// weirctl that must fail; its stderr.
    fn fails(&self, args: &[&str]) -> anyhow::Result<String> {
        let (ok, out, err) = self.ctl(args)?;
        anyhow::ensure!(!ok, "weirctl {args:?} succeeded: {out}");
        Ok(err)
    }

    /// `weirctl apply -f` of a manifest written to a fresh file.
    fn apply(&self, yaml: &str) -> anyhow::Result<String> {
        let n = self.files.get() + 1;
        self.files.set(n);
        let path = self.dir.join(format!("m{n}.yaml"));
        std::fs::write(&path, yaml)?;
        self.ok(&["apply", "-f", &path.display().to_string()])
    }

    /// An object as JSON through `get -o json`.
    fn json(&self, args: &[&str]) -> anyhow::Result<serde_json::Value> {
        let mut all = args.to_vec();
        all.extend(["-o", "json"]);
        Ok(serde_json::from_str(&self.ok(&all)?)?)
    }

    /// The uid of an object.
    fn uid(&self, args: &[&str]) -> anyhow::Result<String> {
        let v = self.json(args)?;
        Ok(v["metadata"]["uid"]
            .as_str()
            .ok_or_else(|| anyhow::anyhow!("{args:?} has no uid"))?
            .to_owned())
    }

    /// Writes an object's status as a controller or agent would.
    fn status(
        &self,
        kind: &str,
        ns: &str,
        name: &str,
        status: &serde_json::Value,
    ) -> anyhow::Result<()> {
        let addr = format!("http://{}", self.control.addr);
        let api_version = if matches!(kind, "Deployment" | "ReplicaSet" | "DaemonSet") {
            "apps/v1"
        } else {
            "v1"
        };
        let req = weir_proto::v1::UpdateStatusRequest {
            r#ref: Some(ObjectRef {
                api_version: api_version.into(),
                kind: kind.into(),
                namespace: ns.into(),
                name: name.into(),
            }),
            status_json: status.to_string(),
            resource_version: 0,
        };
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(async move {
                let mut client = ObjectsClient::connect(addr).await?;
                client.update_status(req).await?;
                anyhow::Ok(())
            })
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        self.control.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// An `ownerReferences` entry making `kind/name` (uid) the controller.
fn owner(kind: &str, name: &str, uid: &str) -> String {
    let api = if kind == "Node" { "v1" } else { "apps/v1" };
    format!(
        "  ownerReferences: [{{apiVersion: {api}, kind: {kind}, name: {name}, uid: \"{uid}\", controller: true, blockOwnerDeletion: true}}]\n"
    )
}

fn deployment(name: &str, image: &str, revision: u32, replicas: u32) -> String {
    format!(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: {name}\n  annotations: {{deployment.kubernetes.io/revision: \"{revision}\"}}\nspec:\n  replicas: {replicas}\n  selector: {{matchLabels: {{app: {name}}}}}\n  template:\n    metadata: {{labels: {{app: {name}}}}}\n    spec: {{containers: [{{name: c, image: {image}}}]}}\n"
    )
}

fn replicaset(
    deploy: &str,
    uid: &str,
    hash: &str,
    image: &str,
    revision: u32,
    replicas: u32,
) -> String {
    format!(
        "apiVersion: apps/v1\nkind: ReplicaSet\nmetadata:\n  name: {deploy}-{hash}\n  labels: {{app: {deploy}, pod-template-hash: {hash}}}\n  annotations: {{deployment.kubernetes.io/revision: \"{revision}\"}}\n{}spec:\n  replicas: {replicas}\n  selector: {{matchLabels: {{app: {deploy}, pod-template-hash: {hash}}}}}\n  template:\n    metadata: {{labels: {{app: {deploy}, pod-template-hash: {hash}}}}}\n    spec: {{containers: [{{name: c, image: {image}}}]}}\n",
        owner("Deployment", deploy, uid)
    )
}

/// A Pod event: (event name, pod, pod uid), reason, type, message, time.
fn event(
    (name, obj, uid): (&str, &str, &str),
    reason: &str,
    kind_of_event: &str,
    message: &str,
    at: &str,
) -> String {
    format!(
        "apiVersion: v1\nkind: Event\nmetadata: {{name: {name}, namespace: default}}\ninvolvedObject: {{apiVersion: v1, kind: Pod, namespace: default, name: {obj}, uid: \"{uid}\"}}\nreason: {reason}\ntype: {kind_of_event}\nmessage: \"{message}\"\nsource: {{component: default-scheduler}}\nfirstTimestamp: \"{at}\"\nlastTimestamp: \"{at}\"\ncount: 1\n"
    )
}

#[test]
fn weirctl_shows_workload_status_and_events_like_kubectl() -> anyhow::Result<()> {
    let env = Env::start("status")?;
    env.apply(&deployment("web", "busybox", 1, 3))?;
    let duid = env.uid(&["get", "deploy", "web"])?;
    env.apply(&replicaset("web", &duid, "7c5d9f8b4x", "busybox", 1, 3))?;
    let rsuid = env.uid(&["get", "rs", "web-7c5d9f8b4x"])?;
    let out = env.apply(&format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: web-7c5d9f8b4x-abcde\n  labels: {{app: web}}\n{}spec:\n  containers: [{{name: c, image: busybox}}, {{name: side, image: busybox}}]\n",
        owner("ReplicaSet", "web-7c5d9f8b4x", &rsuid)
    ))?;
    assert_eq!(out, "pod/web-7c5d9f8b4x-abcde created\n");
    let pod = "web-7c5d9f8b4x-abcde";
    // What the controllers and the agent would report.
    env.status("Deployment", "default", "web", &serde_json::json!({
        "observedGeneration": 1, "replicas": 3, "updatedReplicas": 3, "readyReplicas": 2,
        "availableReplicas": 2, "unavailableReplicas": 1,
        "conditions": [{"type": "Available", "status": "False", "reason": "MinimumReplicasUnavailable"}]}))?;
    env.status(
        "ReplicaSet",
        "default",
        "web-7c5d9f8b4x",
        &serde_json::json!({"replicas": 3, "readyReplicas": 2, "availableReplicas": 2}),
    )?;
    env.status("Pod", "default", pod, &serde_json::json!({
        "phase": "Running", "podIP": "10.244.1.7",
        "conditions": [{"type": "Ready", "status": "False"}],
        "containerStatuses": [
            {"name": "c", "ready": true, "restartCount": 0, "image": "busybox", "imageID": "", "state": {"running": {"startedAt": "2024-01-01T00:00:00Z"}}},
            {"name": "side", "ready": false, "restartCount": 4, "image": "busybox", "imageID": "", "state": {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 40s"}},
             "lastState": {"terminated": {"exitCode": 1, "reason": "Error"}}}]}))?;

    get_prints_kubectl_columns(&env, pod)?;
    describe_shows_status_and_events(&env, pod)?;

    // rollout status waits for the available replicas and says so.
    let mut watcher = env.spawn(
        &["rollout", "status", "deployment/web", "--timeout", "60s"],
        Stdio::piped(),
    )?;
    std::thread::sleep(Duration::from_millis(700));
    env.status("Deployment", "default", "web", &serde_json::json!({
        "observedGeneration": 1, "replicas": 3, "updatedReplicas": 3, "readyReplicas": 3, "availableReplicas": 3}))?;
    let done = weir_tests::wait_for("rollout status to exit", Duration::from_secs(20), || {
        watcher.try_wait().ok().flatten()
    });
    if done.is_err() {
        let _ = watcher.kill();
    }
    let out = watcher.wait_with_output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        done?.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        text,
        "Waiting for deployment \"web\" rollout to finish: 2 of 3 updated replicas are available...\ndeployment \"web\" successfully rolled out\n"
    );
    Ok(())
}

/// get's tables for the objects seeded above.
fn get_prints_kubectl_columns(env: &Env, pod: &str) -> anyhow::Result<()> {
    let out = env.ok(&["get", "deploy"])?;
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines[0], "NAME   READY   UP-TO-DATE   AVAILABLE   AGE",
        "{out}"
    );
    let cells: Vec<&str> = lines[1].split_whitespace().collect();
    assert_eq!(&cells[..4], ["web", "2/3", "3", "2"], "{out}");
    let out = env.ok(&["get", "rs", "-o", "wide"])?;
    assert!(out.starts_with("NAME"), "{out}");
    let cells: Vec<&str> = out
        .lines()
        .nth(1)
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    assert_eq!(&cells[..4], ["web-7c5d9f8b4x", "3", "3", "2"], "{out}");
    assert!(
        cells.contains(&"app=web,pod-template-hash=7c5d9f8b4x"),
        "{out}"
    );
    let out = env.ok(&["get", "pods"])?;
    let cells: Vec<&str> = out
        .lines()
        .nth(1)
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    assert_eq!(&cells[..4], [pod, "1/2", "CrashLoopBackOff", "4"], "{out}");
    let out = env.ok(&["get", "all"])?;
    for want in [
        format!("pod/{pod}"),
        "deployment.apps/web".to_owned(),
        "replicaset.apps/web-7c5d9f8b4x".to_owned(),
    ] {
        assert!(
            out.lines().any(|l| l.starts_with(&want)),
            "{want} missing:\n{out}"
        );
    }
    assert_eq!(out.matches("\n\n").count(), 2, "three sections:\n{out}");
    let out = env.ok(&["get", "deploy,rs", "-o", "name"])?;
    assert_eq!(out, "deployment.apps/web\nreplicaset.apps/web-7c5d9f8b4x\n");

    Ok(())
}

/// describe of the pod and deployment seeded above, with events.
fn describe_shows_status_and_events(env: &Env, pod: &str) -> anyhow::Result<()> {
    // Events about the pod (and one about another object) recorded via Apply.
    let puid = env.uid(&["get", "pod", pod])?;
    env.apply(&event(
        ("e2", pod, &puid),
        "BackOff",
        "Warning",
        "Back-off restarting failed container side",
        "2024-01-01T00:05:00Z",
    ))?;
    env.apply(&event(
        ("e1", pod, &puid),
        "Scheduled",
        "Normal",
        "Successfully assigned default/web to n1",
        "2024-01-01T00:00:00Z",
    ))?;
    env.apply(&event(
        ("e3", "other", "not-this-uid"),
        "Killing",
        "Normal",
        "unrelated",
        "2024-01-01T00:06:00Z",
    ))?;
    let out = env.ok(&["describe", "pod", pod])?;
    for want in [
        "Name:".to_owned(),
        "Controlled By:".to_owned(),
        "ReplicaSet/web-7c5d9f8b4x".to_owned(),
        "CrashLoopBackOff".to_owned(),
        "Restart Count:  4".to_owned(),
        "Events:".to_owned(),
    ] {
        assert!(out.contains(&want), "{want} missing:\n{out}");
    }
    let scheduled = out
        .find("Successfully assigned")
        .expect("the Scheduled event is shown");
    let backoff = out
        .find("Back-off restarting")
        .expect("the BackOff event is shown");
    assert!(scheduled < backoff, "oldest first:\n{out}");
    assert!(!out.contains("unrelated"), "another object's event:\n{out}");
    let header = out
        .lines()
        .find(|l| l.trim_start().starts_with("Type ") && l.contains("From"))
        .expect("events header");
    assert!(
        header.contains("Reason") && header.contains("Age") && header.contains("Message"),
        "{out}"
    );

    let out = env.ok(&["describe", "deployment", "web"])?;
    assert!(
        out.contains("3 desired | 3 updated | 3 total | 2 available | 1 unavailable"),
        "{out}"
    );
    assert!(
        out.contains("StrategyType:")
            && out.contains("RollingUpdateStrategy:  25% max unavailable, 25% max surge"),
        "{out}"
    );
    assert!(
        out.lines().any(|l| l.starts_with("NewReplicaSet:")
            && l.contains("web-7c5d9f8b4x (3/3 replicas created)")),
        "{out}"
    );
    let out = env.ok(&["get", "events"])?;
    assert!(
        out.lines().any(|l| l.contains("Warning")
            && l.contains("BackOff")
            && l.contains(&format!("pod/{pod}"))),
        "{out}"
    );

    Ok(())
}

#[test]
fn weirctl_scales_and_rolls_back_deployments() -> anyhow::Result<()> {
    let env = Env::start("undo")?;
    env.apply(&deployment("web", "busybox:2", 2, 3))?;
    let duid = env.uid(&["get", "deploy", "web"])?;
    env.apply(&replicaset("web", &duid, "b1b1b1b1b1", "busybox:1", 1, 0))?;
    env.apply(&replicaset("web", &duid, "c2c2c2c2c2", "busybox:2", 2, 3))?;

    assert_eq!(
        env.ok(&["scale", "deployment", "web", "--replicas", "5"])?,
        "deployment.apps/web scaled\n"
    );
    let d = env.json(&["get", "deploy", "web"])?;
    assert_eq!(d["spec"]["replicas"], 5);
    assert_eq!(
        d["spec"]["template"]["spec"]["containers"][0]["image"], "busybox:2",
        "scale kept the template"
    );

    let out = env.ok(&["rollout", "history", "deployment/web"])?;
    let revs: Vec<&str> = out
        .lines()
        .skip(2)
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert_eq!(revs, ["1", "2"], "{out}");

    assert_eq!(
        env.ok(&["rollout", "undo", "deployment/web"])?,
        "deployment.apps/web rolled back\n"
    );
    let d = env.json(&["get", "deploy", "web"])?;
    assert_eq!(
        d["spec"]["template"]["spec"]["containers"][0]["image"],
        "busybox:1"
    );
    assert_eq!(
        d["spec"]["template"]["metadata"]["labels"],
        serde_json::json!({"app": "web"}),
        "pod-template-hash stripped"
    );
    assert_eq!(d["spec"]["replicas"], 5, "undo keeps replicas");
    assert_eq!(
        env.ok(&["rollout", "undo", "deployment/web", "--to-revision", "2"])?,
        "deployment.apps/web rolled back\n"
    );
    let d = env.json(&["get", "deploy", "web"])?;
    assert_eq!(
        d["spec"]["template"]["spec"]["containers"][0]["image"],
        "busybox:2"
    );

    let err = env.fails(&["rollout", "undo", "deployment/web", "--to-revision", "9"])?;
    assert_eq!(
        err,
        "error: unable to find specified revision 9 in history\n"
    );
    let err = env.fails(&["scale", "deployment/nope", "--replicas", "2"])?;
    assert_eq!(
        err,
        "Error from server (NotFound): deployments \"nope\" not found\n"
    );
    let err = env.fails(&["rollout", "status", "deployment/web", "--timeout", "1s"])?;
    assert!(err.contains("timed out waiting for the condition"), "{err}");
    Ok(())
}

#[test]
fn weirctl_cordons_uncordons_and_drains_nodes() -> anyhow::Result<()> {
    let env = Env::start("nodes")?;
    let node = format!("n{}", std::process::id());
    env.apply(&format!("apiVersion: v1\nkind: Node\nmetadata:\n  name: {node}\n  labels: {{kubernetes.io/hostname: {node}}}\nspec:\n  podCIDR: 10.244.1.0/24\n  taints: [{{key: dedicated, value: db, effect: NoSchedule}}]\n"))?;
    env.status("Node", "", &node, &serde_json::json!({
        "capacity": {"cpu": "2", "memory": "8Gi", "pods": "110"},
        "allocatable": {"cpu": "2", "memory": "8Gi", "pods": "110"},
        "addresses": [{"type": "InternalIP", "address": "127.0.0.1"}, {"type": "Hostname", "address": node}],
        "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady", "message": "agent is posting ready status"}],
        "nodeInfo": {"kubeletVersion": "weir-0.1.0", "machineID": "", "systemUUID": "", "bootID": "", "kernelVersion": "", "osImage": "", "containerRuntimeVersion": "", "kubeProxyVersion": "", "operatingSystem": "linux", "architecture": "amd64"}}))?;
    let status_of = |env: &Env| -> anyhow::Result<String> {
        let out = env.ok(&["get", "nodes", &node, "--no-headers"])?;
        Ok(out.split_whitespace().nth(1).unwrap_or_default().to_owned())
    };
    assert_eq!(status_of(&env)?, "Ready");
    let out = env.ok(&["get", "no", "-o", "wide"])?;
    assert!(
        out.lines()
            .next()
            .unwrap_or_default()
            .contains("INTERNAL-IP")
            && out.contains("127.0.0.1")
            && out.contains("weir-0.1.0"),
        "{out}"
    );

    assert_eq!(
        env.ok(&["cordon", &node])?,
        format!("node/{node} cordoned\n")
    );
    assert_eq!(status_of(&env)?, "Ready,SchedulingDisabled");
    assert_eq!(
        env.json(&["get", "node", &node])?["spec"]["unschedulable"],
        true
    );
    assert_eq!(
        env.json(&["get", "node", &node])?["spec"]["podCIDR"],
        "10.244.1.0/24",
        "cordon kept the spec"
    );
    assert_eq!(
        env.ok(&["cordon", &node])?,
        format!("node/{node} already cordoned\n")
    );
    assert_eq!(
        env.ok(&["uncordon", &node])?,
        format!("node/{node} uncordoned\n")
    );
    assert!(env.json(&["get", "node", &node])?["spec"]["unschedulable"].is_null());
    assert_eq!(status_of(&env)?, "Ready");
    let out = env.ok(&["describe", "node", &node])?;
    for want in [
        "Taints:",
        "dedicated=db:NoSchedule",
        "Unschedulable:",
        "InternalIP:",
        "127.0.0.1",
        "Capacity:",
        "Allocatable:",
        "Non-terminated Pods:",
        "KubeletReady",
    ] {
        assert!(out.contains(want), "{want} missing:\n{out}");
    }

    drain_evicts_what_kubectl_would(&env, &node)
}

/// drain's refusals and evictions on a node with pods of each kind of owner.
fn drain_evicts_what_kubectl_would(env: &Env, node: &str) -> anyhow::Result<()> {
    let status_of = |env: &Env| -> anyhow::Result<String> {
        let out = env.ok(&["get", "nodes", node, "--no-headers"])?;
        Ok(out.split_whitespace().nth(1).unwrap_or_default().to_owned())
    };
    // Pods on the node: one per kind of owner, and one with none.
    let pod = |name: &str, owner_yaml: &str| {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n{owner_yaml}spec:\n  nodeName: {node}\n  containers: [{{name: c, image: busybox}}]\n"
        )
    };
    env.apply(&pod("bare", ""))?;
    env.apply(&pod("agent-x1", &owner("DaemonSet", "agent", "ds-uid")))?;
    env.apply(&pod("web-x1", &owner("ReplicaSet", "web", "rs-uid")))?;
    let err = env.fails(&["drain", node])?;
    assert!(err.contains("cannot delete DaemonSet-managed Pods (use --ignore-daemonsets to ignore): default/agent-x1"), "{err}");
    assert!(
        err.contains(
            "cannot delete Pods that declare no controller (use --force to override): default/bare"
        ),
        "{err}"
    );
    assert_eq!(
        env.ok(&["get", "pods", "-o", "name"])?.lines().count(),
        3,
        "a refused drain deletes nothing"
    );
    assert_eq!(
        status_of(env)?,
        "Ready,SchedulingDisabled",
        "drain cordons first"
    );
    let out = env.ok(&[
        "drain",
        node,
        "--ignore-daemonsets",
        "--force",
        "--grace-period",
        "0",
        "--timeout",
        "30s",
    ])?;
    assert!(
        out.contains("evicting pod default/bare") && out.contains("pod/web-x1 evicted"),
        "{out}"
    );
    assert!(out.ends_with(&format!("node/{node} drained\n")), "{out}");
    assert_eq!(
        env.ok(&["get", "pods", "-o", "name"])?,
        "pod/agent-x1\n",
        "DaemonSet pods stay"
    );
    Ok(())
}

/// Kills and reaps a child process on drop.
struct Kill(Child);
impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn weirctl_get_watch_prints_a_line_per_change() -> anyhow::Result<()> {
    let env = Env::start("watch")?;
    env.apply("apiVersion: v1\nkind: Pod\nmetadata: {name: first}\nspec:\n  containers: [{name: c, image: busybox}]\n")?;
    let mut child = env.spawn(&["get", "pods", "-w"], Stdio::null())?;
    let stdout = child.stdout.take().expect("piped stdout");
    let _guard = Kill(child);
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        use std::io::BufRead as _;
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let next = |what: &str| {
        rx.recv_timeout(Duration::from_secs(15))
            .map_err(|e| anyhow::anyhow!("no line for {what}: {e}"))
    };
    assert!(next("header")?.starts_with("NAME"));
    assert!(next("the listed pod")?.starts_with("first "));
    env.apply("apiVersion: v1\nkind: Pod\nmetadata: {name: second}\nspec:\n  containers: [{name: c, image: busybox}]\n")?;
    let line = next("the new pod")?;
    assert!(
        line.starts_with("second ") && line.contains("Pending"),
        "{line}"
    );
    env.status("Pod", "default", "first", &serde_json::json!({"phase": "Running",
        "containerStatuses": [{"name": "c", "ready": true, "restartCount": 0, "image": "busybox", "imageID": "", "state": {"running": {}}}]}))?;
    let line = next("the status change")?;
    assert!(
        line.starts_with("first ") && line.contains("1/1") && line.contains("Running"),
        "{line}"
    );
    Ok(())
}

#[test]
fn weirctl_logs_streams_from_the_agent_on_the_pods_node() -> anyhow::Result<()> {
    use std::io::{BufRead as _, Write as _};
    let env = Env::start("logs")?;
    // A stand-in for the agent's HTTP endpoint: one chunked response.
    let agent = TcpListener::bind("127.0.0.1:0")?;
    let port = agent.local_addr()?.port();
    let server = std::thread::spawn(move || -> anyhow::Result<String> {
        let (stream, _) = agent.accept()?;
        let mut reader = std::io::BufReader::new(stream.try_clone()?);
        let mut request = String::new();
        reader.read_line(&mut request)?;
        let mut stream = stream;
        stream.write_all(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ntransfer-encoding: chunked\r\n\r\n6\r\nhello\n\r\n")?;
        stream.flush()?;
        std::thread::sleep(Duration::from_millis(200));
        stream.write_all(b"6\r\nworld\n\r\n0\r\n\r\n")?;
        Ok(request)
    });
    env.apply("apiVersion: v1\nkind: Node\nmetadata: {name: logs-node}\nspec: {}\n")?;
    env.status(
        "Node",
        "",
        "logs-node",
        &serde_json::json!({"addresses": [{"type": "InternalIP", "address": "127.0.0.1"}]}),
    )?;
    env.apply("apiVersion: v1\nkind: Pod\nmetadata: {name: two}\nspec:\n  nodeName: logs-node\n  containers: [{name: a, image: busybox}, {name: b, image: busybox}]\n")?;
    let err = env.fails(&["logs", "two"])?;
    assert_eq!(
        err,
        "error: a container name must be specified for pod two, choose one of: [a b]\n"
    );
    let out = env.ok(&[
        "logs",
        "-f",
        "two",
        "-c",
        "b",
        "--agent-port",
        &port.to_string(),
    ])?;
    assert_eq!(out, "hello\nworld\n");
    let request = server
        .join()
        .map_err(|_| anyhow::anyhow!("agent thread panicked"))??;
    assert_eq!(
        request.trim_end(),
        "GET /api/v1/namespaces/default/pods/two/log?container=b&follow=true HTTP/1.1"
    );
    env.apply("apiVersion: v1\nkind: Pod\nmetadata: {name: unbound}\nspec:\n  containers: [{name: a, image: busybox}]\n")?;
    let err = env.fails(&["logs", "unbound"])?;
    assert!(err.contains("does not have a host assigned"), "{err}");
    Ok(())
}

#[test]
fn weirctl_finds_the_server_from_flag_env_or_config() -> anyhow::Result<()> {
    let env = Env::start("server")?;
    let home = env.dir.join("home");
    std::fs::create_dir_all(home.join(".config/weir"))?;
    std::fs::write(
        home.join(".config/weir/config"),
        format!("server: http://{}\n", env.control.addr),
    )?;
    let run = |envs: &[(&str, String)], args: &[&str]| -> anyhow::Result<(bool, String, String)> {
        let mut cmd = Command::new(weir_tests::weirctl_bin());
        cmd.env_remove("WEIR_SERVER")
            .env_remove("XDG_CONFIG_HOME")
            .env_remove("WEIRCONFIG")
            .env("HOME", &home);
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let out = cmd.args(args).output()?;
        Ok((
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ))
    };
    env.apply("apiVersion: v1\nkind: Namespace\nmetadata: {name: found}\n")?;
    let (ok, out, err) = run(&[], &["get", "ns", "found", "-o", "name"])?;
    assert!(ok, "the config file's server: {err}");
    assert_eq!(out, "namespace/found\n");
    // WEIR_SERVER beats the config file; --server beats both.
    let closed = free_addr()?;
    let (ok, _, err) = run(
        &[("WEIR_SERVER", format!("http://{closed}"))],
        &["get", "ns"],
    )?;
    assert!(!ok);
    assert_eq!(
        err,
        format!(
            "The connection to the server {closed} was refused - did you specify the right host or port?\n"
        )
    );
    let (ok, out, err) = run(
        &[("WEIR_SERVER", format!("http://{closed}"))],
        &[
            "--server",
            &format!("http://{}", env.control.addr),
            "get",
            "ns",
            "found",
            "-o",
            "name",
        ],
    )?;
    assert!(ok, "{err}");
    assert_eq!(out, "namespace/found\n");
    Ok(())
}

#[test]
fn weirctl_deletes_by_name_label_and_file() -> anyhow::Result<()> {
    let env = Env::start("delete")?;
    let pod = |name: &str, app: &str| {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  labels: {{app: {app}}}\nspec:\n  containers: [{{name: c, image: busybox}}]\n"
        )
    };
    env.apply(&[pod("a1", "a"), pod("a2", "a"), pod("b1", "b")].join("---\n"))?;
    let file = env.dir.join("b.yaml");
    std::fs::write(&file, pod("b1", "b"))?;
    let out = env.ok(&["delete", "pods", "-l", "app=a"])?;
    assert_eq!(out, "pod \"a1\" deleted\npod \"a2\" deleted\n");
    let out = env.ok(&[
        "delete",
        "-f",
        &file.display().to_string(),
        "--grace-period",
        "5",
    ])?;
    assert_eq!(out, "pod \"b1\" deleted\n");
    assert_eq!(env.ok(&["get", "pods", "-o", "name"])?, "");
    let err = env.fails(&["delete", "pod", "nope"])?;
    assert_eq!(
        err,
        "Error from server (NotFound): pods \"nope\" not found\n"
    );
    assert_eq!(
        env.ok(&["delete", "pod", "nope", "--ignore-not-found"])?,
        ""
    );
    let err = env.fails(&["delete", "deploy", "web", "--cascade=sideways"])?;
    assert!(err.contains("invalid cascade value (sideways)"), "{err}");
    env.apply(&deployment("web", "busybox", 1, 1))?;
    let out = env.ok(&["delete", "deployment/web", "--cascade=orphan"])?;
    assert_eq!(out, "deployment.apps \"web\" deleted\n");
    let err = env.fails(&["delete", "pods"])?;
    assert!(err.contains("no name was specified"), "{err}");
    Ok(())
}

const WEB_SVC: &str = "apiVersion: v1\nkind: Service\nmetadata:\n  name: web\n  labels: {app: web}\nspec:\n  type: NodePort\n  selector: {app: web}\n  ports: [{name: http, port: 80, targetPort: 8080, nodePort: 30080}]\n";
const API_SVC: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: api}\nspec:\n  selector: {app: api, tier: back}\n  ports: [{port: 443, protocol: TCP}]\n";

/// The slice the endpoints controller would write for `web`: two ready pods
/// and one not ready.
fn web_slice(service_uid: &str) -> String {
    let endpoint = |ip: &str, ready: bool| {
        format!(
            "  - {{addresses: [\"{ip}\"], conditions: {{ready: {ready}, serving: {ready}, terminating: false}}, nodeName: n1, targetRef: {{kind: Pod, namespace: default, name: web-{}}}}}\n",
            ip.replace('.', "-")
        )
    };
    format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: web\n  labels: {{kubernetes.io/service-name: web, endpointslice.kubernetes.io/managed-by: endpointslice-controller.weir}}\n  ownerReferences: [{{apiVersion: v1, kind: Service, name: web, uid: \"{service_uid}\", controller: true, blockOwnerDeletion: true}}]\naddressType: IPv4\nports: [{{name: http, port: 8080, protocol: TCP}}]\nendpoints:\n{}{}{}",
        endpoint("10.244.1.5", true),
        endpoint("10.244.1.6", false),
        endpoint("10.244.2.7", true),
    )
}

#[test]
fn weirctl_shows_services_and_endpoint_slices_like_kubectl() -> anyhow::Result<()> {
    let env = Env::start("svc")?;
    assert_eq!(env.apply(WEB_SVC)?, "service/web created\n");
    assert_eq!(env.apply(API_SVC)?, "service/api created\n");
    let web = env.json(&["get", "svc", "web"])?;
    let web_ip = web["spec"]["clusterIP"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let api = env.json(&["get", "service/api"])?;
    let api_ip = api["spec"]["clusterIP"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(
        web_ip.starts_with("10.96.") && api_ip.starts_with("10.96."),
        "{web_ip} {api_ip}"
    );
    assert_ne!(web_ip, api_ip);
    let uid = env.uid(&["get", "svc", "web"])?;
    assert_eq!(
        env.apply(&web_slice(&uid))?,
        "endpointslice.discovery.k8s.io/web created\n"
    );

    service_tables(&env, &web_ip, &api_ip)?;
    describe_service(&env, &web_ip)?;

    // get all: services after pods.
    env.apply(POD)?;
    let out = env.ok(&["get", "all"])?;
    let pods_at = out
        .find("pod/web")
        .ok_or_else(|| anyhow::anyhow!("no pod: {out}"))?;
    let svc_at = out
        .find("service/web")
        .ok_or_else(|| anyhow::anyhow!("no service: {out}"))?;
    assert!(pods_at < svc_at && out.contains("service/api"), "{out}");
    assert!(out.contains("PORT(S)"), "{out}");

    service_refusals(&env)?;

    // delete svc.
    assert_eq!(
        env.ok(&["delete", "svc", "api"])?,
        "service \"api\" deleted\n"
    );
    assert_eq!(env.ok(&["get", "svc", "-o", "name"])?, "service/web\n");
    Ok(())
}

/// get svc / endpointslices for the services seeded above.
fn service_tables(env: &Env, web_ip: &str, api_ip: &str) -> anyhow::Result<()> {
    // get svc: kubectl's columns, sorted by name.
    let out = env.ok(&["get", "svc"])?;
    let rows: Vec<Vec<&str>> = out
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(
        rows[0],
        [
            "NAME",
            "TYPE",
            "CLUSTER-IP",
            "EXTERNAL-IP",
            "PORT(S)",
            "AGE"
        ],
        "{out}"
    );
    assert_eq!(
        rows[1][..5],
        ["api", "ClusterIP", api_ip, "<none>", "443/TCP"],
        "{out}"
    );
    assert_eq!(
        rows[2][..5],
        ["web", "NodePort", web_ip, "<none>", "80:30080/TCP"],
        "{out}"
    );
    assert_eq!(rows.len(), 3, "{out}");
    let out = env.ok(&["get", "services", "-o", "wide"])?;
    let rows: Vec<Vec<&str>> = out
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(rows[0].last(), Some(&"SELECTOR"), "{out}");
    assert_eq!(rows[1].last(), Some(&"app=api,tier=back"), "{out}");
    assert_eq!(rows[2].last(), Some(&"app=web"), "{out}");
    assert_eq!(
        env.ok(&["get", "svc", "-o", "name"])?,
        "service/api\nservice/web\n"
    );

    // get endpointslices: every address, as kubectl lists them.
    for kind in [
        "endpointslices",
        "endpointslice",
        "endpointslices.discovery.k8s.io",
    ] {
        let out = env.ok(&["get", kind])?;
        let rows: Vec<Vec<&str>> = out
            .lines()
            .map(|l| l.split_whitespace().collect())
            .collect();
        assert_eq!(
            rows[0],
            ["NAME", "ADDRESSTYPE", "PORTS", "ENDPOINTS", "AGE"],
            "{out}"
        );
        assert_eq!(
            rows[1][..4],
            ["web", "IPv4", "8080", "10.244.1.5,10.244.1.6,10.244.2.7"],
            "{out}"
        );
    }
    assert_eq!(
        env.ok(&["get", "endpointslices", "-o", "name"])?,
        "endpointslice.discovery.k8s.io/web\n"
    );
    Ok(())
}

/// describe svc for the services seeded above.
fn describe_service(env: &Env, web_ip: &str) -> anyhow::Result<()> {
    // describe svc: the ready endpoints at the target port.
    let out = env.ok(&["describe", "svc", "web"])?;
    let field = |key: &str| {
        out.lines()
            .find(|l| l.starts_with(&format!("{key}:")))
            .map(|l| l[key.len() + 1..].trim().to_owned())
    };
    assert_eq!(field("Name").as_deref(), Some("web"), "{out}");
    assert_eq!(field("Namespace").as_deref(), Some("default"), "{out}");
    assert_eq!(field("Labels").as_deref(), Some("app=web"), "{out}");
    assert_eq!(field("Selector").as_deref(), Some("app=web"), "{out}");
    assert_eq!(field("Type").as_deref(), Some("NodePort"), "{out}");
    assert_eq!(field("IP").as_deref(), Some(web_ip), "{out}");
    assert_eq!(field("IPs").as_deref(), Some(web_ip), "{out}");
    assert_eq!(field("Port").as_deref(), Some("http  80/TCP"), "{out}");
    assert_eq!(field("TargetPort").as_deref(), Some("8080/TCP"), "{out}");
    assert_eq!(
        field("NodePort").as_deref(),
        Some("http  30080/TCP"),
        "{out}"
    );
    assert_eq!(
        field("Endpoints").as_deref(),
        Some("10.244.1.5:8080,10.244.2.7:8080"),
        "{out}"
    );
    assert_eq!(field("Session Affinity").as_deref(), Some("None"), "{out}");
    assert_eq!(
        field("External Traffic Policy").as_deref(),
        Some("Cluster"),
        "{out}"
    );
    assert_eq!(field("Events").as_deref(), Some("<none>"), "{out}");
    let out = env.ok(&["describe", "svc", "api"])?;
    // No slice (the controllers are off): no endpoints.
    assert!(
        out.lines()
            .any(|l| l.starts_with("Endpoints:") && l.ends_with(" <none>")),
        "{out}"
    );
    assert!(
        !out.contains("NodePort:") && !out.contains("External Traffic Policy"),
        "{out}"
    );
    Ok(())
}

/// Services the server refuses: exit 1 with its message naming the field.
fn service_refusals(env: &Env) -> anyhow::Result<()> {
    // Refusals name the field, with the server's message.
    let err = env.fails(&["apply", "-f", &write(env, "lb", "apiVersion: v1\nkind: Service\nmetadata: {name: lb}\nspec:\n  type: LoadBalancer\n  ports: [{port: 80}]\n")?])?;
    assert!(
        err.starts_with("Error from server (BadRequest): ")
            && err.contains("spec.type")
            && err.contains("LoadBalancer"),
        "{err}"
    );
    let err = env.fails(&["apply", "-f", &write(env, "big", "apiVersion: v1\nkind: Service\nmetadata: {name: big}\nspec:\n  ports: [{port: 70000}]\n")?])?;
    assert!(
        err.starts_with("Error from server (BadRequest): ")
            && err.contains("spec.ports[0].port")
            && err.contains("70000"),
        "{err}"
    );
    let err = env.fails(&["apply", "-f", &write(env, "clash", "apiVersion: v1\nkind: Service\nmetadata: {name: clash}\nspec:\n  type: NodePort\n  ports: [{port: 81, nodePort: 30080}]\n")?])?;
    assert!(
        err.starts_with("Error from server ")
            && err.contains("spec.ports[0].nodePort")
            && err.contains("30080")
            && err.contains("already allocated"),
        "{err}"
    );
    let err = env.fails(&["get", "svc", "clash"])?;
    assert!(err.contains("services \"clash\" not found"), "{err}");
    Ok(())
}

/// A manifest in the env's directory; its path.
fn write(env: &Env, name: &str, yaml: &str) -> anyhow::Result<String> {
    let path = env.dir.join(format!("{name}.yaml"));
    std::fs::write(&path, yaml)?;
    Ok(path.display().to_string())
}

/// The Kubernetes documentation's first `NetworkPolicy` example and its
/// default deny, in one file.
const NETPOLS: &str = "apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: test-network-policy
  namespace: default
spec:
  podSelector:
    matchLabels:
      role: db
  policyTypes:
  - Ingress
  - Egress
  ingress:
  - from:
    - ipBlock:
        cidr: 172.17.0.0/16
        except:
        - 172.17.1.0/24
    - namespaceSelector:
        matchLabels:
          project: myproject
    - podSelector:
        matchLabels:
          role: frontend
    ports:
    - protocol: TCP
      port: 6379
  egress:
  - to:
    - ipBlock:
        cidr: 10.0.0.0/24
    ports:
    - protocol: TCP
      port: 5978
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: default-deny-ingress
spec:
  podSelector: {}
  policyTypes:
  - Ingress
";

#[test]
fn weirctl_applies_gets_describes_and_deletes_network_policies() -> anyhow::Result<()> {
    let env = Env::start("netpol")?;
    assert_eq!(
        env.apply(NETPOLS)?,
        "networkpolicy.networking.k8s.io/test-network-policy created\n\
         networkpolicy.networking.k8s.io/default-deny-ingress created\n"
    );
    // get: kubectl's columns, under every spelling.
    for kind in ["netpol", "networkpolicy", "networkpolicies"] {
        let out = env.ok(&["get", kind])?;
        let rows: Vec<Vec<&str>> = out
            .lines()
            .map(|l| l.split_whitespace().collect())
            .collect();
        assert_eq!(rows[0], ["NAME", "POD-SELECTOR", "AGE"], "{out}");
        assert_eq!(rows[1][..2], ["default-deny-ingress", "<none>"], "{out}");
        assert_eq!(rows[2][..2], ["test-network-policy", "role=db"], "{out}");
        assert_eq!(rows.len(), 3, "{out}");
    }
    assert_eq!(
        env.ok(&["get", "netpol", "-o", "name"])?,
        "networkpolicy.networking.k8s.io/default-deny-ingress\n\
         networkpolicy.networking.k8s.io/test-network-policy\n"
    );
    let deny = env.json(&["get", "netpol", "default-deny-ingress"])?;
    assert_eq!(deny["spec"]["policyTypes"], serde_json::json!(["Ingress"]));
    // describe: kubectl's text.
    let out = env.ok(&["describe", "networkpolicy", "test-network-policy"])?;
    for line in [
        "Name:         test-network-policy",
        "  PodSelector:     role=db",
        "  Allowing ingress traffic:",
        "    To Port: 6379/TCP",
        "        Except: 172.17.1.0/24",
        "      NamespaceSelector: project=myproject",
        "      PodSelector: role=frontend",
        "  Allowing egress traffic:",
        "    To Port: 5978/TCP",
        "        CIDR: 10.0.0.0/24",
        "  Policy Types: Ingress, Egress",
    ] {
        assert!(out.lines().any(|l| l == line), "no {line:?} in:\n{out}");
    }
    // get all leaves policies out, as kubectl's `all` does.
    env.apply(POD)?;
    let out = env.ok(&["get", "all"])?;
    assert!(
        out.contains("pod/web") && !out.contains("networkpolic"),
        "{out}"
    );
    // The pod got its security identity.
    let pod = env.json(&["get", "pod", "web"])?;
    let id: u32 = pod["metadata"]["annotations"]["weir.io/identity"]
        .as_str()
        .unwrap_or_default()
        .parse()?;
    assert!(id >= 256, "{pod}");
    // Refusals name the field and the reason.
    let bad = NETPOLS
        .split("---")
        .next()
        .unwrap_or_default()
        .replace("172.17.1.0/24", "172.18.1.0/24")
        .replace("name: test-network-policy", "name: bad");
    let err = env.fails(&["apply", "-f", &write(&env, "bad", &bad)?])?;
    assert!(
        err.starts_with("Error from server (BadRequest): ")
            && err.contains("spec.ingress[0].from[0].ipBlock.except[0]")
            && err.contains("must be a strict subset of cidr"),
        "{err}"
    );
    let sctp = NETPOLS
        .split("---")
        .next()
        .unwrap_or_default()
        .replace(
            "protocol: TCP\n      port: 6379",
            "protocol: SCTP\n      port: 6379",
        )
        .replace("name: test-network-policy", "name: sctp");
    let err = env.fails(&["apply", "-f", &write(&env, "sctp", &sctp)?])?;
    assert!(
        err.contains("spec.ingress[0].ports[0].protocol") && err.contains("SCTP"),
        "{err}"
    );
    // delete.
    assert_eq!(
        env.ok(&["delete", "netpol", "default-deny-ingress"])?,
        "networkpolicy.networking.k8s.io \"default-deny-ingress\" deleted\n"
    );
    assert_eq!(
        env.ok(&["get", "networkpolicies", "-o", "name"])?,
        "networkpolicy.networking.k8s.io/test-network-policy\n"
    );
    Ok(())
}
