//! `weirctl describe`: kubectl's sections for pods, deployments,
//! replicasets, daemonsets, nodes and namespaces, each ending with the
//! Events whose `involvedObject.uid` is the object's, oldest first.

use k8s_openapi::jiff::Timestamp;
use serde_json::Value;
use weir_proto::manifest::{parse_cpu_millis, parse_memory_bytes};

use crate::client::{Api, name_of, ns_of, uid_of};
use crate::doc::Doc;
use crate::format::{age, describe_time, int, label_pairs, or, selector_text};
use crate::printers::{event_last_seen, event_source, event_time, node_roles};
use crate::resource::{Resource, targets};
use crate::rollout::{owned_replicasets, revision_of};

/// Runs `describe <kind> [name...]` (all of the kind, or those matching `-l`,
/// without names).
pub async fn run(api: &Api, args: &[String], ns: &str, selector: &str) -> anyhow::Result<()> {
    let mut objects: Vec<(Resource, Value)> = Vec::new();
    for (r, name) in targets(args)? {
        if let Some(n) = name {
            objects.push((r, api.get(r, ns, &n).await?));
        } else {
            let (items, _) = api.list(r, ns, selector).await?;
            if items.is_empty() {
                eprintln!("No resources found in {ns} namespace.");
            }
            objects.extend(items.into_iter().map(|v| (r, v)));
        }
    }
    let mut first = true;
    for (r, v) in objects {
        // kubectl shows no events for these.
        let events = if matches!(r, Resource::Event | Resource::NetworkPolicy) {
            Vec::new()
        } else {
            events_for(api, r, &v).await?
        };
        let text = describe(api, r, &v, &events).await?;
        if !first {
            println!("\n");
        }
        first = false;
        print!("{text}");
    }
    Ok(())
}

/// Events about an object (by uid), oldest first.
pub async fn events_for(api: &Api, r: Resource, v: &Value) -> anyhow::Result<Vec<Value>> {
    let ns = if r.namespaced() { ns_of(v) } else { "" };
    let (items, _) = api.list(Resource::Event, ns, "").await?;
    let uid = uid_of(v);
    let mut events: Vec<Value> = items
        .into_iter()
        .filter(|e| !uid.is_empty() && e["involvedObject"]["uid"] == uid)
        .collect();
    events.sort_by(|a, b| (event_time(a), name_of(a)).cmp(&(event_time(b), name_of(b))));
    Ok(events)
}

async fn describe(api: &Api, r: Resource, v: &Value, events: &[Value]) -> anyhow::Result<String> {
    let mut d = Doc::default();
    match r {
        Resource::Pod => pod(&mut d, v),
        Resource::Deployment => {
            let rss = owned_replicasets(api, v).await?;
            deployment(&mut d, v, &rss);
        }
        Resource::ReplicaSet | Resource::DaemonSet => {
            let (pods, _) = api.list(Resource::Pod, ns_of(v), "").await?;
            let uid = uid_of(v);
            let owned: Vec<Value> = pods
                .into_iter()
                .filter(|p| controller_uid(p) == Some(uid))
                .collect();
            if r == Resource::ReplicaSet {
                replicaset(&mut d, v, &owned);
            } else {
                daemonset(&mut d, v, &owned);
            }
        }
        Resource::Node => {
            let (pods, _) = api.list(Resource::Pod, "", "").await?;
            node(&mut d, v, &pods);
        }
        Resource::Namespace => namespace(&mut d, v),
        Resource::Event => event(&mut d, v),
        Resource::Service => {
            let selector = format!("kubernetes.io/service-name={}", name_of(v));
            let (slices, _) = api
                .list(Resource::EndpointSlice, ns_of(v), &selector)
                .await?;
            header(&mut d, v, true);
            labels_annotations(&mut d, 0, &v["metadata"]);
            crate::services::describe_service(&mut d, v, &slices);
        }
        Resource::EndpointSlice => {
            header(&mut d, v, true);
            labels_annotations(&mut d, 0, &v["metadata"]);
            crate::services::describe_endpoint_slice(&mut d, v);
        }
        Resource::NetworkPolicy => crate::netpol::describe_network_policy(&mut d, v),
        Resource::HorizontalPodAutoscaler => crate::hpa::describe_hpa(&mut d, v),
    }
    if !matches!(r, Resource::Event | Resource::NetworkPolicy) {
        events_section(&mut d, events, crate::format::now());
    }
    Ok(d.render())
}

