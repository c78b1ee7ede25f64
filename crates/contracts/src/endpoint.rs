//! The webhook endpoint state event: what the notifier publishes to
//! `onceflow.webhook-endpoints` when a tenant's callback URL is disabled (it
//! answered `410 Gone`) or enabled again, so ingest can refuse commands that
//! name a disabled one. The topic is compacted and keyed by endpoint id, so
//! it holds the latest state of every endpoint that ever changed.
//!
//! Encoded and decoded like the other messages (`encode`, `decode(schema_id,
//! bytes)`); the schema is `schemas/webhook-endpoint-state.avsc`.

use std::sync::LazyLock;

use crate::{Result, schema};

/// The schema, as shipped in `schemas/webhook-endpoint-state.avsc`.
pub const ENDPOINT_STATE_AVSC: &str = include_str!("../../../schemas/webhook-endpoint-state.avsc");

/// The current endpoint state schema and its wire id.
pub static ENDPOINT_STATE: LazyLock<schema::KnownSchema> =
    LazyLock::new(|| schema::KnownSchema::parse(ENDPOINT_STATE_AVSC));

/// Whether an endpoint takes deliveries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EndpointStatus {
    Enabled,
    Disabled,
}

impl EndpointStatus {
    /// The name used in JSON, SQL and message types.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Enabled => "enabled",
            Self::Disabled => "disabled",
        }
    }

    /// The envelope's `message-type` of a change to this state.
    pub fn message_type(self) -> &'static str {
        match self {
            Self::Enabled => "webhook_endpoint.enabled",
            Self::Disabled => "webhook_endpoint.disabled",
        }
    }
}

/// One change of a webhook endpoint's state (the Avro record
/// `io.onceflow.v1.WebhookEndpointState`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct WebhookEndpointState {
    /// A UUID (the Avro `uuid` logical type is a string on the wire).
    pub endpoint_id: String,
    pub tenant: String,
    /// The callback URL, normalised as ingest stores it.
    pub url: String,
    pub state: EndpointStatus,
    /// Grows with every change of this endpoint: readers keep the highest.
    pub version: i64,
    pub reason: Option<String>,
    /// Milliseconds since the Unix epoch.
    pub changed_at: i64,
}

impl WebhookEndpointState {
    /// Avro-encode with the current schema.
    pub fn encode(&self) -> Result<Vec<u8>> {
        schema::encode(&ENDPOINT_STATE, self)
    }

    /// Decode a record written with the schema named by `schema_id`.
    pub fn decode(schema_id: &str, bytes: &[u8]) -> Result<Self> {
        schema::decode(schema_id, &ENDPOINT_STATE.schema, bytes)
    }
}

#[cfg(test)]
mod tests {
    use apache_avro::Schema;

    use super::*;
    use crate::ContractError;

    fn sample() -> WebhookEndpointState {
        WebhookEndpointState {
            endpoint_id: uuid::Uuid::now_v7().to_string(),
            tenant: "acme".to_owned(),
            url: "https://hooks.example.com/onceflow".to_owned(),
            state: EndpointStatus::Disabled,
            version: 3,
            reason: Some("HTTP 410 Gone".to_owned()),
            changed_at: 1_700_000_000_000,
        }
    }

    #[test]
    fn round_trips_through_avro() {
        for event in [sample(), WebhookEndpointState { state: EndpointStatus::Enabled, reason: None, ..sample() }] {
            let bytes = event.encode().unwrap();
            assert_eq!(WebhookEndpointState::decode(&ENDPOINT_STATE.id, &bytes).unwrap(), event);
        }
    }

    #[test]
    fn the_schema_is_named_and_garbage_is_an_error_not_a_panic() {
        assert!(ENDPOINT_STATE.id.starts_with("io.onceflow.v1.WebhookEndpointState@"), "{}", ENDPOINT_STATE.id);
        let bytes = sample().encode().unwrap();
        // A result is no endpoint state: its writer does not resolve to this reader.
        let result = crate::ResultEvent::decode(&schema::RESULT.id, &bytes);
        assert!(result.is_err(), "an endpoint state read as a result");
        let error = WebhookEndpointState::decode(&ENDPOINT_STATE.id, &[0xff, 0xff, 0xff]).unwrap_err();
        assert!(matches!(error, ContractError::NotSingleObject(_)), "{error}");
        let mut unknown = bytes.clone();
        unknown[2] ^= 0xff;
        let error = WebhookEndpointState::decode(&ENDPOINT_STATE.id, &unknown).unwrap_err();
        assert!(matches!(error, ContractError::UnknownSchema(_)), "{error}");
        let mut longer = bytes;
        longer.push(0);
        assert!(WebhookEndpointState::decode(&ENDPOINT_STATE.id, &longer).is_err(), "trailing bytes");
    }

    #[test]
    fn an_unknown_state_reads_as_enabled() {
        // A later writer with a third state: this reader falls back to the
        // enum's default rather than refusing the record.
        let newer = ENDPOINT_STATE_AVSC
            .replace(r#""symbols": ["enabled", "disabled"]"#, r#""symbols": ["enabled", "disabled", "paused"]"#);
        let writer = Schema::parse_str(&newer).unwrap();
        let mut value = apache_avro::to_value(sample()).unwrap();
        if let apache_avro::types::Value::Record(fields) = &mut value {
            for (name, field) in fields.iter_mut() {
                if name == "state" {
                    *field = apache_avro::types::Value::Enum(2, "paused".to_owned());
                }
            }
        }
        let bytes = apache_avro::to_avro_datum(&writer, value.resolve(&writer).unwrap()).unwrap();
        let read: WebhookEndpointState = schema::decode_datum(&writer, &ENDPOINT_STATE.schema, &bytes).unwrap();
        assert_eq!(read.state, EndpointStatus::Enabled);
    }

    #[test]
    fn asyncapi_names_the_schema_id_on_the_wire() {
        let asyncapi = include_str!("../../../asyncapi.yaml");
        assert!(asyncapi.contains(ENDPOINT_STATE.id.as_str()), "asyncapi.yaml does not mention {}", ENDPOINT_STATE.id);
        assert!(asyncapi.contains("./schemas/webhook-endpoint-state.avsc"));
    }
}
