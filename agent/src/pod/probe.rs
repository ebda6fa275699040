//! Container probes, as kubelet runs them: per container a startup probe
//! (if any) first; liveness and readiness once it succeeded (or at once
//! without one). Each probe waits `initialDelaySeconds` from the container's
//! start, then runs every `periodSeconds`, each attempt bounded by
//! `timeoutSeconds`; a result flips only after `successThreshold`
//! consecutive successes or `failureThreshold` consecutive failures.
//!
//! httpGet and tcpSocket connect to the pod IP from the agent's own network
//! namespace (the node's, which routes to every local pod); exec runs the
//! command in the container through containerd (exit status 0 is success).
//!
//! Every failed attempt is a kubelet `Unhealthy` event ("Readiness probe
//! failed: HTTP probe failed with statuscode: 500"), and a liveness or
//! startup failure that kills the container a `Killing` one ("Container web
//! failed liveness probe, will be restarted"); they go out as [`Note`]s to
//! whoever records events (control mode), which de-duplicates repeats.
//!
//! The probes of one container run consists of one task, owned by the pod's
//! worker through an [`AbortOnDrop`]: it ends when the container stops, the
//! pod stops or the worker ends. Results are held in memory only, as
//! kubelet does: after an agent restart an adopted container starts over
//! (not ready until its readiness probe succeeds again, the startup probe
//! runs again).

use std::{fmt::Write as _, io, net::Ipv4Addr, time::Duration};

use k8s_openapi::{
    api::core::v1::{Container, Probe},
    apimachinery::pkg::util::intstr::IntOrString,
};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
    sync::{broadcast, mpsc},
    time::Instant,
};

use super::Msg;
use crate::cri::Runtime;

/// Which probe.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Restarts the container when it fails.
    Liveness,
    /// Drives the container's `ready`.
    Readiness,
    /// Holds liveness and readiness back until it succeeds; restarts the
    /// container when it fails.
    Startup,
}

impl Kind {
    /// `Liveness`, `Readiness`, `Startup` (as kubelet's event messages say it).
    pub fn name(self) -> &'static str {
        match self {
            Self::Liveness => "Liveness",
            Self::Readiness => "Readiness",
            Self::Startup => "Startup",
        }
    }

    /// `liveness`, `readiness`, `startup` (mid-sentence).
    pub fn lower(self) -> &'static str {
        match self {
            Self::Liveness => "liveness",
            Self::Readiness => "readiness",
            Self::Startup => "startup",
        }
    }
}

/// An event a probe calls for, about a pod (kubelet's `Unhealthy` and
/// `Killing`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Note {
    /// The pod's uid.
    pub pod_uid: String,
    /// `Warning` (`Unhealthy`) or `Normal` (`Killing`).
    pub warning: bool,
    /// `Unhealthy` or `Killing`.
    pub reason: &'static str,
    /// kubelet's message.
    pub message: String,
}

impl Note {
    /// `Unhealthy`: "Readiness probe failed: <why>".
    pub fn unhealthy(pod_uid: &str, kind: Kind, why: &str) -> Self {
        Self {
            pod_uid: pod_uid.to_owned(),
            warning: true,
            reason: "Unhealthy",
            message: format!("{} probe failed: {why}", kind.name()),
        }
    }

    /// `Killing`: "Container web failed liveness probe, will be restarted".
    pub fn killing(pod_uid: &str, container: &str, kind: Kind) -> Self {
        Self {
            pod_uid: pod_uid.to_owned(),
            warning: false,
            reason: "Killing",
            message: format!(
                "Container {container} failed {} probe, will be restarted",
                kind.lower()
            ),
        }
    }
}

/// Where the probe events of one pod go: the node's event sink (lossy: a
/// note nobody takes in time is dropped, events are best effort).
#[derive(Clone, Debug)]
pub struct Recorder {
    /// The node's sink.
    pub sink: broadcast::Sender<Note>,
    /// The pod the probes belong to.
    pub pod_uid: String,
}

impl Recorder {
    fn note(&self, note: Note) {
        // No receiver (standalone) is fine: nobody records events there.
        let _ = self.sink.send(note);
    }
}

/// What one attempt does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Handler {
    /// `GET path` on the pod IP; 200..=399 is success.
    Http {
        /// TCP port.
        port: u16,
        /// Request path (`/` if empty).
        path: String,
        /// Extra request headers.
        headers: Vec<(String, String)>,
    },
    /// A TCP connect to the pod IP.
    Tcp {
        /// TCP port.
        port: u16,
    },
    /// A command in the container; exit status 0 is success.
    Exec {
        /// argv.
        command: Vec<String>,
    },
}

