//! Ingest's configuration: embedded defaults, overridable by file and
//! `ONCEFLOW_` environment variables (see [`onceflow_runtime::config`]).

use std::time::Duration;

use onceflow_runtime::{
    auth::TenantKey,
    config::{DatabaseConfig, KafkaConfig, TelemetryConfig},
};

/// The defaults, which also document every setting.
pub const DEFAULTS: &str = include_str!("../config/defaults.toml");

#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
pub struct IngestConfig {
    /// Address of the HTTP API.
    pub listen: String,
    /// How long an idempotency key is remembered.
    pub idempotency_ttl_secs: u64,
    /// Largest accepted request body; larger bodies get `413`.
    pub max_body_bytes: usize,
    /// How long a request with a key still in flight waits for the first
    /// request to finish before it gets `409`.
    pub in_flight_wait_ms: u64,
    pub database: DatabaseConfig,
    pub kafka: KafkaConfig,
    pub telemetry: TelemetryConfig,
    /// Consumer group of the job-status projection.
    pub results_group_id: String,
    /// API keys, stored as SHA-256 hex digests, and the tenant each belongs to.
    pub tenants: Vec<TenantKey>,
}

impl IngestConfig {
    pub fn idempotency_ttl(&self) -> Duration {
        Duration::from_secs(self.idempotency_ttl_secs)
    }
}

impl onceflow_runtime::cli::ServiceConfig for IngestConfig {
    fn telemetry(&self) -> &TelemetryConfig {
        &self.telemetry
    }
    fn database(&self) -> &DatabaseConfig {
        &self.database
    }
}
