//! weir-agent: makes a node match the pods it is given.
//!
//! Modules by concern: `cri` talks to containerd (images, containers, tasks,
//! events), `net` does pod networking through netlink, `dataplane` loads and
//! adopts the eBPF programs and pinned maps, `pod` runs the per-pod lifecycle,
//! `policy` enforces network policy (TC programs on pod veths and their
//! maps), `standalone` turns a manifest directory into desired pods, `control`
//! follows weir-control (register, heartbeat, node watch, status reports), `http` serves
//! metrics, pod status and logs, `dns` answers the cluster domain (control mode), `flows` reads the
//! policy programs' flow records.

pub mod cgroup;
pub mod control;
pub mod cri;
pub mod dataplane;
pub mod dns;
pub mod flows;
pub mod http;
pub mod lb;
pub mod metrics;
pub mod net;
pub mod pod;
pub mod policy;
pub mod standalone;
pub mod state;
