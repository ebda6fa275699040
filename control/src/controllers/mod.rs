//! Reconcile loops: `ReplicaSet`, `Deployment`, `DaemonSet`, node lifecycle (filled by their increment).
