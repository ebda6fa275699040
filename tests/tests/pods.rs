//! weir-agent end to end: real containerd + runc, real netns/veth, real
//! eBPF, real HTTP. Needs root.
#![expect(
    clippy::too_many_lines,
    reason = "each e2e scenario reads top to bottom"
)]
#![allow(
    clippy::many_single_char_names,
    reason = "c = cluster, n = node, p = pod throughout"
)]

use std::{
    io::{Read as _, Write as _},
    net::SocketAddr,
    time::Duration,
};

use weir_tests::{Cluster, http_get, web_pod};

const START: Duration = Duration::from_mins(1);

fn container_status<'a>(pod: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    pod["status"]["containerStatuses"]
        .as_array()
        .and_then(|a| a.iter().find(|c| c["name"] == name))
        .unwrap_or(&serde_json::Value::Null)
}

fn counter(metrics: &str, name: &str, pod: &str) -> u64 {
    metrics
        .lines()
        .find(|l| l.starts_with(name) && l.contains(&format!("pod=\"{pod}\"")))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0)
}

#[test]
fn pods_serve_http_to_each_other_and_the_host_then_leave_nothing() -> anyhow::Result<()> {
    let mut c = Cluster::new("a", 11, 1)?;
    let n = c.node(0);
    n.start_agent()?;
    n.apply("web1.yaml", &web_pod("web1", 8080, "hello-from-web1"))?;
    n.apply("web2.yaml", &web_pod("web2", 8081, "hello-from-web2"))?;
    let ip1 = n.wait_running("web1", START)?;
    let ip2 = n.wait_running("web2", START)?;
    assert_ne!(ip1, ip2, "IPAM handed out one address twice");
    assert!(n.pod_cidr.starts_with(&format!(
        "{}.{}.{}.",
        ip1.octets()[0],
        ip1.octets()[1],
        ip1.octets()[2]
    )));

    // Host → pod, through the host's route to the node's pod CIDR.
    let (code, body) =
        weir_tests::wait_for("web1 answers the host", Duration::from_secs(20), || {
            http_get(SocketAddr::from((ip1, 8080)), "/", Duration::from_secs(2))
                .ok()
                .filter(|r| r.0 == 200)
        })?;
    assert_eq!((code, body.trim()), (200, "hello-from-web1"));
    // Node → pod.
    let out = n.exec(&["busybox", "wget", "-qO-", &format!("http://{ip2}:8081/")])?;
    assert_eq!(out.trim(), "hello-from-web2");
    // Pod → pod, from inside web1's network namespace.
    let p1 = n.pod("web1").expect("web1 listed");
    let uid1 = p1["metadata"]["uid"].as_str().expect("uid").to_owned();
    let netns1 = format!("/run/weir/netns/{}/{uid1}", n.name);
    let out = weir_tests::sh(
        "nsenter",
        &[
            &format!("--net={netns1}"),
            "busybox",
            "wget",
            "-qO-",
            &format!("http://{ip2}:8081/"),
        ],
    )?;
    assert_eq!(out.trim(), "hello-from-web2");
    // The pod sees only its own eth0 with a /32 and the link-local gateway.
    let addr = weir_tests::sh(
        "nsenter",
        &[
            &format!("--net={netns1}"),
            "ip",
            "-4",
            "-o",
            "addr",
            "show",
            "dev",
            "eth0",
        ],
    )?;
    assert!(addr.contains(&format!("{ip1}/32")), "{addr}");
    let routes = weir_tests::sh("nsenter", &[&format!("--net={netns1}"), "ip", "route"])?;
    assert!(routes.contains("default via 169.254.1.1"), "{routes}");
    // The cluster and service CIDRs are unreachable inside the node.
    let node_routes = n.exec(&["ip", "route", "show", "type", "unreachable"])?;
    assert!(
        node_routes.contains("10.244.0.0/16") && node_routes.contains("10.96.0.0/16"),
        "{node_routes}"
    );

    // eBPF counters move with real traffic, in both directions.
    let before = n.metrics()?;
    let rx0 = counter(&before, "weir_pod_network_receive_bytes_total", "web1");
    let tx0 = counter(&before, "weir_pod_network_transmit_bytes_total", "web1");
    for _ in 0..20 {
        http_get(SocketAddr::from((ip1, 8080)), "/", Duration::from_secs(2))?;
    }
    let after = n.metrics()?;
    let rx1 = counter(&after, "weir_pod_network_receive_bytes_total", "web1");
    let tx1 = counter(&after, "weir_pod_network_transmit_bytes_total", "web1");
    assert!(rx1 > rx0 + 20 * 60, "receive bytes {rx0} -> {rx1}");
    assert!(tx1 > tx0 + 20 * 100, "transmit bytes {tx0} -> {tx1}");
    assert!(counter(&after, "weir_pod_network_receive_packets_total", "web1") >= 20 * 3);
    assert!(
        after.contains("weir_pod_cpu_usage_seconds_total{"),
        "{after}"
    );
    assert!(
        after.contains("weir_pod_memory_working_set_bytes{"),
        "{after}"
    );

    // Teardown: remove the manifest; everything of web1 goes.
    let ns = n.containerd_ns();
    let veth1 = n.exec(&["ip", "-o", "route", "get", &ip1.to_string()])?;
    let veth1 = veth1
        .split_whitespace()
        .skip_while(|w| *w != "dev")
        .nth(1)
        .expect("route names a dev")
        .to_owned();
    n.remove("web1.yaml")?;
    weir_tests::wait_for("web1 gone", Duration::from_secs(30), || {
        n.pod("web1").is_none().then_some(())
    })?;
    let node_name = n.name.clone();
    let state_dir = n.dir.join("state");
    let containers = c.containerd.ctr(&ns, &["containers", "ls", "-q"])?;
    assert!(
        !containers.contains("-web\n") || containers.lines().count() == 1,
        "{containers}"
    );
    assert_eq!(
        containers.lines().count(),
        1,
        "only web2's container is left: {containers}"
    );
    let snaps = c.containerd.ctr(&ns, &["snapshots", "ls"])?;
    assert_eq!(
        snaps.lines().filter(|l| l.contains("Active")).count(),
        1,
        "only web2's snapshot is active: {snaps}"
    );
    assert!(!std::path::Path::new(&netns1).exists(), "netns file left");
    let n = c.node(0);
    let links = n.exec(&["ip", "-o", "link"])?;
    assert!(!links.contains(&veth1), "veth {veth1} left: {links}");
    let routes = n.exec(&["ip", "route"])?;
    assert!(
        !routes.contains(&format!("{ip1} ")),
        "route to {ip1} left: {routes}"
    );
    let pins: Vec<String> = std::fs::read_dir(format!("/sys/fs/bpf/weir/{node_name}/links"))?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        !pins.iter().any(|p| p.starts_with(&veth1)),
        "link pins left: {pins:?}"
    );
    assert_eq!(pins.len(), 2, "web2 keeps its two links: {pins:?}");
    let ipam = std::fs::read_to_string(state_dir.join("ipam.json"))?;
    assert!(!ipam.contains(&uid1), "lease left: {ipam}");
    for ctrl in ["memory", "cpu", "pids"] {
        let dir = format!("/sys/fs/cgroup/{ctrl}/{ns}/{uid1}");
        assert!(!std::path::Path::new(&dir).exists(), "cgroup {dir} left");
    }
    Ok(())
}

