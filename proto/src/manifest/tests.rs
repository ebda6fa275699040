use serde_json::json;

use super::*;

const FILE: &str = "pods/web.yaml";

/// The nginx Pod of the Kubernetes docs ("Pods" and "Resource Management for
/// Pods and Containers"), with labels, a named port and resources.
const NGINX: &str = r#"
apiVersion: v1
kind: Pod
metadata:
  name: nginx
  labels:
    app.kubernetes.io/name: proxy
    tier: frontend
  annotations:
    description: "a web server"
spec:
  containers:
  - name: nginx
    image: nginx:1.14.2
    ports:
    - containerPort: 80
      name: http-web-svc
    resources:
      requests:
        memory: "64Mi"
        cpu: "250m"
      limits:
        memory: "128Mi"
        cpu: "500m"
  - name: log-aggregator
    image: images.my-company.example/log-aggregator:v6
    command: ["/bin/sh", "-c"]
    args: ["exec aggregate --all"]
    workingDir: /var/log
    env:
    - name: DEMO_GREETING
      value: "Hello from the environment"
    resources:
      limits:
        memory: 129e6
        cpu: 0.5
"#;

fn one(text: &str) -> Result<ValidPod, ManifestError> {
    let mut pods = parse_pods(FILE, text)?;
    assert_eq!(pods.len(), 1);
    Ok(pods.remove(0))
}

/// A minimal valid Pod with `extra` merged into the JSON at `pointer`.
fn pod_with(pointer: &str, key: &str, value: Value) -> Value {
    let mut doc = json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": { "name": "web" },
        "spec": {
            "containers": [{ "name": "app", "image": "busybox:1.36", "ports": [{ "containerPort": 8080 }] }]
        }
    });
    let Some(Value::Object(m)) = doc.pointer_mut(pointer) else {
        panic!("no mapping at {pointer}");
    };
    m.insert(key.to_owned(), value);
    doc
}

/// The one-line error for `doc`, which must be refused.
fn refusal(doc: &Value) -> String {
    match validate_pod(FILE, doc) {
        Ok(p) => panic!("accepted: {:?}", p.pod),
        Err(e) => e.to_string(),
    }
}

fn assert_refused(doc: &Value, field: &str, reason_part: &str) {
    let msg = refusal(doc);
    let prefix = format!("{FILE}: {field}: ");
    assert!(
        msg.starts_with(&prefix),
        "{msg:?} does not start with {prefix:?}"
    );
    assert!(
        msg.contains(reason_part),
        "{msg:?} does not mention {reason_part:?}"
    );
    assert!(!msg.contains('\n'), "{msg:?} is not one line");
}

#[test]
fn nginx_from_the_docs_is_accepted() {
    let v = one(NGINX).unwrap();
    assert_eq!(v.warnings, Vec::<String>::new());
    let meta = &v.pod.metadata;
    assert_eq!(meta.name.as_deref(), Some("nginx"));
    assert_eq!(meta.namespace.as_deref(), Some("default"));
    assert_eq!(
        meta.labels.as_ref().unwrap()["app.kubernetes.io/name"],
        "proxy"
    );
    let spec = v.pod.spec.as_ref().unwrap();
    assert_eq!(spec.containers.len(), 2);
    let port = &spec.containers[0].ports.as_ref().unwrap()[0];
    assert_eq!(port.container_port, 80);
    assert_eq!(port.protocol.as_deref(), Some("TCP"));
    assert_eq!(port.name.as_deref(), Some("http-web-svc"));
    assert_eq!(
        v.limits,
        vec![
            ContainerResources {
                cpu_request_millis: Some(250),
                cpu_limit_millis: Some(500),
                memory_request_bytes: Some(64 << 20),
                memory_limit_bytes: Some(128 << 20),
            },
            ContainerResources {
                cpu_request_millis: Some(500),
                cpu_limit_millis: Some(500),
                memory_request_bytes: Some(129_000_000),
                memory_limit_bytes: Some(129_000_000),
            },
        ]
    );
    // Quantities written as YAML numbers are kept as Kubernetes quantity strings.
    let res = spec.containers[1].resources.as_ref().unwrap();
    assert_eq!(res.limits.as_ref().unwrap()["memory"].0, "129000000");
    assert_eq!(res.limits.as_ref().unwrap()["cpu"].0, "0.5");
    // Requests default to limits, in the Pod as well.
    assert_eq!(res.requests.as_ref().unwrap()["cpu"].0, "0.5");
}

#[test]
fn defaults_are_applied() {
    let v = validate_pod(
        FILE,
        &pod_with(
            "/spec",
            "containers",
            json!([{ "name": "app", "image": "busybox" }]),
        ),
    )
    .unwrap();
    let spec = v.pod.spec.as_ref().unwrap();
    assert_eq!(v.pod.metadata.namespace.as_deref(), Some("default"));
    assert_eq!(spec.restart_policy.as_deref(), Some("Always"));
    assert_eq!(spec.termination_grace_period_seconds, Some(30));
    // Ignored fields get no defaults.
    assert_eq!(spec.dns_policy, None);
    assert_eq!(spec.containers[0].image_pull_policy, None);
    assert_eq!(v.limits, vec![ContainerResources::default()]);
    assert!(v.warnings.is_empty());

    let v = validate_pod(FILE, &pod_with("/spec", "restartPolicy", json!("Never"))).unwrap();
    let spec = v.pod.spec.as_ref().unwrap();
    assert_eq!(spec.restart_policy.as_deref(), Some("Never"));
    assert_eq!(
        spec.containers[0].ports.as_ref().unwrap()[0]
            .protocol
            .as_deref(),
        Some("TCP")
    );
    let v = validate_pod(FILE, &pod_with("/metadata", "namespace", json!("team-a"))).unwrap();
    assert_eq!(v.pod.metadata.namespace.as_deref(), Some("team-a"));
    let v = validate_pod(
        FILE,
        &pod_with("/spec", "terminationGracePeriodSeconds", json!(0)),
    )
    .unwrap();
    assert_eq!(
        v.pod.spec.unwrap().termination_grace_period_seconds,
        Some(0)
    );
}

#[test]
fn used_fields_are_checked() {
    assert_refused(
        &pod_with("/spec", "restartPolicy", json!("Sometimes")),
        "spec.restartPolicy",
        "must be one of \"Always\", \"OnFailure\", \"Never\"",
    );
    assert_refused(
        &pod_with("/spec", "terminationGracePeriodSeconds", json!(-1)),
        "spec.terminationGracePeriodSeconds",
        ">= 0",
    );
    assert_refused(
        &pod_with("/spec", "terminationGracePeriodSeconds", json!("30")),
        "spec.terminationGracePeriodSeconds",
        "must be an integer, got string \"30\"",
    );
    assert_refused(
        &pod_with("/metadata", "name", json!("Web_1")),
        "metadata.name",
        "DNS-1123 subdomain",
    );
    assert_refused(
        &pod_with("/metadata", "name", json!("a".repeat(254))),
        "metadata.name",
        "longer than 253",
    );
    assert!(validate_pod(FILE, &pod_with("/metadata", "name", json!("web.v2"))).is_ok());
    assert_refused(
        &pod_with("/metadata", "namespace", json!("team.a")),
        "metadata.namespace",
        "DNS-1123 label",
    );
    assert_refused(
        &pod_with("/spec/containers/0", "workingDir", json!("srv")),
        "spec.containers[0].workingDir",
        "absolute path",
    );
    assert_refused(
        &pod_with("/spec/containers/0", "command", json!("echo hi")),
        "spec.containers[0].command",
        "must be a list of strings",
    );
    assert_refused(
        &pod_with("/spec/containers/0", "args", json!(["-p", 80])),
        "spec.containers[0].args[1]",
        "must be a string, got number 80 (put it in quotes)",
    );
    assert_refused(
        &pod_with("/spec/containers/0", "env", json!([{ "value": "x" }])),
        "spec.containers[0].env[0].name",
        "required",
    );
    assert_refused(
        &pod_with("/spec/containers/0", "env", json!([{ "name": "A=B" }])),
        "spec.containers[0].env[0].name",
        "'='",
    );
    assert_refused(
        &pod_with(
            "/spec/containers/0",
            "env",
            json!([{ "name": "PORT", "value": 8080 }]),
        ),
        "spec.containers[0].env[0].value",
        "in quotes",
    );
    assert_refused(
        &pod_with("/spec", "os", json!({ "name": "windows" })),
        "spec.os.name",
        "Linux",
    );
    assert!(validate_pod(FILE, &pod_with("/spec", "os", json!({ "name": "linux" }))).is_ok());
}

