//! weir-control: the thin control service. Its store, API, scheduler and
//! controllers land with the control-plane issue; until then weir-agent runs
//! in standalone mode from a manifest directory.

pub mod api;
pub mod store;
