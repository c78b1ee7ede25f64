//! The processor's configuration (embedded defaults → file → `ONCEFLOW_` environment).

use std::time::Duration;

use onceflow_runtime::{
    admin::AdminConfig,
    config::{DatabaseConfig, KafkaConfig, TelemetryConfig},
    failure::Backoff,
    http::HttpLimits,
};

/// The defaults, which also document every setting.
pub const DEFAULTS: &str = include_str!("../config/defaults.toml");

#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
pub struct ProcessorConfig {
    /// Address of the health and metrics endpoints.
    pub listen: String,
    pub group_id: String,
    /// Concurrency: assigned partitions are spread over this many lanes; each
    /// lane applies its partitions' commands one at a time, in order, so a
    /// slow command, or one waiting out an outage, holds up only its own lane.
    pub lanes: usize,
    /// The most commands a lane applies in one transaction: the ones waiting
    /// in its queue when it is free (it never waits to fill a batch).
    pub max_batch: usize,
    pub retry: RetryConfig,
    /// The operator's endpoints (dead letters: list and redrive).
    #[serde(default)]
    pub admin: AdminConfig,
    /// Timeouts and bounds of the HTTP port (see `onceflow_runtime::hygiene`).
    #[serde(default)]
    pub http: HttpLimits,
    pub database: DatabaseConfig,
    pub kafka: KafkaConfig,
    pub telemetry: TelemetryConfig,
    /// A file declaring command types of one's own (see
    /// `onceflow_catalogue`); empty: the built-in ledger only. Ingest must
    /// read the same file.
    #[serde(default)]
    pub command_types_file: String,
}

/// The waits of a command whose database or broker is down: exponential
/// with jitter from `base_delay_ms` up to `max_delay_ms`, and no bound on
/// their number, because an outage must never dead-letter a command.
#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
pub struct RetryConfig {
    pub base_delay_ms: u64,
    pub max_delay_ms: u64,
}

impl RetryConfig {
    /// A fresh backoff for one record's outage.
    pub fn backoff(&self) -> Backoff {
        Backoff::new(Duration::from_millis(self.base_delay_ms), Duration::from_millis(self.max_delay_ms))
    }
}

impl onceflow_runtime::cli::ServiceConfig for ProcessorConfig {
    fn telemetry(&self) -> &TelemetryConfig {
        &self.telemetry
    }
    fn database(&self) -> &DatabaseConfig {
        &self.database
    }
}