#[test]
fn labels_and_annotations_are_checked() {
    assert_refused(
        &pod_with("/metadata", "labels", json!({ "app": "web server" })),
        "metadata.labels.app",
        "not a valid label value",
    );
    assert_refused(
        &pod_with("/metadata", "labels", json!({ "Example.com/app": "web" })),
        "metadata.labels[Example.com/app]",
        "invalid key",
    );
    assert_refused(
        &pod_with("/metadata", "labels", json!({ "enabled": true })),
        "metadata.labels.enabled",
        "must be a string, got boolean true",
    );
    assert_refused(
        &pod_with("/metadata", "annotations", json!({ "-bad": "x" })),
        "metadata.annotations[-bad]",
        "invalid key",
    );
    assert_refused(
        &pod_with(
            "/metadata",
            "annotations",
            json!({ "big": "x".repeat(300 * 1024) }),
        ),
        "metadata.annotations",
        "262144",
    );
    // An empty YAML value (`tier:`) is an empty label value, as in Kubernetes.
    let v = validate_pod(
        FILE,
        &pod_with("/metadata", "labels", json!({ "tier": null })),
    )
    .unwrap();
    assert_eq!(v.pod.metadata.labels.unwrap()["tier"], "");
}

#[test]
fn warned_fields_are_accepted_with_a_warning_naming_them() {
    let cases = [
        (
            "/spec/containers/0",
            "imagePullPolicy",
            json!("Always"),
            "spec.containers[0].imagePullPolicy",
            "never pulls",
        ),
        (
            "/spec/containers/0",
            "tty",
            json!(true),
            "spec.containers[0].tty",
            "terminal",
        ),
        (
            "/spec",
            "nodeName",
            json!("node-1"),
            "spec.nodeName",
            "own node",
        ),
        (
            "/spec",
            "tolerations",
            json!([{ "key": "k", "operator": "Exists" }]),
            "spec.tolerations",
            "own node",
        ),
        (
            "/spec",
            "dnsPolicy",
            json!("ClusterFirst"),
            "spec.dnsPolicy",
            "DNS",
        ),
        (
            "/spec",
            "enableServiceLinks",
            json!(true),
            "spec.enableServiceLinks",
            "environment",
        ),
        (
            "/spec",
            "securityContext",
            json!({ "runAsNonRoot": true }),
            "spec.securityContext.runAsNonRoot",
            "user",
        ),
        (
            "/metadata",
            "ownerReferences",
            json!([{ "apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web", "uid": "u" }]),
            "metadata.ownerReferences",
            "owner",
        ),
    ];
    for (pointer, key, value, field, why) in cases {
        let v = validate_pod(FILE, &pod_with(pointer, key, value))
            .unwrap_or_else(|e| panic!("{field}: {e}"));
        assert_eq!(v.warnings.len(), 1, "{field}: {:?}", v.warnings);
        let w = &v.warnings[0];
        assert!(w.starts_with(&format!("{FILE}: {field}: ignored: ")), "{w}");
        assert!(w.contains(why), "{w}");
    }
    // Kept in the Pod, for whoever implements them later.
    let v = validate_pod(
        FILE,
        &pod_with("/spec/containers/0", "imagePullPolicy", json!("Never")),
    )
    .unwrap();
    assert_eq!(
        v.pod.spec.unwrap().containers[0]
            .image_pull_policy
            .as_deref(),
        Some("Never")
    );
    // A value that asks for nothing gives no warning.
    for (key, value) in [
        ("tty", json!(false)),
        ("livenessProbe", json!(null)),
        ("stdin", json!(false)),
    ] {
        let v = validate_pod(FILE, &pod_with("/spec/containers/0", key, value)).unwrap();
        assert!(v.warnings.is_empty(), "{key}: {:?}", v.warnings);
    }
}

#[test]
fn status_and_server_set_metadata_are_dropped() {
    let mut doc = pod_with(
        "/metadata",
        "uid",
        json!("6f3b0c1e-0000-4000-8000-000000000000"),
    );
    doc["metadata"]["resourceVersion"] = json!("42");
    doc["metadata"]["creationTimestamp"] = json!(null);
    doc["status"] = json!({ "phase": "Running", "podIP": "10.244.0.5" });
    let v = validate_pod(FILE, &doc).unwrap();
    assert_eq!(v.pod.status, None);
    assert_eq!(v.pod.metadata.uid, None);
    assert_eq!(v.pod.metadata.resource_version, None);
    let mut fields: Vec<&str> = v
        .warnings
        .iter()
        .map(|w| w.split(": ").nth(1).unwrap())
        .collect();
    // Key order depends on serde_json's preserve_order feature.
    fields.sort_unstable();
    assert_eq!(
        fields,
        ["metadata.resourceVersion", "metadata.uid", "status"]
    );
    // `status: {}` as `kubectl create --dry-run -o yaml` writes it: no warning.
    let v = validate_pod(FILE, &pod_with("", "status", json!({}))).unwrap();
    assert!(v.warnings.is_empty());
}

#[test]
#[expect(clippy::too_many_lines, reason = "one table of cases")]
fn refused_fields_name_the_field_and_the_reason() {
    let cases = [
        (
            "/spec",
            "hostNetwork",
            json!(true),
            "spec.hostNetwork",
            "network namespace",
        ),
        ("/spec", "hostPID", json!(true), "spec.hostPID", "PID"),
        ("/spec", "hostIPC", json!(true), "spec.hostIPC", "IPC"),
        (
            "/spec",
            "hostUsers",
            json!(false),
            "spec.hostUsers",
            "user namespaces",
        ),
        (
            "/spec",
            "volumes",
            json!([{ "name": "data", "emptyDir": {} }]),
            "spec.volumes",
            "volume",
        ),
        (
            "/spec",
            "initContainers",
            json!([{ "name": "init", "image": "busybox" }]),
            "spec.initContainers",
            "init containers",
        ),
        (
            "/spec",
            "ephemeralContainers",
            json!([{ "name": "debug", "image": "busybox" }]),
            "spec.ephemeralContainers",
            "ephemeral",
        ),
        (
            "/spec",
            "activeDeadlineSeconds",
            json!(60),
            "spec.activeDeadlineSeconds",
            "deadline",
        ),
        (
            "/spec",
            "securityContext",
            json!({ "runAsUser": 1000 }),
            "spec.securityContext.runAsUser",
            "user",
        ),
        (
            "/spec/containers/0",
            "volumeMounts",
            json!([{ "name": "data", "mountPath": "/data" }]),
            "spec.containers[0].volumeMounts",
            "volume",
        ),
        (
            "/spec/containers/0",
            "lifecycle",
            json!({ "preStop": { "exec": { "command": ["true"] } } }),
            "spec.containers[0].lifecycle",
            "hooks",
        ),
        (
            "/spec/containers/0",
            "envFrom",
            json!([{ "configMapRef": { "name": "cfg" } }]),
            "spec.containers[0].envFrom",
            "ConfigMaps",
        ),
        (
            "/spec/containers/0",
            "env",
            json!([{ "name": "POD_IP", "valueFrom": { "fieldRef": { "fieldPath": "status.podIP" } } }]),
            "spec.containers[0].env[0].valueFrom",
            "downward API",
        ),
        (
            "/spec/containers/0",
            "securityContext",
            json!({ "privileged": true }),
            "spec.containers[0].securityContext.privileged",
            "privileged",
        ),
        (
            "/spec/containers/0",
            "securityContext",
            json!({ "capabilities": { "add": ["NET_ADMIN"] } }),
            "spec.containers[0].securityContext.capabilities.add",
            "capabilities",
        ),
        (
            "/spec/containers/0/ports/0",
            "hostPort",
            json!(8080),
            "spec.containers[0].ports[0].hostPort",
            "Service",
        ),
        (
            "/metadata",
            "generateName",
            json!("web-"),
            "metadata.generateName",
            "metadata.name",
        ),
    ];
    for (pointer, key, value, field, why) in cases {
        let doc = pod_with(pointer, key, value);
        assert_refused(&doc, field, why);
        assert!(refusal(&doc).contains(&format!("{field}: not supported: ")));
    }
    // The value that asks for nothing is accepted silently.
    for (pointer, key, value) in [
        ("/spec", "hostNetwork", json!(false)),
        ("/spec", "hostUsers", json!(true)),
        ("/spec", "hostIPC", json!({})),
        ("/spec", "volumes", json!([])),
        ("/spec/containers/0/ports/0", "hostPort", json!(0)),
        (
            "/spec/containers/0",
            "securityContext",
            json!({ "privileged": false, "capabilities": { "add": [] } }),
        ),
    ] {
        let v = validate_pod(FILE, &pod_with(pointer, key, value))
            .unwrap_or_else(|e| panic!("{key}: {e}"));
        assert!(v.warnings.is_empty(), "{key}: {:?}", v.warnings);
    }
}

