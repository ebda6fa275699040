//! Leader election for HA control planes: several weir-controls share one
//! etcd and all serve the API, but only the one holding the leader lock runs
//! the controllers and the scheduler.
//!
//! The lock is a key (`<prefix>/leader`, value = the holder's identity)
//! created with an etcd lease; whoever creates it while it is absent leads
//! until its lease ends. The leader renews the lease every third of its TTL
//! and steps down on its own — stopping its work at once, without being told
//! — as soon as a renewal fails or the lease's deadline passes unrenewed, so
//! it has stopped before the lease expires in etcd and a standby can take
//! over. Standbys watch the key and campaign again when it is deleted (the
//! leader resigned or its lease expired). On shutdown the leader stops its
//! work, then revokes its lease (resigns) so a standby takes over at once.
//!
//! The side effects sit behind the narrow [`Lock`] trait: [`EtcdLock`] is the
//! real one, the unit tests use an in-memory one to check the decisions.

mod etcd;
#[cfg(test)]
mod tests;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::{Instant, sleep, sleep_until, timeout, timeout_at};
use weir_proto::v1;

pub use self::etcd::EtcdLock;
use crate::api::ObjectsApi;
use crate::events::{self, EventType};
use crate::store::Store;

/// The lock's key under the store's key prefix.
pub const LEADER_KEY: &str = "/leader";
/// The shortest lease `--leader-lease` accepts (etcd counts leases in whole
/// seconds and renewals go every third of the TTL).
pub const MIN_LEASE: Duration = Duration::from_secs(2);
/// How long a term's work may take to stop once told.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// How long revoking the lease may take before it is left to expire.
const REVOKE_TIMEOUT: Duration = Duration::from_secs(2);
/// Pause before campaigning again after an error or a lost term.
const RETRY: Duration = Duration::from_secs(1);
/// The component named in leader election events.
const COMPONENT: &str = "weir-control";

/// An etcd lease id.
pub type LeaseId = i64;

/// Why leader election could not proceed.
#[derive(Debug, thiserror::Error)]
pub enum LeaderError {
    /// etcd refused or did not answer.
    #[error("leader election: {op} on {target}: {reason}")]
    Backend {
        /// What was attempted, e.g. `grant lease`.
        op: &'static str,
        /// The endpoints or key it was attempted on.
        target: String,
        /// What etcd said.
        reason: String,
    },
    /// A flag's value is unusable.
    #[error("{flag} {value:?}: {reason}")]
    InvalidConfig {
        /// The flag, e.g. `--leader-lease`.
        flag: &'static str,
        /// The value given.
        value: String,
        /// Why it is refused.
        reason: String,
    },
}

/// The outcome of one campaign.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Campaign {
    /// This process holds the lock with `lease`, granted for `ttl`.
    Won {
        /// The lease the lock key is attached to.
        lease: LeaseId,
        /// The TTL etcd granted (it may round up what was asked).
        ttl: Duration,
    },
    /// Another process holds the lock.
    Held {
        /// The holder's identity (the key's value).
        holder: String,
        /// The store revision the holder was seen at; the lock is watched
        /// for release after it.
        revision: u64,
    },
}

/// The lock's side effects: the real one is [`EtcdLock`].
pub trait Lock: Send + Sync + 'static {
    /// Grants a lease of `ttl` and takes the lock for `id` with it if no one
    /// holds it; otherwise releases the new lease and says who holds it.
    fn campaign(
        &self,
        id: &str,
        ttl: Duration,
    ) -> impl Future<Output = Result<Campaign, LeaderError>> + Send;

    /// Renews `lease` for its full TTL: `true` if renewed, `false` if the
    /// lease is gone (expired or revoked).
    fn renew(&self, lease: LeaseId) -> impl Future<Output = Result<bool, LeaderError>> + Send;

    /// Revokes `lease`, which releases the lock if it holds it. Revoking a
    /// lease that is gone is not an error.
    fn revoke(&self, lease: LeaseId) -> impl Future<Output = Result<(), LeaderError>> + Send;

    /// Returns once the lock seen held at `revision` has been released after
    /// it (at once if it already was).
    fn released(&self, revision: u64) -> impl Future<Output = Result<(), LeaderError>> + Send;
}

/// Election settings (weir-control's `--leader-id` and `--leader-lease`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// This process's identity, stored as the lock's value.
    pub id: String,
    /// The lease TTL: how long leadership outlives the last renewal.
    pub lease: Duration,
}

