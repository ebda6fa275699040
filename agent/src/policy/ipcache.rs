//! The agent's mirror of the ipcache: which identities each prefix holds,
//! and the values the LPM trie must carry so one lookup answers both "whose
//! address is this" and "which `ipBlock` holds it".
//!
//! A prefix has up to two slots: a *node* identity (a pod, the host, a
//! remote node) and a *CIDR* identity (an `ipBlock` names exactly this
//! prefix). The value written for it carries the node identity if there is
//! one (else its CIDR identity) and, as `cidr_identity`, the CIDR identity
//! of the longest `ipBlock` prefix holding it. Changing a CIDR slot can
//! change the value of every prefix inside it; [`IpCacheMirror`] returns
//! the writes that keep the trie consistent.

use std::collections::BTreeMap;

use weir_common::{ID_CIDR_MIN, IPCACHE_F_CIDR, IpCacheValue};

use super::Cidr;

/// The identities one prefix holds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Slot {
    /// A pod's, the host's or a remote node's identity.
    pub node: Option<u32>,
    /// The CIDR identity of an `ipBlock` naming exactly this prefix.
    pub cidr: Option<u32>,
}

/// One write the trie needs: a value, or `None` to delete the prefix.
pub(crate) type Write = (Cidr, Option<IpCacheValue>);

/// The ipcache as the agent last wrote it.
#[derive(Debug, Default)]
pub(crate) struct IpCacheMirror {
    slots: BTreeMap<Cidr, Slot>,
}

impl IpCacheMirror {
    /// Rebuilds the mirror from the values a trie holds (an adopted map).
    pub fn from_values(entries: impl IntoIterator<Item = (Cidr, IpCacheValue)>) -> Self {
        let slots = entries
            .into_iter()
            .map(|(c, v)| {
                let own_cidr = v.flags & IPCACHE_F_CIDR != 0;
                let slot = if v.identity >= ID_CIDR_MIN {
                    Slot {
                        node: None,
                        cidr: Some(v.identity),
                    }
                } else {
                    Slot {
                        node: Some(v.identity),
                        cidr: own_cidr.then_some(v.cidr_identity),
                    }
                };
                (c, slot)
            })
            .collect();
        Self { slots }
    }

    /// Every prefix and its slots.
    pub fn slots(&self) -> impl Iterator<Item = (&Cidr, &Slot)> {
        self.slots.iter()
    }

    /// Sets `cidr`'s slot for `identity` (a CIDR identity if it is ≥
    /// [`ID_CIDR_MIN`]); returns the writes, empty if nothing changed.
    pub fn upsert(&mut self, cidr: Cidr, identity: u32) -> Vec<Write> {
        let before = self.values();
        let slot = self.slots.entry(cidr).or_default();
        if identity >= ID_CIDR_MIN {
            slot.cidr = Some(identity);
        } else {
            slot.node = Some(identity);
        }
        self.changes(&before)
    }

    /// Clears `cidr`'s slot if it holds `identity`; returns the writes,
    /// empty if it did not.
    pub fn remove(&mut self, cidr: Cidr, identity: u32) -> Vec<Write> {
        let before = self.values();
        if let Some(slot) = self.slots.get_mut(&cidr) {
            if slot.cidr == Some(identity) {
                slot.cidr = None;
            } else if slot.node == Some(identity) {
                slot.node = None;
            }
            if *slot == Slot::default() {
                self.slots.remove(&cidr);
            }
        }
        self.changes(&before)
    }

    /// The value every prefix must carry now.
    pub fn values(&self) -> BTreeMap<Cidr, IpCacheValue> {
        self.slots
            .iter()
            .filter_map(|(c, s)| {
                let identity = s.node.or(s.cidr)?;
                Some((
                    *c,
                    IpCacheValue {
                        identity,
                        cidr_identity: self.covering_cidr(*c).unwrap_or(0),
                        flags: if s.cidr.is_some() { IPCACHE_F_CIDR } else { 0 },
                    },
                ))
            })
            .collect()
    }

    /// The CIDR identity of the longest `ipBlock` prefix holding `c`.
    fn covering_cidr(&self, c: Cidr) -> Option<u32> {
        (0..=c.prefix).rev().find_map(|len| {
            let outer = Cidr::masked(c.addr, len).ok()?;
            self.slots.get(&outer)?.cidr
        })
    }

