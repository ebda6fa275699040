//! The allocation of per-node pod CIDRs (`/24`s) out of the cluster CIDR
//! ([`Cidr`] itself is weir-proto's, shared with the agent).

use std::net::Ipv4Addr;

pub use weir_proto::cidr::{Cidr, CidrError};

/// The prefix length of a node's pod CIDR.
pub const NODE_PREFIX: u8 = 24;

/// The lowest `/24` of `cluster` not in `used`, skipping the cluster's
/// first `/24` (`10.244.0.0/24` stays free, as the contract has it); `None`
/// if the cluster CIDR is full or smaller than a `/24`.
pub fn allocate(cluster: Cidr, used: &[Cidr]) -> Option<Cidr> {
    if cluster.prefix > NODE_PREFIX {
        return None;
    }
    let count: u32 = 1 << (NODE_PREFIX - cluster.prefix);
    let base = u32::from(cluster.addr);
    (1..count)
        .map(|i| Cidr {
            addr: Ipv4Addr::from(base + (i << (32 - NODE_PREFIX))),
            prefix: NODE_PREFIX,
        })
        .find(|c| !used.contains(c))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(s: &str) -> Cidr {
        s.parse().expect("valid CIDR")
    }

    #[test]
    fn parses_and_refuses_clearly() {
        assert_eq!(c("10.244.0.0/16").to_string(), "10.244.0.0/16");
        for (bad, why) in [
            ("10.244.0.0", "expected"),
            ("10.244.0.1/16", "host bits"),
            ("10.244.0.0/33", "0..=32"),
            ("x/8", "IPv4"),
        ] {
            let e = bad.parse::<Cidr>().expect_err(bad).to_string();
            assert!(e.contains(why) && e.contains(bad), "{e}");
        }
    }

    #[test]
    fn allocates_the_lowest_free_slash_24_from_dot_1() {
        let cluster = c("10.244.0.0/16");
        assert_eq!(allocate(cluster, &[]), Some(c("10.244.1.0/24")));
        assert_eq!(
            allocate(cluster, &[c("10.244.1.0/24"), c("10.244.3.0/24")]),
            Some(c("10.244.2.0/24"))
        );
        // A freed CIDR is reused.
        assert_eq!(
            allocate(cluster, &[c("10.244.2.0/24")]),
            Some(c("10.244.1.0/24"))
        );
        // Full.
        let small = c("10.1.0.0/23");
        assert_eq!(allocate(small, &[]), Some(c("10.1.1.0/24")));
        assert_eq!(allocate(small, &[c("10.1.1.0/24")]), None);
        assert_eq!(allocate(c("10.1.0.0/25"), &[]), None);
        assert!(cluster.contains_net(c("10.244.7.0/24")));
        assert!(!cluster.contains_net(c("10.245.7.0/24")));
    }
}