#[test]
fn unknown_fields_are_refused_with_their_path() {
    assert_refused(
        &pod_with("/spec/containers/0", "imagePullPolcy", json!("Always")),
        "spec.containers[0].imagePullPolcy",
        "did you mean \"imagePullPolicy\"",
    );
    assert_refused(
        &pod_with("/spec/containers/0/ports/0", "port", json!(80)),
        "spec.containers[0].ports[0].port",
        "unknown field",
    );
    assert_refused(
        &pod_with("/spec", "replicas", json!(3)),
        "spec.replicas",
        "unknown field (Kubernetes has no such field here)",
    );
    assert_refused(
        &pod_with("/metadata", "label", json!({ "a": "b" })),
        "metadata.label",
        "did you mean \"labels\"",
    );
    assert_refused(&pod_with("", "extra", json!(1)), "extra", "unknown field");
    assert_refused(
        &pod_with(
            "/spec/containers/0",
            "resources",
            json!({ "limit": { "cpu": "1" } }),
        ),
        "spec.containers[0].resources.limit",
        "did you mean \"limits\"",
    );
    assert_refused(
        &pod_with(
            "/spec/containers/0",
            "securityContext",
            json!({ "capabilities": { "remove": ["ALL"] } }),
        ),
        "spec.containers[0].securityContext.capabilities.remove",
        "unknown field",
    );
}

#[test]
fn quantities_are_parsed_with_field_paths() {
    let res = |r: Value| pod_with("/spec/containers/0", "resources", r);
    assert_eq!(
        refusal(&res(json!({ "limits": { "cpu": "lots" } }))),
        "pods/web.yaml: spec.containers[0].resources.limits.cpu: invalid quantity \"lots\": expected a number with an optional suffix (m, k, M, G, Ki, Mi, Gi, ...)"
    );
    assert_refused(
        &res(json!({ "requests": { "memory": "-64Mi" } })),
        "spec.containers[0].resources.requests.memory",
        "must not be negative",
    );
    assert_refused(
        &res(json!({ "requests": { "memory": "" } })),
        "spec.containers[0].resources.requests.memory",
        "invalid quantity \"\"",
    );
    assert_refused(
        &res(json!({ "limits": { "memory": true } })),
        "spec.containers[0].resources.limits.memory",
        "must be a quantity",
    );
    assert_refused(
        &res(json!({ "limits": { "nvidia.com/gpu": "1" } })),
        "spec.containers[0].resources.limits[nvidia.com/gpu]",
        "only the cpu and memory",
    );
    assert_refused(
        &res(json!({ "requests": { "ephemeral-storage": "1Gi" } })),
        "spec.containers[0].resources.requests.ephemeral-storage",
        "not supported",
    );
    assert_refused(
        &res(json!({ "requests": { "cpu": "2" }, "limits": { "cpu": "1" } })),
        "spec.containers[0].resources.requests.cpu",
        "\"2\" must be less than or equal to the cpu limit \"1\"",
    );
    assert_refused(
        &res(json!({ "requests": { "memory": "1Gi" }, "limits": { "memory": "512Mi" } })),
        "spec.containers[0].resources.requests.memory",
        "limit \"512Mi\"",
    );
    let v = validate_pod(
        FILE,
        &res(json!({ "requests": { "cpu": 1, "memory": "1k" } })),
    )
    .unwrap();
    assert_eq!(
        v.limits[0],
        ContainerResources {
            cpu_request_millis: Some(1000),
            memory_request_bytes: Some(1000),
            ..Default::default()
        }
    );
}

#[test]
fn containers_are_checked() {
    let containers = |c: Value| pod_with("/spec", "containers", c);
    assert_refused(
        &containers(json!([{ "name": "app", "image": "a" }, { "name": "app", "image": "b" }])),
        "spec.containers[1].name",
        "duplicate container name \"app\"",
    );
    assert_refused(
        &containers(json!([{ "name": "app" }])),
        "spec.containers[0].image",
        "required",
    );
    assert_refused(
        &containers(json!([{ "name": "app", "image": "" }])),
        "spec.containers[0].image",
        "required",
    );
    assert_refused(
        &containers(json!([{ "name": "app", "image": " nginx" }])),
        "spec.containers[0].image",
        "whitespace",
    );
    assert_refused(
        &containers(json!([{ "image": "nginx" }])),
        "spec.containers[0].name",
        "required",
    );
    assert_refused(
        &containers(json!([{ "name": "App", "image": "nginx" }])),
        "spec.containers[0].name",
        "DNS-1123 label",
    );
    assert_refused(
        &containers(json!([])),
        "spec.containers",
        "at least one container",
    );
    assert_refused(
        &containers(json!({ "name": "app" })),
        "spec.containers",
        "must be a list",
    );
    assert_refused(
        &containers(json!(["nginx"])),
        "spec.containers[0]",
        "must be a mapping",
    );
    let mut no_containers = pod_with("", "spec", json!({ "restartPolicy": "Never" }));
    assert_refused(&no_containers, "spec.containers", "required");
    no_containers["spec"] = json!(null);
    assert_refused(&no_containers, "spec", "required");
}

#[test]
fn ports_are_checked() {
    let ports = |p: Value| pod_with("/spec/containers/0", "ports", p);
    for bad in [0, 70000, -1] {
        assert_refused(
            &ports(json!([{ "containerPort": bad }])),
            "spec.containers[0].ports[0].containerPort",
            "between 1 and 65535",
        );
    }
    assert_refused(
        &ports(json!([{ "containerPort": 3_000_000_000_i64 }])),
        "spec.containers[0].ports[0].containerPort",
        "out of range",
    );
    assert_refused(
        &ports(json!([{ "containerPort": "http" }])),
        "spec.containers[0].ports[0].containerPort",
        "must be an integer, got string \"http\"",
    );
    assert_refused(
        &ports(json!([{ "containerPort": 80.5 }])),
        "spec.containers[0].ports[0].containerPort",
        "must be an integer",
    );
    assert_refused(
        &ports(json!([{ "name": "http" }])),
        "spec.containers[0].ports[0].containerPort",
        "required",
    );
    assert_refused(
        &ports(json!([{ "containerPort": 80, "protocol": "tcp" }])),
        "spec.containers[0].ports[0].protocol",
        "must be one of \"TCP\", \"UDP\", \"SCTP\"",
    );
    assert_refused(
        &ports(json!([{ "containerPort": 80, "name": "http-web-service" }])),
        "spec.containers[0].ports[0].name",
        "at most 15",
    );
    assert_refused(
        &ports(
            json!([{ "containerPort": 80, "name": "http" }, { "containerPort": 81, "name": "http" }]),
        ),
        "spec.containers[0].ports[1].name",
        "duplicate port name \"http\"",
    );
    let v = validate_pod(FILE, &ports(json!([{ "containerPort": 53, "protocol": "UDP", "name": "dns" }, { "containerPort": 53, "name": "dns-tcp" }]))).unwrap();
    assert!(v.warnings.is_empty());
    // Containers share the pod's netns: the same port twice is a warning, as in Kubernetes.
    let v = validate_pod(
        FILE,
        &pod_with(
            "/spec",
            "containers",
            json!([
                { "name": "a", "image": "x", "ports": [{ "containerPort": 80 }] },
                { "name": "b", "image": "x", "ports": [{ "containerPort": 80 }] },
            ]),
        ),
    )
    .unwrap();
    assert_eq!(v.warnings.len(), 1);
    assert!(v.warnings[0].contains(
        "spec.containers[1].ports[0]: duplicate port definition with spec.containers[0].ports[0]"
    ));
}

#[test]
fn ports_from_yaml_text() {
    let text = "apiVersion: v1\nkind: Pod\nmetadata: {name: web}\nspec:\n  containers:\n  - name: app\n    image: nginx\n    ports:\n    - containerPort: http\n";
    assert_eq!(
        one(text).unwrap_err().to_string(),
        "pods/web.yaml: spec.containers[0].ports[0].containerPort: must be an integer, got string \"http\""
    );
}

