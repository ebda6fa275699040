//! weir's API crate: the object model shared by weir-control, weir-agent and
//! weirctl. Today it holds manifest parsing and validation; the gRPC services
//! (`proto/weir/v1/*.proto`) come with the control plane.

pub mod manifest;
