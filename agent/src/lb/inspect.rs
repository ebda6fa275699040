//! The node's service table as the kernel sees it, read straight from the
//! pinned maps under `<bpffs>/weir/<node>/` (read only: nothing is written,
//! no program is loaded), so it works while the agent is stopped.
//!
//! `weir-agent inspect services --node <name> [--bpffs DIR] [-o json]`
//! prints it; the agent's `/metrics` uses [`entry_counts`].

use std::{
    collections::{BTreeMap, HashMap as StdHashMap},
    ffi::OsString,
    fmt::Write as _,
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use aya::maps::{HashMap, Map, MapData};
use serde::Serialize;
use weir_common::{
    AFFINITY_MAP, AffinityKey, AffinityValue, BACKENDS_MAP, Backend, LB_NETNS_MAP, PROTO_TCP,
    PROTO_UDP, SLOTS_MAP, SOCK_REV_MAP, SVC_FLAG_AFFINITY, SVC_MAP, SlotKey, SvcKey, SvcValue,
};

use super::{Current, LbError, map_err};

/// The maps whose entries are counted, in display order.
pub const COUNTED_MAPS: [&str; 6] = [
    SVC_MAP,
    SLOTS_MAP,
    BACKENDS_MAP,
    SOCK_REV_MAP,
    AFFINITY_MAP,
    LB_NETNS_MAP,
];

/// One backend of a service, as its slot points at it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct BackendView {
    /// Slot index (`0..count`).
    pub slot: u32,
    /// Backend id (key of `weir_backends_v1`).
    pub id: u32,
    /// Pod IP.
    pub ip: Ipv4Addr,
    /// Target port.
    pub port: u16,
}

/// One service port as programmed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ServiceView {
    /// The VIP.
    pub vip: Ipv4Addr,
    /// The service port.
    pub port: u16,
    /// `TCP`, `UDP` or the protocol number.
    pub protocol: String,
    /// Service id (first half of the slot keys).
    pub id: u32,
    /// Ready backends the programs choose from (0: connects are refused).
    pub count: u32,
    /// `ClientIP` affinity timeout in seconds, if affinity is on.
    pub affinity_timeout_seconds: Option<u32>,
    /// Clients with a live affinity entry for this service.
    pub affinity_clients: usize,
    /// The backends in slot order.
    pub backends: Vec<BackendView>,
    /// Slots `< count` with no slot entry or whose backend is missing
    /// (should be 0; anything else is a half-written service).
    pub missing_slots: u32,
}

/// A node's service table and map sizes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Snapshot {
    /// The node.
    pub node: String,
    /// The pin directory read.
    pub pin_dir: PathBuf,
    /// Services, ordered by VIP, port, protocol.
    pub services: Vec<ServiceView>,
    /// Entries per map name.
    pub map_entries: BTreeMap<String, usize>,
}

fn open<K: aya::Pod, V: aya::Pod>(
    dir: &Path,
    name: &'static str,
) -> Result<HashMap<MapData, K, V>, LbError> {
    let pin = dir.join(name);
    if !pin.exists() {
        return Err(LbError::Io {
            what: "open pinned map (no balancer was loaded for this node?)",
            path: pin,
            source: std::io::ErrorKind::NotFound.into(),
        });
    }
    let data = MapData::from_pin(&pin).map_err(map_err("open pinned", name))?;
    let map = Map::from_map_data(data).map_err(map_err("open pinned", name))?;
    HashMap::try_from(map).map_err(map_err("open pinned", name))
}

fn entries<K: aya::Pod + Ord, V: aya::Pod>(
    dir: &Path,
    name: &'static str,
) -> Result<BTreeMap<K, V>, LbError> {
    let m: HashMap<MapData, K, V> = open(dir, name)?;
    Ok(m.iter().filter_map(Result::ok).collect())
}

/// Reads node `node`'s service table from `<bpffs>/weir/<node>/`.
pub fn read(bpffs: &Path, node: &str) -> Result<Snapshot, LbError> {
    let dir = bpffs.join("weir").join(node);
    let cur = Current {
        svcs: entries::<SvcKey, SvcValue>(&dir, SVC_MAP)?,
        slots: entries::<SlotKey, u32>(&dir, SLOTS_MAP)?,
        backends: entries::<u32, Backend>(&dir, BACKENDS_MAP)?,
    };
    let aff: HashMap<MapData, AffinityKey, AffinityValue> = open(&dir, AFFINITY_MAP)?;
    let affinity: Vec<(AffinityKey, AffinityValue)> = aff.iter().filter_map(Result::ok).collect();
    let map_entries = entry_counts(&dir)?
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
    Ok(Snapshot {
        node: node.to_owned(),
        services: services(&cur, &affinity),
        pin_dir: dir,
        map_entries,
    })
}