#[test]
fn restart_policies_backoff_exit_codes_and_logs() -> anyhow::Result<()> {
    let mut c = Cluster::new("b", 12, 1)?;
    let n = c.node(0);
    n.start_agent()?;
    let job = |name: &str, policy: &str, script: &str| {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\nspec:\n  restartPolicy: {policy}\n  terminationGracePeriodSeconds: 1\n  containers:\n  - name: main\n    image: busybox\n    command: [\"sh\", \"-c\", \"{script}\"]\n"
        )
    };
    n.apply("crash.yaml", &job("crash", "Always", "echo run-$$; exit 3"))?;
    n.apply("ok.yaml", &job("ok", "OnFailure", "echo done; exit 0"))?;
    n.apply("fail.yaml", &job("fail", "Never", "exit 2"))?;

    let p = n.wait_pod("ok", "Succeeded", START, |p| {
        p["status"]["phase"] == "Succeeded"
    })?;
    let st = container_status(&p, "main");
    assert_eq!(st["state"]["terminated"]["reason"], "Completed");
    assert_eq!(st["restartCount"], 0);
    let p = n.wait_pod("fail", "Failed", START, |p| {
        p["status"]["phase"] == "Failed"
    })?;
    let st = container_status(&p, "main");
    assert_eq!(st["state"]["terminated"]["exitCode"], 2);
    assert_eq!(st["state"]["terminated"]["reason"], "Error");

    // Always: restarted with back-off (1 s, 2 s, 4 s cap in this cluster).
    let p = n.wait_pod("crash", "restarted twice and backing off", START, |p| {
        let st = container_status(p, "main");
        st["restartCount"].as_u64().unwrap_or(0) >= 2
            && st["state"]["waiting"]["reason"] == "CrashLoopBackOff"
    })?;
    let st = container_status(&p, "main");
    assert_eq!(st["lastState"]["terminated"]["exitCode"], 3);
    assert_eq!(st["lastState"]["terminated"]["reason"], "Error");
    assert_eq!(p["status"]["phase"], "Running");
    // Back-off really waits: 4 restarts cannot happen within 1 s.
    let restarts = |p: &serde_json::Value| {
        container_status(p, "main")["restartCount"]
            .as_u64()
            .unwrap_or(0)
    };
    let r0 = restarts(&p);
    std::thread::sleep(Duration::from_millis(900));
    let r1 = restarts(&n.pod("crash").expect("crash listed"));
    assert!(
        r1 <= r0 + 1,
        "restarted {r0} -> {r1} within 0.9 s: no back-off"
    );

    // Logs: one line per run, readable through the agent.
    let (code, logs) = http_get(
        n.api(),
        "/api/v1/namespaces/default/pods/crash/log",
        Duration::from_secs(5),
    )?;
    assert_eq!(code, 200);
    assert!(
        logs.lines().filter(|l| l.starts_with("run-")).count() >= 2,
        "{logs}"
    );
    let (code, _) = http_get(
        n.api(),
        "/api/v1/namespaces/default/pods/crash/log?container=nope",
        Duration::from_secs(5),
    )?;
    assert_eq!(code, 400);
    // Follow: a streaming request sees a line written after it started.
    n.apply(
        "talker.yaml",
        &job(
            "talker",
            "Always",
            "i=0; while true; do echo tick-$i; i=$((i+1)); sleep 0.3; done",
        ),
    )?;
    n.wait_running("talker", START)?;
    let mut s = std::net::TcpStream::connect(n.api())?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "GET /api/v1/namespaces/default/pods/talker/log?follow=true HTTP/1.1\r\nHost: x\r\n\r\n"
    )?;
    let mut seen = String::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !seen.contains("tick-8") && std::time::Instant::now() < deadline {
        let mut buf = [0u8; 4096];
        let k = s.read(&mut buf)?;
        seen.push_str(&String::from_utf8_lossy(&buf[..k]));
    }
    assert!(
        seen.contains("tick-8"),
        "follow did not stream new lines: {seen}"
    );
    Ok(())
}

