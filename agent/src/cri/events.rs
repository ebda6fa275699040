//! containerd's event stream: task exits and OOM kills, the only source of
//! truth for why a container stopped (never guessed from exit code 137).

use std::time::Duration;

use containerd_client::{
    events::{TaskExit, TaskOom},
    services::v1::{SubscribeRequest, events_client::EventsClient},
};
use futures::StreamExt as _;
use prost::Message as _;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use super::request;

/// One task event, for the init process of a container.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TaskEvent {
    /// The container's init process exited.
    Exit {
        /// containerd container id.
        container_id: String,
        /// Exit status (128 + signal for a killed process).
        exit_status: u32,
        /// Unix seconds of the exit.
        exited_at: Option<i64>,
    },
    /// The kernel OOM-killed a process of the container.
    Oom {
        /// containerd container id.
        container_id: String,
    },
    /// The stream was (re)established: events may have been missed while it
    /// was down, so consumers re-read task state.
    Resync,
}

/// Decodes one envelope's payload; `None` for topics weir ignores and for
/// exits of exec'd processes (only the init process matters).
pub fn decode(topic: &str, payload: &[u8]) -> Option<TaskEvent> {
    match topic {
        "/tasks/exit" => {
            let e = TaskExit::decode(payload).ok()?;
            // `id` is the process id: equal to the container id for init.
            if !e.id.is_empty() && e.id != e.container_id {
                return None;
            }
            Some(TaskEvent::Exit {
                container_id: e.container_id,
                exit_status: e.exit_status,
                exited_at: e.exited_at.map(|t| t.seconds),
            })
        }
        "/tasks/oom" => {
            let e = TaskOom::decode(payload).ok()?;
            Some(TaskEvent::Oom {
                container_id: e.container_id,
            })
        }
        _ => None,
    }
}

/// Follows task events of namespace `ns` until `cancel`, reconnecting with
/// backoff; sends a [`TaskEvent::Resync`] after every (re)connect.
pub async fn follow(
    channel: Channel,
    ns: String,
    tx: mpsc::Sender<TaskEvent>,
    cancel: CancellationToken,
) {
    let mut delay = Duration::from_millis(200);
    loop {
        let filters = vec![
            format!("namespace==\"{ns}\",topic==\"/tasks/exit\""),
            format!("namespace==\"{ns}\",topic==\"/tasks/oom\""),
        ];
        let sub = EventsClient::new(channel.clone())
            .subscribe(request(&ns, SubscribeRequest { filters }))
            .await;
        match sub {
            Ok(stream) => {
                delay = Duration::from_millis(200);
                if tx.send(TaskEvent::Resync).await.is_err() {
                    return;
                }
                let mut stream = stream.into_inner();
                loop {
                    let next = tokio::select! {
                        () = cancel.cancelled() => return,
                        n = stream.next() => n,
                    };
                    match next {
                        Some(Ok(env)) => {
                            if env.namespace != ns {
                                continue;
                            }
                            let Some(ev) = env
                                .event
                                .as_ref()
                                .and_then(|a| decode(&env.topic, &a.value))
                            else {
                                continue;
                            };
                            if tx.send(ev).await.is_err() {
                                return;
                            }
                        }
                        Some(Err(status)) => {
                            tracing::warn!(error = %status.message(), "containerd event stream broke; reconnecting");
                            break;
                        }
                        None => {
                            tracing::warn!("containerd event stream ended; reconnecting");
                            break;
                        }
                    }
                }
            }
            Err(status) => {
                tracing::warn!(error = %status.message(), retry_in = ?delay, "cannot subscribe to containerd events");
            }
        }
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_init_exit_and_ignores_exec_exit() {
        let exit = TaskExit {
            container_id: "c1".into(),
            id: "c1".into(),
            pid: 42,
            exit_status: 3,
            exited_at: Some(prost_types::Timestamp {
                seconds: 7,
                nanos: 0,
            }),
        };
        assert_eq!(
            decode("/tasks/exit", &exit.encode_to_vec()),
            Some(TaskEvent::Exit {
                container_id: "c1".into(),
                exit_status: 3,
                exited_at: Some(7)
            })
        );
        let exec = TaskExit {
            id: "exec-1".into(),
            ..exit
        };
        assert_eq!(decode("/tasks/exit", &exec.encode_to_vec()), None);
    }

    #[test]
    fn decodes_oom_and_ignores_other_topics() {
        let oom = TaskOom {
            container_id: "c2".into(),
        };
        assert_eq!(
            decode("/tasks/oom", &oom.encode_to_vec()),
            Some(TaskEvent::Oom {
                container_id: "c2".into()
            })
        );
        assert_eq!(decode("/tasks/start", &oom.encode_to_vec()), None);
    }
}
