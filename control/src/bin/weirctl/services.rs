//! Services and EndpointSlices as kubectl shows them: the `get` columns
//! (TYPE, CLUSTER-IP, EXTERNAL-IP, PORT(S); ADDRESSTYPE, PORTS, ENDPOINTS)
//! and the `describe` sections.

use serde_json::Value;

use crate::doc::Doc;
use crate::format::{int, labels_inline, or};

/// How many addresses kubectl lists before `+ N more...`.
const MAX_LISTED: usize = 3;

/// A Service's row after NAME: TYPE, CLUSTER-IP, EXTERNAL-IP, PORT(S), AGE
/// (and SELECTOR when wide).
pub fn service_cells(v: &Value, created: String, wide: bool) -> Vec<String> {
    let spec = &v["spec"];
    let mut cells = vec![
        service_type(spec).to_owned(),
        cluster_ip(spec).to_owned(),
        external_ip(spec),
        port_string(spec),
        created,
    ];
    if wide {
        cells.push(labels_inline(&spec["selector"]));
    }
    cells
}

fn service_type(spec: &Value) -> &str {
    or(&spec["type"], "ClusterIP")
}

/// `spec.clusterIPs[0]`, else `spec.clusterIP`, else `<none>`.
fn cluster_ip(spec: &Value) -> &str {
    match spec["clusterIPs"][0].as_str().filter(|s| !s.is_empty()) {
        Some(ip) => ip,
        None => or(&spec["clusterIP"], "<none>"),
    }
}

