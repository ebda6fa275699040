//! Security identities: one number per distinct (namespace, pod labels)
//! set in the cluster, which agents enforce network policy by.
//!
//! A pod gets its identity in the write that creates it (and in the write
//! that changes its labels), as the annotation [`IDENTITY_ANNOTATION`], so
//! its node's agent knows it from the first pod event, before it starts the
//! pod. The annotation is the server's: a re-apply without it (or with
//! another value) keeps the stored one while the labels stay the same.
//!
//! Two records per identity, written together with `Compare::Absent`
//! in the pod's transaction, so concurrent creates never give one label set
//! two identities nor one identity two label sets:
//! - `/weir/identities/<id>`: `{"id", "namespace", "labels"}`, what agents
//!   get (`IdentityEvent`s);
//! - `/weir/identitykeys/<namespace>/<k=v,...>`: `{"id"}` plus
//!   `retiringSince` while the garbage collector considers releasing it.
//!   A pod write that uses an identity compares this record's revision,
//!   and revives a retiring one, so the collector's compare-and-swap
//!   delete can never release an identity a pod has just taken.
//!
//! Identities 1-255 are reserved for well-known peers
//! ([`RESERVED_IDENTITIES`]); allocated ones are 256-65535, picked at random
//! (as Cilium does) so concurrent allocations rarely collide.

use std::collections::hash_map::RandomState;
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::hash::BuildHasher as _;
use std::time::Duration;

use k8s_openapi::jiff::{SignedDuration, Timestamp};
use serde::{Deserialize, Serialize};

use super::object::Stored;
use super::{ApiError, Kind, ObjectsApi};
use crate::store::{Compare, KeyValue, Op, Store};

/// The pod annotation that carries its identity (decimal).
pub const IDENTITY_ANNOTATION: &str = "weir.io/identity";
/// The prefix of identity records (`<prefix><id>`), which agents follow.
pub const IDENTITY_RECORDS: &str = "/weir/identities/";
/// The prefix of the (namespace, labels) → identity index.
pub const IDENTITY_INDEX: &str = "/weir/identitykeys/";
/// The first identity the control allocates.
pub const FIRST_IDENTITY: u32 = 256;
/// The last identity the control allocates.
pub const LAST_IDENTITY: u32 = 65535;
/// The well-known identities (never allocated, never in the store):
/// `host` is the node itself (its processes and addresses), `world` any
/// address outside the cluster, `remote-node` another node's address.
pub const RESERVED_IDENTITIES: [(u32, &str); 3] = [(1, "host"), (2, "world"), (3, "remote-node")];
/// How many random picks are tried before scanning for a free identity.
const RANDOM_PICKS: u64 = 64;

/// An identity as agents get it: its number and the set it stands for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdentityRecord {
    /// The numeric identity.
    pub id: u32,
    /// The namespace of its pods.
    pub namespace: String,
    /// Their labels.
    pub labels: BTreeMap<String, String>,
}

/// The index entry of one (namespace, labels) set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct IndexRecord {
    id: u32,
    /// Since when no pod has used it (RFC 3339), while the collector
    /// waits out the grace period.
    #[serde(
        rename = "retiringSince",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    retiring_since: Option<String>,
}

/// What one garbage-collector sweep did to identities.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IdentitySweep {
    /// Identities found unused and marked to be released after the grace.
    pub retiring: usize,
    /// Marked identities in use again, unmarked.
    pub revived: usize,
    /// Identities unused for the whole grace period, released.
    pub released: usize,
}

/// The identity record's key.
pub fn record_key(id: u32) -> String {
    format!("{IDENTITY_RECORDS}{id}")
}

/// The index key of a (namespace, labels) set. Label keys and values can
/// hold neither `,` nor `=`, so the text is unambiguous.
fn index_key(namespace: &str, labels: &BTreeMap<String, String>) -> String {
    let set: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    format!("{IDENTITY_INDEX}{namespace}/{}", set.join(","))
}

/// A pod's identity, from its annotation.
pub fn identity_of(pod: &Stored) -> Option<u32> {
    pod.annotation(IDENTITY_ANNOTATION)?.parse().ok()
}

/// The warning for a manifest that set the identity annotation to a value
/// other than the one the pod got.
pub(super) fn overridden(given: Option<&str>, pod: &Stored) -> Option<String> {
    let given = given?;
    let got = pod.annotation(IDENTITY_ANNOTATION).unwrap_or_default();
    (given != got).then(|| {
        format!(
            "manifest: metadata.annotations[{IDENTITY_ANNOTATION}]: ignored: the identity is set by weir-control (the pod's is {got})"
        )
    })
}

