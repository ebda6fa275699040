//! The leader lock in etcd: a key created with a lease in a transaction that
//! compares its create revision with 0 (absent), so exactly one campaign
//! wins while the key exists; the key goes away with the lease.

use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, Error as EtcdError, EventType, PutOptions, Txn, TxnOp,
    TxnOpResponse, WatchOptions,
};

use super::{Campaign, LeaderError, LeaseId, Lock};

/// A [`Lock`] on one etcd key.
#[derive(Clone)]
pub struct EtcdLock {
    client: Client,
    key: String,
}

impl EtcdLock {
    /// The lock at `key` (e.g. `/weir/leader`) on `client`'s cluster.
    pub fn new(client: Client, key: String) -> Self {
        Self { client, key }
    }

    /// A [`LeaderError::Backend`] for `op` on this lock's key.
    fn error(&self, op: &'static str) -> impl FnOnce(EtcdError) -> LeaderError {
        let target = self.key.clone();
        move |err| LeaderError::Backend {
            op,
            target,
            reason: err.to_string(),
        }
    }
}

/// etcd's lease TTLs are whole seconds: `ttl` rounded up, at least 1.
fn ttl_seconds(ttl: Duration) -> i64 {
    let secs = ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0);
    i64::try_from(secs.max(1)).unwrap_or(i64::MAX)
}

/// Whether etcd says the lease does not exist (expired or revoked).
fn lease_not_found(err: &EtcdError) -> bool {
    match err {
        EtcdError::LeaseKeepAliveError(msg) => msg.contains("lease not found"),
        EtcdError::GRpcStatus(status) => status.message().contains("lease not found"),
        _ => false,
    }
}

impl Lock for EtcdLock {
    async fn campaign(&self, id: &str, ttl: Duration) -> Result<Campaign, LeaderError> {
        let grant = self
            .client
            .lease_client()
            .grant(ttl_seconds(ttl), None)
            .await
            .map_err(self.error("grant lease"))?;
        let lease = grant.id();
        let txn = Txn::new()
            .when([Compare::create_revision(
                self.key.as_str(),
                CompareOp::Equal,
                0,
            )])
            .and_then([TxnOp::put(
                self.key.as_str(),
                id,
                Some(PutOptions::new().with_lease(lease)),
            )])
            .or_else([TxnOp::get(self.key.as_str(), None)]);
        let resp = match self.client.kv_client().txn(txn).await {
            Ok(resp) => resp,
            Err(e) => {
                // The lease is ours alone; don't leave it to expire.
                let _ = self.revoke(lease).await;
                return Err(self.error("take the lock")(e));
            }
        };
        if resp.succeeded() {
            // etcd may grant more than asked (its minimum TTL), never less.
            let granted = u64::try_from(grant.ttl()).unwrap_or(0);
            return Ok(Campaign::Won {
                lease,
                ttl: if granted == 0 {
                    ttl
                } else {
                    Duration::from_secs(granted)
                },
            });
        }
        let _ = self.revoke(lease).await;
        let revision = resp
            .header()
            .map_or(0, |h| u64::try_from(h.revision()).unwrap_or(0));
        let holder = resp
            .op_responses()
            .into_iter()
            .find_map(|op| match op {
                TxnOpResponse::Get(get) => get
                    .kvs()
                    .first()
                    .map(|kv| String::from_utf8_lossy(kv.value()).into_owned()),
                _ => None,
            })
            .unwrap_or_default();
        Ok(Campaign::Held { holder, revision })
    }

    async fn renew(&self, lease: LeaseId) -> Result<bool, LeaderError> {
        // One keep-alive round trip: etcd answers a renewal with the lease's
        // TTL, and the client turns a TTL of 0 (no such lease) into an error.
        match self.client.lease_client().keep_alive(lease).await {
            Ok(_) => Ok(true),
            Err(e) if lease_not_found(&e) => Ok(false),
            Err(e) => Err(self.error("renew the lease")(e)),
        }
    }

    async fn revoke(&self, lease: LeaseId) -> Result<(), LeaderError> {
        match self.client.lease_client().revoke(lease).await {
            Ok(_) => Ok(()),
            Err(e) if lease_not_found(&e) => Ok(()),
            Err(e) => Err(self.error("revoke the lease")(e)),
        }
    }

    async fn released(&self, revision: u64) -> Result<(), LeaderError> {
        let start = i64::try_from(revision.saturating_add(1)).unwrap_or(i64::MAX);
        let mut stream = self
            .client
            .watch_client()
            .watch(
                self.key.as_str(),
                Some(WatchOptions::new().with_start_revision(start)),
            )
            .await
            .map_err(self.error("watch the lock"))?;
        loop {
            let Some(resp) = stream
                .message()
                .await
                .map_err(self.error("watch the lock"))?
            else {
                return Err(LeaderError::Backend {
                    op: "watch the lock",
                    target: self.key.clone(),
                    reason: "etcd closed the watch stream".into(),
                });
            };
            if resp
                .events()
                .iter()
                .any(|ev| ev.event_type() == EventType::Delete)
            {
                return Ok(());
            }
            if resp.canceled() {
                // Compacted past `revision` or refused: campaigning again
                // finds out the lock's state.
                return Ok(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lease_ttls_round_up_to_whole_seconds() {
        assert_eq!(ttl_seconds(Duration::from_secs(10)), 10);
        assert_eq!(ttl_seconds(Duration::from_millis(2500)), 3);
        assert_eq!(ttl_seconds(Duration::from_millis(1)), 1);
        assert_eq!(ttl_seconds(Duration::ZERO), 1);
    }
}
