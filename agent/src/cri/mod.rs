//! containerd: images, containers, tasks and the event stream.

pub mod image;
