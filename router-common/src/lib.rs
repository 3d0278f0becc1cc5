//! Types and logic shared by the XDP program (`router-ebpf`) and the daemon.
//!
//! `#![no_std]` so the eBPF crate can use it. The map value types are
//! `#[repr(C)]` with explicit padding: the kernel copies them byte for byte,
//! and uninitialised padding in a key is rejected by the verifier
//! ("invalid indirect read from stack").
//!
//! [`classify::classify`] is the reference classifier: a plain, slice-based
//! statement of what the XDP program decides. The differential tests check
//! that the kernel agrees with it for every packet they try (DESIGN.md
//! invariant 6).
#![no_std]

pub mod classify;
pub mod maps;
pub mod proto;
pub mod rate;
pub mod reason;

pub use maps::{Counter, PeerCounters, PeerPolicy};
pub use reason::{Action, Reason};