/// The uid of a pod's (or RS's) controller owner.
pub fn controller_uid(v: &Value) -> Option<&str> {
    controller_ref(v)?["uid"].as_str()
}

/// The `controller: true` owner reference.
pub fn controller_ref(v: &Value) -> Option<&Value> {
    v["metadata"]["ownerReferences"]
        .as_array()?
        .iter()
        .find(|o| o["controller"] == true)
}

pub fn header(d: &mut Doc, v: &Value, with_ns: bool) {
    let m = &v["metadata"];
    d.field(0, "Name", &m["name"]);
    if with_ns {
        d.field(0, "Namespace", &m["namespace"]);
    }
}

pub fn labels_annotations(d: &mut Doc, level: usize, m: &Value) {
    d.map(level, "Labels", &m["labels"], "=");
    d.map(level, "Annotations", &m["annotations"], ": ");
}

fn controlled_by(d: &mut Doc, v: &Value) {
    if let Some(o) = controller_ref(v) {
        d.kv(
            0,
            "Controlled By",
            &format!("{}/{}", or(&o["kind"], ""), or(&o["name"], "")),
        );
    }
}

fn pod(d: &mut Doc, v: &Value) {
    let (m, spec, status) = (&v["metadata"], &v["spec"], &v["status"]);
    header(d, v, true);
    d.kv(0, "Priority", &int(&spec["priority"]).to_string());
    if let Some(pc) = spec["priorityClassName"].as_str() {
        d.kv(0, "Priority Class Name", pc);
    }
    d.kv(
        0,
        "Service Account",
        or(&spec["serviceAccountName"], "default"),
    );
    let node = match (spec["nodeName"].as_str(), status["hostIP"].as_str()) {
        (Some(n), Some(ip)) => format!("{n}/{ip}"),
        (Some(n), None) => n.to_owned(),
        (None, _) => "<none>".to_owned(),
    };
    d.kv(0, "Node", &node);
    if status["startTime"].is_string() {
        d.kv(0, "Start Time", &describe_time(&status["startTime"]));
    }
    labels_annotations(d, 0, m);
    pod_state(d, m, status);
    controlled_by(d, v);
    if let Some(init) = spec["initContainers"].as_array().filter(|a| !a.is_empty()) {
        d.line(0, &["Init Containers:"]);
        containers(d, init, &status["initContainerStatuses"]);
    }
    d.line(0, &["Containers:"]);
    containers(
        d,
        spec["containers"].as_array().map_or(&[], Vec::as_slice),
        &status["containerStatuses"],
    );
    match status["conditions"].as_array().filter(|c| !c.is_empty()) {
        Some(conds) => {
            d.line(0, &["Conditions:"]);
            d.line(1, &["Type", "Status"]);
            for c in conds {
                d.line(1, &[or(&c["type"], ""), or(&c["status"], "")]);
            }
        }
        None => d.kv(0, "Conditions", "<none>"),
    }
    let volumes: Vec<String> = spec["volumes"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|vol| {
            let source = vol
                .as_object()
                .and_then(|o| o.keys().find(|k| *k != "name").cloned())
                .unwrap_or_default();
            format!("{} ({source})", or(&vol["name"], ""))
        })
        .collect();
    d.list(0, "Volumes", &volumes);
    d.kv(0, "QoS Class", qos_class(spec));
    d.map(0, "Node-Selectors", &spec["nodeSelector"], "=");
    let tolerations: Vec<String> = spec["tolerations"]
        .as_array()
        .into_iter()
        .flatten()
        .map(toleration)
        .collect();
    d.list(0, "Tolerations", &tolerations);
}

/// Status, Reason, Message, IP and IPs of a pod.
fn pod_state(d: &mut Doc, m: &Value, status: &Value) {
    if m["deletionTimestamp"].is_string() {
        d.kv(
            0,
            "Status",
            &format!("Terminating (lasts {})", lasts(&m["deletionTimestamp"])),
        );
        d.kv(
            0,
            "Termination Grace Period",
            &format!("{}s", int(&m["deletionGracePeriodSeconds"])),
        );
    } else {
        d.kv(0, "Status", or(&status["phase"], "Pending"));
    }
    if let Some(r) = status["reason"].as_str() {
        d.kv(0, "Reason", r);
    }
    if let Some(msg) = status["message"].as_str() {
        d.kv(0, "Message", msg);
    }
    d.kv(0, "IP", or(&status["podIP"], ""));
    let ips: Vec<String> = status["podIPs"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|i| i["ip"].as_str().map(str::to_owned))
        .collect();
    if ips.is_empty() {
        d.kv(0, "IPs", "<none>");
    } else {
        d.line(0, &["IPs:"]);
        for ip in &ips {
            d.kv(1, "IP", ip);
        }
    }
}

