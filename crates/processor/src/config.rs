//! The processor's configuration (embedded defaults → file → `ONCEFLOW_` environment).

use std::time::Duration;

use onceflow_runtime::{
    config::{DatabaseConfig, KafkaConfig, TelemetryConfig},
    failure::Backoff,
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
    pub retry: RetryConfig,
    #[serde(default)]
    pub admin: AdminConfig,
    pub database: DatabaseConfig,
    pub kafka: KafkaConfig,
    pub telemetry: TelemetryConfig,
}

/// The operator's admin endpoints (dead letters: list and redrive).
#[derive(Debug, Clone, Default, serde::Deserialize, serde::Serialize)]
pub struct AdminConfig {
    /// Bearer token of `/admin/*`; empty (the default) serves no admin endpoint.
    #[serde(default)]
    pub token: String,
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
