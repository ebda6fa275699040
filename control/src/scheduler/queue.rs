//! The scheduling queue: an active heap ordered by priority (higher first),
//! then creation time, then arrival; a backoff heap for pods whose attempt
//! failed recently; and the unschedulable set, whose pods go back to the
//! active heap when the cluster changes or after a while.

use std::cmp::{Ordering, Reverse};
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::model::PodInfo;

/// First retry delay after a failed attempt (doubles per attempt).
pub const INITIAL_BACKOFF: Duration = Duration::from_secs(1);
/// Longest retry delay.
pub const MAX_BACKOFF: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Active(u64),
    Backoff,
    Unschedulable(Instant),
    InFlight,
}

#[derive(Debug)]
struct Queued {
    info: Arc<PodInfo>,
    state: State,
    arrival: u64,
    attempts: u32,
    last_attempt: Option<Instant>,
    last_message: Option<String>,
}

#[derive(Debug, PartialEq, Eq)]
struct HeapEntry {
    priority: i32,
    created: i64,
    arrival: u64,
    seq: u64,
    key: Arc<str>,
}

impl Ord for HeapEntry {
    fn cmp(&self, other: &Self) -> Ordering {
        self.priority
            .cmp(&other.priority)
            .then_with(|| other.created.cmp(&self.created))
            .then_with(|| other.arrival.cmp(&self.arrival))
            .then_with(|| other.seq.cmp(&self.seq))
    }
}

impl PartialOrd for HeapEntry {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// The queue of pods waiting for a node.
#[derive(Debug, Default)]
pub struct Queue {
    pods: HashMap<Arc<str>, Queued>,
    active: BinaryHeap<HeapEntry>,
    backoff: BinaryHeap<Reverse<(Instant, u64, Arc<str>)>>,
    /// Keys of the pods parked as unschedulable.
    parked: HashSet<Arc<str>>,
    seq: u64,
}

fn backoff_for(attempts: u32) -> Duration {
    let shift = attempts.saturating_sub(1).min(8);
    (INITIAL_BACKOFF * (1u32 << shift)).min(MAX_BACKOFF)
}

impl Queue {
    /// An empty queue.
    pub fn new() -> Self {
        Self::default()
    }

    fn next_seq(&mut self) -> u64 {
        self.seq += 1;
        self.seq
    }

    fn push_active(&mut self, key: &Arc<str>) {
        let seq = self.next_seq();
        let Some(q) = self.pods.get_mut(key) else {
            return;
        };
        self.parked.remove(key);
        q.state = State::Active(seq);
        self.active.push(HeapEntry {
            priority: q.info.priority,
            created: q.info.created,
            arrival: q.arrival,
            seq,
            key: Arc::clone(key),
        });
    }

    /// Adds a pending pod, or refreshes the one queued under its key
    /// (keeping its place: an update alone does not retry an
    /// unschedulable pod).
    pub fn add_or_update(&mut self, info: Arc<PodInfo>) {
        let key = Arc::clone(&info.key);
        if let Some(q) = self.pods.get_mut(&key) {
            let priority_changed = q.info.priority != info.priority;
            q.info = info;
            if matches!(q.state, State::Active(_)) && priority_changed {
                self.push_active(&key);
            }
            return;
        }
        let arrival = self.next_seq();
        self.pods.insert(
            Arc::clone(&key),
            Queued {
                info,
                state: State::Backoff,
                arrival,
                attempts: 0,
                last_attempt: None,
                last_message: None,
            },
        );
        self.push_active(&key);
    }

    /// Drops a pod (bound, deleted, or no longer ours).
    pub fn remove(&mut self, key: &str) {
        self.pods.remove(key);
        self.parked.remove(key);
    }

    /// Moves pods whose backoff ended to the active heap.
    fn release_backoff(&mut self, now: Instant) {
        while let Some(Reverse((at, _, _))) = self.backoff.peek() {
            if *at > now {
                break;
            }
            let Some(Reverse((_, _, key))) = self.backoff.pop() else {
                break;
            };
            if self
                .pods
                .get(&key)
                .is_some_and(|q| q.state == State::Backoff)
            {
                self.push_active(&key);
            }
        }
    }

    /// The next pod to schedule, marked in flight.
    pub fn pop(&mut self, now: Instant) -> Option<Arc<PodInfo>> {
        self.release_backoff(now);
        while let Some(entry) = self.active.pop() {
            let Some(q) = self.pods.get_mut(&entry.key) else {
                continue;
            };
            if q.state != State::Active(entry.seq) {
                continue;
            }
            q.state = State::InFlight;
            q.attempts += 1;
            q.last_attempt = Some(now);
            return Some(Arc::clone(&q.info));
        }
        None
    }

    /// Parks an in-flight pod that fits nowhere; true if `message`
    /// differs from the last one it got (so status and event are due).
    pub fn unschedulable(&mut self, key: &str, message: &str, now: Instant) -> bool {
        let Some(q) = self.pods.get_mut(key) else {
            return false;
        };
        q.state = State::Unschedulable(now);
        self.parked.insert(Arc::clone(&q.info.key));
        let changed = q.last_message.as_deref() != Some(message);
        if changed {
            q.last_message = Some(message.to_owned());
        }
        changed
    }