/// kubectl's time left until a deletion timestamp (`25s`, `<unknown>`).
fn lasts(deletion: &Value) -> String {
    match crate::format::timestamp(deletion) {
        Some(t) => crate::format::human_duration(t.duration_since(crate::format::now()).as_secs()),
        None => "<unknown>".to_owned(),
    }
}

fn toleration(t: &Value) -> String {
    let mut s = or(&t["key"], "").to_owned();
    if t["operator"] == "Equal" || t["value"].is_string() {
        s = format!("{s}={}", or(&t["value"], ""));
    }
    if let Some(e) = t["effect"].as_str() {
        s = format!("{s}:{e}");
    }
    if t["operator"] == "Exists" && !t["value"].is_string() {
        s = if s.is_empty() {
            "op=Exists".to_owned()
        } else {
            format!("{s} op=Exists")
        };
    }
    if let Some(secs) = t["tolerationSeconds"].as_i64() {
        s = format!("{s} for {secs}s");
    }
    s
}

/// Kubernetes' QoS class from the containers' requests and limits.
pub fn qos_class(spec: &Value) -> &'static str {
    let containers: Vec<&Value> = spec["containers"]
        .as_array()
        .into_iter()
        .flatten()
        .chain(spec["initContainers"].as_array().into_iter().flatten())
        .collect();
    let mut any = false;
    let mut guaranteed = true;
    for c in &containers {
        let (req, lim) = (&c["resources"]["requests"], &c["resources"]["limits"]);
        for res in ["cpu", "memory"] {
            let (r, l) = (req[res].as_str(), lim[res].as_str());
            any |= r.is_some() || l.is_some();
            let same = match (r, l) {
                (Some(r), Some(l)) => r == l,
                (None, Some(_)) => true,
                _ => false,
            };
            guaranteed &= same;
        }
    }
    if !any {
        "BestEffort"
    } else if guaranteed {
        "Guaranteed"
    } else {
        "Burstable"
    }
}

fn containers(d: &mut Doc, specs: &[Value], statuses: &Value) {
    for c in specs {
        let name = or(&c["name"], "");
        let st = statuses
            .as_array()
            .and_then(|a| a.iter().find(|s| s["name"] == name));
        d.line(1, &[&format!("{name}:")]);
        if let Some(st) = st {
            d.kv(2, "Container ID", or(&st["containerID"], ""));
        }
        d.kv(2, "Image", or(&c["image"], ""));
        if let Some(st) = st {
            d.kv(2, "Image ID", or(&st["imageID"], ""));
        }
        container_spec(d, c);
        if let Some(st) = st {
            state(d, "State", &st["state"]);
            if st["lastState"].as_object().is_some_and(|o| !o.is_empty()) {
                state(d, "Last State", &st["lastState"]);
            }
            d.kv(
                2,
                "Ready",
                if st["ready"] == true { "True" } else { "False" },
            );
            d.kv(2, "Restart Count", &int(&st["restartCount"]).to_string());
        }
        resources(d, 2, c);
        env(d, 2, c);
    }
}

/// Ports, command and args of a container (spec side).
fn container_spec(d: &mut Doc, c: &Value) {
    let ports: Vec<String> = c["ports"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| format!("{}/{}", int(&p["containerPort"]), or(&p["protocol"], "TCP")))
        .collect();
    let host_ports: Vec<String> = c["ports"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| format!("{}/{}", int(&p["hostPort"]), or(&p["protocol"], "TCP")))
        .collect();
    if ports.is_empty() {
        d.kv(2, "Port", "<none>");
        d.kv(2, "Host Port", "<none>");
    } else {
        d.kv(
            2,
            if ports.len() > 1 { "Ports" } else { "Port" },
            &ports.join(", "),
        );
        d.kv(
            2,
            if ports.len() > 1 {
                "Host Ports"
            } else {
                "Host Port"
            },
            &host_ports.join(", "),
        );
    }
    for key in ["command", "args"] {
        if let Some(parts) = c[key].as_array().filter(|a| !a.is_empty()) {
            let title = if key == "command" {
                "Command:"
            } else {
                "Args:"
            };
            d.line(2, &[title]);
            for p in parts {
                d.line(3, &[or(p, "")]);
            }
        }
    }
}

