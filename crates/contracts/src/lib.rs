//! onceflow's wire contracts, shared by every service and by outside consumers.
//!
//! - [`schema`]: the Avro schemas (`schemas/*.avsc`, every released version in
//!   `schemas/history/`) and the wire format: Avro single-object encoding, whose
//!   fingerprint tells any Avro reader which schema wrote a value.
//! - [`envelope`]: the metadata every Kafka message carries in its headers
//!   (message id, correlation id, causation id, tenant, type, schema id,
//!   `traceparent`).
//! - [`command`] and [`result`]: the two message bodies, Avro-encoded.
//! - [`endpoint`]: a webhook endpoint's state (disabled after `410 Gone`,
//!   enabled again), from the notifier to ingest.
//! - [`payload`]: canonical JSON of payloads, and the ledger's payload types.
//! - [`topics`]: the topic names.

pub mod command;
pub mod endpoint;
pub mod envelope;
pub mod error;
pub mod payload;
pub mod result;
pub mod schema;
pub mod topics;

pub use command::Command;
pub use endpoint::{EndpointStatus, WebhookEndpointState};
pub use envelope::Envelope;
pub use error::{ContractError, Result};
pub use result::{JobError, JobStatus, ResultEvent};
