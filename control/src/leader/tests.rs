//! The election's decisions against an in-memory lock with etcd's lease
//! semantics (a lease expires `ttl` after its last renewal arrived; the lock
//! key goes with it), with injectable renewal faults.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::{Instant, sleep};

use super::*;

/// How a holder's renewals behave.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    /// etcd answers with an error (unreachable, no quorum).
    Fail,
    /// etcd never answers.
    Hang,
}

#[derive(Default)]
struct State {
    /// The lock: holder id and lease.
    holder: Option<(String, LeaseId)>,
    /// Live leases: owner id and expiry.
    leases: HashMap<LeaseId, (String, Instant)>,
    /// Every lease ever granted and its owner (faults outlive leases).
    owners: HashMap<LeaseId, String>,
    next_lease: LeaseId,
    /// Bumped on every change of the lock.
    revision: u64,
    faults: HashMap<String, Fault>,
    revoked: Vec<String>,
}

impl State {
    /// Drops expired leases, and the lock with its lease.
    fn expire(&mut self, now: Instant) {
        self.leases.retain(|_, (_, expiry)| *expiry > now);
        self.drop_orphan_lock();
    }

    fn drop_orphan_lock(&mut self) {
        if let Some((_, lease)) = &self.holder
            && !self.leases.contains_key(lease)
        {
            self.holder = None;
            self.revision += 1;
        }
    }
}

#[derive(Clone, Default)]
struct MemLock {
    state: Arc<Mutex<State>>,
}

impl MemLock {
    fn with<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        let mut state = self.state.lock().expect("lock state poisoned");
        state.expire(Instant::now());
        f(&mut state)
    }

    fn set_fault(&self, id: &str, fault: Fault) {
        self.with(|s| s.faults.insert(id.to_owned(), fault));
    }

    /// Ends `id`'s leases as etcd would after losing them (e.g. restored
    /// from a backup).
    fn drop_leases_of(&self, id: &str) {
        self.with(|s| {
            s.leases.retain(|_, (owner, _)| owner != id);
            s.drop_orphan_lock();
        });
    }

    fn holder(&self) -> Option<String> {
        self.with(|s| s.holder.as_ref().map(|(id, _)| id.clone()))
    }
}

impl Lock for MemLock {
    async fn campaign(&self, id: &str, ttl: Duration) -> Result<Campaign, LeaderError> {
        Ok(self.with(|s| {
            if let Some((holder, _)) = &s.holder {
                return Campaign::Held {
                    holder: holder.clone(),
                    revision: s.revision,
                };
            }
            s.next_lease += 1;
            let lease = s.next_lease;
            s.leases
                .insert(lease, (id.to_owned(), Instant::now() + ttl));
            s.owners.insert(lease, id.to_owned());
            s.holder = Some((id.to_owned(), lease));
            s.revision += 1;
            Campaign::Won { lease, ttl }
        }))
    }

    async fn renew(&self, lease: LeaseId) -> Result<bool, LeaderError> {
        let owner = self.with(|s| s.owners.get(&lease).cloned().unwrap_or_default());
        match self.with(|s| s.faults.get(&owner).copied()) {
            Some(Fault::Fail) => Err(LeaderError::Backend {
                op: "renew the lease",
                target: "mem".into(),
                reason: "connection refused".into(),
            }),
            Some(Fault::Hang) => std::future::pending().await,
            None => Ok(self.with(|s| match s.leases.get_mut(&lease) {
                Some((_, expiry)) => {
                    // A TTL of 1 s in these tests is kept by the caller's
                    // clock; the lock mirrors it from the campaign's ttl.
                    *expiry = Instant::now() + TTL;
                    true
                }
                None => false,
            })),
        }
    }

    async fn revoke(&self, lease: LeaseId) -> Result<(), LeaderError> {
        self.with(|s| {
            if let Some((owner, _)) = s.leases.remove(&lease) {
                s.revoked.push(owner);
            }
            s.drop_orphan_lock();
        });
        Ok(())
    }

    async fn released(&self, revision: u64) -> Result<(), LeaderError> {
        loop {
            if self.with(|s| s.revision > revision && s.holder.is_none()) {
                return Ok(());
            }
            sleep(Duration::from_millis(5)).await;
        }
    }
}

