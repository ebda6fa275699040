//! kubectl's table columns for each kind (`get`), including the computed
//! ones: a pod's READY/STATUS/RESTARTS and a node's STATUS/ROLES.

use k8s_openapi::jiff::Timestamp;
use serde_json::Value;

use crate::format::{Table, age, human_duration, int, labels_inline, or, selector_text, timestamp};
use crate::resource::Resource;

/// What a printer needs besides the objects.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// `-o wide`.
    pub wide: bool,
    /// `-A`: a NAMESPACE column first.
    pub with_namespace: bool,
    /// `get all`: names as `kind/name`.
    pub with_kind: bool,
    /// The time ages are computed at.
    pub now: Timestamp,
}

/// The column headers for a kind.
pub fn header(r: Resource, o: &Options) -> Vec<&'static str> {
    let mut h = Vec::new();
    if o.with_namespace {
        h.push("NAMESPACE");
    }
    let (base, wide): (&[&'static str], &[&'static str]) = match r {
        Resource::Pod => (
            &["NAME", "READY", "STATUS", "RESTARTS", "AGE"],
            &["IP", "NODE", "NOMINATED NODE", "READINESS GATES"],
        ),
        Resource::Deployment => (
            &["NAME", "READY", "UP-TO-DATE", "AVAILABLE", "AGE"],
            &["CONTAINERS", "IMAGES", "SELECTOR"],
        ),
        Resource::ReplicaSet => (
            &["NAME", "DESIRED", "CURRENT", "READY", "AGE"],
            &["CONTAINERS", "IMAGES", "SELECTOR"],
        ),
        Resource::DaemonSet => (
            &[
                "NAME",
                "DESIRED",
                "CURRENT",
                "READY",
                "UP-TO-DATE",
                "AVAILABLE",
                "NODE SELECTOR",
                "AGE",
            ],
            &["CONTAINERS", "IMAGES", "SELECTOR"],
        ),
        Resource::Node => (
            &["NAME", "STATUS", "ROLES", "AGE", "VERSION"],
            &[
                "INTERNAL-IP",
                "EXTERNAL-IP",
                "OS-IMAGE",
                "KERNEL-VERSION",
                "CONTAINER-RUNTIME",
            ],
        ),
        Resource::Namespace => (&["NAME", "STATUS", "AGE"], &[]),
        Resource::Event => (
            &["LAST SEEN", "TYPE", "REASON", "OBJECT", "MESSAGE"],
            &["SUBOBJECT", "SOURCE", "FIRST SEEN", "COUNT", "NAME"],
        ),
        Resource::Service => (
            &[
                "NAME",
                "TYPE",
                "CLUSTER-IP",
                "EXTERNAL-IP",
                "PORT(S)",
                "AGE",
            ],
            &["SELECTOR"],
        ),
        Resource::EndpointSlice => (&["NAME", "ADDRESSTYPE", "PORTS", "ENDPOINTS", "AGE"], &[]),
        Resource::NetworkPolicy => (&["NAME", "POD-SELECTOR", "AGE"], &[]),
        Resource::HorizontalPodAutoscaler => (
            &[
                "NAME",
                "REFERENCE",
                "TARGETS",
                "MINPODS",
                "MAXPODS",
                "REPLICAS",
                "AGE",
            ],
            &[],
        ),
    };
    h.extend_from_slice(base);
    if o.wide {
        h.extend_from_slice(wide);
    }
    h
}

/// The table for objects of one kind.
pub fn table(r: Resource, items: &[Value], o: &Options) -> Table {
    let mut t = Table::new(&header(r, o));
    for v in items {
        t.rows.push(row(r, v, o));
    }
    t
}