#[test]
fn resource_limits_reach_the_cgroup_and_oom_kills_are_reported() -> anyhow::Result<()> {
    let mut c = Cluster::new("c", 13, 1)?;
    let n = c.node(0);
    n.start_agent()?;
    n.apply(
        "limited.yaml",
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: limited\nspec:\n  terminationGracePeriodSeconds: 1\n  containers:\n  - name: main\n    image: busybox\n    command: [\"sleep\", \"3600\"]\n    resources:\n      requests: {cpu: 250m, memory: 32Mi}\n      limits: {cpu: 500m, memory: 64Mi}\n",
    )?;
    n.apply(
        "hog.yaml",
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: hog\nspec:\n  restartPolicy: Never\n  terminationGracePeriodSeconds: 1\n  containers:\n  - name: main\n    image: busybox\n    command: [\"dd\", \"if=/dev/zero\", \"of=/dev/null\", \"bs=128M\", \"count=4\"]\n    resources:\n      limits: {memory: 32Mi}\n",
    )?;
    n.wait_running("limited", START)?;
    let p = n.pod("limited").expect("limited listed");
    let uid = p["metadata"]["uid"].as_str().expect("uid");
    let ns = n.containerd_ns();
    let v2 = std::path::Path::new("/sys/fs/cgroup/cgroup.controllers").exists();
    if v2 {
        let dir = format!("/sys/fs/cgroup/{ns}/{uid}/main");
        assert_eq!(
            std::fs::read_to_string(format!("{dir}/memory.max"))?.trim(),
            "67108864"
        );
        assert_eq!(
            std::fs::read_to_string(format!("{dir}/cpu.max"))?.trim(),
            "50000 100000"
        );
    } else {
        let mem = std::fs::read_to_string(format!(
            "/sys/fs/cgroup/memory/{ns}/{uid}/main/memory.limit_in_bytes"
        ))?;
        assert_eq!(mem.trim(), "67108864");
        let quota = std::fs::read_to_string(format!(
            "/sys/fs/cgroup/cpu/{ns}/{uid}/main/cpu.cfs_quota_us"
        ))?;
        assert_eq!(quota.trim(), "50000");
        let shares =
            std::fs::read_to_string(format!("/sys/fs/cgroup/cpu/{ns}/{uid}/main/cpu.shares"))?;
        assert_eq!(shares.trim(), "256");
    }
    let p = n.wait_pod("hog", "OOM-killed", START, |p| {
        p["status"]["phase"] == "Failed"
    })?;
    let st = container_status(&p, "main");
    assert_eq!(st["state"]["terminated"]["reason"], "OOMKilled", "{st}");
    assert_eq!(st["state"]["terminated"]["exitCode"], 137);
    Ok(())
}

#[test]
fn agent_sigkill_and_restart_adopts_pods_without_restarting_them() -> anyhow::Result<()> {
    let mut c = Cluster::new("d", 14, 1)?;
    let ns = c.node(0).containerd_ns();
    let n = c.node(0);
    n.start_agent()?;
    n.apply("web.yaml", &web_pod("web", 8080, "adopt-me"))?;
    let ip = n.wait_running("web", START)?;
    let addr = SocketAddr::from((ip, 8080));
    weir_tests::wait_for("web answers", Duration::from_secs(20), || {
        http_get(addr, "/", Duration::from_secs(2))
            .ok()
            .filter(|r| r.0 == 200)
    })?;
    for _ in 0..10 {
        http_get(addr, "/", Duration::from_secs(2))?;
    }
    // Bytes ten requests add to the pod's receive counter (ten, so that a
    // stray retransmit or ARP exchange cannot dominate the figure).
    let ten_requests = |n: &weir_tests::Node| -> anyhow::Result<u64> {
        let before = counter(&n.metrics()?, "weir_pod_network_receive_bytes_total", "web");
        for _ in 0..10 {
            http_get(addr, "/", Duration::from_secs(2))?;
        }
        Ok(counter(&n.metrics()?, "weir_pod_network_receive_bytes_total", "web") - before)
    };
    let per_request_before = ten_requests(n)?;
    let rx_before = counter(&n.metrics()?, "weir_pod_network_receive_bytes_total", "web");
    let tcx_links = || {
        weir_tests::sh("bpftool", &["link", "show"])
            .map(|s| s.matches("type 11 ").count() + s.matches("type tcx").count())
    };
    let links_before = tcx_links()?;
    let tasks_before = c.containerd.ctr(&ns, &["tasks", "ls"])?;
    let n = c.node(0);
    let uid = n.pod("web").expect("web listed")["metadata"]["uid"]
        .as_str()
        .expect("uid")
        .to_owned();

    n.kill_agent();
    // While the agent is down the pod keeps serving.
    let (code, body) = http_get(addr, "/", Duration::from_secs(2))?;
    assert_eq!((code, body.trim()), (200, "adopt-me"));
    n.start_agent()?;
    let ip_after = n.wait_running("web", Duration::from_secs(30))?;
    assert_eq!(ip, ip_after, "IP changed across agent restart");
    let p = n.pod("web").expect("web listed");
    assert_eq!(p["metadata"]["uid"], uid.as_str());
    assert_eq!(container_status(&p, "web")["restartCount"], 0);
    let tasks_after = c.containerd.ctr(&ns, &["tasks", "ls"])?;
    assert_eq!(
        tasks_before, tasks_after,
        "a task was restarted (pid changed)"
    );
    // Counters were neither reset nor double counted: the request made while
    // the agent was down is in, and one request still adds what it did.
    let n = c.node(0);
    let rx_mid = counter(&n.metrics()?, "weir_pod_network_receive_bytes_total", "web");
    assert!(
        rx_mid > rx_before,
        "counter reset or missed traffic while down: {rx_before} -> {rx_mid}"
    );
    let per_request_after = ten_requests(n)?;
    // A second program stacked on the veth would double the figure.
    let (a, b) = (per_request_after, per_request_before);
    assert!(
        a * 4 >= b * 3 && a * 3 <= b * 4,
        "ten requests counted {per_request_before} bytes before the restart, {per_request_after} after (stacked programs?)"
    );
    assert_eq!(
        tcx_links()?,
        links_before,
        "the restart stacked or lost TCX links"
    );
    let leases = std::fs::read_to_string(n.dir.join("state/ipam.json"))?;
    assert_eq!(leases.matches(&uid).count(), 1, "{leases}");
    Ok(())
}

#[test]
fn bad_manifests_are_refused_clearly_and_missing_images_wait() -> anyhow::Result<()> {
    let mut c = Cluster::new("e", 15, 1)?;
    let n = c.node(0);
    n.start_agent()?;
    n.apply("good.yaml", &web_pod("good", 8080, "still-here"))?;
    let ip = n.wait_running("good", START)?;
    let bad = [
        (
            "cpu.yaml",
            "apiVersion: v1\nkind: Pod\nmetadata: {name: cpu}\nspec:\n  containers:\n  - name: a\n    image: busybox\n    resources: {limits: {cpu: lots}}\n",
            "cpu.yaml: spec.containers[0].resources.limits.cpu",
        ),
        (
            "dup.yaml",
            "apiVersion: v1\nkind: Pod\nmetadata: {name: dup}\nspec:\n  containers:\n  - {name: a, image: busybox}\n  - {name: a, image: busybox}\n",
            "dup.yaml: spec.containers[1].name",
        ),
        (
            "noimage.yaml",
            "apiVersion: v1\nkind: Pod\nmetadata: {name: noimage}\nspec:\n  containers:\n  - {name: a}\n",
            "noimage.yaml: spec.containers[0].image",
        ),
        (
            "port.yaml",
            "apiVersion: v1\nkind: Pod\nmetadata: {name: port}\nspec:\n  containers:\n  - name: a\n    image: busybox\n    ports: [{containerPort: 70000}]\n",
            "port.yaml: spec.containers[0].ports[0].containerPort",
        ),
        (
            "host.yaml",
            "apiVersion: v1\nkind: Pod\nmetadata: {name: host}\nspec:\n  hostNetwork: true\n  containers:\n  - {name: a, image: busybox}\n",
            "host.yaml: spec.hostNetwork",
        ),
        (
            "unknown.yaml",
            "apiVersion: v1\nkind: Pod\nmetadata: {name: unknown}\nspec:\n  containers:\n  - {name: a, image: busybox, imagePulPolicy: Never}\n",
            "unknown.yaml: spec.containers[0].imagePulPolicy",
        ),
    ];
    for (file, yaml, _) in &bad {
        n.apply(file, yaml)?;
    }
    n.apply(
        "missing.yaml",
        "apiVersion: v1\nkind: Pod\nmetadata: {name: missing}\nspec:\n  containers:\n  - {name: a, image: example.com/not-here:1}\n",
    )?;
    let p = n.wait_pod("missing", "waiting for its image", START, |p| {
        container_status(p, "a")["state"]["waiting"]["reason"] == "ErrImageNeverPull"
    })?;
    assert_eq!(p["status"]["phase"], "Pending");
    let msg = container_status(&p, "a")["state"]["waiting"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(msg.contains("example.com/not-here:1"), "{msg}");
    let log = n.agent_log_text();
    for (file, _, needle) in &bad {
        assert!(
            log.contains(needle),
            "no clear refusal for {file} (expected {needle:?}) in:\n{}",
            weir_tests::tail(&log, 40)
        );
        let name = file.trim_end_matches(".yaml");
        assert!(n.pod(name).is_none(), "{name} was started");
    }
    // The good pod never noticed.
    let p = n.pod("good").expect("good listed");
    assert_eq!(container_status(&p, "web")["restartCount"], 0);
    let (code, body) = http_get(SocketAddr::from((ip, 8080)), "/", Duration::from_secs(2))?;
    assert_eq!((code, body.trim()), (200, "still-here"));
    // An invalid edit of a running pod's file keeps the running pod.
    n.apply(
        "good.yaml",
        "apiVersion: v1\nkind: Pod\nmetadata: {name: good}\nspec:\n  containers: []\n",
    )?;
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        n.agent_log_text().contains("good.yaml: spec.containers"),
        "{}",
        weir_tests::tail(&n.agent_log_text(), 10)
    );
    let (code, _) = http_get(SocketAddr::from((ip, 8080)), "/", Duration::from_secs(2))?;
    assert_eq!(code, 200);
    // A valid change replaces the pod: new uid, new content served.
    let old_uid = n.pod("good").expect("good listed")["metadata"]["uid"].clone();
    n.apply("good.yaml", &web_pod("good", 8080, "replaced"))?;
    let p = n.wait_pod("good", "replaced", START, |p| {
        p["metadata"]["uid"] != old_uid && p["status"]["phase"] == "Running"
    })?;
    let new_ip: std::net::Ipv4Addr = p["status"]["podIP"].as_str().expect("podIP").parse()?;
    let (code, body) =
        weir_tests::wait_for("replaced pod answers", Duration::from_secs(20), || {
            http_get(
                SocketAddr::from((new_ip, 8080)),
                "/",
                Duration::from_secs(2),
            )
            .ok()
            .filter(|r| r.0 == 200)
        })?;
    assert_eq!((code, body.trim()), (200, "replaced"));
    weir_tests::wait_for("the old good pod gone", Duration::from_secs(20), || {
        (n.pods()
            .ok()?
            .iter()
            .filter(|p| p["metadata"]["name"] == "good")
            .count()
            == 1)
            .then_some(())
    })?;
    Ok(())
}

#[test]
fn a_pods_containers_share_one_netns_and_one_shim() -> anyhow::Result<()> {
    let mut c = Cluster::new("f", 16, 1)?;
    let ns = c.node(0).containerd_ns();
    let n = c.node(0);
    n.start_agent()?;
    n.apply(
        "duo.yaml",
        r#"apiVersion: v1
kind: Pod
metadata: {name: duo}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: web
    image: busybox
    command: ["sh", "-c", "mkdir -p /srv && echo from-web > /srv/index.html && exec httpd -f -p 8080 -h /srv"]
  - name: side
    image: busybox
    env: [{name: TARGET, value: "http://127.0.0.1:8080/"}]
    command: ["sh", "-c", "while true; do wget -qO- $TARGET && sleep 0.5 || sleep 0.2; done"]
"#,
    )?;
    n.wait_running("duo", START)?;
    // The sidecar reaches the web container over the pod's loopback.
    weir_tests::wait_for(
        "sidecar fetched from web over localhost",
        Duration::from_secs(20),
        || {
            let (_, log) = http_get(
                n.api(),
                "/api/v1/namespaces/default/pods/duo/log?container=side",
                Duration::from_secs(2),
            )
            .ok()?;
            log.contains("from-web").then_some(())
        },
    )?;
    let shims = weir_tests::sh(
        "pgrep",
        &["-f", &format!("containerd-shim-runc-v2 -namespace {ns} ")],
    )?;
    assert_eq!(
        shims.lines().count(),
        1,
        "one shim for the pod's two containers: {shims}"
    );
    let tasks = c.containerd.ctr(&ns, &["tasks", "ls"])?;
    assert_eq!(
        tasks.lines().filter(|l| l.contains("RUNNING")).count(),
        2,
        "{tasks}"
    );
    Ok(())
}

#[test]
fn containerd_down_is_reported_and_retried_without_losing_pods() -> anyhow::Result<()> {
    let mut c = Cluster::new("g", 17, 1)?;
    c.node(0).start_agent()?;
    c.node(0)
        .apply("web.yaml", &web_pod("web", 8080, "survivor"))?;
    let ip = c.node(0).wait_running("web", START)?;
    let addr = SocketAddr::from((ip, 8080));
    c.containerd.kill();
    // The agent stays up and keeps the pod; the pod keeps serving.
    c.node(0)
        .apply("late.yaml", &web_pod("late", 8081, "late"))?;
    let n = c.node(0);
    let p = n.wait_pod(
        "late",
        "waiting for containerd",
        Duration::from_secs(20),
        |p| {
            container_status(p, "web")["state"]["waiting"]["reason"] == "ContainerCreating"
                && container_status(p, "web")["state"]["waiting"]["message"]
                    .as_str()
                    .is_some_and(|m| !m.is_empty())
        },
    )?;
    assert_eq!(p["status"]["phase"], "Pending");
    assert!(n.pod("web").is_some(), "web lost while containerd is down");
    let (code, body) = http_get(addr, "/", Duration::from_secs(2))?;
    assert_eq!((code, body.trim()), (200, "survivor"));
    c.containerd.restart()?;
    let n = c.node(0);
    let late_ip = n.wait_running("late", START)?;
    let (code, body) = weir_tests::wait_for("late answers", Duration::from_secs(20), || {
        http_get(
            SocketAddr::from((late_ip, 8081)),
            "/",
            Duration::from_secs(2),
        )
        .ok()
        .filter(|r| r.0 == 200)
    })?;
    assert_eq!((code, body.trim()), (200, "late"));
    let p = n.pod("web").expect("web listed");
    assert_eq!(p["status"]["phase"], "Running");
    assert_eq!(
        container_status(&p, "web")["restartCount"],
        0,
        "web was restarted"
    );
    Ok(())
}

fn condition(p: &serde_json::Value, kind: &str) -> String {
    p["status"]["conditions"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["type"] == kind))
        .and_then(|c| c["status"].as_str())
        .unwrap_or("")
        .to_owned()
}

fn restarts(p: &serde_json::Value, container: &str) -> u64 {
    container_status(p, container)["restartCount"]
        .as_u64()
        .unwrap_or(0)
}

#[test]
fn probes_drive_readiness_and_restart_unhealthy_containers() -> anyhow::Result<()> {
    let mut c = Cluster::new("pr", 23, 1)?;
    let n = c.node(0);
    n.start_agent()?;
    let pod = |name: &str, script: &str, probes: &str| {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\nspec:\n  terminationGracePeriodSeconds: 1\n  containers:\n  - name: main\n    image: busybox\n    command: [\"sh\", \"-c\", \"{script}\"]\n    ports:\n    - containerPort: 8080\n      name: web\n{probes}"
        )
    };
    // Readiness over HTTP: /ok exists from 5 s to 11 s after the start.
    n.apply(
        "http.yaml",
        &pod(
            "http",
            "mkdir -p /srv && httpd -p 8080 -h /srv && sleep 5 && touch /srv/ok && sleep 6 && rm /srv/ok && exec sleep 3600",
            "    readinessProbe:\n      httpGet: { path: /ok, port: web }\n      periodSeconds: 1\n      failureThreshold: 1\n",
        ),
    )?;
    // Readiness by exec once a file exists; a passing HTTP liveness probe.
    n.apply(
        "exec.yaml",
        &pod(
            "exec",
            "mkdir -p /srv && echo hi > /srv/index.html && httpd -p 8080 -h /srv && sleep 5 && touch /tmp/ready && exec sleep 3600",
            "    readinessProbe:\n      exec: { command: [test, -f, /tmp/ready] }\n      periodSeconds: 1\n    livenessProbe:\n      httpGet: { path: /, port: 8080 }\n      periodSeconds: 1\n      failureThreshold: 2\n",
        ),
    )?;
    // Liveness over TCP to a port nothing listens on.
    n.apply(
        "tcp.yaml",
        &pod(
            "tcp",
            "exec sleep 3600",
            "    livenessProbe:\n      tcpSocket: { port: 9999 }\n      periodSeconds: 1\n      failureThreshold: 2\n",
        ),
    )?;
    // A startup probe that never succeeds.
    n.apply(
        "startup.yaml",
        &pod(
            "startup",
            "exec sleep 3600",
            "    startupProbe:\n      exec: { command: [\"false\"] }\n      periodSeconds: 1\n      failureThreshold: 2\n    readinessProbe:\n      tcpSocket: { port: 8080 }\n",
        ),
    )?;

    // Running but not ready until the readiness probes pass.
    for name in ["http", "exec"] {
        let p = n.wait_pod(name, "running", START, |p| {
            container_status(p, "main")["state"]["running"].is_object()
        })?;
        assert_eq!(condition(&p, "Ready"), "False", "{name}: {}", p["status"]);
        assert_eq!(container_status(&p, "main")["ready"], false);
    }
    for name in ["http", "exec"] {
        let p = n.wait_pod(name, "Ready", Duration::from_secs(20), |p| {
            condition(p, "Ready") == "True"
        })?;
        assert_eq!(condition(&p, "ContainersReady"), "True");
        assert_eq!(container_status(&p, "main")["ready"], true);
        assert_eq!(restarts(&p, "main"), 0, "{name}");
    }
    // /ok is removed again: not ready, but not restarted either.
    let p = n.wait_pod("http", "not Ready again", Duration::from_secs(20), |p| {
        condition(p, "Ready") == "False"
    })?;
    assert_eq!(restarts(&p, "main"), 0);
    assert!(
        container_status(&p, "main")["state"]["running"].is_object(),
        "{}",
        p["status"]
    );

    // Failing liveness and startup probes kill the container; it restarts.
    for name in ["tcp", "startup"] {
        let p = n.wait_pod(name, "restarted by its probe", START, |p| {
            restarts(p, "main") >= 1
        })?;
        let last = &container_status(&p, "main")["lastState"]["terminated"];
        assert_eq!(last["reason"], "Error", "{name}: {}", p["status"]);
        assert_eq!(last["exitCode"], 137, "{name}: {}", p["status"]);
    }
    // Not started, so never ready, whatever its readiness probe says.
    let p = n.pod("startup").expect("startup listed");
    assert_eq!(condition(&p, "Ready"), "False", "{}", p["status"]);
    assert_eq!(container_status(&p, "main")["started"], false);
    // The passing liveness probe never restarted its container.
    let p = n.pod("exec").expect("exec listed");
    assert_eq!(restarts(&p, "main"), 0, "{}", p["status"]);
    assert_eq!(condition(&p, "Ready"), "True");

    // An agent restart adopts the pods and resumes probing: readiness comes
    // back without a restart, and the failing liveness probe still kills.
    let tcp_before = restarts(&n.pod("tcp").expect("tcp listed"), "main");
    n.kill_agent();
    n.start_agent()?;
    let p = n.wait_pod(
        "exec",
        "Ready after the agent restart",
        Duration::from_secs(20),
        |p| condition(p, "Ready") == "True",
    )?;
    assert_eq!(restarts(&p, "main"), 0, "{}", p["status"]);
    n.wait_pod(
        "tcp",
        "restarted by its probe after the agent restart",
        START,
        |p| restarts(p, "main") > tcp_before,
    )?;
    Ok(())
}
