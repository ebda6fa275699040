//! A weir cluster end to end: the real weir-control (redb store) and real
//! agents in control mode, each in its own node netns, sharing a private
//! containerd. Nodes register and get their pod CIDRs, run the pods bound
//! to them, report status, route to each other's pods, and ride out
//! restarts of the agent and of the control. Needs root.

use std::net::Ipv4Addr;
use std::time::Duration;

use serde_json::{Value, json};
use weir_tests::api::{Api, condition_status, heartbeat, uid};
use weir_tests::{ControlCluster, Node, wait_for};

const START: Duration = Duration::from_mins(1);
/// Short heartbeats, so a stopped one shows within a few seconds.
const CONTROL_ARGS: &[&str] = &["--heartbeat-interval", "1s"];

/// A busybox HTTP server pod bound to `node` (the scheduler's job, done by
/// hand here).
fn web_pod(name: &str, node: &str, port: u16, body: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "default", "labels": {"app": name}},
        "spec": {
            "nodeName": node,
            "terminationGracePeriodSeconds": 1,
            "containers": [{
                "name": "web",
                "image": "busybox",
                "command": ["sh", "-c", format!("mkdir -p /srv && echo {body} > /srv/index.html && exec httpd -f -v -p {port} -h /srv")],
                "ports": [{"containerPort": port}],
            }],
        },
    })
}

/// GET `http://ip:port/` from inside the network namespace of pod `uid`
/// on `node`.
fn wget_from_pod(node: &Node, uid: &str, ip: Ipv4Addr, port: u16) -> anyhow::Result<String> {
    let netns = format!("/run/weir/netns/{}/{uid}", node.name);
    weir_tests::sh(
        "nsenter",
        &[
            &format!("--net={netns}"),
            // Not wget -T: Debian's busybox 1.35 crashes with it.
            "timeout",
            "5",
            "busybox",
            "wget",
            "-qO-",
            &format!("http://{ip}:{port}/"),
        ],
    )
}

/// Waits until both nodes are Ready in the control; returns their Node objects.
fn wait_nodes_ready(api: &Api, c: &mut ControlCluster) -> anyhow::Result<Vec<Value>> {
    let mut out = Vec::new();
    for i in 0..c.cluster.nodes.len() {
        let name = c.node(i).name.clone();
        out.push(wait_for(
            &format!("node {name} Ready"),
            Duration::from_secs(30),
            || {
                api.get("Node", "", &name)
                    .filter(|n| condition_status(n, "Ready") == "True")
            },
        )?);
    }
    Ok(out)
}

