//! Runtime plumbing every onceflow service shares, so each service's crate
//! holds only its own logic:
//!
//! - [`admin`]: the `admin.token` setting and the bearer check of `/admin/*`.
//! - [`auth`]: API keys (stored as digests) → tenants.
//! - [`cli`]: the command line of every service binary (`serve`, `migrate`).
//! - [`config`]: layered configuration (embedded defaults → TOML file →
//!   `ONCEFLOW_`-prefixed environment), validated at start.
//! - [`telemetry`]: `tracing` with JSON logs, OpenTelemetry spans (OTLP when an
//!   endpoint is configured) and W3C trace-context propagation through Kafka.
//! - [`log_fields`]: the JSON log lines' span fields, recorded without
//!   reading them back.
//! - [`failure`]: data errors (end the record now) versus outages (wait
//!   and retry without bound), and the backoff of those waits (G8).
//! - [`kafka`]: producer and consumer set-up, topic creation, envelope
//!   headers, the consume loop that ends, parks or waits on each record, and
//!   the consumer-lag probe.
//! - [`limits`]: per-tenant limits, one set for every tenant and what
//!   differs for some.
//! - [`parking`]: records a consumer could never apply, kept for an operator
//!   (the `parked_records` table and its admin endpoints).
//! - [`openapi`]: what every service's OpenAPI document shares.
//! - [`postgres`]: connection pools and database creation.
//! - [`probe_records`]: the synthetic probe's command type, and the
//!   `[probe_records]` setting by which every service prunes its records.
//! - [`http`]: the `/livez`, `/readyz` (cached) and `/metrics` probes and
//!   serving with graceful shutdown.
//! - [`instruments`]: the Prometheus recorder, HELP of every metric, HTTP
//!   RED metrics, database pool use and consumer lag.
//! - [`hygiene`]: what every HTTP port gets: header-read and request
//!   timeouts, connection and concurrency bounds, problem+json for every error.
//! - [`problem`]: RFC 9457 problem+json, the shape of every HTTP error.
//! - [`signed_tokens`]: self-contained HMAC-signed tokens with an expiry
//!   (stream tokens, callback tokens).
//! - [`shutdown`]: SIGTERM / ctrl-c turned into a cancellation token.
//! - [`vitals`]: tasks a service cannot work without, reported by `/readyz`
//!   when one ends before shutdown.

pub mod admin;
pub mod auth;
pub mod cli;
pub mod config;
pub mod error;
pub mod failure;
pub mod http;
pub mod hygiene;
pub mod instruments;
pub mod kafka;
pub mod limits;
pub mod log_fields;
pub mod openapi;
pub mod parking;
pub mod postgres;
pub mod probe_records;
pub mod problem;
pub mod service;
pub mod shutdown;
pub mod signed_tokens;
pub mod telemetry;
pub mod vitals;

pub use error::{Error, Result};