#[test]
fn kind_and_api_version() {
    let mut doc = pod_with("", "kind", json!("Deployment"));
    doc["apiVersion"] = json!("apps/v1");
    assert_eq!(
        refusal(&doc),
        "pods/web.yaml: kind: kind Deployment is not supported here (weir-agent standalone mode runs Pods)"
    );
    assert_refused(
        &pod_with("", "apiVersion", json!("apps/v1")),
        "apiVersion",
        "expected \"v1\"",
    );
    let mut doc = pod_with("", "x", json!(null));
    doc.as_object_mut().unwrap().remove("kind");
    assert_refused(&doc, "kind", "required");
    let mut doc = pod_with("", "x", json!(null));
    doc.as_object_mut().unwrap().remove("apiVersion");
    assert_refused(&doc, "apiVersion", "required");
    assert_eq!(
        validate_pod(FILE, &json!(["a"])).unwrap_err().to_string(),
        "pods/web.yaml: a document must be a mapping with apiVersion, kind, metadata and spec"
    );
}

#[test]
fn multi_document_text() {
    let text = "---\n# leading comment\n---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: a\nspec:\n  containers:\n  - {name: app, image: busybox}\n---\n---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: b\n  namespace: team-b\nspec:\n  containers:\n  - {name: app, image: busybox}\n...\n";
    let docs = parse_documents(FILE, text).unwrap();
    assert_eq!(docs.len(), 2);
    assert_eq!(docs[1]["metadata"]["namespace"], "team-b");
    let pods = parse_pods(FILE, text).unwrap();
    let names: Vec<_> = pods
        .iter()
        .map(|p| p.pod.metadata.name.clone().unwrap())
        .collect();
    assert_eq!(names, ["a", "b"]);
    assert!(parse_documents(FILE, "").unwrap().is_empty());
    assert!(parse_pods(FILE, "# nothing\n").unwrap().is_empty());

    // A Service among Pods is refused, naming its document.
    let mixed =
        format!("{text}---\napiVersion: v1\nkind: Service\nmetadata: {{name: web}}\nspec: {{}}\n");
    assert_eq!(
        parse_pods(FILE, &mixed).unwrap_err().to_string(),
        "pods/web.yaml (document 3): kind: kind Service is not supported here (weir-agent standalone mode runs Pods)"
    );
}

#[test]
fn yaml_errors_are_one_line() {
    let e = parse_documents(FILE, "a: b\na: c\n").unwrap_err();
    assert_eq!(
        e.to_string(),
        "pods/web.yaml: invalid YAML: duplicate mapping key: a at line 2, column 1"
    );
    for bad in [
        "a: [1, 2\n",
        "key: value\n  bad indent: x\n- list\n",
        "a: 'unterminated\n",
    ] {
        let e = parse_documents(FILE, bad).unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, ManifestError::Yaml { .. }), "{msg}");
        assert!(msg.starts_with("pods/web.yaml: invalid YAML: "), "{msg}");
        assert!(!msg.contains('\n'), "{msg}");
    }
}

#[test]
fn warned_field_of_the_wrong_type_is_named() {
    let doc = pod_with("/spec", "tolerations", json!("all"));
    let msg = refusal(&doc);
    assert!(
        msg.starts_with("pods/web.yaml: spec.tolerations: "),
        "{msg}"
    );
}

#[test]
fn tables_are_consistent_and_render() {
    let standalone: &Table = &fields::POD_STANDALONE;
    for table in fields::all().into_iter().chain([standalone]) {
        let rows: Vec<(&str, FieldClass)> = table.rows().collect();
        let mut seen = std::collections::HashSet::new();
        for (path, _) in &rows {
            assert!(seen.insert(*path), "{}: {path} twice", table.kind());
            // Every nested row hangs below a used Object or ObjectList row.
            let Some((parent, _)) = path.rsplit_once('.') else {
                continue;
            };
            let parent = parent.strip_suffix("[]").unwrap_or(parent);
            let class = table
                .rule(parent)
                .unwrap_or_else(|| panic!("{}: {path} has no parent", table.kind()));
            let walked = |shape| {
                matches!(class, FieldClass::Used { shape: s, .. } if s == shape)
                    // Below a field the standalone agent ignores, rows stay for the cluster.
                    || std::ptr::eq(table, standalone)
                        && !matches!(class, FieldClass::Used { .. })
            };
            assert!(
                walked(Shape::Object) || walked(Shape::ObjectList),
                "{}: {path} is below {parent} which is not walked",
                table.kind()
            );
            if matches!(class, FieldClass::Used { .. }) {
                assert_eq!(
                    walked(Shape::ObjectList),
                    path[parent.len()..].starts_with("[]."),
                    "{path}"
                );
            }
        }
    }
    let md = field_table_markdown();
    assert!(md.starts_with("| Pod field | Class | Notes |\n|---|---|---|\n"));
    assert!(md.contains(
        "| `spec.hostNetwork` | refused | weir pods always get their own network namespace |"
    ));
    assert!(md.contains("| `spec.containers[].imagePullPolicy` | warning, ignored | "));
    assert!(
        md.contains("| `spec.containers[].ports[].containerPort` | used (required) | 1..=65535 |")
    );
    assert!(md.contains("| `spec.nodeName` | used | "), "{md}");
    assert!(md.contains(
        "(standalone agent: warning, ignored: weir-agent runs the pod on its own node) |"
    ));
    for kind in ["ReplicaSet", "Deployment", "DaemonSet", "Node", "Event"] {
        assert!(
            md.contains(&format!("\n| {kind} field | Class | Notes |\n")),
            "{kind}"
        );
    }
    assert!(md.contains("| `spec.template.spec.*` | as the Pod's `spec.*` (the same table) | |"));
    assert!(!md.contains("spec.template.spec.containers"));
    let pod_rows = fields::POD.rows().count();
    assert_eq!(
        md.split("\n\n").next().unwrap().lines().count(),
        pod_rows + 3
    );
}

/// A deserializer that only records the field names a k8s-openapi type
/// passes to `deserialize_struct`: the exact list Kubernetes knows.
struct FieldNames<'a>(&'a mut Vec<&'static str>);

impl<'de> serde::Deserializer<'de> for FieldNames<'_> {
    type Error = serde::de::value::Error;

    fn deserialize_any<V: serde::de::Visitor<'de>>(self, _: V) -> Result<V::Value, Self::Error> {
        Err(serde::de::Error::custom("only structs"))
    }

    fn deserialize_struct<V: serde::de::Visitor<'de>>(
        self,
        _: &'static str,
        fields: &'static [&'static str],
        _: V,
    ) -> Result<V::Value, Self::Error> {
        self.0.extend_from_slice(fields);
        Err(serde::de::Error::custom("fields recorded"))
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf option
        unit unit_struct newtype_struct seq tuple tuple_struct map enum identifier ignored_any
    }
}

fn fields_of<T: serde::de::DeserializeOwned>() -> Vec<&'static str> {
    let mut fields = Vec::new();
    assert!(T::deserialize(FieldNames(&mut fields)).is_err());
    assert!(!fields.is_empty());
    fields
}