impl Config {
    /// Checks the flags: a non-empty id and a lease of at least
    /// [`MIN_LEASE`].
    pub fn new(id: String, lease: Duration) -> Result<Self, LeaderError> {
        if id.trim().is_empty() {
            return Err(LeaderError::InvalidConfig {
                flag: "--leader-id",
                value: id,
                reason: "must not be empty".into(),
            });
        }
        if lease < MIN_LEASE {
            return Err(LeaderError::InvalidConfig {
                flag: "--leader-lease",
                value: format!("{lease:?}"),
                reason: format!("must be at least {MIN_LEASE:?}"),
            });
        }
        Ok(Self { id, lease })
    }
}

/// The default identity: `<hostname>-<pid>`.
pub fn default_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "weir-control".into());
    format!("{host}-{}", std::process::id())
}

/// When a leader must renew its lease and until when it may lead.
///
/// The lease is valid in etcd for its TTL from when etcd received the last
/// renewal, which is after we sent it. The leader counts from the send and
/// steps down a fifth of the TTL early, so its work has stopped before
/// etcd can expire the lease and elect anyone else.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseClock {
    ttl: Duration,
    last_sent: Instant,
}

impl LeaseClock {
    /// A lease of `ttl` whose grant was requested at `sent`.
    pub fn new(sent: Instant, ttl: Duration) -> Self {
        Self {
            ttl,
            last_sent: sent,
        }
    }

    /// When to send the next renewal: a third of the TTL after the last.
    pub fn next_renewal(&self) -> Instant {
        self.last_sent + self.ttl / 3
    }

    /// Until when this process may lead without another renewal.
    pub fn valid_until(&self) -> Instant {
        self.last_sent + self.ttl - self.ttl / 5
    }

    /// Records a renewal sent at `sent` that etcd confirmed.
    pub fn renewed(&mut self, sent: Instant) {
        self.last_sent = self.last_sent.max(sent);
    }
}

/// Why a term of leadership ended.
#[derive(Debug, Clone, PartialEq, Eq)]
enum TermEnd {
    /// The lease was lost or could not be renewed.
    Lost(String),
    /// The work returned by itself.
    WorkEnded,
    /// This process is shutting down.
    Shutdown,
}

/// Campaigns for the lock and runs the leader's work while it holds it.
pub struct Elector<L> {
    lock: Arc<L>,
    config: Config,
}

impl<L: Lock> Elector<L> {
    /// An elector for `config.id` on `lock`.
    pub fn new(lock: L, config: Config) -> Self {
        Self {
            lock: Arc::new(lock),
            config,
        }
    }

    /// This process's identity.
    pub fn id(&self) -> &str {
        &self.config.id
    }

    /// Campaigns until `shutdown` turns true. Each time this process becomes
    /// leader it calls `work` with a stop signal and runs the future it
    /// returns; the signal turns true when leadership ends (lost, or
    /// shutdown), and the future must then return (within a few seconds).
    /// On shutdown the work is stopped first, then the lease revoked.
    pub async fn run<W, F>(self, mut work: W, mut shutdown: watch::Receiver<bool>)
    where
        W: FnMut(watch::Receiver<bool>) -> F,
        F: Future<Output = ()>,
    {
        let id = self.config.id.as_str();
        let mut following: Option<String> = None;
        while !*shutdown.borrow() {
            let sent = Instant::now();
            let attempt = tokio::select! {
                attempt = self.lock.campaign(id, self.config.lease) => attempt,
                _ = shutdown.wait_for(|stop| *stop) => return,
            };
            match attempt {
                Ok(Campaign::Won { lease, ttl }) => {
                    following = None;
                    tracing::info!(id, lease, ?ttl, "became leader");
                    let clock = LeaseClock::new(sent, ttl);
                    let end = self.lead(lease, clock, &mut work, &mut shutdown).await;
                    self.resign(lease).await;
                    match end {
                        TermEnd::Shutdown => {
                            tracing::info!(id, "resigned leadership on shutdown");
                            return;
                        }
                        TermEnd::Lost(why) => {
                            tracing::warn!(id, reason = %why, "lost leadership; stopped the controllers and the scheduler");
                        }
                        TermEnd::WorkEnded => {
                            tracing::warn!(
                                id,
                                "the controllers and the scheduler ended by themselves; resigned leadership"
                            );
                        }
                    }
                    pause(RETRY, &mut shutdown).await;
                }
                Ok(Campaign::Held { holder, revision }) => {
                    if following.as_deref() != Some(holder.as_str()) {
                        tracing::info!(id, leader = %holder, "standing by: another control leads");
                        following = Some(holder);
                    }
                    // Re-check at least once per lease TTL even if the
                    // watch stays quiet.
                    let released = tokio::select! {
                        released = timeout(self.config.lease, self.lock.released(revision)) => released,
                        _ = shutdown.wait_for(|stop| *stop) => return,
                    };
                    if let Ok(Err(e)) = released {
                        tracing::warn!(id, error = %e, "watching the leader lock");
                        pause(RETRY, &mut shutdown).await;
                    }
                }
                Err(e) => {
                    tracing::warn!(id, error = %e, "campaigning for leadership");
                    pause(RETRY, &mut shutdown).await;
                }
            }
        }
    }

