//! The benchmark harness: load generator, counting subscriber, CPU
//! accounting, the systems measured. The binaries in this crate (e2e,
//! coap-bench, xdp-cost, spool-rate, soak) and
//! `cargo xtask bench` build on it.

pub mod cpu;
pub mod load;
pub mod subscriber;
pub mod systems;