/// A probe with Kubernetes' defaults applied.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Spec {
    /// What to do.
    pub handler: Handler,
    /// Wait from the container's start before the first attempt.
    pub initial_delay: Duration,
    /// Between attempts.
    pub period: Duration,
    /// Bound of one attempt.
    pub timeout: Duration,
    /// Consecutive successes to become successful.
    pub success_threshold: u32,
    /// Consecutive failures to become failed.
    pub failure_threshold: u32,
}

fn secs(v: Option<i32>, default: u64, min: u64) -> Duration {
    Duration::from_secs(
        v.and_then(|v| u64::try_from(v).ok())
            .unwrap_or(default)
            .max(min),
    )
}

fn count(v: Option<i32>, default: u32) -> u32 {
    v.and_then(|v| u32::try_from(v).ok())
        .unwrap_or(default)
        .max(1)
}

/// A port number, or the named port of the container.
fn port(p: &IntOrString, c: &Container) -> Option<u16> {
    match p {
        IntOrString::Int(n) => u16::try_from(*n).ok(),
        IntOrString::String(name) => c
            .ports
            .iter()
            .flatten()
            .find(|cp| cp.name.as_deref() == Some(name.as_str()))
            .and_then(|cp| u16::try_from(cp.container_port).ok()),
    }
}

impl Spec {
    /// The probe of a (validated) container; `None` if it has no usable handler.
    pub fn from_probe(p: &Probe, c: &Container) -> Option<Self> {
        let handler = if let Some(h) = &p.http_get {
            Handler::Http {
                port: port(&h.port, c)?,
                path: h
                    .path
                    .clone()
                    .filter(|p| !p.is_empty())
                    .unwrap_or_else(|| "/".into()),
                headers: h
                    .http_headers
                    .iter()
                    .flatten()
                    .map(|h| (h.name.clone(), h.value.clone()))
                    .collect(),
            }
        } else if let Some(t) = &p.tcp_socket {
            Handler::Tcp {
                port: port(&t.port, c)?,
            }
        } else {
            Handler::Exec {
                command: p.exec.as_ref()?.command.clone().filter(|c| !c.is_empty())?,
            }
        };
        Some(Self {
            handler,
            initial_delay: secs(p.initial_delay_seconds, 0, 0),
            period: secs(p.period_seconds, 10, 1),
            timeout: secs(p.timeout_seconds, 1, 1),
            success_threshold: count(p.success_threshold, 1),
            failure_threshold: count(p.failure_threshold, 3),
        })
    }
}

/// The probes of one container.
#[derive(Clone, Debug, Default)]
pub struct Set {
    /// startupProbe.
    pub startup: Option<Spec>,
    /// livenessProbe.
    pub liveness: Option<Spec>,
    /// readinessProbe.
    pub readiness: Option<Spec>,
}

impl Set {
    /// The probes of a container.
    pub fn of(c: &Container) -> Self {
        let get = |p: &Option<Probe>| p.as_ref().and_then(|p| Spec::from_probe(p, c));
        Self {
            startup: get(&c.startup_probe),
            liveness: get(&c.liveness_probe),
            readiness: get(&c.readiness_probe),
        }
    }

    /// Whether there is nothing to run.
    pub fn is_empty(&self) -> bool {
        self.startup.is_none() && self.liveness.is_none() && self.readiness.is_none()
    }
}

/// kubelet's result counter: the reported result changes only after
/// `threshold` consecutive equal results that differ from it.
#[derive(Clone, Debug)]
pub struct Threshold {
    state: bool,
    last: Option<bool>,
    run: u32,
    successes: u32,
    failures: u32,
}

impl Threshold {
    /// Starts as `initial` (readiness: false; liveness: true; startup: false).
    pub fn new(initial: bool, successes: u32, failures: u32) -> Self {
        Self {
            state: initial,
            last: None,
            run: 0,
            successes: successes.max(1),
            failures: failures.max(1),
        }
    }

    /// The reported result.
    pub fn state(&self) -> bool {
        self.state
    }

    /// Records one attempt; returns the new result when it changed.
    pub fn record(&mut self, ok: bool) -> Option<bool> {
        if self.last == Some(ok) {
            self.run = self.run.saturating_add(1);
        } else {
            self.last = Some(ok);
            self.run = 1;
        }
        let needed = if ok { self.successes } else { self.failures };
        if self.run >= needed && self.state != ok {
            self.state = ok;
            return Some(ok);
        }
        None
    }
}

