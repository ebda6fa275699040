//! Checks and defaults of `networking.k8s.io/v1` `NetworkPolicy`, with the
//! apiserver's rules (`ValidateNetworkPolicy`, `SetDefaults_NetworkPolicy`)
//! and weir's limits: the dataplane does TCP and UDP, not SCTP, and pods
//! are IPv4 only, so an IPv6 `ipBlock` is accepted with a warning (it can
//! match nothing).

use std::net::IpAddr;

use k8s_openapi::api::networking::v1::{
    IPBlock, NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort, NetworkPolicySpec,
};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::check::{Checker, Scope, one_of};
use super::{ManifestError, names};

const POLICY_TYPES: [&str; 2] = ["Ingress", "Egress"];
const PROTOCOLS: [&str; 2] = ["TCP", "UDP"];

/// Checks and defaults a `NetworkPolicy` (see the module docs).
pub(super) fn network_policy(
    c: &mut Checker<'_>,
    np: &mut NetworkPolicy,
) -> Result<(), ManifestError> {
    c.object_meta(&mut np.metadata, Scope::Namespaced)?;
    let spec = np.spec.get_or_insert_with(NetworkPolicySpec::default);
    if let Some(selector) = &spec.pod_selector {
        c.label_selector("spec.podSelector", selector, true)?;
    }
    for (i, rule) in spec.ingress.iter_mut().flatten().enumerate() {
        let path = format!("spec.ingress[{i}]");
        peers(
            c,
            &format!("{path}.from"),
            rule.from.as_deref().unwrap_or_default(),
        )?;
        ports(c, &format!("{path}.ports"), rule.ports.iter_mut().flatten())?;
    }
    for (i, rule) in spec.egress.iter_mut().flatten().enumerate() {
        let path = format!("spec.egress[{i}]");
        peers(
            c,
            &format!("{path}.to"),
            rule.to.as_deref().unwrap_or_default(),
        )?;
        ports(c, &format!("{path}.ports"), rule.ports.iter_mut().flatten())?;
    }
    policy_types(c, spec)
}

/// `policyTypes`: at most two, each `Ingress` or `Egress`; defaulted to
/// `Ingress`, plus `Egress` when there are egress rules.
fn policy_types(c: &Checker<'_>, spec: &mut NetworkPolicySpec) -> Result<(), ManifestError> {
    let has_egress = spec.egress.as_ref().is_some_and(|e| !e.is_empty());
    let types = spec.policy_types.get_or_insert_with(Vec::new);
    if types.is_empty() {
        types.push("Ingress".to_owned());
        if has_egress {
            types.push("Egress".to_owned());
        }
        return Ok(());
    }
    if types.len() > POLICY_TYPES.len() {
        return Err(c.err(
            "spec.policyTypes",
            format!(
                "may not specify more than two policyTypes, got {}",
                types.len()
            ),
        ));
    }
    for (i, t) in types.iter().enumerate() {
        one_of(t, &POLICY_TYPES).map_err(|r| c.err(&format!("spec.policyTypes[{i}]"), r))?;
    }
    Ok(())
}

/// The peers of one rule (`from` or `to`): each exactly one of ipBlock or
/// (podSelector and/or namespaceSelector).
fn peers(
    c: &mut Checker<'_>,
    path: &str,
    peers: &[NetworkPolicyPeer],
) -> Result<(), ManifestError> {
    for (i, peer) in peers.iter().enumerate() {
        let p = format!("{path}[{i}]");
        let selectors = usize::from(peer.pod_selector.is_some())
            + usize::from(peer.namespace_selector.is_some());
        match (&peer.ip_block, selectors) {
            (None, 0) => {
                return Err(c.err(
                    &p,
                    "must specify a peer: podSelector, namespaceSelector or ipBlock",
                ));
            }
            (Some(_), 1..) => {
                return Err(c.err(
                    &p,
                    "may not specify both ipBlock and another peer (podSelector or namespaceSelector)",
                ));
            }
            (Some(block), 0) => ip_block(c, &format!("{p}.ipBlock"), block)?,
            (None, _) => {}
        }
        if let Some(s) = &peer.pod_selector {
            c.label_selector(&format!("{p}.podSelector"), s, true)?;
        }
        if let Some(s) = &peer.namespace_selector {
            c.label_selector(&format!("{p}.namespaceSelector"), s, true)?;
        }
    }
    Ok(())
}

