//! weir-control: the thin control service. It stores the cluster's objects
//! ([`store`]), serves them to users ([`api`]) and agents ([`nodes`]),
//! schedules pods onto nodes ([`scheduler`]) and runs the controllers
//! ([`controllers`]) that turn `Deployments`, `ReplicaSets` and `DaemonSets` into
//! pods and watch over nodes. With the etcd store, [`leader`] election lets
//! only one of several controls run the controllers and the scheduler.

pub mod api;
pub mod controllers;
pub mod events;
pub mod leader;
pub mod matching;
pub mod metrics;
pub mod nodes;
pub mod scheduler;
pub mod servicemap;
pub mod store;