/// One object's row.
pub fn row(r: Resource, v: &Value, o: &Options) -> Vec<String> {
    let mut cells = Vec::new();
    if o.with_namespace {
        cells.push(or(&v["metadata"]["namespace"], "").to_owned());
    }
    let name = or(&v["metadata"]["name"], "").to_owned();
    let name = if o.with_kind {
        format!("{}/{name}", r.qualified())
    } else {
        name
    };
    let created = age(&v["metadata"]["creationTimestamp"], o.now);
    match r {
        Resource::Pod => pod_row(v, name, created, o, &mut cells),
        Resource::Deployment => {
            let s = &v["status"];
            cells.extend([
                name,
                format!("{}/{}", int(&s["readyReplicas"]), replicas(v)),
                int(&s["updatedReplicas"]).to_string(),
                int(&s["availableReplicas"]).to_string(),
                created,
            ]);
            if o.wide {
                cells.extend(template_columns(v));
            }
        }
        Resource::ReplicaSet => {
            let s = &v["status"];
            cells.extend([
                name,
                replicas(v).to_string(),
                int(&s["replicas"]).to_string(),
                int(&s["readyReplicas"]).to_string(),
                created,
            ]);
            if o.wide {
                cells.extend(template_columns(v));
            }
        }
        Resource::DaemonSet => {
            let s = &v["status"];
            cells.extend([
                name,
                int(&s["desiredNumberScheduled"]).to_string(),
                int(&s["currentNumberScheduled"]).to_string(),
                int(&s["numberReady"]).to_string(),
                int(&s["updatedNumberScheduled"]).to_string(),
                int(&s["numberAvailable"]).to_string(),
                labels_inline(&v["spec"]["template"]["spec"]["nodeSelector"]),
                created,
            ]);
            if o.wide {
                cells.extend(template_columns(v));
            }
        }
        Resource::Node => {
            cells.extend([
                name,
                node_status(v),
                node_roles(v),
                created,
                or(&v["status"]["nodeInfo"]["kubeletVersion"], "").to_owned(),
            ]);
            if o.wide {
                let info = &v["status"]["nodeInfo"];
                cells.extend([
                    node_address(v, "InternalIP").unwrap_or("<none>").to_owned(),
                    node_address(v, "ExternalIP").unwrap_or("<none>").to_owned(),
                    or(&info["osImage"], "<unknown>").to_owned(),
                    or(&info["kernelVersion"], "<unknown>").to_owned(),
                    or(&info["containerRuntimeVersion"], "<unknown>").to_owned(),
                ]);
            }
        }
        Resource::Namespace => {
            cells.extend([
                name,
                or(&v["status"]["phase"], "Active").to_owned(),
                created,
            ]);
        }
        Resource::Event => event_row(v, name, o, &mut cells),
        Resource::Service => {
            cells.push(name);
            cells.extend(crate::services::service_cells(v, created, o.wide));
        }
        Resource::EndpointSlice => {
            cells.push(name);
            cells.extend(crate::services::endpoint_slice_cells(v, created));
        }
        Resource::NetworkPolicy => {
            cells.extend([name, selector_text(&v["spec"]["podSelector"]), created]);
        }
        Resource::HorizontalPodAutoscaler => {
            cells.push(name);
            cells.extend(crate::hpa::hpa_cells(v, created));
        }
    }
    cells
}

fn replicas(v: &Value) -> i64 {
    v["spec"]["replicas"].as_i64().unwrap_or(1)
}

