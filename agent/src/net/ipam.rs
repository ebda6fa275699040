//! Pod IP leases of one node, persisted in `<state_dir>/ipam.json`.
//!
//! Every change is written (fsync, atomic rename, fsync of the directory)
//! before it takes effect in memory and before the caller configures the
//! address, so a crash at any point never leaves an address in use that the
//! file does not record.

use std::collections::{BTreeMap, HashSet};
use std::fs;
use std::io::{self, Write};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{Cidr, NetError};

const FILE: &str = "ipam.json";

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct State {
    /// The pod CIDR the leases were taken from.
    pod_cidr: Option<Cidr>,
    /// Pod UID → address.
    leases: BTreeMap<String, Ipv4Addr>,
    /// The address handed out last; allocation continues after it, so a
    /// released address is reused as late as possible.
    last: Option<Ipv4Addr>,
}

/// The lease table of one node.
#[derive(Debug)]
pub(crate) struct Ipam {
    path: PathBuf,
    cidr: Cidr,
    /// First and last address handed to pods: the network address, `.1`
    /// (reserved for a gateway) and the broadcast address are never used.
    first: u32,
    last: u32,
    state: State,
}

impl Ipam {
    /// Loads the leases from `state_dir` (none if the file is missing).
    pub(crate) fn open(state_dir: &Path, cidr: Cidr) -> Result<Self, NetError> {
        if cidr.prefix > 30 {
            return Err(NetError::PodCidrTooSmall { cidr });
        }
        let path = state_dir.join(FILE);
        let state = match fs::read(&path) {
            Ok(bytes) => {
                serde_json::from_slice::<State>(&bytes).map_err(|source| NetError::IpamParse {
                    path: path.clone(),
                    source,
                })?
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => State::default(),
            Err(e) => {
                return Err(NetError::io(
                    format!("read IPAM state {}", path.display()),
                    e,
                ));
            }
        };
        let invalid = |reason: String| NetError::IpamInvalid {
            path: path.clone(),
            reason,
        };
        let mut seen = HashSet::new();
        for (uid, ip) in &state.leases {
            if !cidr.contains(*ip) {
                return Err(invalid(format!(
                    "lease {ip} of pod {uid} is outside the node's pod CIDR {cidr} \
                     (file was written for {})",
                    state
                        .pod_cidr
                        .map_or_else(|| "-".to_owned(), |c| c.to_string())
                )));
            }
            if !seen.insert(*ip) {
                return Err(invalid(format!("address {ip} is leased twice")));
            }
        }
        let mut ipam = Ipam {
            path,
            cidr,
            first: u32::from(cidr.addr) + 2,
            last: u32::from(cidr.last()) - 1,
            state,
        };
        if ipam.state.pod_cidr != Some(cidr) {
            let mut next = ipam.state.clone();
            next.pod_cidr = Some(cidr);
            ipam.commit(next)?;
        }
        Ok(ipam)
    }

    /// The lease of `uid`, if it has one.
    pub(crate) fn get(&self, uid: &str) -> Option<Ipv4Addr> {
        self.state.leases.get(uid).copied()
    }

    /// The lease of `uid`, taking a free address (and persisting it) if it has none.
    pub(crate) fn allocate(&mut self, uid: &str) -> Result<Ipv4Addr, NetError> {
        if let Some(ip) = self.get(uid) {
            return Ok(ip);
        }
        let used: HashSet<u32> = self
            .state
            .leases
            .values()
            .map(|ip| u32::from(*ip))
            .collect();
        let size = self.last - self.first + 1;
        let start = match self.state.last.map(u32::from) {
            Some(prev) if (self.first..=self.last).contains(&prev) => prev - self.first + 1,
            _ => 0,
        };
        let free = (0..size)
            .map(|i| self.first + (start + i) % size)
            .find(|candidate| !used.contains(candidate))
            .ok_or_else(|| NetError::IpamExhausted {
                pod: uid.to_owned(),
                cidr: self.cidr,
                leases: self.state.leases.len(),
            })?;
        let ip = Ipv4Addr::from(free);
        let mut next = self.state.clone();
        next.leases.insert(uid.to_owned(), ip);
        next.last = Some(ip);
        self.commit(next)?;
        Ok(ip)
    }

    /// Drops the lease of `uid`; no lease is success.
    pub(crate) fn release(&mut self, uid: &str) -> Result<(), NetError> {
        if !self.state.leases.contains_key(uid) {
            return Ok(());
        }
        let mut next = self.state.clone();
        next.leases.remove(uid);
        self.commit(next)
    }

    /// UIDs holding a lease.
    pub(crate) fn uids(&self) -> impl Iterator<Item = &str> {
        self.state.leases.keys().map(String::as_str)
    }

    /// Writes `next` durably, then makes it the in-memory state.
    fn commit(&mut self, next: State) -> Result<(), NetError> {
        let action = || format!("write IPAM state {}", self.path.display());
        let json = serde_json::to_vec_pretty(&next)
            .map_err(|e| NetError::io(action(), io::Error::other(e)))?;
        write_atomic(&self.path, &json).map_err(|e| NetError::io(action(), e))?;
        self.state = next;
        Ok(())
    }
}

/// Replaces `path` with `bytes` so that a crash leaves either the old or the
/// new content, both durable.
fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp_name = path.file_name().unwrap_or_default().to_owned();
    tmp_name.push(".tmp");
    let tmp = dir.join(tmp_name);
    let mut file = fs::File::create(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    drop(file);
    fs::rename(&tmp, path)?;
    fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    struct TempDir(PathBuf);

    impl TempDir {
        fn new(name: &str) -> Self {
            let dir =
                std::env::temp_dir().join(format!("weir-ipam-test-{name}-{}", std::process::id()));
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir_all(&dir).unwrap();
            TempDir(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn cidr(s: &str) -> Cidr {
        s.parse().unwrap()
    }

    #[test]
    fn allocates_distinct_addresses_in_range() {
        let dir = TempDir::new("distinct");
        let mut ipam = Ipam::open(&dir.0, cidr("10.244.1.0/24")).unwrap();
        let mut seen = HashSet::new();
        for i in 0..253 {
            let ip = ipam.allocate(&format!("pod-{i}")).unwrap();
            assert!(seen.insert(ip), "{ip} handed out twice");
            let last = ip.octets()[3];
            assert!((2..=254).contains(&last), "{ip} outside .2-.254");
        }
        assert_eq!(seen.len(), 253);
        // The same UID gets the same address again.
        assert_eq!(ipam.allocate("pod-7").unwrap(), ipam.get("pod-7").unwrap());
        assert_eq!(
            ipam.allocate("pod-0").unwrap(),
            Ipv4Addr::new(10, 244, 1, 2)
        );
    }

    #[test]
    fn exhaustion_is_an_error() {
        let dir = TempDir::new("exhaust");
        let mut ipam = Ipam::open(&dir.0, cidr("10.244.1.0/29")).unwrap();
        // .2 .. .6 are usable in a /29.
        for i in 0..5 {
            ipam.allocate(&format!("pod-{i}")).unwrap();
        }
        let err = ipam.allocate("one-too-many").unwrap_err();
        assert!(
            matches!(err, NetError::IpamExhausted { leases: 5, .. }),
            "{err}"
        );
        assert_eq!(
            err.to_string(),
            "allocate IP for pod one-too-many: all 5 addresses of pod CIDR 10.244.1.0/29 are leased"
        );
        assert!(ipam.get("one-too-many").is_none());
        // Releasing one makes room again.
        let freed = ipam.get("pod-3").unwrap();
        ipam.release("pod-3").unwrap();
        assert_eq!(ipam.allocate("late").unwrap(), freed);
    }

    #[test]
    fn persists_across_reopen() {
        let dir = TempDir::new("persist");
        let (a, b) = {
            let mut ipam = Ipam::open(&dir.0, cidr("10.244.1.0/24")).unwrap();
            (ipam.allocate("a").unwrap(), ipam.allocate("b").unwrap())
        };
        let mut ipam = Ipam::open(&dir.0, cidr("10.244.1.0/24")).unwrap();
        assert_eq!(ipam.get("a"), Some(a));
        assert_eq!(ipam.get("b"), Some(b));
        assert_eq!(ipam.allocate("a").unwrap(), a);
        let c = ipam.allocate("c").unwrap();
        assert!(c != a && c != b);
        let mut uids: Vec<_> = ipam.uids().collect();
        uids.sort_unstable();
        assert_eq!(uids, ["a", "b", "c"]);
        assert!(!dir.0.join("ipam.json.tmp").exists());
    }

    #[test]
    fn release_is_persisted_and_idempotent() {
        let dir = TempDir::new("release");
        let mut ipam = Ipam::open(&dir.0, cidr("10.244.1.0/24")).unwrap();
        let a = ipam.allocate("a").unwrap();
        ipam.release("a").unwrap();
        ipam.release("a").unwrap();
        ipam.release("never-had-one").unwrap();
        let ipam = Ipam::open(&dir.0, cidr("10.244.1.0/24")).unwrap();
        assert_eq!(ipam.get("a"), None);
        // A released address is not the next one handed out.
        let mut ipam = ipam;
        assert_ne!(ipam.allocate("b").unwrap(), a);
    }

    #[test]
    fn rejects_leases_outside_a_changed_cidr_and_bad_files() {
        let dir = TempDir::new("changed");
        Ipam::open(&dir.0, cidr("10.244.1.0/24"))
            .unwrap()
            .allocate("a")
            .unwrap();
        let err = Ipam::open(&dir.0, cidr("10.244.2.0/24")).unwrap_err();
        assert!(matches!(err, NetError::IpamInvalid { .. }), "{err}");

        fs::write(dir.0.join(FILE), b"{not json").unwrap();
        let err = Ipam::open(&dir.0, cidr("10.244.1.0/24")).unwrap_err();
        assert!(matches!(err, NetError::IpamParse { .. }), "{err}");

        fs::write(
            dir.0.join(FILE),
            br#"{"pod_cidr":"10.244.1.0/24","leases":{"a":"10.244.1.2","b":"10.244.1.2"}}"#,
        )
        .unwrap();
        let err = Ipam::open(&dir.0, cidr("10.244.1.0/24")).unwrap_err();
        assert!(err.to_string().contains("leased twice"), "{err}");

        let err = Ipam::open(&dir.0, cidr("10.244.1.0/31")).unwrap_err();
        assert!(matches!(err, NetError::PodCidrTooSmall { .. }), "{err}");
    }
}
