//! `weirctl logs [-f] [-c container] <pod>`: finds the pod's node, that
//! node's InternalIP, and streams the agent's log endpoint
//! (`GET http://<ip>:<port>/api/v1/namespaces/<ns>/pods/<name>/log?container=<c>&follow=true`).

use std::fmt::Write as _;

use anyhow::{Context as _, bail};
use tokio::io::{
    AsyncBufRead, AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader,
};

use crate::client::Api;
use crate::printers::node_address;
use crate::resource::Resource;

/// Options of `logs`.
#[derive(Debug, Clone)]
pub struct LogOptions {
    /// `-c`.
    pub container: Option<String>,
    /// `-f`.
    pub follow: bool,
    /// The agents' HTTP port.
    pub agent_port: u16,
}

/// The container to read: `-c`, or the pod's only container; several and
/// no `-c` is kubectl's error listing them.
pub fn pick_container(pod: &serde_json::Value, asked: Option<&str>) -> anyhow::Result<String> {
    let name = pod["metadata"]["name"].as_str().unwrap_or_default();
    let names: Vec<&str> = pod["spec"]["containers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| c["name"].as_str())
        .collect();
    let init: Vec<&str> = pod["spec"]["initContainers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| c["name"].as_str())
        .collect();
    match (asked, names.as_slice()) {
        (Some(c), _) if names.contains(&c) || init.contains(&c) => Ok(c.to_owned()),
        (Some(c), _) => bail!("container {c} is not valid for pod {name}"),
        (None, [only]) => Ok((*only).to_owned()),
        (None, _) => {
            let mut msg = format!(
                "a container name must be specified for pod {name}, choose one of: [{}]",
                names.join(" ")
            );
            if !init.is_empty() {
                let _ = write!(msg, " or one of the init containers: [{}]", init.join(" "));
            }
            bail!("{msg}")
        }
    }
}

/// The log URL path for a pod's container.
pub fn log_path(ns: &str, pod: &str, container: &str, follow: bool) -> String {
    let mut p = format!("/api/v1/namespaces/{ns}/pods/{pod}/log?container={container}");
    if follow {
        p.push_str("&follow=true");
    }
    p
}

/// Runs `logs`.
pub async fn run(api: &Api, ns: &str, pod_arg: &str, o: &LogOptions) -> anyhow::Result<()> {
    let pod_name = pod_arg
        .strip_prefix("pod/")
        .or_else(|| pod_arg.strip_prefix("pods/"))
        .unwrap_or(pod_arg);
    let pod = api.get(Resource::Pod, ns, pod_name).await?;
    let container = pick_container(&pod, o.container.as_deref())?;
    let Some(node) = pod["spec"]["nodeName"].as_str().filter(|n| !n.is_empty()) else {
        bail!("Error from server (BadRequest): pod {pod_name} does not have a host assigned");
    };
    let node_obj = api.get(Resource::Node, "", node).await?;
    let Some(ip) = node_address(&node_obj, "InternalIP") else {
        bail!("node {node} has no InternalIP address in status.addresses");
    };
    let host = if ip.contains(':') {
        format!("[{ip}]:{}", o.agent_port)
    } else {
        format!("{ip}:{}", o.agent_port)
    };
    let path = log_path(ns, pod_name, &container, o.follow);
    let stream = tokio::net::TcpStream::connect(&host)
        .await
        .with_context(|| format!("connect to the agent on node {node} at {host}"))?;
    let mut stream = BufReader::new(stream);
    stream
        .get_mut()
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .with_context(|| format!("send the log request to {host}"))?;
    let (code, chunked) = read_head(&mut stream).await?;
    if code != 200 {
        let mut body = Vec::new();
        let _ = copy_body(&mut stream, chunked, &mut body).await;
        let reason = if code == 404 {
            "NotFound"
        } else {
            "BadRequest"
        };
        bail!(
            "Error from server ({reason}): {}",
            String::from_utf8_lossy(&body).trim()
        );
    }
    let mut out = std::io::stdout();
    copy_body(&mut stream, chunked, &mut out).await
}

/// Reads the status line and headers: (status code, chunked).
async fn read_head<R: AsyncBufRead + Unpin>(r: &mut R) -> anyhow::Result<(u16, bool)> {
    let mut line = String::new();
    r.read_line(&mut line)
        .await
        .context("read the agent's response")?;
    let code = line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("the agent's response is not HTTP: {line:?}"))?;
    let mut chunked = false;
    loop {
        line.clear();
        if r.read_line(&mut line).await? == 0 || line.trim().is_empty() {
            break;
        }
        let lower = line.to_ascii_lowercase();
        if lower.starts_with("transfer-encoding:") && lower.contains("chunked") {
            chunked = true;
        }
    }
    Ok((code, chunked))
}

/// Copies the body to `out` as it arrives (chunked or until EOF).
async fn copy_body<R: AsyncBufRead + Unpin, W: std::io::Write>(
    r: &mut R,
    chunked: bool,
    out: &mut W,
) -> anyhow::Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    if !chunked {
        loop {
            let n = r.read(&mut buf).await?;
            if n == 0 {
                return Ok(());
            }
            out.write_all(&buf[..n])?;
            out.flush()?;
        }
    }
    let mut line = String::new();
    loop {
        line.clear();
        if r.read_line(&mut line).await? == 0 {
            return Ok(());
        }
        let size_text = line.trim().split(';').next().unwrap_or_default();
        let mut size = usize::from_str_radix(size_text, 16)
            .with_context(|| format!("bad chunk size {size_text:?} from the agent"))?;
        if size == 0 {
            return Ok(());
        }
        while size > 0 {
            let want = size.min(buf.len());
            let n = r.read(&mut buf[..want]).await?;
            if n == 0 {
                return Ok(());
            }
            out.write_all(&buf[..n])?;
            size -= n;
        }
        out.flush()?;
        line.clear();
        r.read_line(&mut line).await?; // the CRLF after the chunk
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn container_choice_like_kubectl() {
        let pod = json!({"metadata": {"name": "p"}, "spec": {"containers": [{"name": "a"}, {"name": "b"}]}});
        assert_eq!(
            pick_container(&pod, None).expect_err("two").to_string(),
            "a container name must be specified for pod p, choose one of: [a b]"
        );
        assert_eq!(pick_container(&pod, Some("b")).expect("b"), "b");
        assert!(pick_container(&pod, Some("z")).is_err());
        let one = json!({"metadata": {"name": "p"}, "spec": {"containers": [{"name": "a"}]}});
        assert_eq!(pick_container(&one, None).expect("only"), "a");
        assert_eq!(
            log_path("default", "p", "a", true),
            "/api/v1/namespaces/default/pods/p/log?container=a&follow=true"
        );
    }

    #[tokio::test]
    async fn chunked_bodies_are_decoded() {
        let raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n6\r\nhello \r\n6\r\nworld\n\r\n0\r\n\r\n";
        let mut r = BufReader::new(&raw[..]);
        let (code, chunked) = read_head(&mut r).await.expect("head");
        assert_eq!((code, chunked), (200, true));
        let mut out = Vec::new();
        copy_body(&mut r, chunked, &mut out).await.expect("body");
        assert_eq!(out, b"hello world\n");
    }
}
