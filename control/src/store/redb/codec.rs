//! Byte layout of the event log's values: all events of one revision, each
//! as kind, key, value, create revision and the optional previous value.
//! The revision itself is the log key, so it is not repeated here.

use crate::store::{Event, EventKind, KeyValue, StoreError};

const PUT: u8 = 0;
const DELETE: u8 = 1;

/// Encodes the events of one revision.
pub(super) fn encode_events(events: &[Event]) -> Vec<u8> {
    let mut out = Vec::new();
    put_len(&mut out, events.len());
    for ev in events {
        out.push(match ev.kind {
            EventKind::Put => PUT,
            EventKind::Delete => DELETE,
        });
        put_bytes(&mut out, ev.kv.key.as_bytes());
        put_bytes(&mut out, &ev.kv.value);
        out.extend_from_slice(&ev.kv.create_revision.to_le_bytes());
        match &ev.prev {
            None => out.push(0),
            Some(prev) => {
                out.push(1);
                put_bytes(&mut out, &prev.value);
                out.extend_from_slice(&prev.create_revision.to_le_bytes());
                out.extend_from_slice(&prev.mod_revision.to_le_bytes());
            }
        }
    }
    out
}

/// Decodes the events stored at `revision`.
pub(super) fn decode_events(revision: u64, bytes: &[u8]) -> Result<Vec<Event>, StoreError> {
    let corrupt = |reason: &str| StoreError::Corrupt {
        what: format!("event log entry at revision {revision}"),
        reason: reason.to_owned(),
    };
    let mut r = Reader { bytes };
    let count = r.len().ok_or_else(|| corrupt("truncated event count"))?;
    // Each event takes at least 1+8+8+8+1 bytes; don't trust a huge count.
    let mut events = Vec::with_capacity(count.min(bytes.len() / 26));
    for _ in 0..count {
        let kind = match r.byte() {
            Some(PUT) => EventKind::Put,
            Some(DELETE) => EventKind::Delete,
            Some(_) => return Err(corrupt("unknown event kind")),
            None => return Err(corrupt("truncated event")),
        };
        let key = r.bytes().ok_or_else(|| corrupt("truncated key"))?;
        let key = String::from_utf8(key.to_vec()).map_err(|_| corrupt("key is not UTF-8"))?;
        let value = r
            .bytes()
            .ok_or_else(|| corrupt("truncated value"))?
            .to_vec();
        let create_revision = r
            .u64()
            .ok_or_else(|| corrupt("truncated create revision"))?;
        let prev = match r.byte() {
            Some(0) => None,
            Some(1) => {
                let value = r
                    .bytes()
                    .ok_or_else(|| corrupt("truncated previous value"))?;
                let create_revision = r
                    .u64()
                    .ok_or_else(|| corrupt("truncated previous revision"))?;
                let mod_revision = r
                    .u64()
                    .ok_or_else(|| corrupt("truncated previous revision"))?;
                Some(KeyValue {
                    key: key.clone(),
                    value: value.to_vec(),
                    mod_revision,
                    create_revision,
                })
            }
            _ => return Err(corrupt("bad previous-value marker")),
        };
        events.push(Event {
            kind,
            kv: KeyValue {
                key,
                value,
                mod_revision: revision,
                create_revision,
            },
            prev,
        });
    }
    if !r.bytes.is_empty() {
        return Err(corrupt("trailing bytes"));
    }
    Ok(events)
}

fn put_len(out: &mut Vec<u8>, len: usize) {
    out.extend_from_slice(&(len as u64).to_le_bytes());
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    put_len(out, b.len());
    out.extend_from_slice(b);
}

struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.bytes.len() < n {
            return None;
        }
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Some(head)
    }

    fn byte(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }

    fn u64(&mut self) -> Option<u64> {
        let b = self.take(8)?;
        Some(u64::from_le_bytes(b.try_into().ok()?))
    }

    fn len(&mut self) -> Option<usize> {
        usize::try_from(self.u64()?).ok()
    }

    fn bytes(&mut self) -> Option<&'a [u8]> {
        let n = self.len()?;
        self.take(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_truncation() {
        let events = vec![
            Event {
                kind: EventKind::Put,
                kv: KeyValue {
                    key: "/a/b".into(),
                    value: b"new".to_vec(),
                    mod_revision: 7,
                    create_revision: 3,
                },
                prev: Some(KeyValue {
                    key: "/a/b".into(),
                    value: b"old".to_vec(),
                    mod_revision: 5,
                    create_revision: 3,
                }),
            },
            Event {
                kind: EventKind::Delete,
                kv: KeyValue {
                    key: "/a/c".into(),
                    value: Vec::new(),
                    mod_revision: 7,
                    create_revision: 7,
                },
                prev: None,
            },
        ];
        let bytes = encode_events(&events);
        assert_eq!(decode_events(7, &bytes).unwrap(), events);
        for cut in 0..bytes.len() {
            assert!(decode_events(7, &bytes[..cut]).is_err(), "cut at {cut}");
        }
        assert!(decode_events(7, &[bytes.as_slice(), &[0]].concat()).is_err());
    }
}