/// CONTAINERS, IMAGES, SELECTOR of a workload's pod template.
fn template_columns(v: &Value) -> [String; 3] {
    let containers = v["spec"]["template"]["spec"]["containers"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let names: Vec<&str> = containers
        .iter()
        .map(|c| c["name"].as_str().unwrap_or_default())
        .collect();
    let images: Vec<&str> = containers
        .iter()
        .map(|c| c["image"].as_str().unwrap_or_default())
        .collect();
    [
        names.join(","),
        images.join(","),
        selector_text(&v["spec"]["selector"]),
    ]
}

fn pod_row(v: &Value, name: String, created: String, o: &Options, cells: &mut Vec<String>) {
    let s = pod_summary(v, o.now);
    cells.extend([
        name,
        format!("{}/{}", s.ready, s.total),
        s.status,
        s.restarts,
        created,
    ]);
    if o.wide {
        cells.extend([
            or(&v["status"]["podIP"], "<none>").to_owned(),
            or(&v["spec"]["nodeName"], "<none>").to_owned(),
            or(&v["status"]["nominatedNodeName"], "<none>").to_owned(),
            "<none>".to_owned(),
        ]);
    }
}

/// A pod's READY, STATUS and RESTARTS as kubectl computes them.
#[derive(Debug, PartialEq, Eq)]
pub struct PodSummary {
    /// Containers ready and running.
    pub ready: usize,
    /// Containers in the spec.
    pub total: usize,
    /// The STATUS column.
    pub status: String,
    /// The RESTARTS column (`2 (5m ago)`).
    pub restarts: String,
}

/// kubectl's printPod: phase, overridden by the pod's reason, then by init
/// containers' and containers' waiting/terminated reasons (last container
/// first), `Completed` turned back to `Running`/`NotReady` while one still
/// runs, and `Terminating` once deletion started.
pub fn pod_summary(v: &Value, now: Timestamp) -> PodSummary {
    let status = &v["status"];
    let spec = &v["spec"];
    let mut reason = or(&status["phase"], "Pending").to_owned();
    if let Some(r) = status["reason"].as_str().filter(|r| !r.is_empty()) {
        r.clone_into(&mut reason);
    }
    let total = spec["containers"].as_array().map_or(0, Vec::len);
    let mut restarts = Restarts::default();
    let init = init_reason(spec, status, &mut restarts);
    let initializing = init.is_some();
    if let Some(r) = init {
        reason = r;
    }
    let mut ready = 0;
    if !initializing || has_condition(status, "Initialized") {
        restarts = Restarts::default();
        let mut has_running = false;
        let statuses = status["containerStatuses"]
            .as_array()
            .map_or(&[][..], Vec::as_slice);
        for c in statuses.iter().rev() {
            restarts.note(c);
            let term = &c["state"]["terminated"];
            let waiting = c["state"]["waiting"]["reason"].as_str().unwrap_or_default();
            if !waiting.is_empty() {
                waiting.clone_into(&mut reason);
            } else if let Some(r) = term["reason"].as_str().filter(|r| !r.is_empty()) {
                r.clone_into(&mut reason);
            } else if term.is_object() {
                reason = if int(&term["signal"]) == 0 {
                    format!("ExitCode:{}", int(&term["exitCode"]))
                } else {
                    format!("Signal:{}", int(&term["signal"]))
                };
            } else if c["ready"] == true && c["state"]["running"].is_object() {
                has_running = true;
                ready += 1;
            }
        }
        if reason == "Completed" && has_running {
            let now_reason = if has_condition(status, "Ready") {
                "Running"
            } else {
                "NotReady"
            };
            now_reason.clone_into(&mut reason);
        }
    }
    if reason == "Pending"
        && condition(status, "PodScheduled").is_some_and(|c| c["reason"] == "SchedulingGated")
    {
        "SchedulingGated".clone_into(&mut reason);
    }
    let deleting = v["metadata"]["deletionTimestamp"].is_string();
    let terminal = matches!(status["phase"].as_str(), Some("Succeeded" | "Failed"));
    if deleting && status["reason"] == "NodeLost" {
        "Unknown".clone_into(&mut reason);
    } else if deleting && !terminal {
        "Terminating".clone_into(&mut reason);
    }
    PodSummary {
        ready,
        total,
        status: reason,
        restarts: restarts.column(now),
    }
}

/// Restart counts and the time of the latest restart.
#[derive(Debug, Default)]
struct Restarts {
    count: i64,
    last: Option<Timestamp>,
}

impl Restarts {
    fn note(&mut self, c: &Value) {
        self.count += int(&c["restartCount"]);
        if let Some(t) = timestamp(&c["lastState"]["terminated"]["finishedAt"])
            && self.last.is_none_or(|l| t > l)
        {
            self.last = Some(t);
        }
    }

    /// `2 (5m ago)`, or just the count.
    fn column(&self, now: Timestamp) -> String {
        match self.last {
            Some(t) if self.count > 0 => format!(
                "{} ({} ago)",
                self.count,
                human_duration(now.duration_since(t).as_secs())
            ),
            _ => self.count.to_string(),
        }
    }
}

/// The STATUS while init containers run (`Init:1/2`, `Init:Error`…), or
/// `None` once they all succeeded.
fn init_reason(spec: &Value, status: &Value, restarts: &mut Restarts) -> Option<String> {
    let init_total = spec["initContainers"].as_array().map_or(0, Vec::len);
    let statuses = status["initContainerStatuses"]
        .as_array()
        .map_or(&[][..], Vec::as_slice);
    for (i, c) in statuses.iter().enumerate() {
        restarts.note(c);
        let term = &c["state"]["terminated"];
        let waiting = c["state"]["waiting"]["reason"].as_str().unwrap_or_default();
        if term.is_object() && int(&term["exitCode"]) == 0 {
            continue;
        }
        return Some(if term.is_object() {
            match term["reason"].as_str().filter(|r| !r.is_empty()) {
                Some(r) => format!("Init:{r}"),
                None if int(&term["signal"]) != 0 => {
                    format!("Init:Signal:{}", int(&term["signal"]))
                }
                None => format!("Init:ExitCode:{}", int(&term["exitCode"])),
            }
        } else if !waiting.is_empty() && waiting != "PodInitializing" {
            format!("Init:{waiting}")
        } else {
            format!("Init:{i}/{init_total}")
        });
    }
    None
}

/// Whether `status.conditions` has `type` with status True.
pub fn has_condition(status: &Value, kind: &str) -> bool {
    condition(status, kind).is_some_and(|c| c["status"] == "True")
}

/// The condition of a type in `status.conditions`.
pub fn condition<'a>(status: &'a Value, kind: &str) -> Option<&'a Value> {
    status["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == kind)
}