/// Entries in each of [`COUNTED_MAPS`] pinned in `pin_dir` (keys only, no
/// lookups). A map that is not pinned counts as an error.
pub fn entry_counts(pin_dir: &Path) -> Result<BTreeMap<&'static str, usize>, LbError> {
    let mut out = BTreeMap::new();
    for name in COUNTED_MAPS {
        let n = match name {
            SVC_MAP => open::<SvcKey, SvcValue>(pin_dir, name)?.keys().count(),
            SLOTS_MAP => open::<SlotKey, u32>(pin_dir, name)?.keys().count(),
            BACKENDS_MAP => open::<u32, Backend>(pin_dir, name)?.keys().count(),
            SOCK_REV_MAP => open::<u64, SvcKey>(pin_dir, name)?.keys().count(),
            AFFINITY_MAP => open::<AffinityKey, AffinityValue>(pin_dir, name)?
                .keys()
                .count(),
            _ => open::<u64, u32>(pin_dir, name)?.keys().count(),
        };
        out.insert(name, n);
    }
    Ok(out)
}

/// The service table from the maps' contents (pure).
pub fn services(cur: &Current, affinity: &[(AffinityKey, AffinityValue)]) -> Vec<ServiceView> {
    let mut clients: StdHashMap<u32, usize> = StdHashMap::new();
    for (k, _) in affinity {
        *clients.entry(k.id).or_default() += 1;
    }
    let mut out: Vec<ServiceView> = cur
        .svcs
        .iter()
        .map(|(k, v)| {
            let mut missing = 0;
            let backends = (0..v.count)
                .filter_map(|slot| {
                    let found = cur
                        .slots
                        .get(&SlotKey { id: v.id, slot })
                        .and_then(|id| Some((*id, cur.backends.get(id)?)));
                    if found.is_none() {
                        missing += 1;
                    }
                    let (id, b) = found?;
                    Some(BackendView {
                        slot,
                        id,
                        ip: Ipv4Addr::from(u32::from_be(b.ip)),
                        port: u16::from_be(b.port),
                    })
                })
                .collect();
            ServiceView {
                vip: Ipv4Addr::from(u32::from_be(k.ip)),
                port: u16::from_be(k.port),
                protocol: match k.proto {
                    PROTO_TCP => "TCP".to_owned(),
                    PROTO_UDP => "UDP".to_owned(),
                    n => n.to_string(),
                },
                id: v.id,
                count: v.count,
                affinity_timeout_seconds: (v.flags & SVC_FLAG_AFFINITY != 0)
                    .then_some(v.affinity_timeout_s),
                affinity_clients: clients.get(&v.id).copied().unwrap_or(0),
                backends,
                missing_slots: missing,
            }
        })
        .collect();
    out.sort_by(|a, b| (a.vip, a.port, &a.protocol).cmp(&(b.vip, b.port, &b.protocol)));
    out
}