/// Checks that `table` has exactly Kubernetes' fields below each parent in
/// `objects`, and that every mapping the walk enters is in `objects`.
fn assert_covers(table: &Table, objects: &[(&str, Vec<&'static str>)]) {
    for (parent, fields) in objects {
        let known: Vec<&str> = table.children(parent).map(|(n, _)| n).collect();
        for f in fields {
            assert!(
                known.contains(f),
                "{}: {parent}.{f} is missing from the table",
                table.kind()
            );
        }
        for k in &known {
            assert!(
                fields.contains(k),
                "{}: {parent}.{k} is in the table but Kubernetes has no such field",
                table.kind()
            );
        }
    }
    for (path, class) in table.rows() {
        let FieldClass::Used { shape, .. } = class else {
            continue;
        };
        let entered = match shape {
            Shape::Object => path.to_owned(),
            Shape::ObjectList => format!("{path}[]"),
            _ => continue,
        };
        assert!(
            objects.iter().any(|(p, _)| *p == entered),
            "{}: no Kubernetes type checked for {entered}",
            table.kind()
        );
    }
}

fn meta_objects(at: &str) -> Vec<(String, Vec<&'static str>)> {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
    let join = |p: &str| {
        if at.is_empty() {
            p.to_owned()
        } else {
            format!("{at}.{p}")
        }
    };
    vec![
        (join("metadata"), fields_of::<ObjectMeta>()),
        (
            join("metadata.ownerReferences[]"),
            fields_of::<OwnerReference>(),
        ),
    ]
}

fn selector_objects(at: &str) -> Vec<(String, Vec<&'static str>)> {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, LabelSelectorRequirement};
    vec![
        (at.to_owned(), fields_of::<LabelSelector>()),
        (
            format!("{at}.matchExpressions[]"),
            fields_of::<LabelSelectorRequirement>(),
        ),
    ]
}

fn pod_spec_objects(at: &str) -> Vec<(String, Vec<&'static str>)> {
    use k8s_openapi::api::core::v1::{
        Affinity, Capabilities, Container, ContainerPort, EnvVar, ExecAction, HTTPGetAction,
        HTTPHeader, NodeAffinity, NodeSelector, NodeSelectorRequirement, NodeSelectorTerm,
        PodAffinity, PodAffinityTerm, PodAntiAffinity, PodOS, PodSecurityContext, PodSpec,
        PreferredSchedulingTerm, Probe, ResourceRequirements, SecurityContext, TCPSocketAction,
        Toleration, WeightedPodAffinityTerm,
    };
    let spec = if at.is_empty() {
        "spec".to_owned()
    } else {
        format!("{at}.spec")
    };
    let nodes = format!("{spec}.affinity.nodeAffinity");
    let mut out = vec![
        (spec.clone(), fields_of::<PodSpec>()),
        (format!("{spec}.os"), fields_of::<PodOS>()),
        (
            format!("{spec}.securityContext"),
            fields_of::<PodSecurityContext>(),
        ),
        (format!("{spec}.containers[]"), fields_of::<Container>()),
        (format!("{spec}.containers[].env[]"), fields_of::<EnvVar>()),
        (
            format!("{spec}.containers[].ports[]"),
            fields_of::<ContainerPort>(),
        ),
        (
            format!("{spec}.containers[].resources"),
            fields_of::<ResourceRequirements>(),
        ),
        (
            format!("{spec}.containers[].securityContext"),
            fields_of::<SecurityContext>(),
        ),
        (
            format!("{spec}.containers[].securityContext.capabilities"),
            fields_of::<Capabilities>(),
        ),
        (format!("{spec}.tolerations[]"), fields_of::<Toleration>()),
        (format!("{spec}.affinity"), fields_of::<Affinity>()),
        (nodes.clone(), fields_of::<NodeAffinity>()),
        (
            format!("{nodes}.requiredDuringSchedulingIgnoredDuringExecution"),
            fields_of::<NodeSelector>(),
        ),
        (
            format!("{nodes}.preferredDuringSchedulingIgnoredDuringExecution[]"),
            fields_of::<PreferredSchedulingTerm>(),
        ),
    ];
    for term in [
        format!("{nodes}.requiredDuringSchedulingIgnoredDuringExecution.nodeSelectorTerms[]"),
        format!("{nodes}.preferredDuringSchedulingIgnoredDuringExecution[].preference"),
    ] {
        out.push((
            format!("{term}.matchExpressions[]"),
            fields_of::<NodeSelectorRequirement>(),
        ));
        out.push((
            format!("{term}.matchFields[]"),
            fields_of::<NodeSelectorRequirement>(),
        ));
        out.push((term, fields_of::<NodeSelectorTerm>()));
    }
    for (name, fields) in [
        ("podAffinity", fields_of::<PodAffinity>()),
        ("podAntiAffinity", fields_of::<PodAntiAffinity>()),
    ] {
        let base = format!("{spec}.affinity.{name}");
        let preferred = format!("{base}.preferredDuringSchedulingIgnoredDuringExecution[]");
        for term in [
            format!("{base}.requiredDuringSchedulingIgnoredDuringExecution[]"),
            format!("{preferred}.podAffinityTerm"),
        ] {
            out.extend(selector_objects(&format!("{term}.labelSelector")));
            out.push((term, fields_of::<PodAffinityTerm>()));
        }
        out.push((preferred, fields_of::<WeightedPodAffinityTerm>()));
        out.push((base, fields));
    }
    for probe in ["livenessProbe", "readinessProbe", "startupProbe"] {
        let base = format!("{spec}.containers[].{probe}");
        out.push((format!("{base}.httpGet"), fields_of::<HTTPGetAction>()));
        out.push((
            format!("{base}.httpGet.httpHeaders[]"),
            fields_of::<HTTPHeader>(),
        ));
        out.push((format!("{base}.tcpSocket"), fields_of::<TCPSocketAction>()));
        out.push((format!("{base}.exec"), fields_of::<ExecAction>()));
        out.push((base, fields_of::<Probe>()));
    }
    out
}

fn borrowed<'a>(objects: &'a [(String, Vec<&'static str>)]) -> Vec<(&'a str, Vec<&'static str>)> {
    objects
        .iter()
        .map(|(p, f)| (p.as_str(), f.clone()))
        .collect()
}

#[test]
fn the_pod_table_covers_every_field_kubernetes_knows() {
    let mut objects = vec![(String::new(), fields_of::<Pod>())];
    objects.extend(meta_objects(""));
    objects.extend(pod_spec_objects(""));
    assert_covers(&fields::POD, &borrowed(&objects));
}

#[test]
fn the_workload_tables_cover_every_field_kubernetes_knows() {
    use k8s_openapi::api::apps::v1::{
        DaemonSet, DaemonSetSpec, DaemonSetUpdateStrategy, Deployment, DeploymentSpec,
        DeploymentStrategy, ReplicaSet, ReplicaSetSpec, RollingUpdateDaemonSet,
        RollingUpdateDeployment,
    };
    use k8s_openapi::api::core::v1::PodTemplateSpec;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
    let common = |top: Vec<&'static str>, spec: Vec<&'static str>| {
        let mut objects = vec![
            (String::new(), top),
            ("spec".to_owned(), spec),
            ("spec.template".to_owned(), fields_of::<PodTemplateSpec>()),
            (
                "spec.template.metadata".to_owned(),
                fields_of::<ObjectMeta>(),
            ),
        ];
        objects.extend(meta_objects(""));
        objects.extend(selector_objects("spec.selector"));
        objects.extend(pod_spec_objects("spec.template"));
        objects
    };
    let rs = common(fields_of::<ReplicaSet>(), fields_of::<ReplicaSetSpec>());
    assert_covers(&fields::REPLICA_SET, &borrowed(&rs));
    let mut d = common(fields_of::<Deployment>(), fields_of::<DeploymentSpec>());
    d.push((
        "spec.strategy".to_owned(),
        fields_of::<DeploymentStrategy>(),
    ));
    d.push((
        "spec.strategy.rollingUpdate".to_owned(),
        fields_of::<RollingUpdateDeployment>(),
    ));
    assert_covers(&fields::DEPLOYMENT, &borrowed(&d));
    let mut ds = common(fields_of::<DaemonSet>(), fields_of::<DaemonSetSpec>());
    ds.push((
        "spec.updateStrategy".to_owned(),
        fields_of::<DaemonSetUpdateStrategy>(),
    ));
    ds.push((
        "spec.updateStrategy.rollingUpdate".to_owned(),
        fields_of::<RollingUpdateDaemonSet>(),
    ));
    assert_covers(&fields::DAEMON_SET, &borrowed(&ds));
}

#[test]
fn the_node_and_event_tables_cover_every_field_kubernetes_knows() {
    use k8s_openapi::api::core::v1::{
        Event, EventSeries, EventSource, Node, NodeSpec, ObjectReference, Taint,
    };
    let mut node = vec![
        (String::new(), fields_of::<Node>()),
        ("spec".to_owned(), fields_of::<NodeSpec>()),
        ("spec.taints[]".to_owned(), fields_of::<Taint>()),
    ];
    node.extend(meta_objects(""));
    assert_covers(&fields::NODE, &borrowed(&node));
    let mut event = vec![
        (String::new(), fields_of::<Event>()),
        ("involvedObject".to_owned(), fields_of::<ObjectReference>()),
        ("related".to_owned(), fields_of::<ObjectReference>()),
        ("source".to_owned(), fields_of::<EventSource>()),
        ("series".to_owned(), fields_of::<EventSeries>()),
    ];
    event.extend(meta_objects(""));
    assert_covers(&fields::EVENT, &borrowed(&event));
}

/// The Deployment of the Kubernetes docs ("Deployments").
const NGINX_DEPLOYMENT: &str = r"
apiVersion: apps/v1
kind: Deployment
metadata:
  name: nginx-deployment
  labels:
    app: nginx
spec:
  replicas: 3
  selector:
    matchLabels:
      app: nginx
  template:
    metadata:
      labels:
        app: nginx
    spec:
      containers:
      - name: nginx
        image: nginx:1.14.2
        ports:
        - containerPort: 80
";

fn deployment_doc() -> Value {
    parse_documents("d.yaml", NGINX_DEPLOYMENT)
        .unwrap()
        .remove(0)
}

/// `doc` with `value` set at the JSON pointer `pointer` (parents must exist).
fn with(mut doc: Value, pointer: &str, value: Value) -> Value {
    let (parent, key) = pointer.rsplit_once('/').unwrap();
    let Some(Value::Object(m)) = doc.pointer_mut(parent) else {
        panic!("no mapping at {parent}");
    };
    m.insert(key.to_owned(), value);
    doc
}

fn refused_with(
    result: Result<impl std::fmt::Debug, ManifestError>,
    file: &str,
    field: &str,
    why: &str,
) {
    let msg = result.expect_err("must be refused").to_string();
    assert!(
        msg.starts_with(&format!("{file}: {field}: ")),
        "{msg:?} is not about {field}"
    );
    assert!(msg.contains(why), "{msg:?} does not say {why:?}");
}

#[test]
fn deployment_from_the_docs_is_defaulted() {
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
    let v = validate_deployment("d.yaml", &deployment_doc()).unwrap();
    assert_eq!(v.warnings, Vec::<String>::new());
    let spec = &v.object.spec;
    assert_eq!(spec.replicas, Some(3));
    assert_eq!(spec.revision_history_limit, Some(10));
    assert_eq!(spec.progress_deadline_seconds, Some(600));
    assert_eq!(spec.min_ready_seconds, Some(0));
    let strategy = spec.strategy.as_ref().unwrap();
    assert_eq!(strategy.type_.as_deref(), Some("RollingUpdate"));
    let ru = strategy.rolling_update.as_ref().unwrap();
    assert_eq!(ru.max_surge, Some(IntOrString::String("25%".into())));
    assert_eq!(ru.max_unavailable, Some(IntOrString::String("25%".into())));
    let pod = spec.template.spec.as_ref().unwrap();
    assert_eq!(pod.restart_policy.as_deref(), Some("Always"));
    assert_eq!(pod.termination_grace_period_seconds, Some(30));
    assert_eq!(pod.priority, Some(0));
    let port = &pod.containers[0].ports.as_ref().unwrap()[0];
    assert_eq!(port.protocol.as_deref(), Some("TCP"));
    assert_eq!(v.object.metadata.namespace.as_deref(), Some("default"));

    let mut doc = deployment_doc();
    doc["spec"].as_object_mut().unwrap().remove("replicas");
    let v = validate_deployment("d.yaml", &doc).unwrap();
    assert_eq!(v.object.spec.replicas, Some(1));

    let mut rs = deployment_doc();
    rs["kind"] = json!("ReplicaSet");
    rs["spec"].as_object_mut().unwrap().remove("replicas");
    let v = validate_replica_set("rs.yaml", &rs).unwrap();
    assert_eq!(v.object.spec.replicas, Some(1));
    let mut ds = deployment_doc();
    ds["kind"] = json!("DaemonSet");
    ds["spec"].as_object_mut().unwrap().remove("replicas");
    let v = validate_daemon_set("ds.yaml", &ds).unwrap();
    let strategy = v.object.spec.update_strategy.as_ref().unwrap();
    let ru = strategy.rolling_update.as_ref().unwrap();
    assert_eq!(
        (ru.max_unavailable.clone(), ru.max_surge.clone()),
        (Some(IntOrString::Int(1)), Some(IntOrString::Int(0)))
    );
    assert_eq!(v.object.spec.revision_history_limit, Some(10));
    // A DaemonSet has no replicas.
    refused_with(
        validate_daemon_set("ds.yaml", &with(ds, "/spec/replicas", json!(2))),
        "ds.yaml",
        "spec.replicas",
        "unknown field",
    );
}

#[test]
#[expect(clippy::too_many_lines, reason = "one table of cases")]
fn workload_refusals_name_the_field() {
    let d = deployment_doc;
    let t = "/spec/template/spec";
    let cases = [
        (
            with(
                d(),
                "/spec/template/metadata/labels",
                json!({"app": "other"}),
            ),
            "spec.template.metadata.labels",
            "selector does not match template labels",
        ),
        (
            with(d(), "/spec/selector", json!({})),
            "spec.selector",
            "empty selector is invalid",
        ),
        (
            with(
                d(),
                "/spec/selector",
                json!({"matchExpressions": [{"key": "app", "operator": "In"}]}),
            ),
            "spec.selector.matchExpressions[0].values",
            "must be specified",
        ),
        (
            with(
                d(),
                "/spec/selector",
                json!({"matchExpressions": [{"key": "app", "operator": "Near", "values": ["x"]}]}),
            ),
            "spec.selector.matchExpressions[0].operator",
            "unsupported value",
        ),
        (
            with(d(), &format!("{t}/restartPolicy"), json!("OnFailure")),
            "spec.template.spec.restartPolicy",
            "must be \"Always\"",
        ),
        (
            with(
                d(),
                &format!("{t}/containers/0/imagePullPolcy"),
                json!("Always"),
            ),
            "spec.template.spec.containers[0].imagePullPolcy",
            "did you mean \"imagePullPolicy\"",
        ),
        (
            with(d(), &format!("{t}/containers/0/image"), json!("")),
            "spec.template.spec.containers[0].image",
            "required",
        ),
        (
            with(d(), &format!("{t}/hostNetwork"), json!(true)),
            "spec.template.spec.hostNetwork",
            "not supported",
        ),
        (
            with(d(), "/spec/replicas", json!(-1)),
            "spec.replicas",
            "greater than or equal to 0",
        ),
        (
            with(d(), "/spec/replicas", json!("3")),
            "spec.replicas",
            "must be an integer",
        ),
        (
            with(
                d(),
                "/spec/strategy",
                json!({"rollingUpdate": {"maxUnavailable": "150%"}}),
            ),
            "spec.strategy.rollingUpdate.maxUnavailable",
            "not be greater than 100%",
        ),
        (
            with(
                d(),
                "/spec/strategy",
                json!({"rollingUpdate": {"maxUnavailable": 0, "maxSurge": "0%"}}),
            ),
            "spec.strategy.rollingUpdate.maxUnavailable",
            "may not be 0 when maxSurge is 0",
        ),
        (
            with(
                d(),
                "/spec/strategy",
                json!({"rollingUpdate": {"maxSurge": "a lot"}}),
            ),
            "spec.strategy.rollingUpdate.maxSurge",
            "percentage",
        ),
        (
            with(
                d(),
                "/spec/strategy",
                json!({"type": "Recreate", "rollingUpdate": {"maxSurge": 1}}),
            ),
            "spec.strategy.rollingUpdate",
            "Recreate",
        ),
        (
            with(d(), "/spec/strategy", json!({"type": "BlueGreen"})),
            "spec.strategy.type",
            "unsupported value",
        ),
        (
            with(d(), "/spec/progressDeadlineSeconds", json!(5)).pipe_min_ready(10),
            "spec.progressDeadlineSeconds",
            "greater than minReadySeconds",
        ),
        (
            with(d(), "/spec/paused", json!(true)),
            "spec.paused",
            "not supported",
        ),
        (
            with(d(), "/metadata/name", json!("Nginx")),
            "metadata.name",
            "DNS-1123 subdomain",
        ),
        (
            with(
                d(),
                "/metadata/ownerReferences",
                json!([{"apiVersion": "v1", "kind": "X", "name": "x", "uid": "1", "controller": true}, {"apiVersion": "v1", "kind": "Y", "name": "y", "uid": "2", "controller": true}]),
            ),
            "metadata.ownerReferences[1].controller",
            "only one reference",
        ),
    ];
    for (doc, field, why) in cases {
        refused_with(validate_deployment("d.yaml", &doc), "d.yaml", field, why);
    }
    refused_with(
        validate_deployment(
            "d.yaml",
            &with(d(), "/apiVersion", json!("extensions/v1beta1")),
        ),
        "d.yaml",
        "apiVersion",
        "expected \"apps/v1\"",
    );
}

trait MinReady {
    fn pipe_min_ready(self, seconds: i64) -> Value;
}

impl MinReady for Value {
    fn pipe_min_ready(self, seconds: i64) -> Value {
        with(self, "/spec/minReadySeconds", json!(seconds))
    }
}

/// A pod using every scheduling field weir-control reads.
fn scheduled_pod() -> Value {
    let mut doc = pod_with("/spec", "nodeSelector", json!({"disktype": "ssd"}));
    let spec = doc["spec"].as_object_mut().unwrap();
    spec.insert("nodeName".into(), json!("node-1"));
    spec.insert("priorityClassName".into(), json!("system-node-critical"));
    spec.insert("preemptionPolicy".into(), json!("Never"));
    spec.insert("tolerations".into(), json!([
        {"key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300},
        {"key": "dedicated", "value": "gpu", "effect": "NoSchedule"},
    ]));
    spec.insert("affinity".into(), json!({
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
                {"matchExpressions": [{"key": "kubernetes.io/os", "operator": "In", "values": ["linux"]}]},
                {"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["node-1"]}]},
            ]},
            "preferredDuringSchedulingIgnoredDuringExecution": [
                {"weight": 10, "preference": {"matchExpressions": [{"key": "cpus", "operator": "Gt", "values": ["4"]}]}},
            ],
        },
        "podAntiAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": [
                {"labelSelector": {"matchLabels": {"app": "web"}}, "topologyKey": "kubernetes.io/hostname"},
            ],
            "preferredDuringSchedulingIgnoredDuringExecution": [
                {"weight": 100, "podAffinityTerm": {"labelSelector": {"matchExpressions": [{"key": "app", "operator": "Exists"}]}, "topologyKey": "zone", "namespaces": ["default"]}},
            ],
        },
    }));
    doc["spec"]["containers"][0]["ports"][0]["hostPort"] = json!(8080);
    doc
}

#[test]
fn cluster_pods_use_the_scheduling_fields() {
    let v = validate_cluster_pod(FILE, &scheduled_pod()).unwrap();
    assert_eq!(v.warnings, Vec::<String>::new());
    let spec = v.pod.spec.as_ref().unwrap();
    assert_eq!(spec.priority, Some(2_000_001_000));
    assert_eq!(spec.node_name.as_deref(), Some("node-1"));
    assert_eq!(spec.tolerations.as_ref().unwrap().len(), 2);
    assert!(spec.affinity.as_ref().unwrap().pod_anti_affinity.is_some());
    assert_eq!(
        spec.containers[0].ports.as_ref().unwrap()[0].host_port,
        Some(8080)
    );
    // The standalone agent refuses the host port and ignores the rest.
    refused_with(
        validate_pod(FILE, &scheduled_pod()),
        FILE,
        "spec.containers[0].ports[0].hostPort",
        "not supported",
    );
    let mut alone = scheduled_pod();
    alone["spec"]["containers"][0]["ports"][0]["hostPort"] = json!(0);
    let v = validate_pod(FILE, &alone).unwrap();
    let mut fields: Vec<&str> = v
        .warnings
        .iter()
        .map(|w| w.split(": ").nth(1).unwrap())
        .collect();
    fields.sort_unstable();
    assert_eq!(
        fields,
        [
            "spec.affinity",
            "spec.nodeName",
            "spec.nodeSelector",
            "spec.preemptionPolicy",
            "spec.priorityClassName",
            "spec.tolerations"
        ]
    );
}

#[test]
#[expect(clippy::too_many_lines, reason = "one table of cases")]
fn cluster_pod_scheduling_fields_are_checked() {
    let p = scheduled_pod;
    let na = "/spec/affinity/nodeAffinity";
    let cases = [
        (
            with(p(), "/spec/nodeName", json!("Node_1")),
            "spec.nodeName",
            "DNS-1123 subdomain",
        ),
        (
            with(p(), "/spec/nodeSelector", json!({"disk type": "ssd"})),
            "spec.nodeSelector[disk type]",
            "invalid key",
        ),
        (
            with(
                p(),
                "/spec/tolerations",
                json!([{"key": "k", "operator": "Exists", "value": "v"}]),
            ),
            "spec.tolerations[0].value",
            "must be empty when operator is Exists",
        ),
        (
            with(
                p(),
                "/spec/tolerations",
                json!([{"operator": "Equal", "value": "v"}]),
            ),
            "spec.tolerations[0].operator",
            "must be Exists when key is empty",
        ),
        (
            with(
                p(),
                "/spec/tolerations",
                json!([{"key": "k", "effect": "NoWay"}]),
            ),
            "spec.tolerations[0].effect",
            "unsupported value",
        ),
        (
            with(
                p(),
                "/spec/tolerations",
                json!([{"key": "k", "effect": "NoSchedule", "tolerationSeconds": 5}]),
            ),
            "spec.tolerations[0].effect",
            "must be NoExecute",
        ),
        (
            with(
                p(),
                &format!("{na}/requiredDuringSchedulingIgnoredDuringExecution"),
                json!({"nodeSelectorTerms": []}),
            ),
            "spec.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution.nodeSelectorTerms",
            "at least one",
        ),
        (
            with(
                p(),
                &format!("{na}/preferredDuringSchedulingIgnoredDuringExecution"),
                json!([{"weight": 0, "preference": {}}]),
            ),
            "spec.affinity.nodeAffinity.preferredDuringSchedulingIgnoredDuringExecution[0].weight",
            "range 1-100",
        ),
        (
            with(
                p(),
                &format!("{na}/preferredDuringSchedulingIgnoredDuringExecution"),
                json!([{"weight": 1, "preference": {"matchExpressions": [{"key": "cpus", "operator": "Gt", "values": ["4", "5"]}]}}]),
            ),
            "spec.affinity.nodeAffinity.preferredDuringSchedulingIgnoredDuringExecution[0].preference.matchExpressions[0].values",
            "exactly one integer",
        ),
        (
            with(
                p(),
                &format!("{na}/requiredDuringSchedulingIgnoredDuringExecution"),
                json!({"nodeSelectorTerms": [{"matchFields": [{"key": "spec.unschedulable", "operator": "In", "values": ["true"]}]}]}),
            ),
            "spec.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution.nodeSelectorTerms[0].matchFields[0].key",
            "metadata.name",
        ),
        (
            with(
                p(),
                "/spec/affinity/podAffinity",
                json!({"requiredDuringSchedulingIgnoredDuringExecution": [{"labelSelector": {}}]}),
            ),
            "spec.affinity.podAffinity.requiredDuringSchedulingIgnoredDuringExecution[0].topologyKey",
            "required",
        ),
        (
            with(
                p(),
                "/spec/affinity/podAffinity",
                json!({"requiredDuringSchedulingIgnoredDuringExecution": [{"topologyKey": "zone", "namespaceSelector": {"matchLabels": {"a": "b"}}}]}),
            ),
            "spec.affinity.podAffinity.requiredDuringSchedulingIgnoredDuringExecution[0].namespaceSelector",
            "not supported",
        ),
        (
            with(p(), "/spec/priorityClassName", json!("high")),
            "spec.priorityClassName",
            "PriorityClass",
        ),
        (
            with(p(), "/spec/priority", json!(5)),
            "spec.priority",
            "does not match",
        ),
        (
            with(p(), "/spec/preemptionPolicy", json!("Always")),
            "spec.preemptionPolicy",
            "unsupported value",
        ),
        (
            with(p(), "/spec/containers/0/ports/0/hostPort", json!(70000)),
            "spec.containers[0].ports[0].hostPort",
            "between 1 and 65535",
        ),
    ];
    for (doc, field, why) in cases {
        refused_with(validate_cluster_pod(FILE, &doc), FILE, field, why);
    }
    // Another class together with an explicit priority is fine.
    let mut custom = with(p(), "/spec/priorityClassName", json!("high"));
    custom["spec"]["priority"] = json!(1000);
    let v = validate_cluster_pod(FILE, &custom).unwrap();
    assert_eq!(v.pod.spec.unwrap().priority, Some(1000));
    // Two containers may not take the same host port.
    let mut two = p();
    two["spec"]["containers"]
        .as_array_mut()
        .unwrap()
        .push(json!({"name": "b", "image": "busybox", "ports": [{"containerPort": 9090, "hostPort": 8080}]}));
    refused_with(
        validate_cluster_pod(FILE, &two),
        FILE,
        "spec.containers[1].ports[0].hostPort",
        "duplicate host port 8080/TCP",
    );
}

#[test]
fn nodes_and_events_are_checked() {
    let node = |spec: Value| json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-1", "labels": {"kubernetes.io/hostname": "node-1"}}, "spec": spec});
    let v = validate_node("n", &node(json!({"podCIDR": "10.244.1.0/24", "unschedulable": true, "providerID": "weir://node-1",
        "taints": [{"key": "node.kubernetes.io/unreachable", "effect": "NoExecute", "timeAdded": "2024-01-01T00:00:00Z"}]}))).unwrap();
    assert_eq!(
        v.object.spec.as_ref().unwrap().pod_cidrs,
        Some(vec!["10.244.1.0/24".to_owned()])
    );
    assert_eq!(v.object.metadata.namespace, None);
    let v = validate_node("n", &node(json!({}))).unwrap();
    assert_eq!(v.object.spec.unwrap().pod_cidrs, None);
    for (spec, field, why) in [
        (
            json!({"podCIDR": "10.244.1.0"}),
            "spec.podCIDR",
            "not a valid CIDR",
        ),
        (
            json!({"podCIDR": "10.244.1.0/24", "podCIDRs": ["10.244.2.0/24"]}),
            "spec.podCIDRs[0]",
            "must match spec.podCIDR",
        ),
        (
            json!({"podCIDRs": ["10.244.1.0/24", "10.245.0.0/24"]}),
            "spec.podCIDRs[1]",
            "one CIDR for each IP family",
        ),
        (
            json!({"taints": [{"key": "k", "effect": "Sometimes"}]}),
            "spec.taints[0].effect",
            "unsupported value",
        ),
        (
            json!({"taints": [{"key": "k"}]}),
            "spec.taints[0].effect",
            "required",
        ),
        (
            json!({"taints": [{"key": "k", "effect": "NoSchedule"}, {"key": "k", "value": "v", "effect": "NoSchedule"}]}),
            "spec.taints[1]",
            "unique by key and effect",
        ),
        (
            json!({"unschedulable": "yes"}),
            "spec.unschedulable",
            "true or false",
        ),
    ] {
        refused_with(validate_node("n", &node(spec)), "n", field, why);
    }
    let mut namespaced = node(json!({}));
    namespaced["metadata"]["namespace"] = json!("default");
    refused_with(
        validate_node("n", &namespaced),
        "n",
        "metadata.namespace",
        "cluster-scoped",
    );

    let event = |extra: Value| {
        let mut e = json!({"apiVersion": "v1", "kind": "Event", "metadata": {"name": "web.1", "namespace": "default"},
            "involvedObject": {"kind": "Pod", "name": "web", "namespace": "default", "uid": "u"},
            "reason": "Scheduled", "message": "assigned", "type": "Normal", "source": {"component": "default-scheduler"},
            "firstTimestamp": "2024-01-01T00:00:00Z", "lastTimestamp": "2024-01-01T00:00:00Z", "count": 1});
        e.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        e
    };
    validate_event("e", &event(json!({}))).unwrap();
    refused_with(
        validate_event("e", &event(json!({"type": "Info"}))),
        "e",
        "type",
        "unsupported value",
    );
    refused_with(
        validate_event(
            "e",
            &event(json!({"involvedObject": {"kind": "Pod", "name": "web", "namespace": "other"}})),
        ),
        "e",
        "involvedObject.namespace",
        "does not match",
    );
    refused_with(
        validate_event("e", &event(json!({"involvedObject": {"kind": "Pod"}}))),
        "e",
        "involvedObject.name",
        "required",
    );
    refused_with(
        validate_event("e", &event(json!({"severity": "high"}))),
        "e",
        "severity",
        "unknown field",
    );
}

#[test]
fn probes_are_checked_and_defaulted() {
    let probe = json!({ "httpGet": { "path": "/healthz", "port": 8080 } });
    let v = validate_pod(
        FILE,
        &pod_with("/spec/containers/0", "readinessProbe", probe),
    )
    .unwrap();
    assert!(v.warnings.is_empty(), "{:?}", v.warnings);
    let spec = v.pod.spec.unwrap();
    let p = spec.containers[0].readiness_probe.clone().unwrap();
    assert_eq!(
        (
            p.initial_delay_seconds,
            p.period_seconds,
            p.timeout_seconds,
            p.success_threshold,
            p.failure_threshold
        ),
        (Some(0), Some(10), Some(1), Some(1), Some(3))
    );
    assert_eq!(p.http_get.unwrap().scheme.as_deref(), Some("HTTP"));

    // A named port of the container is accepted; exec and tcpSocket too.
    let mut doc = pod_with(
        "/spec/containers/0",
        "livenessProbe",
        json!({ "tcpSocket": { "port": "web" }, "periodSeconds": 2 }),
    );
    doc["spec"]["containers"][0]["ports"][0]["name"] = json!("web");
    doc["spec"]["containers"][0]["startupProbe"] =
        json!({ "exec": { "command": ["cat", "/tmp/ok"] }, "failureThreshold": 30 });
    validate_pod(FILE, &doc).unwrap();
}

#[test]
fn bad_probes_are_refused() {
    let bad = [
        (
            json!({}),
            "spec.containers[0].livenessProbe",
            "exactly one handler",
        ),
        (
            json!({ "tcpSocket": { "port": 80 }, "exec": { "command": ["true"] } }),
            "spec.containers[0].livenessProbe",
            "found 2",
        ),
        (
            json!({ "tcpSocket": { "port": 0 } }),
            "spec.containers[0].livenessProbe.tcpSocket.port",
            "between 1 and 65535",
        ),
        (
            json!({ "tcpSocket": { "port": "nope" } }),
            "spec.containers[0].livenessProbe.tcpSocket.port",
            "container's ports",
        ),
        (
            json!({ "httpGet": { "port": 80, "scheme": "HTTPS" } }),
            "spec.containers[0].livenessProbe.httpGet.scheme",
            "plain HTTP",
        ),
        (
            json!({ "httpGet": { "port": 80, "host": "example.com" } }),
            "spec.containers[0].livenessProbe.httpGet.host",
            "pod IP",
        ),
        (
            json!({ "httpGet": { "port": 80, "path": "x" } }),
            "spec.containers[0].livenessProbe.httpGet.path",
            "start with",
        ),
        (
            json!({ "httpGet": { "port": 80, "httpHeaders": [{ "name": "a b", "value": "x" }] } }),
            "spec.containers[0].livenessProbe.httpGet.httpHeaders[0].name",
            "header name",
        ),
        (
            json!({ "exec": { "command": [] } }),
            "spec.containers[0].livenessProbe.exec.command",
            "empty",
        ),
        (
            json!({ "grpc": { "port": 80 } }),
            "spec.containers[0].livenessProbe.grpc",
            "gRPC",
        ),
        (
            json!({ "tcpSocket": { "port": 80 }, "periodSeconds": 0 }),
            "spec.containers[0].livenessProbe.periodSeconds",
            ">= 1",
        ),
        (
            json!({ "tcpSocket": { "port": 80 }, "timeoutSeconds": 0 }),
            "spec.containers[0].livenessProbe.timeoutSeconds",
            ">= 1",
        ),
        (
            json!({ "tcpSocket": { "port": 80 }, "initialDelaySeconds": -1 }),
            "spec.containers[0].livenessProbe.initialDelaySeconds",
            ">= 0",
        ),
        (
            json!({ "tcpSocket": { "port": 80 }, "successThreshold": 2 }),
            "spec.containers[0].livenessProbe.successThreshold",
            "must be 1",
        ),
        (
            json!({ "tcpSocket": { "port": 80 }, "terminationGracePeriodSeconds": 5 }),
            "spec.containers[0].livenessProbe.terminationGracePeriodSeconds",
            "grace",
        ),
    ];
    for (probe, field, why) in bad {
        refused_with(
            validate_pod(
                FILE,
                &pod_with("/spec/containers/0", "livenessProbe", probe),
            ),
            FILE,
            field,
            why,
        );
    }
    // successThreshold > 1 is fine for readiness.
    validate_pod(
        FILE,
        &pod_with(
            "/spec/containers/0",
            "readinessProbe",
            json!({ "tcpSocket": { "port": 80 }, "successThreshold": 2 }),
        ),
    )
    .unwrap();
}