/// A parsed CIDR: its network bits (IPv4 in the low 32), prefix length and
/// family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Net {
    bits: u128,
    prefix: u8,
    v6: bool,
}

impl Net {
    fn width(self) -> u8 {
        if self.v6 { 128 } else { 32 }
    }

    fn mask(self) -> u128 {
        let family = if self.v6 {
            u128::MAX
        } else {
            u128::from(u32::MAX)
        };
        let host = u32::from(self.width() - self.prefix);
        let host_bits = 1u128.checked_shl(host).map_or(u128::MAX, |b| b - 1);
        family & !host_bits
    }

    fn network(self) -> Self {
        Self {
            bits: self.bits & self.mask(),
            ..self
        }
    }

    /// Whether `inner` lies inside this network (any prefix length).
    fn contains(self, inner: Self) -> bool {
        self.v6 == inner.v6 && inner.bits & self.mask() == self.network().bits
    }

    fn text(self) -> String {
        let addr = if self.v6 {
            IpAddr::from(std::net::Ipv6Addr::from(self.bits))
        } else {
            IpAddr::from(std::net::Ipv4Addr::from(
                u32::try_from(self.bits).unwrap_or_default(),
            ))
        };
        format!("{addr}/{}", self.prefix)
    }
}

/// Parses `a.b.c.d/n` or an IPv6 CIDR, as Kubernetes' `IsValidCIDR` does
/// (no leading zeros, a decimal prefix length within the family's width).
fn parse_cidr(text: &str) -> Result<Net, String> {
    let bad = |why: &str| {
        format!("{text:?} is not a valid CIDR: {why} (e.g. \"10.0.0.0/16\" or \"192.168.1.1/32\")")
    };
    let (addr, prefix) = text
        .split_once('/')
        .ok_or_else(|| bad("a prefix length (\"/n\") is required"))?;
    let addr: IpAddr = addr
        .parse()
        .map_err(|_| bad(&format!("{addr:?} is not an IP address")))?;
    let (bits, width, v6) = match addr {
        IpAddr::V4(a) => (u128::from(u32::from(a)), 32, false),
        IpAddr::V6(a) => (u128::from(a), 128, true),
    };
    let prefix = Some(prefix)
        .filter(|p| !p.is_empty() && p.len() <= 3 && p.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|p| p.parse::<u8>().ok())
        .filter(|p| *p <= width)
        .ok_or_else(|| bad(&format!("the prefix length must be 0-{width}")))?;
    Ok(Net { bits, prefix, v6 })
}

/// `ipBlock`: a valid CIDR (host bits and IPv6 warned about), each
/// `except` a valid CIDR strictly inside it.
fn ip_block(c: &mut Checker<'_>, path: &str, block: &IPBlock) -> Result<(), ManifestError> {
    let field = format!("{path}.cidr");
    if block.cidr.is_empty() {
        return Err(c.err(&field, "required"));
    }
    let cidr = parse_cidr(&block.cidr).map_err(|r| c.err(&field, r))?;
    canonical(c, &field, cidr, &block.cidr);
    if cidr.v6 {
        c.warnings.push(format!(
            "{}: {field}: {:?} is an IPv6 CIDR: weir pods have IPv4 addresses only, so this peer matches nothing",
            c.file, block.cidr
        ));
    }
    for (i, except) in block.except.iter().flatten().enumerate() {
        let field = format!("{path}.except[{i}]");
        let inner = parse_cidr(except).map_err(|r| c.err(&field, r))?;
        if inner.v6 != cidr.v6 {
            return Err(c.err(
                &field,
                format!(
                    "{except:?} must be a strict subset of cidr {:?}: it is of the other IP family",
                    block.cidr
                ),
            ));
        }
        if !cidr.contains(inner) {
            return Err(c.err(
                &field,
                format!(
                    "{except:?} must be a strict subset of cidr {:?}: it is not inside it",
                    block.cidr
                ),
            ));
        }
        if inner.prefix <= cidr.prefix {
            let how = if inner.prefix == cidr.prefix {
                "it is the whole cidr"
            } else {
                "it is wider than the cidr"
            };
            return Err(c.err(
                &field,
                format!(
                    "{except:?} must be a strict subset of cidr {:?}: {how}",
                    block.cidr
                ),
            ));
        }
        canonical(c, &field, inner, except);
    }
    Ok(())
}

