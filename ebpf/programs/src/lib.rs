//! Present so the crate can be a workspace member that `cargo check`s on the
//! host; the programs themselves are in `main.rs`.
#![no_std]