fn state(d: &mut Doc, title: &str, s: &Value) {
    if let Some(r) = s.get("running").filter(|r| r.is_object()) {
        d.kv(2, title, "Running");
        d.kv(3, "Started", &describe_time(&r["startedAt"]));
    } else if let Some(w) = s.get("waiting").filter(|w| w.is_object()) {
        d.kv(2, title, "Waiting");
        if let Some(r) = w["reason"].as_str() {
            d.kv(3, "Reason", r);
        }
        if let Some(m) = w["message"].as_str() {
            d.kv(3, "Message", m);
        }
    } else if let Some(t) = s.get("terminated").filter(|t| t.is_object()) {
        d.kv(2, title, "Terminated");
        if let Some(r) = t["reason"].as_str() {
            d.kv(3, "Reason", r);
        }
        if let Some(m) = t["message"].as_str() {
            d.kv(3, "Message", m);
        }
        d.kv(3, "Exit Code", &int(&t["exitCode"]).to_string());
        if int(&t["signal"]) != 0 {
            d.kv(3, "Signal", &int(&t["signal"]).to_string());
        }
        d.kv(3, "Started", &describe_time(&t["startedAt"]));
        d.kv(3, "Finished", &describe_time(&t["finishedAt"]));
    } else {
        d.kv(2, title, "Waiting");
    }
}

fn resources(d: &mut Doc, level: usize, c: &Value) {
    for (title, key) in [("Limits:", "limits"), ("Requests:", "requests")] {
        let map = &c["resources"][key];
        if map.as_object().is_some_and(|m| !m.is_empty()) {
            d.line(level, &[title]);
            for p in label_pairs(map) {
                let (k, v) = p.split_once('=').unwrap_or((&p, ""));
                d.kv(level + 1, k, v);
            }
        }
    }
}

fn env(d: &mut Doc, level: usize, c: &Value) {
    let vars: Vec<&Value> = c["env"].as_array().into_iter().flatten().collect();
    if vars.is_empty() {
        d.kv(level, "Environment", "<none>");
        return;
    }
    d.line(level, &["Environment:"]);
    for e in vars {
        let value = match e["value"].as_str() {
            Some(v) => v.to_owned(),
            None if e["valueFrom"].is_object() => "<set from valueFrom>".to_owned(),
            None => String::new(),
        };
        d.kv(level + 1, or(&e["name"], ""), &value);
    }
    let mounts: Vec<String> = c["volumeMounts"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|m| format!("{} from {}", or(&m["mountPath"], ""), or(&m["name"], "")))
        .collect();
    d.list(level, "Mounts", &mounts);
}

fn pod_template(d: &mut Doc, t: &Value) {
    d.line(0, &["Pod Template:"]);
    d.map(1, "Labels", &t["metadata"]["labels"], "=");
    if t["metadata"]["annotations"].is_object() {
        d.map(1, "Annotations", &t["metadata"]["annotations"], ": ");
    }
    d.line(1, &["Containers:"]);
    for c in t["spec"]["containers"].as_array().into_iter().flatten() {
        d.line(1, &[&format!(" {}:", or(&c["name"], ""))]);
        d.kv(2, "Image", or(&c["image"], ""));
        container_spec(d, c);
        resources(d, 2, c);
        env(d, 2, c);
    }
    d.map(1, "Node-Selectors", &t["spec"]["nodeSelector"], "=");
    let tolerations: Vec<String> = t["spec"]["tolerations"]
        .as_array()
        .into_iter()
        .flatten()
        .map(toleration)
        .collect();
    d.list(1, "Tolerations", &tolerations);
}

