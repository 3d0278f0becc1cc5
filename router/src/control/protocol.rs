//! The control protocol: one JSON object per line each way (see
//! docs/control-protocol.md).

use serde::{Deserialize, Serialize};
use serde_json::Value;

pub const PROTOCOL_VERSION: u32 = 1;
/// Longest request line: room for a bulk import of 100,000+ peers.
pub const MAX_REQUEST_BYTES: usize = 64 << 20;

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Request {
    /// Echoed in the response; any JSON value.
    pub id: Value,
    pub version: u32,
    pub command: String,
    #[serde(default, skip_serializing_if = "Value::is_null")]
    pub args: Value,
}

#[derive(Debug, Deserialize, Serialize)]
pub struct Response {
    pub id: Value,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub result: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<ApiError>,
}

/// A refusal: a stable code, a message for people, and the field at fault.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
pub struct ApiError {
    pub code: String,
    pub message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

impl ApiError {
    pub fn new(code: &str, message: impl Into<String>, field: Option<&str>) -> ApiError {
        ApiError {
            code: code.to_owned(),
            message: message.into(),
            field: field.map(str::to_owned),
        }
    }

    /// From a serde error: unknown fields and wrong types name the field.
    pub fn from_json(err: &serde_json::Error, context: &str) -> ApiError {
        let msg = err.to_string();
        let field = msg
            .split('`')
            .nth(1)
            .filter(|_| msg.starts_with("unknown field") || msg.starts_with("missing field"));
        ApiError::new("invalid_request", format!("{context}: {msg}"), field)
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.field {
            Some(field) => write!(f, "{}: {} ({})", field, self.message, self.code),
            None => write!(f, "{} ({})", self.message, self.code),
        }
    }
}