/// A node's STATUS: `Ready`/`NotReady` from its Ready condition (`Unknown`
/// without one), plus `,SchedulingDisabled` when cordoned.
pub fn node_status(v: &Value) -> String {
    let mut parts = vec![match condition(&v["status"], "Ready") {
        Some(c) if c["status"] == "True" => "Ready",
        Some(_) => "NotReady",
        None => "Unknown",
    }];
    if v["spec"]["unschedulable"] == true {
        parts.push("SchedulingDisabled");
    }
    parts.join(",")
}

/// A node's ROLES from `node-role.kubernetes.io/<role>` and
/// `kubernetes.io/role` labels; `<none>`.
pub fn node_roles(v: &Value) -> String {
    let mut roles: Vec<String> = Vec::new();
    if let Some(labels) = v["metadata"]["labels"].as_object() {
        for (k, val) in labels {
            if let Some(role) = k.strip_prefix("node-role.kubernetes.io/") {
                if !role.is_empty() {
                    roles.push(role.to_owned());
                }
            } else if k == "kubernetes.io/role"
                && let Some(r) = val.as_str().filter(|r| !r.is_empty())
            {
                roles.push(r.to_owned());
            }
        }
    }
    roles.sort();
    roles.dedup();
    if roles.is_empty() {
        "<none>".to_owned()
    } else {
        roles.join(",")
    }
}

/// A node's address of a type (`InternalIP`, `Hostname`…).
pub fn node_address<'a>(v: &'a Value, kind: &str) -> Option<&'a str> {
    v["status"]["addresses"]
        .as_array()?
        .iter()
        .find(|a| a["type"] == kind)?
        .get("address")?
        .as_str()
}

