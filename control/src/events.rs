//! Kubernetes-style Events recorded by the scheduler, controllers and agents (filled by its increment).
