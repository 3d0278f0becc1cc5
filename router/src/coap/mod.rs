//! CoAP over UDP (RFC 7252): the message format, request options, duplicate
//! detection, and the uplink server behaviour.

pub mod dedup;
pub mod message;
pub mod request;
pub mod uplink;
