//! The scheduler: binds pending pods to nodes (filled by its increment).
