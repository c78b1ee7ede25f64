//! The notifier's configuration (embedded defaults → file → `ONCEFLOW_` environment).

use onceflow_runtime::{
    auth::TenantKey,
    config::{DatabaseConfig, KafkaConfig, TelemetryConfig},
};

/// The defaults, which also document every setting.
pub const DEFAULTS: &str = include_str!("../config/defaults.toml");

#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
pub struct NotifierConfig {
    pub listen: String,
    pub group_id: String,
    pub sse: SseConfig,
    pub database: DatabaseConfig,
    pub kafka: KafkaConfig,
    pub telemetry: TelemetryConfig,
    pub tenants: Vec<TenantKey>,
}

#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
pub struct SseConfig {
    pub heartbeat_secs: u64,
    pub reconnect_ms: u64,
    pub buffer: usize,
}

impl onceflow_runtime::cli::ServiceConfig for NotifierConfig {
    fn telemetry(&self) -> &TelemetryConfig {
        &self.telemetry
    }
    fn database(&self) -> &DatabaseConfig {
        &self.database
    }
}