fn event_row(v: &Value, name: String, o: &Options, cells: &mut Vec<String>) {
    let obj = &v["involvedObject"];
    let kind = obj["kind"]
        .as_str()
        .unwrap_or_default()
        .to_ascii_lowercase();
    cells.extend([
        event_last_seen(v, o.now),
        or(&v["type"], "").to_owned(),
        or(&v["reason"], "").to_owned(),
        format!("{kind}/{}", obj["name"].as_str().unwrap_or_default()),
        v["message"]
            .as_str()
            .unwrap_or_default()
            .trim()
            .replace('\n', " "),
    ]);
    if o.wide {
        let source = event_source(v);
        cells.extend([
            or(&obj["fieldPath"], "").to_owned(),
            source,
            age(&v["firstTimestamp"], o.now),
            int(&v["count"]).max(1).to_string(),
            name,
        ]);
    }
}

/// When an event was last seen: its `lastTimestamp`, else `eventTime`,
/// else its creation.
pub fn event_time(v: &Value) -> Option<Timestamp> {
    timestamp(&v["lastTimestamp"])
        .or_else(|| timestamp(&v["eventTime"]))
        .or_else(|| timestamp(&v["metadata"]["creationTimestamp"]))
}

/// kubectl's LAST SEEN / describe's Age: `5m`, or `5m (x3 over 10m)` for a
/// repeated event.
pub fn event_last_seen(v: &Value, now: Timestamp) -> String {
    let last = event_time(v).map_or_else(
        || "<unknown>".to_owned(),
        |t| human_duration(now.duration_since(t).as_secs()),
    );
    let count = int(&v["count"]);
    match timestamp(&v["firstTimestamp"]) {
        Some(first) if count > 1 => format!(
            "{last} (x{count} over {})",
            human_duration(now.duration_since(first).as_secs())
        ),
        _ => last,
    }
}