    /// Retries an in-flight pod after its backoff (e.g. its bind failed).
    pub fn retry_later(&mut self, key: &str, now: Instant) {
        let seq = self.next_seq();
        let Some(q) = self.pods.get_mut(key) else {
            return;
        };
        q.state = State::Backoff;
        let at = q.last_attempt.unwrap_or(now) + backoff_for(q.attempts);
        self.parked.remove(key);
        self.backoff
            .push(Reverse((at.max(now), seq, Arc::from(key))));
    }

    fn wake(&mut self, key: &Arc<str>, now: Instant) {
        let Some(q) = self.pods.get(key) else {
            return;
        };
        let at = q.last_attempt.unwrap_or(now) + backoff_for(q.attempts);
        if at <= now {
            self.push_active(key);
        } else {
            let seq = self.next_seq();
            if let Some(q) = self.pods.get_mut(key) {
                q.state = State::Backoff;
            }
            self.parked.remove(key);
            self.backoff.push(Reverse((at, seq, Arc::clone(key))));
        }
    }

    /// The cluster changed: every unschedulable pod is retried (after its
    /// backoff).
    pub fn move_all_unschedulable(&mut self, now: Instant) -> usize {
        self.move_unschedulable_where(now, |_| true)
    }

    /// Retries unschedulable pods parked for longer than `age`.
    pub fn flush_unschedulable(&mut self, now: Instant, age: Duration) -> usize {
        self.move_unschedulable_where(now, |since| now.duration_since(since) >= age)
    }

    fn move_unschedulable_where(&mut self, now: Instant, pred: impl Fn(Instant) -> bool) -> usize {
        let keys: Vec<Arc<str>> = self
            .parked
            .iter()
            .filter(|k| {
                self.pods
                    .get(*k)
                    .is_some_and(|q| matches!(q.state, State::Unschedulable(since) if pred(since)))
            })
            .cloned()
            .collect();
        for key in &keys {
            self.wake(key, now);
        }
        keys.len()
    }

    /// When the earliest backoff ends, if any pod is backing off.
    pub fn next_backoff(&self) -> Option<Instant> {
        self.backoff.peek().map(|Reverse((at, _, _))| *at)
    }

    /// Keys of every queued pod.
    pub fn keys(&self) -> Vec<Arc<str>> {
        self.pods.keys().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scheduler::testutil::pod;

    fn queued(name: &str, priority: i32, created: i64) -> Arc<PodInfo> {
        let mut p = pod(name, 0, 0);
        p.priority = priority;
        p.created = created;
        Arc::new(p)
    }

    fn names(q: &mut Queue, now: Instant) -> Vec<String> {
        std::iter::from_fn(|| q.pop(now))
            .map(|p| p.name.clone())
            .collect()
    }

    #[test]
    fn queue_orders_by_priority_then_creation_then_arrival() {
        let mut q = Queue::new();
        q.add_or_update(queued("low-old", 0, 10));
        q.add_or_update(queued("high-new", 100, 50));
        q.add_or_update(queued("low-new", 0, 20));
        q.add_or_update(queued("high-old", 100, 5));
        q.add_or_update(queued("low-new-2", 0, 20));
        assert_eq!(
            names(&mut q, Instant::now()),
            ["high-old", "high-new", "low-old", "low-new", "low-new-2"]
        );
    }

    #[test]
    fn unschedulable_pods_return_on_cluster_change_after_backoff_and_on_flush() {
        let mut q = Queue::new();
        let t0 = Instant::now();
        q.add_or_update(queued("a", 0, 0));
        let a = q.pop(t0).unwrap();
        assert!(q.unschedulable(&a.key, "0/1 nodes are available", t0));
        assert!(
            !q.unschedulable(&a.key, "0/1 nodes are available", t0),
            "same message"
        );
        assert!(q.pop(t0).is_none());
        // A change right away: the pod backs off first.
        assert_eq!(q.move_all_unschedulable(t0), 1);
        assert!(q.pop(t0).is_none());
        assert_eq!(q.next_backoff(), Some(t0 + INITIAL_BACKOFF));
        assert_eq!(
            q.pop(t0 + INITIAL_BACKOFF)
                .map(|p| p.name.clone())
                .as_deref(),
            Some("a")
        );
        // Parked again; the periodic flush only takes old ones.
        let t1 = t0 + Duration::from_secs(5);
        q.unschedulable(&a.key, "x", t1);
        assert_eq!(
            q.flush_unschedulable(t1 + Duration::from_secs(1), Duration::from_secs(30)),
            0
        );
        assert_eq!(
            q.flush_unschedulable(t1 + Duration::from_secs(31), Duration::from_secs(30)),
            1
        );
        assert!(q.pop(t1 + Duration::from_secs(31)).is_some());
    }

    #[test]
    fn removed_and_updated_pods_leave_no_stale_entries() {
        let mut q = Queue::new();
        q.add_or_update(queued("a", 0, 0));
        q.add_or_update(queued("b", 0, 1));
        q.remove("default/a");
        q.add_or_update(queued("b", 5, 1));
        assert_eq!(names(&mut q, Instant::now()), ["b"]);
    }
}