    fn changes(&self, before: &BTreeMap<Cidr, IpCacheValue>) -> Vec<Write> {
        let after = self.values();
        let mut out: Vec<Write> = after
            .iter()
            .filter(|(c, v)| before.get(c) != Some(v))
            .map(|(c, v)| (*c, Some(*v)))
            .collect();
        out.extend(
            before
                .keys()
                .filter(|c| !after.contains_key(c))
                .map(|c| (*c, None)),
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    fn c(s: &str) -> Cidr {
        Cidr::parse_masked(s).expect("cidr")
    }

    const POD: u32 = 300;
    const BLOCK: u32 = ID_CIDR_MIN + 1;
    const EXCEPT: u32 = ID_CIDR_MIN + 2;

    #[test]
    fn a_pod_inside_an_ipblock_carries_both_identities() {
        let mut m = IpCacheMirror::default();
        let w = m.upsert(c("10.1.2.5/32"), POD);
        assert_eq!(
            w,
            vec![(
                c("10.1.2.5/32"),
                Some(IpCacheValue {
                    identity: POD,
                    cidr_identity: 0,
                    flags: 0
                })
            )]
        );
        let w = m.upsert(c("10.1.2.0/24"), BLOCK);
        assert_eq!(w.len(), 2, "the block and the pod inside it: {w:?}");
        let v = m.values();
        assert_eq!(v[&c("10.1.2.5/32")].cidr_identity, BLOCK);
        assert_eq!(v[&c("10.1.2.0/24")].identity, BLOCK);
        assert_eq!(v[&c("10.1.2.0/24")].flags, IPCACHE_F_CIDR);
        // An except inside the block takes over the pods inside it.
        let w = m.upsert(c("10.1.2.0/28"), EXCEPT);
        assert_eq!(w.len(), 2, "{w:?}");
        assert_eq!(m.values()[&c("10.1.2.5/32")].cidr_identity, EXCEPT);
        // Removing with the wrong identity does nothing.
        assert!(m.remove(c("10.1.2.0/28"), BLOCK).is_empty());
        let w = m.remove(c("10.1.2.0/28"), EXCEPT);
        assert!(w.contains(&(c("10.1.2.0/28"), None)), "{w:?}");
        assert_eq!(m.values()[&c("10.1.2.5/32")].cidr_identity, BLOCK);
    }

    #[test]
    fn a_pod_ip_named_by_an_ipblock_keeps_both_slots() {
        let mut m = IpCacheMirror::default();
        m.upsert(c("10.1.2.5/32"), BLOCK);
        m.upsert(c("10.1.2.5/32"), POD);
        let v = m.values()[&c("10.1.2.5/32")];
        assert_eq!((v.identity, v.cidr_identity, v.flags), (POD, BLOCK, 1));
        // The pod goes: the prefix stays for the ipBlock.
        let w = m.remove(c("10.1.2.5/32"), POD);
        assert_eq!(w.len(), 1);
        assert_eq!(w[0].1.map(|v| v.identity), Some(BLOCK));
        // Round trip through the trie's values.
        let again = IpCacheMirror::from_values(m.values());
        assert_eq!(again.values(), m.values());
        m.upsert(c("10.1.2.5/32"), POD);
        let again = IpCacheMirror::from_values(m.values());
        assert_eq!(again.values(), m.values());
    }

    #[test]
    fn host_bits_are_masked() {
        let x = c("10.1.2.3/16");
        assert_eq!(x.addr, Ipv4Addr::new(10, 1, 0, 0));
        assert_eq!(x.to_string(), "10.1.0.0/16");
        assert!(Cidr::new(Ipv4Addr::LOCALHOST, 33).is_err());
        assert!("10.0.0.0".parse::<Cidr>().is_err());
        assert!("10.0.0.0/x".parse::<Cidr>().is_err());
        assert!(c("0.0.0.0/0").contains(Ipv4Addr::new(1, 2, 3, 4)));
        assert!(!c("10.1.0.0/16").contains(Ipv4Addr::new(10, 2, 0, 1)));
    }
}