/// On an update whose labels are unchanged, keeps the stored identity
/// (whatever the manifest says); otherwise drops the manifest's, for
/// [`ObjectsApi::assign_identity`] to allocate.
pub(super) fn carry_over(stored: &Stored, desired: &mut Stored) {
    let kept = identity_of(stored)
        .filter(|_| stored.labels() == desired.labels())
        .map(|id| id.to_string());
    desired.set_annotation(IDENTITY_ANNOTATION, kept);
}

fn decode<T: for<'de> Deserialize<'de>>(kv: &KeyValue) -> Result<T, ApiError> {
    serde_json::from_slice(&kv.value).map_err(|e| ApiError::Corrupt {
        key: kv.key.clone(),
        reason: e.to_string(),
    })
}

fn encode<T: Serialize>(key: &str, value: &T) -> Result<Op, ApiError> {
    let value = serde_json::to_vec(value)
        .map_err(|e| ApiError::Internal(format!("serialise {key}: {e}")))?;
    Ok(Op::Put {
        key: key.to_owned(),
        value,
    })
}

/// A random `u64`, from std's randomly keyed hasher.
fn random(salt: u64) -> u64 {
    RandomState::new().hash_one((salt, std::time::SystemTime::now()))
}

/// The first free identity in a random pick (then a scan) of the range.
fn pick_free(used: &HashSet<u32>) -> Option<u32> {
    let span = u64::from(LAST_IDENTITY - FIRST_IDENTITY) + 1;
    (0..RANDOM_PICKS)
        .map(|salt| FIRST_IDENTITY + u32::try_from(random(salt) % span).unwrap_or(0))
        .find(|id| !used.contains(id))
        .or_else(|| (FIRST_IDENTITY..=LAST_IDENTITY).find(|id| !used.contains(id)))
}

type Txn = (Vec<(String, Compare)>, Vec<Op>);

/// Using the identity of an index record: compare its revision, and
/// revive it if it is retiring.
fn existing(kv: &KeyValue) -> Result<(u32, Txn), ApiError> {
    let record: IndexRecord = decode(kv)?;
    let compares = vec![(kv.key.clone(), Compare::ModRevision(kv.mod_revision))];
    let mut ops = Vec::new();
    if record.retiring_since.is_some() {
        let revived = IndexRecord {
            id: record.id,
            retiring_since: None,
        };
        ops.push(encode(&kv.key, &revived)?);
    }
    Ok((record.id, (compares, ops)))
}

/// Creating both records of a new identity, neither of which may exist.
fn allocation(index: &str, record: &IdentityRecord) -> Result<Txn, ApiError> {
    let key = record_key(record.id);
    let entry = IndexRecord {
        id: record.id,
        retiring_since: None,
    };
    Ok((
        vec![
            (key.clone(), Compare::Absent),
            (index.to_owned(), Compare::Absent),
        ],
        vec![encode(&key, record)?, encode(index, &entry)?],
    ))
}

impl<S: Store> ObjectsApi<S> {
    /// Gives `desired` (a Pod being written over `stored`) its identity
    /// annotation, and returns the compares and writes of the identity
    /// records to go in the pod's transaction, before the pod's own write.
    pub(super) async fn assign_identity(
        &self,
        stored: Option<&Stored>,
        desired: &mut Stored,
    ) -> Result<Txn, ApiError> {
        if let Some(stored) = stored {
            carry_over(stored, desired);
            if identity_of(desired).is_some() {
                return Ok((Vec::new(), Vec::new()));
            }
        }
        let labels = desired.labels();
        let namespace = desired.namespace().to_owned();
        let index = index_key(&namespace, &labels);
        let (id, txn) = if let Some(kv) = self.store.get(&index).await? {
            existing(&kv)?
        } else {
            let id = self.free_identity().await?;
            let record = IdentityRecord {
                id,
                namespace,
                labels,
            };
            (id, allocation(&index, &record)?)
        };
        desired.set_annotation(IDENTITY_ANNOTATION, Some(id.to_string()));
        Ok(txn)
    }