/// The component (and host) that reported an event.
pub fn event_source(v: &Value) -> String {
    let component = v["source"]["component"]
        .as_str()
        .filter(|c| !c.is_empty())
        .or_else(|| v["reportingComponent"].as_str())
        .unwrap_or_default();
    match v["source"]["host"].as_str().filter(|h| !h.is_empty()) {
        Some(host) => format!("{component}, {host}"),
        None => component.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn now() -> Timestamp {
        "2024-01-01T01:00:00Z".parse().expect("ts")
    }

    fn pod(status: &Value) -> Value {
        json!({"metadata": {"name": "p"}, "spec": {"containers": [{"name": "a"}, {"name": "b"}]}, "status": status})
    }

    #[test]
    fn pod_status_follows_kubectl() {
        let s = pod_summary(&pod(&Value::Null), now());
        assert_eq!((s.ready, s.total, s.status.as_str()), (0, 2, "Pending"));
        let running = json!({"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}],
            "containerStatuses": [
                {"name": "a", "ready": true, "restartCount": 0, "state": {"running": {}}},
                {"name": "b", "ready": true, "restartCount": 2, "state": {"running": {}},
                 "lastState": {"terminated": {"exitCode": 1, "finishedAt": "2024-01-01T00:55:00Z"}}}]});
        let s = pod_summary(&pod(&running), now());
        assert_eq!(
            (s.ready, s.status.as_str(), s.restarts.as_str()),
            (2, "Running", "2 (5m ago)")
        );
        let crash = json!({"phase": "Running", "containerStatuses": [
            {"name": "a", "ready": true, "restartCount": 0, "state": {"running": {}}},
            {"name": "b", "ready": false, "restartCount": 4, "state": {"waiting": {"reason": "CrashLoopBackOff"}}}]});
        let s = pod_summary(&pod(&crash), now());
        assert_eq!(
            (s.ready, s.status.as_str(), s.restarts.as_str()),
            (1, "CrashLoopBackOff", "4")
        );
        let done = json!({"phase": "Succeeded", "containerStatuses": [
            {"name": "a", "state": {"terminated": {"exitCode": 0, "reason": "Completed"}}},
            {"name": "b", "state": {"terminated": {"exitCode": 0, "reason": "Completed"}}}]});
        assert_eq!(pod_summary(&pod(&done), now()).status, "Completed");
        let half = json!({"phase": "Running", "containerStatuses": [
            {"name": "a", "ready": true, "state": {"running": {}}},
            {"name": "b", "state": {"terminated": {"exitCode": 0, "reason": "Completed"}}}]});
        assert_eq!(pod_summary(&pod(&half), now()).status, "NotReady");
        let killed = json!({"phase": "Failed", "containerStatuses": [
            {"name": "a", "state": {"terminated": {"exitCode": 137, "signal": 9}}}]});
        assert_eq!(pod_summary(&pod(&killed), now()).status, "Signal:9");
        let mut deleting = pod(&running);
        deleting["metadata"]["deletionTimestamp"] = json!("2024-01-01T01:00:30Z");
        assert_eq!(pod_summary(&deleting, now()).status, "Terminating");
        let mut evicted = pod(&json!({"phase": "Failed", "reason": "Evicted"}));
        assert_eq!(pod_summary(&evicted, now()).status, "Evicted");
        evicted["spec"]["initContainers"] = json!([{"name": "i"}]);
        evicted["status"] = json!({"phase": "Pending", "initContainerStatuses": [
            {"name": "i", "restartCount": 1, "state": {"waiting": {"reason": "CrashLoopBackOff"}}}]});
        let s = pod_summary(&evicted, now());
        assert_eq!(
            (s.status.as_str(), s.restarts.as_str()),
            ("Init:CrashLoopBackOff", "1")
        );
        evicted["status"]["initContainerStatuses"][0]["state"] = json!({"running": {}});
        assert_eq!(pod_summary(&evicted, now()).status, "Init:0/1");
    }

    #[test]
    fn node_status_and_roles() {
        let mut n = json!({"metadata": {"name": "n1", "labels": {"node-role.kubernetes.io/control-plane": ""}},
            "spec": {}, "status": {"conditions": [{"type": "Ready", "status": "True"}]}});
        assert_eq!(node_status(&n), "Ready");
        assert_eq!(node_roles(&n), "control-plane");
        n["spec"]["unschedulable"] = json!(true);
        assert_eq!(node_status(&n), "Ready,SchedulingDisabled");
        n["status"]["conditions"][0]["status"] = json!("Unknown");
        assert_eq!(node_status(&n), "NotReady,SchedulingDisabled");
        n["status"] = json!({});
        n["spec"] = json!({});
        assert_eq!(node_status(&n), "Unknown");
        assert_eq!(node_roles(&json!({"metadata": {}})), "<none>");
    }

    #[test]
    fn rows_have_kubectl_columns() {
        let o = Options {
            wide: false,
            with_namespace: false,
            with_kind: false,
            now: now(),
        };
        let d = json!({"metadata": {"name": "web", "creationTimestamp": "2024-01-01T00:00:00Z"},
            "spec": {"replicas": 6}, "status": {"readyReplicas": 2, "updatedReplicas": 6, "availableReplicas": 2}});
        assert_eq!(
            table(Resource::Deployment, &[d], &o).render(true),
            "NAME   READY   UP-TO-DATE   AVAILABLE   AGE\nweb    2/6     6            2           60m\n"
        );
        let ev = json!({"metadata": {"name": "e"}, "type": "Warning", "reason": "BackOff",
            "involvedObject": {"kind": "Pod", "name": "p"}, "message": "Back-off restarting",
            "count": 3, "firstTimestamp": "2024-01-01T00:50:00Z", "lastTimestamp": "2024-01-01T00:59:00Z"});
        assert_eq!(
            row(Resource::Event, &ev, &o),
            vec![
                "60s (x3 over 10m)",
                "Warning",
                "BackOff",
                "pod/p",
                "Back-off restarting"
            ]
        );
    }
}
