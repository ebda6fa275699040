//! The `Nodes` gRPC service agents use (filled by its increment).
