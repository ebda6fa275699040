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