/// What a container's probe task tells the worker.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// The startup probe succeeded (or there is none).
    Started,
    /// The readiness result changed.
    Ready(bool),
    /// The liveness or startup probe failed: the container must be killed.
    Unhealthy {
        /// Liveness or Startup.
        kind: Kind,
        /// Why the last attempt failed.
        message: String,
    },
}

/// One report to a pod's worker.
#[derive(Debug)]
pub struct Report {
    /// The container.
    pub container: String,
    /// The run of the container the probes belong to (stale runs are ignored).
    pub run: u64,
    /// What happened.
    pub event: Event,
}

/// Aborts the task when dropped.
#[derive(Debug)]
pub struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Where the attempts go.
#[derive(Clone)]
pub struct Target {
    /// The pod IP.
    pub ip: Ipv4Addr,
    /// containerd, for exec.
    pub rt: Runtime,
    /// The container's containerd id.
    pub container_id: String,
}

/// Runs one attempt: `Ok(())` on success, `Err(why)` on failure.
pub async fn attempt(target: &Target, spec: &Spec) -> Result<(), String> {
    match tokio::time::timeout(spec.timeout, attempt_unbounded(target, spec)).await {
        Ok(r) => r,
        Err(_) => Err(timeout_message(target.ip, spec)),
    }
}

/// Why an attempt that ran out of time failed, worded as kubelet's.
fn timeout_message(ip: Ipv4Addr, spec: &Spec) -> String {
    match &spec.handler {
        Handler::Http { port, path, .. } => format!(
            "Get \"http://{ip}:{port}{path}\": context deadline exceeded (Client.Timeout exceeded while awaiting headers)"
        ),
        Handler::Tcp { port } => format!("dial tcp {ip}:{port}: i/o timeout"),
        Handler::Exec { command } => format!(
            "command {:?} timed out after {}s",
            command.join(" "),
            spec.timeout.as_secs()
        ),
    }
}

/// A connect error as Go's net package words it (kubelet's messages are
/// Go's): "connect: connection refused".
fn dial_error(e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::ConnectionRefused => "connect: connection refused".into(),
        io::ErrorKind::HostUnreachable => "connect: no route to host".into(),
        io::ErrorKind::NetworkUnreachable => "connect: network is unreachable".into(),
        io::ErrorKind::TimedOut => "i/o timeout".into(),
        _ => io_error(e),
    }
}

/// An I/O error without Rust's " (os error N)" tail, lower-case as Go's.
fn io_error(e: &io::Error) -> String {
    let text = e.to_string();
    let text = text
        .split_once(" (os error")
        .map_or(text.as_str(), |(head, _)| head);
    let mut chars = text.chars();
    chars
        .next()
        .map_or_else(String::new, |c| c.to_lowercase().chain(chars).collect())
}

async fn attempt_unbounded(target: &Target, spec: &Spec) -> Result<(), String> {
    match &spec.handler {
        Handler::Tcp { port } => TcpStream::connect((target.ip, *port))
            .await
            .map(drop)
            .map_err(|e| format!("dial tcp {}:{port}: {}", target.ip, dial_error(&e))),
        Handler::Http {
            port,
            path,
            headers,
        } => http_get(target.ip, *port, path, headers).await,
        Handler::Exec { command } => {
            match target
                .rt
                .exec(&target.container_id, command, spec.timeout)
                .await
            {
                Ok(Some(0)) => Ok(()),
                Ok(Some(code)) => Err(format!(
                    "command {:?} exited with {code}",
                    command.join(" ")
                )),
                Ok(None) => Err(timeout_message(target.ip, spec)),
                Err(e) => Err(e.to_string()),
            }
        }
    }
}

