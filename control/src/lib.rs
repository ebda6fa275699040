//! weir-control: the thin control service. It stores the cluster's objects
//! ([`store`]), serves them to users ([`api`]) and agents ([`nodes`]),
//! schedules pods onto nodes ([`scheduler`]) and runs the controllers
//! ([`controllers`]) that turn `Deployments`, `ReplicaSets` and `DaemonSets` into
//! pods and watch over nodes.

pub mod api;
pub mod controllers;
pub mod events;
pub mod nodes;
pub mod scheduler;
pub mod store;
