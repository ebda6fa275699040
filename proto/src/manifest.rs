//! Manifest parsing and validation.