fn conditions_table(d: &mut Doc, status: &Value) {
    match status["conditions"].as_array().filter(|c| !c.is_empty()) {
        Some(conds) => {
            d.line(0, &["Conditions:"]);
            d.line(1, &["Type", "Status", "Reason"]);
            d.line(1, &["----", "------", "------"]);
            for c in conds {
                d.line(
                    1,
                    &[
                        or(&c["type"], ""),
                        or(&c["status"], ""),
                        or(&c["reason"], ""),
                    ],
                );
            }
        }
        None => d.kv(0, "Conditions", "<none>"),
    }
}

/// `name (ready/desired replicas created)` for the RS lines of a deployment.
fn rs_summary(rs: &Value) -> String {
    format!(
        "{} ({}/{} replicas created)",
        name_of(rs),
        int(&rs["status"]["replicas"]),
        rs["spec"]["replicas"].as_i64().unwrap_or(1)
    )
}

fn deployment(d: &mut Doc, v: &Value, rss: &[Value]) {
    let (m, spec, status) = (&v["metadata"], &v["spec"], &v["status"]);
    header(d, v, true);
    d.kv(
        0,
        "CreationTimestamp",
        &describe_time(&m["creationTimestamp"]),
    );
    labels_annotations(d, 0, m);
    d.kv(0, "Selector", &selector_text(&spec["selector"]));
    d.kv(
        0,
        "Replicas",
        &format!(
            "{} desired | {} updated | {} total | {} available | {} unavailable",
            spec["replicas"].as_i64().unwrap_or(1),
            int(&status["updatedReplicas"]),
            int(&status["replicas"]),
            int(&status["availableReplicas"]),
            int(&status["unavailableReplicas"]),
        ),
    );
    let strategy = or(&spec["strategy"]["type"], "RollingUpdate");
    d.kv(0, "StrategyType", strategy);
    d.kv(
        0,
        "MinReadySeconds",
        &int(&spec["minReadySeconds"]).to_string(),
    );
    if strategy == "RollingUpdate" {
        let ru = &spec["strategy"]["rollingUpdate"];
        let text = |v: &Value| match v {
            Value::String(s) => s.clone(),
            Value::Number(n) => n.to_string(),
            _ => "25%".to_owned(),
        };
        d.kv(
            0,
            "RollingUpdateStrategy",
            &format!(
                "{} max unavailable, {} max surge",
                text(&ru["maxUnavailable"]),
                text(&ru["maxSurge"])
            ),
        );
    }
    pod_template(d, &spec["template"]);
    conditions_table(d, status);
    let current = revision_of(v);
    let (new, old): (Vec<&Value>, Vec<&Value>) = rss
        .iter()
        .partition(|rs| current.is_some() && revision_of(rs) == current);
    let old: Vec<String> = old
        .iter()
        .filter(|rs| int(&rs["spec"]["replicas"]) > 0 || int(&rs["status"]["replicas"]) > 0)
        .map(|rs| rs_summary(rs))
        .collect();
    d.kv(
        0,
        "OldReplicaSets",
        &if old.is_empty() {
            "<none>".to_owned()
        } else {
            old.join(", ")
        },
    );
    d.kv(
        0,
        "NewReplicaSet",
        &new.first()
            .map_or_else(|| "<none>".to_owned(), |rs| rs_summary(rs)),
    );
}

/// `N Running / N Waiting / N Succeeded / N Failed` of some pods.
fn pods_status(pods: &[Value]) -> String {
    let count = |phase: &str| {
        pods.iter()
            .filter(|p| p["status"]["phase"] == phase)
            .count()
    };
    let waiting = pods
        .iter()
        .filter(|p| matches!(p["status"]["phase"].as_str(), None | Some("Pending")))
        .count();
    format!(
        "{} Running / {waiting} Waiting / {} Succeeded / {} Failed",
        count("Running"),
        count("Succeeded"),
        count("Failed")
    )
}

fn replicaset(d: &mut Doc, v: &Value, pods: &[Value]) {
    let (m, spec, status) = (&v["metadata"], &v["spec"], &v["status"]);
    header(d, v, true);
    d.kv(0, "Selector", &selector_text(&spec["selector"]));
    labels_annotations(d, 0, m);
    controlled_by(d, v);
    d.kv(
        0,
        "Replicas",
        &format!(
            "{} current / {} desired",
            int(&status["replicas"]),
            spec["replicas"].as_i64().unwrap_or(1)
        ),
    );
    d.kv(0, "Pods Status", &pods_status(pods));
    pod_template(d, &spec["template"]);
}