/// The lease TTL of these tests.
const TTL: Duration = Duration::from_millis(900);

/// Who ran the leader's work, and never two at once.
#[derive(Clone, Default)]
struct Ledger {
    starts: Arc<Mutex<Vec<String>>>,
    running: Arc<AtomicUsize>,
    most_at_once: Arc<AtomicUsize>,
    last_stop: Arc<Mutex<Option<Instant>>>,
}

impl Ledger {
    fn starts(&self) -> Vec<String> {
        self.starts.lock().expect("ledger poisoned").clone()
    }

    fn running(&self) -> usize {
        self.running.load(Ordering::SeqCst)
    }

    fn last_stop(&self) -> Option<Instant> {
        *self.last_stop.lock().expect("ledger poisoned")
    }

    /// The work of `id`'s terms: counted while it runs.
    fn work(
        &self,
        id: &str,
    ) -> impl FnMut(watch::Receiver<bool>) -> std::pin::Pin<Box<dyn Future<Output = ()> + Send>> + use<>
    {
        let ledger = self.clone();
        let id = id.to_owned();
        move |mut stop| {
            let ledger = ledger.clone();
            let id = id.clone();
            Box::pin(async move {
                ledger.starts.lock().expect("ledger poisoned").push(id);
                let now = ledger.running.fetch_add(1, Ordering::SeqCst) + 1;
                ledger.most_at_once.fetch_max(now, Ordering::SeqCst);
                let _ = stop.wait_for(|s| *s).await;
                ledger.running.fetch_sub(1, Ordering::SeqCst);
                *ledger.last_stop.lock().expect("ledger poisoned") = Some(Instant::now());
            })
        }
    }
}

/// A running elector and its shutdown switch.
struct Candidate {
    shutdown: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Candidate {
    fn start(lock: &MemLock, id: &str, ledger: &Ledger) -> Self {
        let (shutdown, stopped) = watch::channel(false);
        let elector = Elector::new(
            lock.clone(),
            Config {
                id: id.to_owned(),
                lease: TTL,
            },
        );
        let task = tokio::spawn(elector.run(ledger.work(id), stopped));
        Self { shutdown, task }
    }

    async fn stop(self) {
        self.shutdown.send_replace(true);
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("elector stops on shutdown")
            .expect("elector task");
    }
}

async fn until(what: &str, limit: Duration, mut f: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < limit, "{what}: not within {limit:?}");
        sleep(Duration::from_millis(5)).await;
    }
    start.elapsed()
}