/// kubectl's EXTERNAL-IP: external IPs for ClusterIP and NodePort services
/// (`<none>` without), the name of an ExternalName service, `<pending>` for a
/// LoadBalancer without ingress.
fn external_ip(spec: &Value) -> String {
    let external: Vec<&str> = spec["externalIPs"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    match service_type(spec) {
        "ExternalName" => or(&spec["externalName"], "<none>").to_owned(),
        "LoadBalancer" if external.is_empty() => "<pending>".to_owned(),
        _ if external.is_empty() => "<none>".to_owned(),
        _ => external.join(","),
    }
}

fn protocol(p: &Value) -> &str {
    or(&p["protocol"], "TCP")
}

/// PORT(S): `80/TCP`, `80:30080/TCP` with a node port, comma-separated;
/// `<none>` without ports.
pub fn port_string(spec: &Value) -> String {
    let ports: Vec<String> = spec["ports"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| {
            let node_port = int(&p["nodePort"]);
            if node_port > 0 {
                format!("{}:{node_port}/{}", int(&p["port"]), protocol(p))
            } else {
                format!("{}/{}", int(&p["port"]), protocol(p))
            }
        })
        .collect();
    if ports.is_empty() {
        "<none>".to_owned()
    } else {
        ports.join(",")
    }
}

/// An EndpointSlice's row after NAME: ADDRESSTYPE, PORTS, ENDPOINTS, AGE.
pub fn endpoint_slice_cells(v: &Value, created: String) -> Vec<String> {
    let ports: Vec<String> = v["ports"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| match (p["port"].as_i64(), p["name"].as_str()) {
            (Some(n), _) => n.to_string(),
            (None, Some(name)) => name.to_owned(),
            (None, None) => "*".to_owned(),
        })
        .collect();
    // As kubectl: every address, whatever its conditions.
    let addresses: Vec<String> = v["endpoints"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|e| e["addresses"].as_array().into_iter().flatten())
        .filter_map(|a| a.as_str().map(str::to_owned))
        .collect();
    vec![
        or(&v["addressType"], "").to_owned(),
        list_with_more(&ports, "<unset>"),
        list_with_more(&addresses, "<unset>"),
        created,
    ]
}

/// The first three, `+ N more...` after them; `empty` if there are none.
fn list_with_more(items: &[String], empty: &str) -> String {
    if items.is_empty() {
        return empty.to_owned();
    }
    let shown = items[..items.len().min(MAX_LISTED)].join(",");
    if items.len() > MAX_LISTED {
        format!("{shown} + {} more...", items.len() - MAX_LISTED)
    } else {
        shown
    }
}

/// Whether an endpoint is ready (unset counts as ready, as kubectl reads it).
fn ready(endpoint: &Value) -> bool {
    endpoint["conditions"]["ready"] != false
}

/// describe's Endpoints of one service port: the ready addresses of the
/// slices with `address:port` of the slice port of that name; `<none>`
/// without slices.
pub fn endpoints_of_port(slices: &[Value], port_name: &str) -> String {
    if slices.is_empty() {
        return "<none>".to_owned();
    }
    let mut list: Vec<String> = Vec::new();
    for s in slices {
        let endpoints = s["endpoints"].as_array().map_or(&[][..], Vec::as_slice);
        let ready_addresses = endpoints
            .iter()
            .filter(|e| ready(e))
            .filter_map(|e| e["addresses"][0].as_str());
        match s["ports"].as_array().filter(|p| !p.is_empty()) {
            None => list.extend(ready_addresses.map(str::to_owned)),
            Some(ports) => {
                for p in ports
                    .iter()
                    .filter(|p| p["name"].as_str().unwrap_or_default() == port_name)
                {
                    let n = int(&p["port"]);
                    list.extend(ready_addresses.clone().map(|a| format!("{a}:{n}")));
                }
            }
        }
    }
    // kubectl prints nothing for a slice without ready endpoints.
    list_with_more(&list, "")
}

/// `describe svc`'s lines between the annotations and the events.
pub fn describe_service(d: &mut Doc, v: &Value, slices: &[Value]) {
    let spec = &v["spec"];
    d.kv(0, "Selector", &labels_inline(&spec["selector"]));
    d.kv(0, "Type", service_type(spec));
    if let Some(p) = spec["ipFamilyPolicy"].as_str() {
        d.kv(0, "IP Family Policy", p);
    }
    let families = strings(&spec["ipFamilies"]);
    d.kv(
        0,
        "IP Families",
        &if families.is_empty() {
            "<none>".to_owned()
        } else {
            families.join(",")
        },
    );
    d.kv(0, "IP", or(&spec["clusterIP"], ""));
    let ips = strings(&spec["clusterIPs"]);
    if !ips.is_empty() {
        d.kv(0, "IPs", &ips.join(","));
    }
    let external = strings(&spec["externalIPs"]);
    if !external.is_empty() {
        d.kv(0, "External IPs", &external.join(","));
    }
    if let Some(name) = spec["externalName"].as_str().filter(|n| !n.is_empty()) {
        d.kv(0, "External Name", name);
    }
    for p in spec["ports"].as_array().into_iter().flatten() {
        let name = or(&p["name"], "<unset>");
        let proto = protocol(p);
        d.line(0, &["Port:", name, &format!("{}/{proto}", int(&p["port"]))]);
        let target = match &p["targetPort"] {
            Value::String(s) => s.clone(),
            Value::Number(n) => n.to_string(),
            _ => int(&p["port"]).to_string(),
        };
        d.kv(0, "TargetPort", &format!("{target}/{proto}"));
        let node_port = int(&p["nodePort"]);
        if node_port != 0 {
            d.line(0, &["NodePort:", name, &format!("{node_port}/{proto}")]);
        }
        d.kv(
            0,
            "Endpoints",
            &endpoints_of_port(slices, p["name"].as_str().unwrap_or_default()),
        );
    }
    d.kv(0, "Session Affinity", or(&spec["sessionAffinity"], "None"));
    if let Some(p) = spec["externalTrafficPolicy"]
        .as_str()
        .filter(|p| !p.is_empty())
    {
        d.kv(0, "External Traffic Policy", p);
    }
    if let Some(p) = spec["internalTrafficPolicy"]
        .as_str()
        .filter(|p| !p.is_empty())
    {
        d.kv(0, "Internal Traffic Policy", p);
    }
}

/// `describe endpointslice`'s lines between the annotations and the events.
pub fn describe_endpoint_slice(d: &mut Doc, v: &Value) {
    d.field(0, "AddressType", &v["addressType"]);
    match v["ports"].as_array().filter(|p| !p.is_empty()) {
        None => d.kv(0, "Ports", "<unset>"),
        Some(ports) => {
            d.line(0, &["Ports:"]);
            d.line(1, &["Name", "Port", "Protocol"]);
            d.line(1, &["----", "----", "--------"]);
            for p in ports {
                let port = p["port"]
                    .as_i64()
                    .map_or_else(|| "<unset>".to_owned(), |n| n.to_string());
                d.line(1, &[or(&p["name"], "<unset>"), &port, protocol(p)]);
            }
        }
    }
    match v["endpoints"].as_array().filter(|e| !e.is_empty()) {
        None => d.kv(0, "Endpoints", "<none>"),
        Some(endpoints) => {
            d.line(0, &["Endpoints:"]);
            for e in endpoints {
                d.kv(1, "- Addresses", &strings(&e["addresses"]).join(","));
                d.line(2, &["Conditions:"]);
                for c in ["ready", "serving", "terminating"] {
                    let value = e["conditions"][c]
                        .as_bool()
                        .map_or_else(|| "<unset>".to_owned(), |b| b.to_string());
                    let mut key = c.to_owned();
                    key[..1].make_ascii_uppercase();
                    d.kv(3, &key, &value);
                }
                d.kv(2, "Hostname", or(&e["hostname"], "<unset>"));
                let target = &e["targetRef"];
                if target.is_object() {
                    d.kv(
                        2,
                        "TargetRef",
                        &format!("{}/{}", or(&target["kind"], ""), or(&target["name"], "")),
                    );
                }
                d.kv(2, "NodeName", or(&e["nodeName"], "<unset>"));
                d.kv(2, "Zone", or(&e["zone"], "<unset>"));
            }
        }
    }
}

fn strings(v: &Value) -> Vec<&str> {
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn node_port_service() -> Value {
        json!({"metadata": {"name": "web", "namespace": "default", "labels": {"app": "web"}},
            "spec": {"type": "NodePort", "clusterIP": "10.96.0.12", "clusterIPs": ["10.96.0.12"],
                "ipFamilies": ["IPv4"], "ipFamilyPolicy": "SingleStack",
                "selector": {"tier": "front", "app": "web"},
                "ports": [{"name": "http", "port": 80, "targetPort": 8080, "nodePort": 30080, "protocol": "TCP"},
                          {"name": "dns", "port": 53, "targetPort": "dns", "protocol": "UDP"}],
                "sessionAffinity": "None", "externalTrafficPolicy": "Cluster"}})
    }

    fn slice(addresses: &[(&str, bool)]) -> Value {
        let endpoints: Vec<Value> = addresses
            .iter()
            .map(|(a, r)| json!({"addresses": [a], "conditions": {"ready": r}}))
            .collect();
        json!({"metadata": {"name": "web"}, "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}, {"name": "dns", "port": 5353, "protocol": "UDP"}],
            "endpoints": endpoints})
    }

    #[test]
    fn service_columns_follow_kubectl() {
        let v = node_port_service();
        assert_eq!(
            service_cells(&v, "5m".into(), true),
            [
                "NodePort",
                "10.96.0.12",
                "<none>",
                "80:30080/TCP,53/UDP",
                "5m",
                "app=web,tier=front"
            ]
        );
        let headless = json!({"spec": {"clusterIP": "None", "ports": []}});
        assert_eq!(
            service_cells(&headless, "1s".into(), true),
            ["ClusterIP", "None", "<none>", "<none>", "1s", "<none>"]
        );
        let lb = json!({"spec": {"type": "LoadBalancer", "ports": [{"port": 443}]}});
        assert_eq!(
            service_cells(&lb, "1s".into(), false),
            ["LoadBalancer", "<none>", "<pending>", "443/TCP", "1s"]
        );
    }

    #[test]
    fn endpoint_slice_columns_follow_kubectl() {
        let s = slice(&[
            ("10.1.0.1", true),
            ("10.1.0.2", false),
            ("10.1.0.3", true),
            ("10.1.0.4", true),
            ("10.1.0.5", true),
        ]);
        assert_eq!(
            endpoint_slice_cells(&s, "2m".into()),
            [
                "IPv4",
                "8080,5353",
                "10.1.0.1,10.1.0.2,10.1.0.3 + 2 more...",
                "2m"
            ]
        );
        let empty = json!({"addressType": "IPv4", "ports": null, "endpoints": []});
        assert_eq!(
            endpoint_slice_cells(&empty, "2m".into()),
            ["IPv4", "<unset>", "<unset>", "2m"]
        );
    }

    #[test]
    fn endpoints_of_a_port_are_the_ready_ones() {
        let s = slice(&[("10.1.0.1", true), ("10.1.0.2", false)]);
        assert_eq!(
            endpoints_of_port(std::slice::from_ref(&s), "http"),
            "10.1.0.1:8080"
        );
        assert_eq!(endpoints_of_port(&[s], "dns"), "10.1.0.1:5353");
        assert_eq!(endpoints_of_port(&[], "http"), "<none>");
        let none_ready = slice(&[("10.1.0.2", false)]);
        assert_eq!(endpoints_of_port(&[none_ready], "http"), "");
        let many = slice(&[
            ("10.1.0.1", true),
            ("10.1.0.2", true),
            ("10.1.0.3", true),
            ("10.1.0.4", true),
        ]);
        assert_eq!(
            endpoints_of_port(&[many], "http"),
            "10.1.0.1:8080,10.1.0.2:8080,10.1.0.3:8080 + 1 more..."
        );
    }

    #[test]
    fn describe_service_lists_each_port() {
        let mut d = Doc::default();
        describe_service(
            &mut d,
            &node_port_service(),
            &[slice(&[("10.1.0.1", true)])],
        );
        let text = d.render();
        let expected = "\
Selector:                 app=web,tier=front
Type:                     NodePort
IP Family Policy:         SingleStack
IP Families:              IPv4
IP:                       10.96.0.12
IPs:                      10.96.0.12
Port:                     http  80/TCP
TargetPort:               8080/TCP
NodePort:                 http  30080/TCP
Endpoints:                10.1.0.1:8080
Port:                     dns  53/UDP
TargetPort:               dns/UDP
Endpoints:                10.1.0.1:5353
Session Affinity:         None
External Traffic Policy:  Cluster
";
        assert_eq!(text, expected);
    }
}