fn daemonset(d: &mut Doc, v: &Value, pods: &[Value]) {
    let (m, spec, status) = (&v["metadata"], &v["spec"], &v["status"]);
    header(d, v, true);
    d.kv(0, "Selector", &selector_text(&spec["selector"]));
    d.map(
        0,
        "Node-Selector",
        &spec["template"]["spec"]["nodeSelector"],
        "=",
    );
    labels_annotations(d, 0, m);
    for (title, key) in [
        (
            "Desired Number of Nodes Scheduled",
            "desiredNumberScheduled",
        ),
        (
            "Current Number of Nodes Scheduled",
            "currentNumberScheduled",
        ),
        (
            "Number of Nodes Scheduled with Up-to-date Pods",
            "updatedNumberScheduled",
        ),
        (
            "Number of Nodes Scheduled with Available Pods",
            "numberAvailable",
        ),
        ("Number of Nodes Misscheduled", "numberMisscheduled"),
    ] {
        d.kv(0, title, &int(&status[key]).to_string());
    }
    d.kv(0, "Pods Status", &pods_status(pods));
    pod_template(d, &spec["template"]);
}

fn node(d: &mut Doc, v: &Value, all_pods: &[Value]) {
    let (m, spec, status) = (&v["metadata"], &v["spec"], &v["status"]);
    let now = crate::format::now();
    d.field(0, "Name", &m["name"]);
    d.kv(0, "Roles", &node_roles(v));
    labels_annotations(d, 0, m);
    d.kv(
        0,
        "CreationTimestamp",
        &describe_time(&m["creationTimestamp"]),
    );
    let taints: Vec<String> = spec["taints"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|t| {
            let kv = match t["value"].as_str().filter(|v| !v.is_empty()) {
                Some(val) => format!("{}={val}", or(&t["key"], "")),
                None => or(&t["key"], "").to_owned(),
            };
            format!("{kv}:{}", or(&t["effect"], ""))
        })
        .collect();
    d.list(0, "Taints", &taints);
    d.kv(
        0,
        "Unschedulable",
        if spec["unschedulable"] == true {
            "true"
        } else {
            "false"
        },
    );
    node_conditions(d, status);
    d.line(0, &["Addresses:"]);
    for a in status["addresses"].as_array().into_iter().flatten() {
        d.kv(1, or(&a["type"], ""), or(&a["address"], ""));
    }
    for (title, key) in [("Capacity:", "capacity"), ("Allocatable:", "allocatable")] {
        if status[key].is_object() {
            d.line(0, &[title]);
            for p in label_pairs(&status[key]) {
                let (k, val) = p.split_once('=').unwrap_or((&p, ""));
                d.kv(1, k, val);
            }
        }
    }
    let info = &status["nodeInfo"];
    if info.is_object() {
        d.line(0, &["System Info:"]);
        for (title, key) in [
            ("Machine ID", "machineID"),
            ("Kernel Version", "kernelVersion"),
            ("OS Image", "osImage"),
            ("Operating System", "operatingSystem"),
            ("Architecture", "architecture"),
            ("Container Runtime Version", "containerRuntimeVersion"),
            ("Kubelet Version", "kubeletVersion"),
        ] {
            if let Some(val) = info[key].as_str() {
                d.kv(1, title, val);
            }
        }
    }
    if let Some(cidr) = spec["podCIDR"].as_str() {
        d.kv(0, "PodCIDR", cidr);
    }
    if let Some(cidrs) = spec["podCIDRs"].as_array() {
        let list: Vec<&str> = cidrs.iter().filter_map(Value::as_str).collect();
        d.kv(0, "PodCIDRs", &list.join(","));
    }
    let name = name_of(v);
    let pods: Vec<&Value> = all_pods
        .iter()
        .filter(|p| p["spec"]["nodeName"] == name)
        .filter(|p| !matches!(p["status"]["phase"].as_str(), Some("Succeeded" | "Failed")))
        .collect();
    node_pods(d, status, &pods, now);
}