/// Warns, as the apiserver does, about a CIDR with host bits set.
fn canonical(c: &mut Checker<'_>, field: &str, net: Net, text: &str) {
    let network = net.network();
    if network != net {
        c.warnings.push(format!(
            "{}: {field}: {text:?} has host bits set: it means {:?}",
            c.file,
            network.text()
        ));
    }
}

/// Each port: protocol (default TCP), a port number or name, and an
/// `endPort` only after a numeric port, not below it.
fn ports<'a>(
    c: &Checker<'_>,
    path: &str,
    ports: impl Iterator<Item = &'a mut NetworkPolicyPort>,
) -> Result<(), ManifestError> {
    for (i, p) in ports.enumerate() {
        let path = format!("{path}[{i}]");
        let protocol = p.protocol.get_or_insert_with(|| "TCP".to_owned());
        if protocol == "SCTP" {
            return Err(c.err(
                &format!("{path}.protocol"),
                "\"SCTP\" is not supported by weir: its dataplane enforces policy on TCP and UDP only",
            ));
        }
        one_of(protocol, &PROTOCOLS).map_err(|r| c.err(&format!("{path}.protocol"), r))?;
        let end_field = format!("{path}.endPort");
        match (&p.port, p.end_port) {
            (None, Some(_)) => {
                return Err(c.err(
                    &end_field,
                    "may not be specified when `port` is not specified",
                ));
            }
            (Some(IntOrString::String(name)), end) => {
                names::iana_svc_name(name).map_err(|r| c.err(&format!("{path}.port"), r))?;
                if end.is_some() {
                    return Err(c.err(
                        &end_field,
                        format!("may not be specified when `port` is a named port ({name:?})"),
                    ));
                }
            }
            (Some(IntOrString::Int(port)), end) => {
                in_port_range(*port).map_err(|r| c.err(&format!("{path}.port"), r))?;
                if let Some(end) = end {
                    in_port_range(end).map_err(|r| c.err(&end_field, r))?;
                    if end < *port {
                        return Err(c.err(
                            &end_field,
                            format!("{end} must be greater than or equal to `port` ({port})"),
                        ));
                    }
                }
            }
            (None, None) => {}
        }
    }
    Ok(())
}

fn in_port_range(port: i32) -> Result<(), String> {
    if (1..=65535).contains(&port) {
        Ok(())
    } else {
        Err(format!("{port} must be between 1 and 65535, inclusive"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidrs_parse_and_contain() {
        let n = parse_cidr("10.0.0.0/8").unwrap();
        assert!(n.contains(parse_cidr("10.1.0.0/16").unwrap()));
        assert!(!n.contains(parse_cidr("11.0.0.0/16").unwrap()));
        assert!(parse_cidr("0.0.0.0/0").unwrap().contains(n));
        assert_eq!(
            parse_cidr("10.1.2.3/8").unwrap().network().text(),
            "10.0.0.0/8"
        );
        assert_eq!(
            parse_cidr("10.1.2.3/32").unwrap().network().text(),
            "10.1.2.3/32"
        );
        let v6 = parse_cidr("fd00::/8").unwrap();
        assert!(v6.contains(parse_cidr("fd00:1::/32").unwrap()));
        assert!(!v6.contains(n));
        assert_eq!(parse_cidr("::/0").unwrap().network().text(), "::/0");
        for bad in [
            "10.0.0.0",
            "10.0.0/8",
            "10.0.0.0/33",
            "010.0.0.0/8",
            "10.0.0.0/+8",
            "fd00::/129",
            "x/1",
        ] {
            assert!(parse_cidr(bad).is_err(), "{bad}");
        }
    }
}