/// The snapshot as a table: a header line with the map sizes, then one
/// line per service port.
pub fn render_table(s: &Snapshot) -> String {
    let mut out = String::new();
    let sizes: Vec<String> = s
        .map_entries
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    let _ = writeln!(
        out,
        "node {} ({}): {} service ports; map entries: {}",
        s.node,
        s.pin_dir.display(),
        s.services.len(),
        sizes.join(" ")
    );
    let rows: Vec<[String; 6]> = s
        .services
        .iter()
        .map(|v| {
            let mut backends: Vec<String> = v
                .backends
                .iter()
                .map(|b| format!("{}:{}", b.ip, b.port))
                .collect();
            if v.missing_slots > 0 {
                backends.push(format!("({} slots missing)", v.missing_slots));
            }
            [
                format!("{}:{}/{}", v.vip, v.port, v.protocol),
                v.id.to_string(),
                v.count.to_string(),
                v.affinity_timeout_seconds
                    .map_or_else(|| "-".to_owned(), |t| format!("ClientIP {t}s")),
                v.affinity_clients.to_string(),
                if backends.is_empty() {
                    "<none: refused>".to_owned()
                } else {
                    backends.join(",")
                },
            ]
        })
        .collect();
    let header = [
        "SERVICE",
        "ID",
        "BACKENDS",
        "AFFINITY",
        "CLIENTS",
        "ENDPOINTS",
    ]
    .map(str::to_owned);
    let mut widths = header.clone().map(|h| h.len());
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.len());
        }
    }
    for r in std::iter::once(&header).chain(&rows) {
        let mut line = String::new();
        for (i, (c, w)) in r.iter().zip(widths).enumerate() {
            if i + 1 == r.len() {
                line.push_str(c);
            } else {
                let _ = write!(line, "{c:<w$}   ");
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// `weir-agent inspect ...`: read-only views of a node's pinned state.
#[derive(Debug, clap::Parser)]
#[command(name = "inspect", bin_name = "weir-agent inspect")]
pub struct InspectArgs {
    #[command(subcommand)]
    what: What,
}

#[derive(Debug, clap::Subcommand)]
enum What {
    /// The service table as the kernel sees it (VIP:port/proto → backends).
    Services {
        /// The node whose pins to read.
        #[arg(long)]
        node: String,
        /// bpffs mount (pins are under <bpffs>/weir/<node>/).
        #[arg(long, default_value = "/sys/fs/bpf", value_name = "DIR")]
        bpffs: PathBuf,
        /// Output format.
        #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Output {
    Table,
    Json,
}

/// A failed `inspect`.
#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    /// Reading the maps failed.
    #[error(transparent)]
    Lb(#[from] LbError),
    /// The arguments were wrong (or help was asked for): `exit()` prints it.
    #[error(transparent)]
    Usage(#[from] clap::Error),
    /// Encoding JSON failed.
    #[error("encode JSON: {0}")]
    Json(#[from] serde_json::Error),
}

/// Parses `args` (starting with `inspect`, in place of a program name) and
/// returns what to print.
pub fn run(args: impl IntoIterator<Item = OsString>) -> Result<String, InspectError> {
    let InspectArgs { what } = clap::Parser::try_parse_from(args)?;
    match what {
        What::Services {
            node,
            bpffs,
            output,
        } => {
            let s = read(&bpffs, &node)?;
            Ok(match output {
                Output::Table => render_table(&s),
                Output::Json => serde_json::to_string_pretty(&s)? + "\n",
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::lb::{Protocol, ServiceSpec, plan};

    fn programmed(specs: &[ServiceSpec]) -> Current {
        plan(&Current::default(), specs).after
    }

    fn spec(vip: [u8; 4], port: u16, backends: &[([u8; 4], u16)]) -> ServiceSpec {
        ServiceSpec {
            vip: Ipv4Addr::from(vip),
            port,
            proto: Protocol::Tcp,
            backends: backends
                .iter()
                .map(|(ip, p)| (Ipv4Addr::from(*ip), *p))
                .collect(),
            affinity: None,
        }
    }

    #[test]
    fn services_read_back_what_was_planned_in_order() {
        let mut specs = vec![
            spec(
                [10, 96, 0, 20],
                80,
                &[([10, 244, 1, 2], 8080), ([10, 244, 1, 3], 8080)],
            ),
            spec([10, 96, 0, 10], 53, &[]),
        ];
        specs[1].proto = Protocol::Udp;
        specs[0].affinity = Some(std::time::Duration::from_secs(30));
        let cur = programmed(&specs);
        let id = cur.svcs[&specs[0].key()].id;
        let aff = [(
            AffinityKey {
                client: 7,
                id,
                pad: 0,
            },
            AffinityValue::default(),
        )];
        let v = services(&cur, &aff);
        assert_eq!(v.len(), 2);
        assert_eq!(
            (v[0].vip, v[0].port, v[0].protocol.as_str()),
            (Ipv4Addr::new(10, 96, 0, 10), 53, "UDP")
        );
        assert_eq!(v[0].count, 0);
        assert!(v[0].backends.is_empty());
        assert_eq!(v[1].affinity_timeout_seconds, Some(30));
        assert_eq!(v[1].affinity_clients, 1);
        let got: Vec<(Ipv4Addr, u16)> = v[1].backends.iter().map(|b| (b.ip, b.port)).collect();
        assert_eq!(got, specs[0].backends);
        assert_eq!(v[1].missing_slots, 0);
    }

    #[test]
    fn a_missing_slot_is_counted_not_hidden() {
        let specs = [spec(
            [10, 96, 0, 20],
            80,
            &[([10, 244, 1, 2], 8080), ([10, 244, 1, 3], 8080)],
        )];
        let mut cur = programmed(&specs);
        let id = cur.svcs[&specs[0].key()].id;
        cur.slots.remove(&SlotKey { id, slot: 1 });
        let v = services(&cur, &[]);
        assert_eq!(v[0].backends.len(), 1);
        assert_eq!(v[0].missing_slots, 1);
        let s = Snapshot {
            node: "n1".into(),
            pin_dir: "/sys/fs/bpf/weir/n1".into(),
            services: v,
            map_entries: BTreeMap::new(),
        };
        assert!(render_table(&s).contains("(1 slots missing)"));
    }

    #[test]
    fn table_has_a_line_per_service_and_json_round_trips_fields() {
        let specs = [
            spec([10, 96, 0, 20], 80, &[([10, 244, 1, 2], 8080)]),
            spec([10, 96, 0, 21], 81, &[]),
        ];
        let s = Snapshot {
            node: "n1".into(),
            pin_dir: "/sys/fs/bpf/weir/n1".into(),
            services: services(&programmed(&specs), &[]),
            map_entries: [(SVC_MAP.to_owned(), 2)].into_iter().collect(),
        };
        let t = render_table(&s);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 4, "{t}");
        assert!(lines[0].contains("weir_svc_v1=2"), "{t}");
        assert!(lines[1].starts_with("SERVICE"), "{t}");
        assert!(lines[2].starts_with("10.96.0.20:80/TCP"), "{t}");
        assert!(lines[2].ends_with("10.244.1.2:8080"), "{t}");
        assert!(lines[3].ends_with("<none: refused>"), "{t}");
        let j: serde_json::Value = serde_json::to_value(&s).expect("json");
        assert_eq!(j["services"][0]["backends"][0]["ip"], "10.244.1.2");
        assert_eq!(j["services"][1]["count"], 0);
        assert_eq!(j["map_entries"]["weir_svc_v1"], 2);
    }
}
