//! IPv4 prefixes as they appear in configuration and objects
//! ("10.244.1.0/24"): the node agent's pod, cluster and service CIDRs and
//! weir-control's allocation of node pod CIDRs and cluster IPs.

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

/// An IPv4 network prefix. Parsing rejects host bits, so "10.244.1.5/24" is
/// an error rather than silently meaning 10.244.1.0/24.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Cidr {
    /// Network address (host bits are zero).
    pub addr: Ipv4Addr,
    /// Prefix length, 0..=32.
    pub prefix: u8,
}

/// Why a string is not a valid [`Cidr`].
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("parse CIDR {input:?}: {reason}")]
pub struct CidrError {
    /// The rejected input.
    pub input: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

impl Cidr {
    /// Builds a prefix, rejecting a length above 32 or set host bits.
    pub fn new(addr: Ipv4Addr, prefix: u8) -> Result<Self, CidrError> {
        let cidr = Cidr { addr, prefix };
        if prefix > 32 {
            return Err(CidrError {
                input: format!("{addr}/{prefix}"),
                reason: "prefix length must be 0..=32",
            });
        }
        if u32::from(addr) & !cidr.mask() != 0 {
            return Err(CidrError {
                input: format!("{addr}/{prefix}"),
                reason: "host bits are set",
            });
        }
        Ok(cidr)
    }

    /// The prefix of length `prefix` holding `addr`, its host bits cleared
    /// (how a `NetworkPolicy` ipBlock "10.1.2.3/16" is read: 10.1.0.0/16).
    pub fn masked(addr: Ipv4Addr, prefix: u8) -> Result<Self, CidrError> {
        let all = Cidr {
            addr: Ipv4Addr::UNSPECIFIED,
            prefix: prefix.min(32),
        };
        Cidr::new(Ipv4Addr::from(u32::from(addr) & all.mask()), prefix)
    }

    /// The single address `addr` (/32).
    pub fn host(addr: Ipv4Addr) -> Self {
        Cidr { addr, prefix: 32 }
    }

    /// Parses "a.b.c.d/n" clearing host bits (see [`Cidr::masked`]); plain
    /// parsing refuses them.
    pub fn parse_masked(s: &str) -> Result<Self, CidrError> {
        parse(s, Cidr::masked)
    }

    /// The netmask as a host-order integer.
    pub fn mask(&self) -> u32 {
        u32::MAX
            .checked_shl(32 - u32::from(self.prefix))
            .unwrap_or(0)
    }

    /// Whether `ip` lies inside this prefix.
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & self.mask() == u32::from(self.addr)
    }

    /// Whether `other` lies entirely inside this prefix.
    pub fn contains_net(&self, other: Cidr) -> bool {
        other.prefix >= self.prefix && self.contains(other.addr)
    }

    /// The last address of the prefix (the broadcast address for a subnet).
    pub fn last(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.addr) | !self.mask())
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl FromStr for Cidr {
    type Err = CidrError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse(s, Cidr::new)
    }
}

/// Splits "a.b.c.d/n" and builds the prefix with `make`.
fn parse(s: &str, make: fn(Ipv4Addr, u8) -> Result<Cidr, CidrError>) -> Result<Cidr, CidrError> {
    let err = |reason| CidrError {
        input: s.to_owned(),
        reason,
    };
    let (addr, prefix) = s
        .split_once('/')
        .ok_or_else(|| err("expected <address>/<prefix length>"))?;
    let addr: Ipv4Addr = addr.parse().map_err(|_| err("not an IPv4 address"))?;
    // u8::from_str accepts a leading '+'; a prefix is plain digits.
    if prefix.is_empty() || !prefix.bytes().all(|b| b.is_ascii_digit()) {
        return Err(err("prefix length must be 0..=32"));
    }
    let prefix: u8 = prefix
        .parse()
        .map_err(|_| err("prefix length must be 0..=32"))?;
    make(addr, prefix).map_err(|e| err(e.reason))
}

impl serde::Serialize for Cidr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Cidr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_displays() {
        let c: Cidr = "10.244.1.0/24".parse().unwrap();
        assert_eq!(c.addr, Ipv4Addr::new(10, 244, 1, 0));
        assert_eq!(c.prefix, 24);
        assert_eq!(c.to_string(), "10.244.1.0/24");
        assert_eq!(c.last(), Ipv4Addr::new(10, 244, 1, 255));
        assert!(c.contains(Ipv4Addr::new(10, 244, 1, 77)));
        assert!(!c.contains(Ipv4Addr::new(10, 244, 2, 1)));

        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert_eq!(all.mask(), 0);
        assert!(all.contains(Ipv4Addr::new(1, 2, 3, 4)));
        let host: Cidr = "10.0.0.1/32".parse().unwrap();
        assert_eq!(host.last(), host.addr);
    }

    #[test]
    fn masked_clears_host_bits_and_plain_parsing_refuses_them() {
        let m = Cidr::parse_masked("10.1.2.3/16").unwrap();
        assert_eq!(m, Cidr::new(Ipv4Addr::new(10, 1, 0, 0), 16).unwrap());
        assert!("10.1.2.3/16".parse::<Cidr>().is_err());
        assert_eq!(
            Cidr::masked(Ipv4Addr::new(1, 2, 3, 4), 0)
                .unwrap()
                .to_string(),
            "0.0.0.0/0"
        );
        assert!(Cidr::masked(Ipv4Addr::LOCALHOST, 33).is_err());
        assert!(Cidr::parse_masked("10.0.0.0").is_err());
        assert_eq!(Cidr::host(Ipv4Addr::LOCALHOST).to_string(), "127.0.0.1/32");
    }

    #[test]
    fn rejects_bad_input() {
        for bad in [
            "10.244.1.0",
            "10.244.1.0/",
            "10.244.1.0/33",
            "10.244.1.0/+24",
            "10.244.1.0/-1",
            "10.244.1.5/24",
            "10.244.1/24",
            "::1/128",
            "",
        ] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad} parsed");
        }
        let e = "10.244.1.5/24".parse::<Cidr>().unwrap_err();
        assert_eq!(
            e.to_string(),
            "parse CIDR \"10.244.1.5/24\": host bits are set"
        );
    }

    #[test]
    fn serde_round_trip() {
        let c: Cidr = "10.96.0.0/16".parse().unwrap();
        let json = serde_json::to_string(&c).unwrap();
        assert_eq!(json, "\"10.96.0.0/16\"");
        assert_eq!(serde_json::from_str::<Cidr>(&json).unwrap(), c);
    }
}
