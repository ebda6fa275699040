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
        let child = Command::new(weir_tests::control_bin())
            .args(["--listen", &addr.to_string(), "--store"])
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
    let out = Command::new(weir_tests::weirctl_bin())
        .arg("--server")
        .arg(format!("http://{server}"))
        .args(args)
        .output()?;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
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
    assert_eq!(out, "namespace/shop configured\npod/web configured\n");

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
    assert!(!ok && err.contains("pods \"web\" not found"), "{err}");
    drop(control);
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
