//! Binding a pod to a node (`spec.nodeName`), as the scheduler does (filled by its increment).