/// The Conditions table of a node.
fn node_conditions(d: &mut Doc, status: &Value) {
    match status["conditions"].as_array().filter(|c| !c.is_empty()) {
        Some(conds) => {
            d.line(0, &["Conditions:"]);
            let head = [
                "Type",
                "Status",
                "LastHeartbeatTime",
                "LastTransitionTime",
                "Reason",
                "Message",
            ];
            d.line(1, &head);
            let dashes: Vec<String> = head.iter().map(|h| "-".repeat(h.len())).collect();
            d.line(1, &dashes.iter().map(String::as_str).collect::<Vec<_>>());
            for c in conds {
                d.line(
                    1,
                    &[
                        or(&c["type"], ""),
                        or(&c["status"], ""),
                        &describe_time(&c["lastHeartbeatTime"]),
                        &describe_time(&c["lastTransitionTime"]),
                        or(&c["reason"], ""),
                        or(&c["message"], ""),
                    ],
                );
            }
        }
        None => d.kv(0, "Conditions", "<none>"),
    }
}

/// Sum of a container resource over a pod's containers (`requests`/`limits`).
fn pod_resource(p: &Value, key: &str, res: &str) -> u64 {
    p["spec"]["containers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| c["resources"][key][res].as_str())
        .map(|q| parse_quantity(res, q))
        .sum()
}

fn parse_quantity(res: &str, q: &str) -> u64 {
    if res == "cpu" {
        parse_cpu_millis(q).unwrap_or(0)
    } else {
        parse_memory_bytes(q).unwrap_or(0)
    }
}

/// `100m (5%)` / `128Mi (1%)` of an allocatable amount.
pub fn amount(res: &str, value: u64, allocatable: u64) -> String {
    let pct = value
        .saturating_mul(100)
        .checked_div(allocatable)
        .unwrap_or(0);
    let text = if value == 0 {
        "0".to_owned()
    } else if res == "cpu" {
        if value.is_multiple_of(1000) {
            (value / 1000).to_string()
        } else {
            format!("{value}m")
        }
    } else {
        memory_text(value)
    };
    format!("{text} ({pct}%)")
}

/// Bytes in the largest binary unit that divides them.
pub fn memory_text(bytes: u64) -> String {
    for (unit, size) in [
        ("Ti", 1u64 << 40),
        ("Gi", 1 << 30),
        ("Mi", 1 << 20),
        ("Ki", 1 << 10),
    ] {
        if bytes >= size && bytes.is_multiple_of(size) {
            return format!("{}{unit}", bytes / size);
        }
    }
    bytes.to_string()
}

fn node_pods(d: &mut Doc, status: &Value, pods: &[&Value], now: Timestamp) {
    let alloc = |res: &str| {
        status["allocatable"][res]
            .as_str()
            .map_or(0, |q| parse_quantity(res, q))
    };
    let (cpu, mem) = (alloc("cpu"), alloc("memory"));
    d.kv(
        0,
        "Non-terminated Pods",
        &format!("({} in total)", pods.len()),
    );
    let head = [
        "Namespace",
        "Name",
        "CPU Requests",
        "CPU Limits",
        "Memory Requests",
        "Memory Limits",
        "Age",
    ];
    d.line(1, &head);
    let dashes: Vec<String> = head.iter().map(|h| "-".repeat(h.len())).collect();
    d.line(1, &dashes.iter().map(String::as_str).collect::<Vec<_>>());
    let mut totals = [0u64; 4];
    for p in pods {
        let vals = [
            pod_resource(p, "requests", "cpu"),
            pod_resource(p, "limits", "cpu"),
            pod_resource(p, "requests", "memory"),
            pod_resource(p, "limits", "memory"),
        ];
        for (t, v) in totals.iter_mut().zip(vals) {
            *t += v;
        }
        d.line(
            1,
            &[
                ns_of(p),
                name_of(p),
                &amount("cpu", vals[0], cpu),
                &amount("cpu", vals[1], cpu),
                &amount("memory", vals[2], mem),
                &amount("memory", vals[3], mem),
                &age(&p["metadata"]["creationTimestamp"], now),
            ],
        );
    }
    d.line(0, &["Allocated resources:"]);
    d.line(
        1,
        &["(Total limits may be over 100 percent, i.e., overcommitted.)"],
    );
    d.line(1, &["Resource", "Requests", "Limits"]);
    d.line(1, &["--------", "--------", "------"]);
    d.line(
        1,
        &[
            "cpu",
            &amount("cpu", totals[0], cpu),
            &amount("cpu", totals[1], cpu),
        ],
    );
    d.line(
        1,
        &[
            "memory",
            &amount("memory", totals[2], mem),
            &amount("memory", totals[3], mem),
        ],
    );
}

fn namespace(d: &mut Doc, v: &Value) {
    header(d, v, false);
    labels_annotations(d, 0, &v["metadata"]);
    d.kv(0, "Status", or(&v["status"]["phase"], "Active"));
}

fn event(d: &mut Doc, v: &Value) {
    header(d, v, true);
    let o = &v["involvedObject"];
    d.line(0, &["Involved Object:"]);
    d.field(1, "Kind", &o["kind"]);
    d.field(1, "Name", &o["name"]);
    d.field(1, "Namespace", &o["namespace"]);
    d.field(1, "UID", &o["uid"]);
    d.field(0, "Type", &v["type"]);
    d.field(0, "Reason", &v["reason"]);
    d.field(0, "Message", &v["message"]);
    d.kv(0, "Source", &event_source(v));
    d.kv(0, "First Timestamp", &describe_time(&v["firstTimestamp"]));
    d.kv(0, "Last Timestamp", &describe_time(&v["lastTimestamp"]));
    d.kv(0, "Count", &int(&v["count"]).max(1).to_string());
}

/// The Events table (or `Events: <none>`).
pub fn events_section(d: &mut Doc, events: &[Value], now: Timestamp) {
    if events.is_empty() {
        d.kv(0, "Events", "<none>");
        return;
    }
    d.line(0, &["Events:"]);
    d.line(1, &["Type", "Reason", "Age", "From", "Message"]);
    d.line(1, &["----", "------", "----", "----", "-------"]);
    for e in events {
        d.line(
            1,
            &[
                or(&e["type"], ""),
                or(&e["reason"], ""),
                &event_last_seen(e, now),
                &event_source(e),
                e["message"].as_str().unwrap_or_default().trim(),
            ],
        );
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn pod_describe_has_kubectl_sections() {
        let p = json!({"metadata": {"name": "web-x", "namespace": "default", "labels": {"app": "web"},
                "ownerReferences": [{"kind": "ReplicaSet", "name": "web-abc", "uid": "u", "controller": true}]},
            "spec": {"nodeName": "n1", "containers": [{"name": "c", "image": "busybox",
                "resources": {"limits": {"cpu": "100m"}, "requests": {"cpu": "100m"}}}]},
            "status": {"phase": "Running", "podIP": "10.244.1.5", "hostIP": "10.0.0.1",
                "conditions": [{"type": "Ready", "status": "True"}],
                "containerStatuses": [{"name": "c", "ready": true, "restartCount": 3,
                    "state": {"waiting": {"reason": "CrashLoopBackOff"}},
                    "lastState": {"terminated": {"exitCode": 1, "reason": "Error"}}}]}});
        let mut d = Doc::default();
        pod(&mut d, &p);
        let ev = json!({"type": "Normal", "reason": "Scheduled", "message": "Successfully assigned default/web-x to n1",
            "source": {"component": "default-scheduler"}, "lastTimestamp": "2024-01-01T00:00:00Z"});
        events_section(&mut d, &[ev], "2024-01-01T00:00:10Z".parse().expect("ts"));
        let text = d.render();
        for want in [
            "Name:             web-x\n",
            "Node:             n1/10.0.0.1\n",
            "Controlled By:    ReplicaSet/web-abc\n",
            "    State:          Waiting\n      Reason:       CrashLoopBackOff\n",
            "    Last State:     Terminated\n",
            "    Restart Count:  3\n",
            "    Limits:\n      cpu:  100m\n",
            "QoS Class:       Burstable\n",
            "  Type    Reason     Age   From               Message\n",
            "  Normal  Scheduled  10s   default-scheduler  Successfully assigned default/web-x to n1\n",
        ] {
            assert!(text.contains(want), "missing {want:?} in\n{text}");
        }
    }

    #[test]
    fn qos_and_amounts() {
        let g = json!({"containers": [{"resources": {"limits": {"cpu": "1", "memory": "1Gi"}}}]});
        assert_eq!(qos_class(&g), "Guaranteed");
        assert_eq!(qos_class(&json!({"containers": [{}]})), "BestEffort");
        assert_eq!(amount("cpu", 500, 2000), "500m (25%)");
        assert_eq!(amount("cpu", 2000, 2000), "2 (100%)");
        assert_eq!(amount("memory", 128 << 20, 0), "128Mi (0%)");
    }
}
