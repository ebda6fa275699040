//! Frame builders and a `BPF_PROG_TEST_RUN` runner shared by the TC
//! program tests (each test binary uses a part of them).
#![allow(dead_code, reason = "each test binary uses a different subset")]

use std::{
    fmt::Write as _,
    net::{Ipv4Addr, SocketAddrV4},
    path::{Path, PathBuf},
    process::Command,
};

use aya::{
    Ebpf,
    programs::{SchedClassifier, TestRun, TestRunOptions},
};
use weir_common::{FlowKey, PROTO_TCP, PROTO_UDP};

/// The object the agent embeds (same build script output).
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/weir-ebpf"));

/// `TC_ACT_UNSPEC` (-1): TCX runs the next program.
pub const TC_ACT_UNSPEC: u32 = u32::MAX;
pub const TC_ACT_OK: u32 = 0;
pub const TC_ACT_SHOT: u32 = 2;
pub const TC_ACT_PIPE: u32 = 3;
pub const TC_ACT_REDIRECT: u32 = 7;

pub const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
pub const NODE_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];

/// TCP flags of a crafted segment.
pub const TCP_SYN: u8 = 0x02;
pub const TCP_SYN_ACK: u8 = 0x12;
pub const TCP_PSH_ACK: u8 = 0x18;
pub const TCP_FIN_ACK: u8 = 0x11;
pub const TCP_RST: u8 = 0x04;

/// The addresses of a crafted frame.
#[derive(Clone, Copy, Debug)]
pub struct Pkt {
    pub smac: [u8; 6],
    pub dmac: [u8; 6],
    pub src: SocketAddrV4,
    pub dst: SocketAddrV4,
    pub proto: u8,
    /// UDP sent without a checksum (0).
    pub no_udp_csum: bool,
    /// TCP flags (default PSH|ACK).
    pub tcp_flags: u8,
}

impl Pkt {
    pub fn new(proto: u8, src: SocketAddrV4, dst: SocketAddrV4) -> Self {
        Self {
            smac: CLIENT_MAC,
            dmac: NODE_MAC,
            src,
            dst,
            proto,
            no_udp_csum: false,
            tcp_flags: TCP_PSH_ACK,
        }
    }

    /// The flow key the programs read from this frame.
    pub fn key(&self) -> FlowKey {
        FlowKey {
            saddr: be_ip(*self.src.ip()),
            daddr: be_ip(*self.dst.ip()),
            sport: self.src.port().to_be(),
            dport: self.dst.port().to_be(),
            proto: self.proto,
            pad: [0; 3],
        }
    }
}

pub fn be_ip(ip: Ipv4Addr) -> u32 {
    u32::from(ip).to_be()
}

/// The one's complement sum of `data` as 16-bit big-endian words, folded.
pub fn ones_sum(mut acc: u32, data: &[u8]) -> u16 {
    for w in data.chunks(2) {
        let hi = u32::from(w[0]) << 8;
        acc += hi | w.get(1).copied().map_or(0, u32::from);
    }
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    u16::try_from(acc).expect("folded")
}

/// The pseudo-header sum of IPv4 frame `f`'s L4 segment.
pub fn pseudo_sum(f: &[u8]) -> u32 {
    let l4_len = f.len() - 34;
    let mut acc = 0u32;
    for w in f[26..34].chunks(2) {
        acc += (u32::from(w[0]) << 8) | u32::from(w[1]);
    }
    acc + u32::from(f[23]) + u32::try_from(l4_len).expect("small frame")
}

/// The offset of frame `f`'s L4 checksum.
pub fn l4_csum_off(f: &[u8]) -> usize {
    if f[23] == PROTO_TCP { 34 + 16 } else { 34 + 6 }
}

/// An Ethernet/IPv4 (no options, DF)/TCP or UDP frame with correct
/// checksums.
pub fn frame(p: &Pkt, payload: &[u8]) -> Vec<u8> {
    let l4_len = if p.proto == PROTO_TCP { 20 } else { 8 } + payload.len();
    let total = u16::try_from(20 + l4_len).expect("small frame");
    let mut f = Vec::with_capacity(34 + l4_len);
    f.extend(p.dmac);
    f.extend(p.smac);
    f.extend(0x0800u16.to_be_bytes());
    f.extend([0x45, 0]);
    f.extend(total.to_be_bytes());
    f.extend(0x1c46u16.to_be_bytes());
    f.extend(0x4000u16.to_be_bytes());
    f.extend([64, p.proto, 0, 0]);
    f.extend(p.src.ip().octets());
    f.extend(p.dst.ip().octets());
    let c = !ones_sum(0, &f[14..34]);
    f[24..26].copy_from_slice(&c.to_be_bytes());
    f.extend(p.src.port().to_be_bytes());
    f.extend(p.dst.port().to_be_bytes());
    if p.proto == PROTO_TCP {
        f.extend(0x0102_0304u32.to_be_bytes()); // seq
        f.extend(0x0a0b_0c0du32.to_be_bytes()); // ack
        f.extend([0x50, p.tcp_flags, 0xff, 0xff, 0, 0, 0, 0]);
    } else {
        f.extend(u16::try_from(l4_len).expect("small").to_be_bytes());
        f.extend([0, 0]);
    }
    f.extend(payload);
    if !(p.proto == PROTO_UDP && p.no_udp_csum) {
        let mut c = !ones_sum(pseudo_sum(&f), &f[34..]);
        if c == 0 && p.proto == PROTO_UDP {
            c = 0xffff;
        }
        let off = l4_csum_off(&f);
        f[off..off + 2].copy_from_slice(&c.to_be_bytes());
    }
    f
}

