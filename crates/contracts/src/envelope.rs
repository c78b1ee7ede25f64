//! The envelope: metadata every onceflow Kafka message carries in its headers,
//! so that routing, dedup, tracing and tenancy never require decoding the body.
//!
//! | header           | meaning                                                        |
//! |------------------|----------------------------------------------------------------|
//! | `message-id`     | unique per logical message; stable across redeliveries         |
//! | `correlation-id` | one per command, shared by every message about it              |
//! | `causation-id`   | the `message-id` of the message that caused this one, if any   |
//! | `tenant-id`      | the tenant the message belongs to                              |
//! | `message-type`   | the command type (`ledger.deposit`) or event type (`job.succeeded`) |
//! | `schema-id`      | which Avro schema wrote the body (also in the body; see [`crate::schema`]) |
//! | `content-type`   | always `application/avro` (single-object encoded)              |
//! | `traceparent`    | W3C trace context of the work that produced the message        |
//! | `tracestate`     | W3C trace state, when there is one                             |

use uuid::Uuid;

use crate::{ContractError, Result};

pub const MESSAGE_ID: &str = "message-id";
pub const CORRELATION_ID: &str = "correlation-id";
pub const CAUSATION_ID: &str = "causation-id";
pub const TENANT_ID: &str = "tenant-id";
pub const MESSAGE_TYPE: &str = "message-type";
pub const SCHEMA_ID: &str = "schema-id";
pub const CONTENT_TYPE: &str = "content-type";
pub const TRACEPARENT: &str = "traceparent";
pub const TRACESTATE: &str = "tracestate";
/// The body encoding every message declares.
pub const AVRO_CONTENT_TYPE: &str = "application/avro";

/// Envelope metadata of one message.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Envelope {
    pub message_id: Uuid,
    pub correlation_id: String,
    pub causation_id: Option<String>,
    pub tenant: String,
    pub message_type: String,
    pub schema_id: String,
    pub traceparent: Option<String>,
    pub tracestate: Option<String>,
}

impl Envelope {
    /// The headers to put on the Kafka record, in a stable order.
    pub fn to_headers(&self) -> Vec<(&'static str, String)> {
        let mut headers = vec![
            (MESSAGE_ID, self.message_id.to_string()),
            (CORRELATION_ID, self.correlation_id.clone()),
            (TENANT_ID, self.tenant.clone()),
            (MESSAGE_TYPE, self.message_type.clone()),
            (SCHEMA_ID, self.schema_id.clone()),
            (CONTENT_TYPE, AVRO_CONTENT_TYPE.to_owned()),
        ];
        let optional =
            [(CAUSATION_ID, &self.causation_id), (TRACEPARENT, &self.traceparent), (TRACESTATE, &self.tracestate)];
        headers.extend(optional.into_iter().filter_map(|(name, value)| value.clone().map(|v| (name, v))));
        headers
    }

    /// Read an envelope back from Kafka headers given as (name, value) pairs.
    /// Unknown headers are ignored, whatever their bytes, so producers can add
    /// more without breaking readers; the envelope's own must be UTF-8.
    pub fn from_headers<'a>(headers: impl IntoIterator<Item = (&'a str, Option<&'a [u8]>)>) -> Result<Self> {
        let mut found = std::collections::HashMap::new();
        for (name, value) in headers {
            if let Some(value) = value
                && header_name(name) != "unknown"
            {
                let text = std::str::from_utf8(value).map_err(|_| ContractError::InvalidHeader {
                    name: header_name(name),
                    reason: "not UTF-8".to_owned(),
                })?;
                found.insert(name, text);
            }
        }
        let required =
            |name: &'static str| found.get(name).map(|v| (*v).to_owned()).ok_or(ContractError::MissingHeader(name));
        let optional = |name: &'static str| found.get(name).map(|v| (*v).to_owned());
        let message_id = required(MESSAGE_ID)?;
        Ok(Self {
            message_id: Uuid::parse_str(&message_id)
                .map_err(|e| ContractError::InvalidHeader { name: MESSAGE_ID, reason: e.to_string() })?,
            correlation_id: required(CORRELATION_ID)?,
            causation_id: optional(CAUSATION_ID),
            tenant: required(TENANT_ID)?,
            message_type: required(MESSAGE_TYPE)?,
            schema_id: required(SCHEMA_ID)?,
            traceparent: optional(TRACEPARENT),
            tracestate: optional(TRACESTATE),
        })
    }
}

/// Maps a header name seen on the wire to its static constant for error messages.
fn header_name(name: &str) -> &'static str {
    [
        MESSAGE_ID,
        CORRELATION_ID,
        CAUSATION_ID,
        TENANT_ID,
        MESSAGE_TYPE,
        SCHEMA_ID,
        CONTENT_TYPE,
        TRACEPARENT,
        TRACESTATE,
    ]
    .into_iter()
    .find(|known| *known == name)
    .unwrap_or("unknown")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Envelope {
        Envelope {
            message_id: Uuid::now_v7(),
            correlation_id: "corr-1".to_owned(),
            causation_id: Some("cause-1".to_owned()),
            tenant: "acme".to_owned(),
            message_type: "ledger.deposit".to_owned(),
            schema_id: "io.onceflow.v1.Command@00".to_owned(),
            traceparent: Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".to_owned()),
            tracestate: None,
        }
    }

    #[test]
    fn headers_round_trip() {
        let envelope = sample();
        let headers = envelope.to_headers();
        let read = Envelope::from_headers(headers.iter().map(|(k, v)| (*k, Some(v.as_bytes())))).unwrap();
        assert_eq!(read, envelope);
    }

    #[test]
    fn a_missing_required_header_is_named() {
        let headers = sample().to_headers();
        let without_tenant = headers.iter().filter(|(k, _)| *k != TENANT_ID).map(|(k, v)| (*k, Some(v.as_bytes())));
        let error = Envelope::from_headers(without_tenant).unwrap_err();
        assert!(matches!(error, ContractError::MissingHeader(TENANT_ID)), "{error}");
    }

    #[test]
    fn unknown_headers_are_ignored_whatever_their_bytes() {
        let envelope = sample();
        let mut headers: Vec<(&str, Vec<u8>)> =
            envelope.to_headers().into_iter().map(|(k, v)| (k, v.into_bytes())).collect();
        headers.push(("x-binary", b"\xff\x00\xfe".to_vec()));
        let read = Envelope::from_headers(headers.iter().map(|(k, v)| (*k, Some(v.as_slice())))).unwrap();
        assert_eq!(read, envelope);
    }

    #[test]
    fn an_envelope_header_that_is_not_utf8_is_refused() {
        let envelope = sample();
        let headers: Vec<(&str, Vec<u8>)> = envelope
            .to_headers()
            .into_iter()
            .map(|(k, v)| (k, if k == TENANT_ID { b"\xffdev".to_vec() } else { v.into_bytes() }))
            .collect();
        let error = Envelope::from_headers(headers.iter().map(|(k, v)| (*k, Some(v.as_slice())))).unwrap_err();
        assert!(matches!(error, ContractError::InvalidHeader { name: TENANT_ID, .. }), "{error}");
    }

    #[test]
    fn a_malformed_message_id_is_refused() {
        let mut headers = sample().to_headers();
        headers[0].1 = "not-a-uuid".to_owned();
        let error = Envelope::from_headers(headers.iter().map(|(k, v)| (*k, Some(v.as_bytes())))).unwrap_err();
        assert!(matches!(error, ContractError::InvalidHeader { name: MESSAGE_ID, .. }), "{error}");
    }
}