#[tokio::test]
async fn one_of_two_leads_and_resigning_hands_over_at_once() {
    let lock = MemLock::default();
    let ledger = Ledger::default();
    let a = Candidate::start(&lock, "a", &ledger);
    until("a leads", Duration::from_secs(2), || ledger.running() == 1).await;
    let b = Candidate::start(&lock, "b", &ledger);
    sleep(TTL * 2).await;
    assert_eq!(ledger.starts(), ["a"], "b must stand by while a renews");
    assert_eq!(lock.holder().as_deref(), Some("a"));

    a.stop().await;
    assert_eq!(
        lock.with(|s| s.revoked.clone()),
        ["a"],
        "a resigns by revoking its lease"
    );
    let took = until("b takes over", Duration::from_secs(2), || {
        ledger.starts() == ["a", "b"]
    })
    .await;
    assert!(
        took < TTL / 2,
        "takeover after a resign took {took:?}, as long as an expiry"
    );
    b.stop().await;
    assert_eq!(ledger.running(), 0);
    assert_eq!(ledger.most_at_once.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_lost_lease_stops_the_work_at_once_then_campaigns_again() {
    let lock = MemLock::default();
    let ledger = Ledger::default();
    let a = Candidate::start(&lock, "a", &ledger);
    until("a leads", Duration::from_secs(2), || ledger.running() == 1).await;
    lock.drop_leases_of("a");
    // The next renewal (a third of the TTL) finds the lease gone.
    until("a stops", TTL / 3 + Duration::from_millis(200), || {
        ledger.running() == 0
    })
    .await;
    until("a leads again", Duration::from_secs(3), || {
        ledger.starts() == ["a", "a"] && ledger.running() == 1
    })
    .await;
    a.stop().await;
}

#[tokio::test]
async fn a_failed_renewal_stops_the_work_and_a_standby_takes_over() {
    let lock = MemLock::default();
    let ledger = Ledger::default();
    let a = Candidate::start(&lock, "a", &ledger);
    until("a leads", Duration::from_secs(2), || ledger.running() == 1).await;
    let b = Candidate::start(&lock, "b", &ledger);
    lock.set_fault("a", Fault::Fail);
    until("b takes over", Duration::from_secs(2), || {
        ledger.starts() == ["a", "b"]
    })
    .await;
    // a tried to resign (its lease was still alive in the lock).
    assert!(lock.with(|s| s.revoked.contains(&"a".to_owned())));
    assert_eq!(ledger.most_at_once.load(Ordering::SeqCst), 1);
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn an_unanswered_renewal_stops_the_work_by_the_lease_deadline() {
    let lock = MemLock::default();
    let ledger = Ledger::default();
    let a = Candidate::start(&lock, "a", &ledger);
    until("a leads", Duration::from_secs(2), || ledger.running() == 1).await;
    sleep(TTL / 2).await;
    lock.set_fault("a", Fault::Hang);
    let hung = Instant::now();
    let expiry = lock.with(|s| s.leases.values().map(|(_, e)| *e).max());
    let expiry = expiry.expect("a's lease");
    let b = Candidate::start(&lock, "b", &ledger);
    until("b takes over", Duration::from_secs(3), || {
        ledger.starts() == ["a", "b"]
    })
    .await;
    let stopped = ledger.last_stop().expect("a's work stopped");
    assert!(
        stopped < expiry,
        "a stopped {:?} after its lease expired",
        stopped - expiry
    );
    assert!(stopped - hung <= TTL, "a kept leading unrenewed");
    assert_eq!(ledger.most_at_once.load(Ordering::SeqCst), 1);
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn work_that_ends_by_itself_gives_up_leadership() {
    let lock = MemLock::default();
    let (shutdown, stopped) = watch::channel(false);
    let runs = Arc::new(AtomicUsize::new(0));
    let elector = Elector::new(
        lock.clone(),
        Config {
            id: "a".into(),
            lease: TTL,
        },
    );
    let counted = Arc::clone(&runs);
    let task = tokio::spawn(elector.run(
        move |_stop| {
            counted.fetch_add(1, Ordering::SeqCst);
            async {}
        },
        stopped,
    ));
    until("a resigns", Duration::from_secs(2), || {
        lock.with(|s| s.revoked.len()) == 1
    })
    .await;
    until("a campaigns again", Duration::from_secs(3), || {
        runs.load(Ordering::SeqCst) == 2
    })
    .await;
    shutdown.send_replace(true);
    task.await.expect("elector task");
}

#[test]
fn the_clock_renews_at_a_third_and_steps_down_before_the_ttl() {
    let t0 = Instant::now();
    let mut clock = LeaseClock::new(t0, Duration::from_secs(15));
    assert_eq!(clock.next_renewal(), t0 + Duration::from_secs(5));
    assert_eq!(clock.valid_until(), t0 + Duration::from_secs(12));
    clock.renewed(t0 + Duration::from_secs(5));
    assert_eq!(clock.next_renewal(), t0 + Duration::from_secs(10));
    assert_eq!(clock.valid_until(), t0 + Duration::from_secs(17));
    // A late confirmation of an older renewal does not move the deadline back.
    clock.renewed(t0 + Duration::from_secs(1));
    assert_eq!(clock.valid_until(), t0 + Duration::from_secs(17));
}

#[test]
fn config_refuses_empty_ids_and_short_leases_naming_the_flag() {
    let err = Config::new(" ".into(), Duration::from_secs(10)).expect_err("empty id");
    assert!(err.to_string().starts_with("--leader-id"), "{err}");
    let err = Config::new("a".into(), Duration::from_secs(1)).expect_err("short lease");
    assert!(
        err.to_string().starts_with("--leader-lease") && err.to_string().contains("at least"),
        "{err}"
    );
    let ok = Config::new("a".into(), MIN_LEASE).expect("minimum lease");
    assert_eq!(ok.lease, MIN_LEASE);
    assert!(default_id().ends_with(&format!("-{}", std::process::id())));
}