/// `GET http://ip:port/path`; success is a status of 200..=399.
async fn http_get(
    ip: Ipv4Addr,
    port: u16,
    path: &str,
    headers: &[(String, String)],
) -> Result<(), String> {
    let url = format!("http://{ip}:{port}{path}");
    let mut s = TcpStream::connect((ip, port))
        .await
        .map_err(|e| format!("Get \"{url}\": dial tcp {ip}:{port}: {}", dial_error(&e)))?;
    let mut req = format!("GET {path} HTTP/1.1\r\n");
    let has = |n: &str| headers.iter().any(|(k, _)| k.eq_ignore_ascii_case(n));
    if !has("host") {
        let _ = write!(req, "Host: {ip}:{port}\r\n");
    }
    if !has("user-agent") {
        req.push_str("User-Agent: kube-probe/weir\r\n");
    }
    if !has("accept") {
        req.push_str("Accept: */*\r\n");
    }
    for (k, v) in headers {
        let _ = write!(req, "{k}: {v}\r\n");
    }
    req.push_str("Connection: close\r\n\r\n");
    s.write_all(req.as_bytes())
        .await
        .map_err(|e| format!("Get \"{url}\": {}", io_error(&e)))?;
    let mut buf = Vec::with_capacity(256);
    let mut chunk = [0u8; 256];
    while !buf.contains(&b'\n') && buf.len() < 4096 {
        let n = s
            .read(&mut chunk)
            .await
            .map_err(|e| format!("Get \"{url}\": {}", io_error(&e)))?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    if buf.is_empty() {
        return Err(format!("Get \"{url}\": EOF"));
    }
    let code =
        status_code(&buf).ok_or_else(|| format!("Get \"{url}\": malformed HTTP response"))?;
    if (200..400).contains(&code) {
        Ok(())
    } else {
        Err(format!("HTTP probe failed with statuscode: {code}"))
    }
}

/// The status code of an HTTP/1.x status line.
pub fn status_code(response: &[u8]) -> Option<u16> {
    let line = response.split(|b| *b == b'\n').next()?;
    let line = std::str::from_utf8(line).ok()?;
    let mut words = line.split_whitespace();
    if !words.next()?.starts_with("HTTP/1.") {
        return None;
    }
    words.next()?.parse().ok()
}

/// The probe task of one container run. `since` is when the container
/// started (initial delays count from it). `report` tells the worker;
/// `failed` hears every failed attempt (for the `Unhealthy` events).
pub async fn run(
    target: Target,
    set: Set,
    since: Instant,
    report: impl Fn(Event) -> bool + Send + Sync,
    failed: impl Fn(Kind, &str) + Send + Sync,
) {
    if let Some(spec) = &set.startup {
        let mut t = Threshold::new(false, 1, spec.failure_threshold);
        tokio::time::sleep_until(since + spec.initial_delay).await;
        loop {
            let started = Instant::now();
            let r = attempt(&target, spec).await;
            if let Err(why) = &r {
                failed(Kind::Startup, why);
            }
            match (t.record(r.is_ok()), r) {
                (Some(true), _) => break,
                (_, Err(message)) if t.run >= t.failures => {
                    report(Event::Unhealthy {
                        kind: Kind::Startup,
                        message,
                    });
                    return;
                }
                _ => {}
            }
            tokio::time::sleep_until(started + spec.period).await;
        }
    }
    if !report(Event::Started) {
        return;
    }
    let liveness = async {
        let Some(spec) = &set.liveness else {
            return std::future::pending::<()>().await;
        };
        let mut t = Threshold::new(true, 1, spec.failure_threshold);
        tokio::time::sleep_until(since + spec.initial_delay).await;
        loop {
            let started = Instant::now();
            let r = attempt(&target, spec).await;
            if let Err(why) = &r {
                failed(Kind::Liveness, why);
            }
            if let (Some(false), Err(message)) = (t.record(r.is_ok()), r) {
                report(Event::Unhealthy {
                    kind: Kind::Liveness,
                    message,
                });
                return;
            }
            tokio::time::sleep_until(started + spec.period).await;
        }
    };
    let readiness = async {
        let Some(spec) = &set.readiness else {
            return std::future::pending::<()>().await;
        };
        let mut t = Threshold::new(false, spec.success_threshold, spec.failure_threshold);
        tokio::time::sleep_until(since + spec.initial_delay).await;
        loop {
            let started = Instant::now();
            let r = attempt(&target, spec).await;
            let flipped = t.record(r.is_ok());
            if let Err(why) = &r {
                tracing::debug!(container = %target.container_id, %why, "Readiness probe failed");
                failed(Kind::Readiness, why);
            }
            if let Some(ready) = flipped
                && !report(Event::Ready(ready))
            {
                return;
            }
            tokio::time::sleep_until(started + spec.period).await;
        }
    };
    // Liveness ends the task when it fails (the container is killed).
    tokio::select! {
        () = liveness => {}
        () = readiness => {}
    }
}

/// Starts the probe task of one container run; reports go to the worker
/// behind `tx` (a weak sender: the task never keeps a worker's channel
/// open), events to `events`.
pub(super) fn spawn(
    tx: mpsc::WeakUnboundedSender<Msg>,
    container: String,
    run_id: u64,
    target: Target,
    set: Set,
    since: Instant,
    events: Recorder,
) -> AbortOnDrop {
    let failures = events.clone();
    let report = move |event: Event| {
        if let Event::Unhealthy { kind, .. } = &event {
            events.note(Note::killing(&events.pod_uid, &container, *kind));
        }
        tx.upgrade().is_some_and(|tx| {
            tx.send(Msg::Probe(Report {
                container: container.clone(),
                run: run_id,
                event,
            }))
            .is_ok()
        })
    };
    let failed = move |kind: Kind, why: &str| {
        failures.note(Note::unhealthy(&failures.pod_uid, kind, why));
    };
    let task = tokio::spawn(run(target, set, since, report, failed));
    AbortOnDrop(task.abort_handle())
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{ContainerPort, ExecAction, HTTPGetAction, TCPSocketAction};

    #[test]
    fn thresholds_need_consecutive_results() {
        // Readiness: starts not ready; 2 successes to become ready, 3 failures to drop.
        let mut t = Threshold::new(false, 2, 3);
        assert_eq!(t.record(true), None);
        assert_eq!(t.record(false), None);
        assert_eq!(t.record(true), None);
        assert_eq!(t.record(true), Some(true));
        assert_eq!(t.record(true), None);
        assert_eq!(t.record(false), None);
        assert_eq!(t.record(false), None);
        assert_eq!(t.record(true), None, "a success resets the failure run");
        assert_eq!(t.record(false), None);
        assert_eq!(t.record(false), None);
        assert_eq!(t.record(false), Some(false));
        assert_eq!(t.record(false), None, "reported once");
        assert!(!t.state());
        // Liveness: starts healthy; one failure is not enough with threshold 3.
        let mut l = Threshold::new(true, 1, 3);
        assert_eq!(l.record(false), None);
        assert_eq!(l.record(false), None);
        assert_eq!(l.record(false), Some(false));
        // Threshold 1 flips at once.
        let mut r = Threshold::new(false, 1, 1);
        assert_eq!(r.record(true), Some(true));
        assert_eq!(r.record(false), Some(false));
    }

    fn container() -> Container {
        Container {
            name: "app".into(),
            ports: Some(vec![ContainerPort {
                name: Some("web".into()),
                container_port: 8080,
                ..Default::default()
            }]),
            ..Default::default()
        }
    }

    #[test]
    fn specs_resolve_named_ports_and_defaults() {
        let c = container();
        let p = Probe {
            http_get: Some(HTTPGetAction {
                port: IntOrString::String("web".into()),
                ..Default::default()
            }),
            ..Default::default()
        };
        let s = Spec::from_probe(&p, &c).expect("spec");
        assert_eq!(
            s.handler,
            Handler::Http {
                port: 8080,
                path: "/".into(),
                headers: vec![]
            }
        );
        assert_eq!(
            (s.initial_delay, s.period, s.timeout),
            (
                Duration::ZERO,
                Duration::from_secs(10),
                Duration::from_secs(1)
            )
        );
        assert_eq!((s.success_threshold, s.failure_threshold), (1, 3));
        let p = Probe {
            tcp_socket: Some(TCPSocketAction {
                port: IntOrString::Int(81),
                ..Default::default()
            }),
            period_seconds: Some(2),
            failure_threshold: Some(1),
            ..Default::default()
        };
        let s = Spec::from_probe(&p, &c).expect("spec");
        assert_eq!(s.handler, Handler::Tcp { port: 81 });
        assert_eq!((s.period, s.failure_threshold), (Duration::from_secs(2), 1));
        let p = Probe {
            exec: Some(ExecAction {
                command: Some(vec!["true".into()]),
            }),
            ..Default::default()
        };
        assert!(matches!(
            Spec::from_probe(&p, &c).expect("spec").handler,
            Handler::Exec { .. }
        ));
        let unknown = Probe {
            tcp_socket: Some(TCPSocketAction {
                port: IntOrString::String("nope".into()),
                ..Default::default()
            }),
            ..Default::default()
        };
        assert_eq!(Spec::from_probe(&unknown, &c), None);
    }

    #[test]
    fn status_lines() {
        assert_eq!(status_code(b"HTTP/1.1 200 OK\r\n"), Some(200));
        assert_eq!(status_code(b"HTTP/1.0 404 Not Found\r\nx"), Some(404));
        assert_eq!(status_code(b"SSH-2.0\r\n"), None);
        assert_eq!(status_code(b""), None);
    }

    #[tokio::test]
    async fn http_and_tcp_attempts_against_a_local_server() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let mut buf = [0u8; 1024];
                let n = s.read(&mut buf).await.unwrap_or(0);
                let req = String::from_utf8_lossy(&buf[..n]).to_string();
                let reply = if req.starts_with("GET /ok ") && req.contains("X-Probe: yes") {
                    "HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
                } else if req.starts_with("GET /moved ") {
                    "HTTP/1.1 302 Found\r\nLocation: /ok\r\n\r\n"
                } else {
                    "HTTP/1.1 503 Service Unavailable\r\n\r\n"
                };
                let _ = s.write_all(reply.as_bytes()).await;
            }
        });
        let ip = Ipv4Addr::LOCALHOST;
        let hdr = vec![("X-Probe".to_owned(), "yes".to_owned())];
        assert_eq!(http_get(ip, port, "/ok", &hdr).await, Ok(()));
        assert_eq!(http_get(ip, port, "/moved", &[]).await, Ok(()));
        let err = http_get(ip, port, "/ok", &[]).await.expect_err("503");
        assert!(err.contains("503"), "{err}");
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            l.local_addr().expect("addr").port()
        };
        assert!(http_get(ip, closed, "/", &[]).await.is_err());
        assert!(
            TcpStream::connect((ip, closed)).await.is_err(),
            "the closed port is closed"
        );
    }

    #[test]
    fn event_messages_are_kubelets() {
        let n = Note::unhealthy(
            "u1",
            Kind::Readiness,
            "HTTP probe failed with statuscode: 500",
        );
        assert_eq!(
            (n.reason, n.warning, n.message.as_str()),
            (
                "Unhealthy",
                true,
                "Readiness probe failed: HTTP probe failed with statuscode: 500"
            )
        );
        assert_eq!(n.pod_uid, "u1");
        let n = Note::unhealthy("u1", Kind::Startup, "x");
        assert_eq!(n.message, "Startup probe failed: x");
        let k = Note::killing("u1", "web", Kind::Liveness);
        assert_eq!(
            (k.reason, k.warning, k.message.as_str()),
            (
                "Killing",
                false,
                "Container web failed liveness probe, will be restarted"
            )
        );
        assert_eq!(
            Note::killing("u1", "web", Kind::Startup).message,
            "Container web failed startup probe, will be restarted"
        );
    }

    #[test]
    fn errors_are_worded_as_gos() {
        let refused = io::Error::from(io::ErrorKind::ConnectionRefused);
        assert_eq!(dial_error(&refused), "connect: connection refused");
        let os = io::Error::from_raw_os_error(111);
        assert_eq!(dial_error(&os), "connect: connection refused");
        let other = io::Error::from_raw_os_error(1);
        assert_eq!(io_error(&other), "operation not permitted");
        let ip = Ipv4Addr::new(10, 244, 1, 5);
        let mut spec = Spec {
            handler: Handler::Tcp { port: 8080 },
            initial_delay: Duration::ZERO,
            period: Duration::from_secs(1),
            timeout: Duration::from_secs(1),
            success_threshold: 1,
            failure_threshold: 1,
        };
        assert_eq!(
            timeout_message(ip, &spec),
            "dial tcp 10.244.1.5:8080: i/o timeout"
        );
        spec.handler = Handler::Http {
            port: 8080,
            path: "/healthz".into(),
            headers: vec![],
        };
        assert!(
            timeout_message(ip, &spec)
                .starts_with("Get \"http://10.244.1.5:8080/healthz\": context deadline exceeded")
        );
    }

    #[tokio::test]
    async fn failures_are_worded_as_kubelets() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).await;
                let _ = s
                    .write_all(b"HTTP/1.1 500 Internal Server Error\r\n\r\n")
                    .await;
            }
        });
        let ip = Ipv4Addr::LOCALHOST;
        assert_eq!(
            http_get(ip, port, "/", &[]).await,
            Err("HTTP probe failed with statuscode: 500".to_owned())
        );
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            l.local_addr().expect("addr").port()
        };
        assert_eq!(
            http_get(ip, closed, "/healthz", &[]).await,
            Err(format!(
                "Get \"http://127.0.0.1:{closed}/healthz\": dial tcp 127.0.0.1:{closed}: connect: connection refused"
            ))
        );
    }
}
