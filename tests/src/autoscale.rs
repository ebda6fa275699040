//! The pieces of the autoscaling e2e test and `bench autoscale`: a
//! Deployment of busybox httpd pods behind a Service, HPAs on it, a
//! bounded request loop through the Service's VIP, and readings of the
//! replica count and the Ready pods.

use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, SocketAddr},
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use serde_json::{Value, json};

use crate::api::{Api, condition_status};
use crate::http_get_in;

/// A Deployment of busybox httpd pods named `name`: `/` answers the pod
/// name, `/cgi-bin/burn` burns about 50 ms of CPU.
/// Readiness probe every second, 100m CPU requested.
#[must_use]
pub fn deployment(name: &str) -> Value {
    let script = "#!/bin/sh\ni=0; while [ $i -lt 20000 ]; do i=$((i+1)); done\n\
        echo Content-Type: text/plain; echo; echo burnt\n";
    let setup = format!(
        "mkdir -p /srv/cgi-bin && hostname > /srv/index.html && \
         printf '%s' '{script}' > /srv/cgi-bin/burn && chmod +x /srv/cgi-bin/burn && \
         exec httpd -f -p 80 -h /srv"
    );
    json!({"apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"replicas": 1, "selector": {"matchLabels": {"app": name}},
            "template": {"metadata": {"labels": {"app": name}},
                "spec": {"terminationGracePeriodSeconds": 1, "containers": [{"name": "web", "image": "busybox",
                    "command": ["sh", "-c", setup],
                    "ports": [{"name": "http", "containerPort": 80}],
                    "resources": {"requests": {"cpu": "100m", "memory": "16Mi"}},
                    "readinessProbe": {"httpGet": {"path": "/", "port": 80},
                        "periodSeconds": 1, "failureThreshold": 1}}]}}}})
}

/// A `ClusterIP` Service `name` on port 80 for the pods of [`deployment`].
#[must_use]
pub fn service(name: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"selector": {"app": name},
            "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}})
}

/// An HPA on Deployment `name` (1..=3 replicas) with `metric`, scaling up
/// at once and down after `down_window_s`.
#[must_use]
pub fn hpa(name: &str, metric: &Value, down_window_s: u64) -> Value {
    json!({"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": name},
            "minReplicas": 1, "maxReplicas": 3, "metrics": [metric],
            "behavior": {"scaleDown": {"stabilizationWindowSeconds": down_window_s}}}})
}

/// A bounded request loop from a node's netns to `vip:80/<path>`: one
/// request every `every` (each on a new connection) until stopped, until
/// `limit` or `max` requests. Every fourth request also asks `/`,
/// to remember which pods answered.
pub struct Load {
    stop: Arc<AtomicBool>,
    answered: Arc<Mutex<Vec<String>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Load {
    /// Starts the loop.
    #[must_use]
    pub fn start(
        netns: PathBuf,
        vip: Ipv4Addr,
        path: &str,
        every: Duration,
        max: usize,
        limit: Duration,
    ) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let answered = Arc::new(Mutex::new(Vec::new()));
        let (s, a, path) = (Arc::clone(&stop), Arc::clone(&answered), path.to_owned());
        let thread = std::thread::spawn(move || {
            let started = Instant::now();
            for i in 0..max {
                if s.load(Ordering::Relaxed) || started.elapsed() > limit {
                    break;
                }
                let due = started + every * u32::try_from(i).unwrap_or(u32::MAX);
                if let Some(wait) = due.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
                let addr = SocketAddr::from((vip, 80));
                let _ = http_get_in(&netns, addr, &path, Duration::from_secs(2));
                // Every fourth time, also ask `/` (the pod's name): who
                // answers through the Service now.
                if i % 4 == 0
                    && let Ok((200, body)) = http_get_in(&netns, addr, "/", Duration::from_secs(2))
                    && let Ok(mut a) = a.lock()
                {
                    a.push(body.trim().to_owned());
                }
            }
        });
        Self {
            stop,
            answered,
            thread: Some(thread),
        }
    }

    /// The pods that answered so far.
    #[must_use]
    pub fn answered_by(&self) -> BTreeSet<String> {
        self.answered
            .lock()
            .map(|a| a.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// How many pod names were collected.
    #[must_use]
    pub fn answers(&self) -> usize {
        self.answered.lock().map(|a| a.len()).unwrap_or_default()
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// `spec.replicas` of Deployment `name`.
#[must_use]
pub fn replicas(api: &Api, name: &str) -> Option<i64> {
    api.get("Deployment", "default", name)?["spec"]["replicas"].as_i64()
}

/// The names of `app`'s pods that are Ready.
#[must_use]
pub fn ready_pods(api: &Api, app: &str) -> BTreeSet<String> {
    api.pods(&format!("app={app}"))
        .unwrap_or_default()
        .iter()
        .filter(|p| {
            condition_status(p, "Ready") == "True" && p["metadata"]["deletionTimestamp"].is_null()
        })
        .filter_map(|p| p["metadata"]["name"].as_str().map(str::to_owned))
        .collect()
}

/// How often a sequence of replica counts changes direction.
#[must_use]
pub fn reversals(series: &[i64]) -> usize {
    let mut last_dir = 0i64;
    let mut n = 0;
    for w in series.windows(2) {
        let dir = (w[1] - w[0]).signum();
        if dir != 0 {
            if last_dir != 0 && dir != last_dir {
                n += 1;
            }
            last_dir = dir;
        }
    }
    n
}

#[cfg(test)]
mod tests {
    use super::reversals;

    #[test]
    fn reversals_are_counted() {
        assert_eq!(reversals(&[1, 2, 3, 3]), 0);
        assert_eq!(reversals(&[1, 3, 2]), 1);
        assert_eq!(reversals(&[1, 3, 2, 3]), 2);
        assert_eq!(reversals(&[1]), 0);
    }
}
