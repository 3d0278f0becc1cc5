//! The benchmark harness: load generator, counting subscriber, CPU
//! accounting. The binaries in this crate (e2e, xdp-cost, spool-rate) and
//! `cargo xtask bench` build on it.

pub mod cpu;
pub mod load;
pub mod subscriber;