    /// A free identity, or `Exhausted` when all of 256-65535 are taken.
    async fn free_identity(&self) -> Result<u32, ApiError> {
        let (kvs, _) = self.store.list(IDENTITY_RECORDS).await?;
        let used: HashSet<u32> = kvs
            .iter()
            .filter_map(|kv| kv.key.strip_prefix(IDENTITY_RECORDS)?.parse().ok())
            .collect();
        pick_free(&used).ok_or_else(|| {
            ApiError::Exhausted(format!(
                "no free security identity left: all {} identities ({FIRST_IDENTITY}-{LAST_IDENTITY}) are in use by distinct (namespace, labels) sets",
                LAST_IDENTITY - FIRST_IDENTITY + 1
            ))
        })
    }

    /// Every allocated identity, by number.
    pub async fn identities(&self) -> Result<Vec<IdentityRecord>, ApiError> {
        let (kvs, _) = self.store.list(IDENTITY_RECORDS).await?;
        kvs.iter().map(decode).collect()
    }

    /// One garbage-collector pass over identities at `now`: an identity no
    /// pod carries is marked retiring; one still unused `grace` after it was
    /// marked is released (both records deleted, compare-and-swap on the
    /// mark); a marked one in use again is unmarked.
    pub async fn sweep_identities(
        &self,
        now: Timestamp,
        grace: Duration,
    ) -> Result<IdentitySweep, ApiError> {
        // The index first, then the pods: a pod written after this read
        // either shows in the list or changed the record it compared.
        let (index, _) = self.store.list(IDENTITY_INDEX).await?;
        let (pods, _) = self.store.list(&Kind::Pod.prefix("")?).await?;
        let mut used = BTreeSet::new();
        for kv in &pods {
            if let Some(id) = identity_of(&Stored::decode(kv)?) {
                used.insert(id);
            }
        }
        let grace = SignedDuration::try_from(grace).unwrap_or(SignedDuration::MAX);
        let mut sweep = IdentitySweep::default();
        for kv in &index {
            let Ok(record) = decode::<IndexRecord>(kv) else {
                tracing::warn!(key = %kv.key, "corrupt identity index record: left alone");
                continue;
            };
            let since = record
                .retiring_since
                .as_deref()
                .and_then(|t| t.parse::<Timestamp>().ok());
            let cas = vec![(kv.key.clone(), Compare::ModRevision(kv.mod_revision))];
            let (counter, ops) = match (used.contains(&record.id), since) {
                (true, None) => continue,
                (false, Some(at)) if at + grace > now => continue,
                (true, Some(_)) => (
                    &mut sweep.revived,
                    vec![encode(
                        &kv.key,
                        &IndexRecord {
                            retiring_since: None,
                            ..record
                        },
                    )?],
                ),
                (false, None) => {
                    let marked = IndexRecord {
                        retiring_since: Some(now.to_string()),
                        ..record
                    };
                    (&mut sweep.retiring, vec![encode(&kv.key, &marked)?])
                }
                (false, Some(_)) => {
                    tracing::info!(identity = record.id, set = %kv.key.trim_start_matches(IDENTITY_INDEX), "releasing an unused security identity");
                    (
                        &mut sweep.released,
                        vec![
                            Op::Delete {
                                key: record_key(record.id),
                            },
                            Op::Delete {
                                key: kv.key.clone(),
                            },
                        ],
                    )
                }
            };
            // A lost race with a pod write is looked at again next sweep.
            if self.store.txn(cas, ops).await?.succeeded {
                *counter += 1;
            }
        }
        Ok(sweep)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_keys_are_canonical() {
        let labels: BTreeMap<String, String> =
            [("b", "2"), ("a", "1"), ("app.kubernetes.io/name", "x")]
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect();
        assert_eq!(
            index_key("default", &labels),
            "/weir/identitykeys/default/a=1,app.kubernetes.io/name=x,b=2"
        );
        assert_eq!(index_key("x", &BTreeMap::new()), "/weir/identitykeys/x/");
    }

    #[test]
    fn picks_are_in_range_and_free() {
        let mut used: HashSet<u32> = (FIRST_IDENTITY..LAST_IDENTITY).collect();
        assert_eq!(pick_free(&used), Some(LAST_IDENTITY));
        used.insert(LAST_IDENTITY);
        assert_eq!(pick_free(&used), None);
        let id = pick_free(&HashSet::new()).unwrap();
        assert!((FIRST_IDENTITY..=LAST_IDENTITY).contains(&id));
    }
}
