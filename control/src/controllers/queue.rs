//! A de-duplicating work queue of object keys, as client-go's and kube-rs'
//! controllers use: a key added while queued is queued once; a key added
//! while a worker processes it is queued again when the worker is done, so
//! one key is never reconciled by two workers at once.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

/// First retry delay after a failed reconcile; doubles per failure.
const BACKOFF_BASE: Duration = Duration::from_millis(100);
/// Longest retry delay after failed reconciles.
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// The queue; share it as `Arc<WorkQueue>`.
#[derive(Debug, Default)]
pub struct WorkQueue {
    inner: Mutex<Inner>,
    ready: Notify,
}

#[derive(Debug, Default)]
struct Inner {
    queue: VecDeque<String>,
    /// Keys waiting to be processed (queued, or re-added while processing).
    dirty: HashSet<String>,
    processing: HashSet<String>,
    /// The earliest pending delayed add per key.
    delayed: HashMap<String, Instant>,
    failures: HashMap<String, u32>,
}

impl WorkQueue {
    /// An empty queue.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues `key` unless it is already waiting.
    pub fn add(&self, key: &str) {
        let mut inner = self.lock();
        if !inner.dirty.insert(key.to_owned()) {
            return;
        }
        if !inner.processing.contains(key) {
            inner.queue.push_back(key.to_owned());
            drop(inner);
            self.ready.notify_one();
        }
    }

    /// Queues `key` after `delay` (an earlier pending delayed add wins).
    pub fn add_after(self: &Arc<Self>, key: &str, delay: Duration) {
        if delay.is_zero() {
            self.add(key);
            return;
        }
        let at = Instant::now() + delay;
        {
            let mut inner = self.lock();
            if inner.delayed.get(key).is_some_and(|&t| t <= at) {
                return;
            }
            inner.delayed.insert(key.to_owned(), at);
        }
        let queue = Arc::downgrade(self);
        let key = key.to_owned();
        tokio::spawn(async move {
            tokio::time::sleep_until(at).await;
            let Some(queue) = queue.upgrade() else { return };
            let due = {
                let mut inner = queue.lock();
                if inner.delayed.get(&key) == Some(&at) {
                    inner.delayed.remove(&key);
                    true
                } else {
                    false
                }
            };
            if due {
                queue.add(&key);
            }
        });
    }

    /// Queues `key` again after a failure, with exponential backoff.
    pub fn add_rate_limited(self: &Arc<Self>, key: &str) {
        let failures = {
            let mut inner = self.lock();
            let n = inner.failures.entry(key.to_owned()).or_default();
            *n = n.saturating_add(1);
            *n
        };
        self.add_after(key, backoff(failures));
    }

    /// Forgets `key`'s failures (after a successful reconcile).
    pub fn forget(&self, key: &str) {
        self.lock().failures.remove(key);
    }

    /// Waits for the next key and marks it as being processed; call
    /// [`WorkQueue::done`] when finished with it.
    pub async fn next(&self) -> String {
        loop {
            {
                let mut inner = self.lock();
                if let Some(key) = inner.queue.pop_front() {
                    inner.dirty.remove(&key);
                    inner.processing.insert(key.clone());
                    let more = !inner.queue.is_empty();
                    drop(inner);
                    if more {
                        // Wake another worker for the rest.
                        self.ready.notify_one();
                    }
                    return key;
                }
            }
            self.ready.notified().await;
        }
    }

    /// Marks `key` as processed; if it was added meanwhile it is queued again.
    pub fn done(&self, key: &str) {
        let mut inner = self.lock();
        inner.processing.remove(key);
        if inner.dirty.contains(key) {
            inner.queue.push_back(key.to_owned());
            drop(inner);
            self.ready.notify_one();
        }
    }

    /// How many keys wait to be processed.
    pub fn len(&self) -> usize {
        self.lock().queue.len()
    }

    /// Whether no key waits to be processed.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The delay before retry number `failures` (1-based).
fn backoff(failures: u32) -> Duration {
    let exp = failures.saturating_sub(1).min(16);
    BACKOFF_BASE.saturating_mul(1 << exp).min(BACKOFF_MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn dedups_and_requeues_keys_added_while_processing() {
        let q = WorkQueue::new();
        q.add("a");
        q.add("b");
        q.add("a");
        assert_eq!(q.len(), 2);
        let a = q.next().await;
        assert_eq!(a, "a");
        q.add("a"); // while processing: not queued twice, not handed out
        assert_eq!(q.next().await, "b");
        assert!(q.is_empty());
        q.done("a");
        assert_eq!(q.next().await, "a");
        q.done("a");
        q.done("b");
        assert!(q.is_empty());
    }

    #[tokio::test]
    async fn delayed_adds_keep_the_earliest() {
        let q = WorkQueue::new();
        q.add_after("k", Duration::from_secs(10));
        q.add_after("k", Duration::from_millis(50));
        q.add_after("k", Duration::from_secs(5));
        let got = tokio::time::timeout(Duration::from_secs(2), q.next()).await;
        assert_eq!(got.ok().as_deref(), Some("k"));
    }

    #[test]
    fn backoff_doubles_up_to_a_cap() {
        assert_eq!(backoff(1), Duration::from_millis(100));
        assert_eq!(backoff(2), Duration::from_millis(200));
        assert_eq!(backoff(4), Duration::from_millis(800));
        assert_eq!(backoff(40), BACKOFF_MAX);
    }
}
