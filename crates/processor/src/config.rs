//! The processor's configuration (embedded defaults → file → `ONCEFLOW_` environment).

use std::time::Duration;

use onceflow_runtime::config::{DatabaseConfig, KafkaConfig, TelemetryConfig};

/// The defaults, which also document every setting.
pub const DEFAULTS: &str = include_str!("../config/defaults.toml");

#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
pub struct ProcessorConfig {
    /// Address of the health and metrics endpoints.
    pub listen: String,
    pub group_id: String,
    /// Concurrency: assigned partitions are spread over this many lanes; each
    /// lane applies its partitions' commands one at a time, in order, so a
    /// slow or retrying command holds up only its own lane.
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

/// Bounded retries of transient failures.
#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
pub struct RetryConfig {
    pub max_attempts: u32,
    pub base_delay_ms: u64,
    pub max_delay_ms: u64,
}

impl RetryConfig {
    /// Full-jitter backoff before attempt `attempt + 1` (AWS architecture blog's
    /// "full jitter": spreads retries of many failing messages apart).
    pub fn delay(&self, attempt: u32) -> Duration {
        let ceiling =
            self.base_delay_ms.saturating_mul(1u64.checked_shl(attempt).unwrap_or(u64::MAX)).min(self.max_delay_ms);
        Duration::from_millis(rand::random_range(0..=ceiling))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_is_bounded_by_the_cap() {
        let retry = RetryConfig { max_attempts: 5, base_delay_ms: 50, max_delay_ms: 2000 };
        for attempt in 0..80 {
            assert!(retry.delay(attempt) <= Duration::from_millis(2000));
        }
    }
}
