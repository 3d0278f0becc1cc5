//! m2m-router: routes CoAP from M2M devices to MQTT topics, with an XDP fast
//! path in front. See DESIGN.md for the architecture; this crate is the
//! daemon and its CLI.

pub mod bridge;
pub mod coap;
pub mod config;
pub mod control;
pub mod daemon;
pub mod fastpath;
pub mod listener;
pub mod mapping;
pub mod metrics;
pub mod mqtt;
pub mod process;
pub mod report;
pub mod template;
pub mod worker;