/// Asserts `f`'s IP header and L4 checksums are right (a UDP checksum of 0
/// only if `udp_zero` — "none" — is expected).
pub fn assert_csums(f: &[u8], udp_zero: bool, what: &str) {
    assert_eq!(
        ones_sum(0, &f[14..34]),
        0xffff,
        "{what}: IP header checksum"
    );
    let off = l4_csum_off(f);
    let c = u16::from_be_bytes([f[off], f[off + 1]]);
    if f[23] == PROTO_UDP && udp_zero {
        assert_eq!(c, 0, "{what}: a UDP checksum of 0 stays 0");
        return;
    }
    assert_ne!(c, 0, "{what}: L4 checksum is set");
    assert_eq!(
        ones_sum(pseudo_sum(f), &f[34..]),
        0xffff,
        "{what}: L4 checksum (pseudo header and segment)"
    );
}

/// Asserts `got` equals `want` in every byte but the two checksums (which
/// [`assert_csums`] checks: incremental updates may give the other zero).
pub fn assert_same(got: &[u8], want: &[u8], what: &str) {
    let mask = |f: &[u8]| {
        let mut f = f.to_vec();
        if f.len() >= 34 {
            let off = l4_csum_off(&f);
            f[24..26].fill(0);
            f[off..off + 2].fill(0);
        }
        f
    };
    assert_eq!(
        hex(&mask(got)),
        hex(&mask(want)),
        "{what}: frame (checksums masked)"
    );
}

pub fn hex(f: &[u8]) -> String {
    f.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// The program `prog` of a loaded object.
pub fn classifier<'a>(ebpf: &'a mut Ebpf, prog: &str) -> &'a mut SchedClassifier {
    ebpf.program_mut(prog)
        .expect("program in object")
        .try_into()
        .expect("a classifier")
}

/// Runs `prog` once on frame `f`: its return code and the frame after it.
pub fn run(ebpf: &Ebpf, prog: &str, f: &[u8]) -> (u32, Vec<u8>) {
    let p: &SchedClassifier = ebpf
        .program(prog)
        .expect("program in object")
        .try_into()
        .expect("a classifier");
    let mut out = vec![0u8; f.len() + 256];
    let r = p
        .test_run(TestRunOptions {
            data_in: Some(f),
            data_out: Some(&mut out),
            ..TestRunOptions::default()
        })
        .unwrap_or_else(|e| panic!("BPF_PROG_TEST_RUN {prog} on {} bytes: {e:?}", f.len()));
    out.truncate(usize::try_from(r.data_size_out).expect("size"));
    (r.return_value, out)
}

/// A scratch bpffs directory `/sys/fs/bpf/<prefix>-<pid>-<tag>`, removed on
/// drop after `.1` (e.g. unpinning links) has run on it.
pub struct Scratch(pub PathBuf, fn(&Path));

impl Scratch {
    /// Makes the directory, first removing those of runs (same `prefix`)
    /// that died without dropping theirs (their process is gone).
    pub fn new(prefix: &str, tag: &str, cleanup: fn(&Path)) -> Self {
        reap_dead_runs(prefix, cleanup);
        let dir = PathBuf::from(format!("/sys/fs/bpf/{prefix}-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create scratch bpffs dir");
        Self(dir, cleanup)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        (self.1)(&self.0);
        if let Err(e) = std::fs::remove_dir_all(&self.0) {
            eprintln!("remove {}: {e}", self.0.display());
        }
    }
}

fn reap_dead_runs(prefix: &str, cleanup: fn(&Path)) {
    let Ok(dir) = std::fs::read_dir("/sys/fs/bpf") else {
        return;
    };
    for e in dir.filter_map(Result::ok) {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some((pid, _)) = name
            .strip_prefix(prefix)
            .and_then(|r| r.strip_prefix('-'))
            .and_then(|r| r.split_once('-'))
        else {
            continue;
        };
        if !Path::new("/proc").join(pid).exists() {
            cleanup(&e.path());
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// Runs `ip` (as an observer/set-up tool), panicking with its stderr.
pub fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}