#[test]
fn agents_register_run_their_pods_report_status_and_pods_talk_across_nodes() -> anyhow::Result<()> {
    let mut c = ControlCluster::new("na", 41, 2, CONTROL_ARGS)?;
    c.start_agent(0)?;
    c.start_agent(1)?;
    let api = Api::connect(&c.control.url())?;
    let nodes = wait_nodes_ready(&api, &mut c)?;
    let (n1, n2) = (c.node(0).name.clone(), c.node(1).name.clone());
    let (ip1, ip2) = (c.node(0).ip, c.node(1).ip);

    // Distinct /24s, the lowest free ones, and what the agents' IPAM holds.
    let cidrs: Vec<String> = nodes
        .iter()
        .map(|n| n["spec"]["podCIDR"].as_str().unwrap_or_default().to_owned())
        .collect();
    let mut sorted = cidrs.clone();
    sorted.sort();
    assert_eq!(sorted, ["10.244.1.0/24", "10.244.2.0/24"], "{cidrs:?}");
    assert_eq!(c.node(0).ipam_cidr().as_deref(), Some(cidrs[0].as_str()));
    assert_eq!(c.node(1).ipam_cidr().as_deref(), Some(cidrs[1].as_str()));
    for (n, (name, ip)) in nodes.iter().zip([(&n1, ip1), (&n2, ip2)]) {
        assert_eq!(
            n["metadata"]["labels"]["kubernetes.io/hostname"],
            name.as_str()
        );
        assert_eq!(n["spec"]["podCIDRs"][0], n["spec"]["podCIDR"]);
        assert_eq!(n["status"]["capacity"]["pods"], "110");
        assert!(n["status"]["allocatable"]["cpu"].is_string(), "{n}");
        let addrs = n["status"]["addresses"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        assert!(
            addrs
                .iter()
                .any(|a| a["type"] == "InternalIP" && a["address"] == ip.to_string().as_str()),
            "{addrs:?}"
        );
        assert!(n["status"]["nodeInfo"]["kubeletVersion"].is_string());
    }

    // Pods bound to each node run there and their status reaches the control.
    api.apply(&web_pod("web1", &n1, 8080, "hello-from-web1"))?;
    api.apply(&web_pod("web2", &n2, 8081, "hello-from-web2"))?;
    let (p1, pip1) = api.wait_running("web1", START)?;
    let (p2, pip2) = api.wait_running("web2", START)?;
    assert_eq!(p1["status"]["hostIP"], ip1.to_string().as_str());
    assert_eq!(p2["status"]["hostIP"], ip2.to_string().as_str());
    let in_cidr = |ip: Ipv4Addr, cidr: &str| {
        let o = ip.octets();
        cidr.starts_with(&format!("{}.{}.{}.", o[0], o[1], o[2]))
    };
    assert!(in_cidr(pip1, &cidrs[0]), "{pip1} not in {}", cidrs[0]);
    assert!(in_cidr(pip2, &cidrs[1]), "{pip2} not in {}", cidrs[1]);
    // Each agent runs only its own pod, under the control's uid.
    let on1 = c.node(0).pods()?;
    assert_eq!(on1.len(), 1, "{on1:?}");
    assert_eq!(on1[0]["metadata"]["uid"], uid(&p1).as_str());
    assert!(c.node(1).pod("web1").is_none());

    // Peer routes: each node routes the other's pod CIDR via its address,
    // and never its own.
    let routes1 = c.node(0).exec(&["ip", "route"])?;
    assert!(
        routes1.contains(&format!("{} via {ip2}", cidrs[1])),
        "{routes1}"
    );
    assert!(!routes1.contains(&format!("{} via", cidrs[0])), "{routes1}");
    let routes2 = c.node(1).exec(&["ip", "route"])?;
    assert!(
        routes2.contains(&format!("{} via {ip1}", cidrs[0])),
        "{routes2}"
    );

    // Pod on node 1 → pod on node 2 and back, over the peer routes.
    let body = wait_for("web1 reaches web2", Duration::from_secs(20), || {
        wget_from_pod(c.cluster.nodes.first()?, &uid(&p1), pip2, 8081).ok()
    })?;
    assert_eq!(body.trim(), "hello-from-web2");
    let body = wget_from_pod(c.node(1), &uid(&p2), pip1, 8080)?;
    assert_eq!(body.trim(), "hello-from-web1");

    // kubelet events for the pod, through the Objects API.
    let started = wait_for("a Started event for web1", Duration::from_secs(20), || {
        api.list("Event", "default", "")
            .ok()?
            .into_iter()
            .find(|e| e["involvedObject"]["uid"] == uid(&p1).as_str() && e["reason"] == "Started")
    })?;
    assert_eq!(started["source"]["component"], "kubelet");
    assert_eq!(started["source"]["host"], n1.as_str());

    // Deleting a pod ends with the object gone and the pod torn down on its
    // node (graceful or at once, whichever the API does).
    api.delete("Pod", "default", "web2")?;
    wait_for(
        "web2 gone from the control",
        Duration::from_secs(30),
        || api.not_found("Pod", "default", "web2").then_some(()),
    )?;
    let n2node = c.node(1);
    wait_for("web2 gone from node 2", Duration::from_secs(30), || {
        n2node.pods().ok().filter(Vec::is_empty)
    })?;
    let tasks = c
        .cluster
        .containerd
        .ctr(&c.cluster.nodes[1].containerd_ns(), &["tasks", "ls", "-q"])?;
    assert!(tasks.trim().is_empty(), "tasks left: {tasks}");
    // web1 is untouched.
    assert!(c.node(0).pod("web1").is_some());
    Ok(())
}

/// Marks a pod for deletion directly in a stopped control's store, as the
/// graceful Delete does (`metadata.deletionTimestamp`).
fn mark_for_deletion(store: &std::path::Path, name: &str) -> anyhow::Result<()> {
    use weir_control::store::{Compare, Op, RedbStore, Store as _};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let s = wait_for("the store's lock", Duration::from_secs(10), || {
        RedbStore::open(store).ok()
    })?;
    rt.block_on(async {
        let key = format!("/core/pods/default/{name}");
        let kv = s
            .get(&key)
            .await?
            .ok_or_else(|| anyhow::anyhow!("{key} missing"))?;
        let mut pod: Value = serde_json::from_slice(&kv.value)?;
        pod["metadata"]["deletionTimestamp"] = json!("2030-01-01T00:00:00Z");
        pod["metadata"]["deletionGracePeriodSeconds"] = json!(1);
        let r = s
            .txn(
                vec![(key.clone(), Compare::ModRevision(kv.mod_revision))],
                vec![Op::Put {
                    key,
                    value: serde_json::to_vec(&pod)?,
                }],
            )
            .await?;
        anyhow::ensure!(r.succeeded, "the pod changed under the test");
        anyhow::Ok(())
    })?;
    drop(s);
    // The store lets go of its file lock from its writer thread, after the
    // drop returns: wait for it (redb locks with flock).
    let path = store.display().to_string();
    wait_for("the store's lock released", Duration::from_secs(10), || {
        weir_tests::sh("flock", &["-n", &path, "true"]).ok()
    })?;
    Ok(())
}

#[test]
#[expect(clippy::too_many_lines, reason = "one cluster's story, top to bottom")]
fn pods_outlive_agent_and_control_restarts_and_marked_pods_are_removed() -> anyhow::Result<()> {
    let mut c = ControlCluster::new("nb", 42, 2, CONTROL_ARGS)?;
    c.start_agent(0)?;
    c.start_agent(1)?;
    let api = Api::connect(&c.control.url())?;
    wait_nodes_ready(&api, &mut c)?;
    let (n1, n2) = (c.node(0).name.clone(), c.node(1).name.clone());
    api.apply(&web_pod("web", &n1, 8080, "still-here"))?;
    api.apply(&web_pod("peer", &n2, 8081, "peer"))?;
    let (web, web_ip) = api.wait_running("web", START)?;
    let (peer, _) = api.wait_running("peer", START)?;
    let probe = |c: &ControlCluster| {
        wget_from_pod(&c.cluster.nodes[1], &uid(&peer), web_ip, 8080).map(|b| b.trim().to_owned())
    };
    assert_eq!(
        wait_for("peer reaches web", Duration::from_secs(20), || probe(&c)
            .ok())?,
        "still-here"
    );
    let ns1 = c.cluster.nodes[0].containerd_ns();
    let tasks_before = c.cluster.containerd.ctr(&ns1, &["tasks", "ls"])?;

    // kill -9 the agent: the pod keeps serving; the node's heartbeat stops.
    c.node(0).kill_agent();
    assert_eq!(probe(&c)?, "still-here");
    let beat = wait_for("a heartbeat time", Duration::from_secs(5), || {
        api.get("Node", "", &n1).map(|n| heartbeat(&n))
    })?;
    std::thread::sleep(Duration::from_millis(3500));
    let node1 = api.get("Node", "", &n1).expect("node 1 exists");
    assert_eq!(
        heartbeat(&node1),
        beat,
        "heartbeats went on without the agent"
    );
    assert_eq!(probe(&c)?, "still-here");

    // Restart it: same pod, no restart, heartbeats and statuses flow again.
    c.start_agent(0)?;
    wait_for("heartbeats again", Duration::from_secs(10), || {
        api.get("Node", "", &n1).filter(|n| heartbeat(n) != beat)
    })?;
    let p = c
        .node(0)
        .wait_pod("web", "adopted", Duration::from_secs(30), |p| {
            p["status"]["phase"] == "Running"
        })?;
    assert_eq!(p["metadata"]["uid"], uid(&web).as_str());
    assert_eq!(p["status"]["containerStatuses"][0]["restartCount"], 0);
    assert_eq!(
        c.cluster.containerd.ctr(&ns1, &["tasks", "ls"])?,
        tasks_before,
        "a task was restarted"
    );
    api.apply(&web_pod("late", &n1, 8082, "late"))?;
    let (late, _) = api.wait_running("late", START)?;
    let late_filter = format!("labels.\"io.weir.pod.uid\"=={}", uid(&late));
    let late_containers = c
        .cluster
        .containerd
        .ctr(&ns1, &["containers", "ls", "-q", &late_filter])?;
    assert_eq!(late_containers.lines().count(), 1, "{late_containers}");

    // kill -9 the control: pods keep running and serving.
    c.control.kill();
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(probe(&c)?, "still-here");
    // An agent restarted while the control is down starts on its cached
    // assignment and adopts its pods.
    c.node(0).kill_agent();
    c.node(0).start_agent()?;
    let p = c
        .node(0)
        .wait_pod("web", "adopted", Duration::from_secs(30), |p| {
            p["status"]["phase"] == "Running"
        })?;
    assert_eq!(p["metadata"]["uid"], uid(&web).as_str());
    assert_eq!(probe(&c)?, "still-here");
    // While it is down, mark `late` for deletion in its store (what a
    // graceful Delete does), then bring it back: the agents reconnect,
    // resume, and node 1 stops `late` and reports it terminated, which
    // removes the object.
    mark_for_deletion(&c.control.store, "late")?;
    c.control.restart()?;
    wait_for(
        "late removed from the control",
        Duration::from_secs(40),
        || api.not_found("Pod", "default", "late").then_some(()),
    )
    .map_err(|e| e.context(weir_tests::tail(&c.cluster.nodes[0].agent_log_text(), 30)))?;
    let n1node = c.node(0);
    wait_for("late torn down on node 1", Duration::from_secs(20), || {
        n1node.pod("late").is_none().then_some(())
    })?;
    // Stopped because of the mark (the agent's Killing event says so).
    let killing = api
        .list("Event", "default", "")?
        .into_iter()
        .find(|e| e["involvedObject"]["uid"] == uid(&late).as_str() && e["reason"] == "Killing");
    assert!(killing.is_some(), "no Killing event for late");
    let left = c
        .cluster
        .containerd
        .ctr(&ns1, &["containers", "ls", "-q", &late_filter])?;
    assert!(left.trim().is_empty(), "late's containers are left: {left}");
    // The others never noticed: same uid, same IP, no restarts, status flows.
    let (web_after, ip_after) = api.wait_running("web", Duration::from_secs(20))?;
    assert_eq!(uid(&web_after), uid(&web));
    assert_eq!(ip_after, web_ip);
    assert_eq!(
        web_after["status"]["containerStatuses"][0]["restartCount"],
        0
    );
    assert_eq!(
        c.cluster.containerd.ctr(&ns1, &["tasks", "ls"])?,
        tasks_before
    );
    assert_eq!(probe(&c)?, "still-here");
    wait_nodes_ready(&api, &mut c)?;
    api.apply(&web_pod("after", &n2, 8083, "after"))?;
    api.wait_running("after", START)?;
    Ok(())
}