    /// One term: runs the work while renewing the lease, until the lease is
    /// lost, the work ends or shutdown; then stops the work.
    async fn lead<W, F>(
        &self,
        lease: LeaseId,
        clock: LeaseClock,
        work: &mut W,
        shutdown: &mut watch::Receiver<bool>,
    ) -> TermEnd
    where
        W: FnMut(watch::Receiver<bool>) -> F,
        F: Future<Output = ()>,
    {
        let (stop, stopped) = watch::channel(false);
        let term = work(stopped);
        tokio::pin!(term);
        let hold = hold(&*self.lock, lease, clock);
        tokio::pin!(hold);
        let end = tokio::select! {
            why = &mut hold => TermEnd::Lost(why),
            () = &mut term => TermEnd::WorkEnded,
            _ = shutdown.wait_for(|stop| *stop) => TermEnd::Shutdown,
        };
        stop.send_replace(true);
        if end == TermEnd::WorkEnded {
            return end;
        }
        let deadline = Instant::now() + STOP_GRACE;
        let stopped_in_time = if end == TermEnd::Shutdown {
            // Keep the lease while the work stops, so no standby starts
            // before it has.
            tokio::select! {
                stopped = timeout_at(deadline, &mut term) => stopped.is_ok(),
                why = &mut hold => {
                    tracing::warn!(id = %self.config.id, reason = %why, "lost the lease while stopping");
                    timeout_at(deadline, &mut term).await.is_ok()
                }
            }
        } else {
            timeout_at(deadline, &mut term).await.is_ok()
        };
        if !stopped_in_time {
            tracing::warn!(id = %self.config.id, "the leader's work did not stop within {STOP_GRACE:?}");
        }
        end
    }

    /// Revokes `lease` so a standby can take over at once; if that fails
    /// the lease expires by itself.
    async fn resign(&self, lease: LeaseId) {
        match timeout(REVOKE_TIMEOUT, self.lock.revoke(lease)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(lease, error = %e, "revoke the leader lease"),
            Err(_) => tracing::warn!(
                lease,
                "revoking the leader lease took over {REVOKE_TIMEOUT:?}"
            ),
        }
    }
}

/// Renews `lease` on `clock`'s schedule; returns why leadership is lost: a
/// failed renewal, a lease that is gone, or no answer before the deadline.
async fn hold<L: Lock>(lock: &L, lease: LeaseId, mut clock: LeaseClock) -> String {
    loop {
        sleep_until(clock.next_renewal()).await;
        let sent = Instant::now();
        match timeout_at(clock.valid_until(), lock.renew(lease)).await {
            Err(_) => return "no keep-alive answer before the lease's deadline".into(),
            Ok(Err(e)) => return format!("keep-alive failed: {e}"),
            Ok(Ok(false)) => return "the lease expired or was revoked".into(),
            Ok(Ok(true)) => clock.renewed(sent),
        }
    }
}

/// Sleeps for `pause`, or less if `shutdown` turns true.
async fn pause(pause: Duration, shutdown: &mut watch::Receiver<bool>) {
    tokio::select! {
        () = sleep(pause) => {}
        _ = shutdown.wait_for(|stop| *stop) => {}
    }
}

/// Records the `LeaderElection` event "`<id>` became leader" on the
/// `kube-system` Namespace (best effort, like every event).
pub async fn record_became_leader<S: Store>(api: &ObjectsApi<S>, id: &str) {
    let namespace = v1::ObjectRef {
        api_version: "v1".into(),
        kind: "Namespace".into(),
        namespace: String::new(),
        name: "kube-system".into(),
    };
    let regarding = match api.get(&namespace).await {
        Ok(object) => object.meta.unwrap_or_default(),
        Err(e) => {
            tracing::warn!(error = %e, "read namespace kube-system for the leader election event");
            return;
        }
    };
    events::record(
        api,
        &regarding,
        EventType::Normal,
        "LeaderElection",
        &format!("{id} became leader"),
        COMPONENT,
    )
    .await;
}
