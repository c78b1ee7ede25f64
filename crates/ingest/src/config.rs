//! Ingest's configuration: embedded defaults, overridable by file and
//! `ONCEFLOW_` environment variables (see [`onceflow_runtime::config`]).

use std::{
    num::{NonZeroU32, NonZeroU64},
    time::Duration,
};

use onceflow_runtime::{
    admin::AdminConfig,
    auth::TenantKey,
    config::{DatabaseConfig, KafkaConfig, TelemetryConfig},
    http::HttpLimits,
    limits::PerTenant,
    probe_records::ProbeRecords,
};

use crate::limits::SubmitLimits;

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
    /// Timeouts and bounds of the HTTP port (see `onceflow_runtime::hygiene`).
    #[serde(default)]
    pub http: HttpLimits,
    /// How long a request with a key still in flight waits for the first
    /// request to finish before it gets `409`.
    pub in_flight_wait_ms: u64,
    pub database: DatabaseConfig,
    pub kafka: KafkaConfig,
    pub telemetry: TelemetryConfig,
    /// How often expired idempotency records are swept, and how many per
    /// statement (0 is refused: the sweep would spin).
    pub sweep_interval_secs: NonZeroU64,
    pub sweep_batch: NonZeroU32,
    /// When the synthetic probe's jobs are deleted (see `crate::maintenance`).
    #[serde(default)]
    pub probe_records: ProbeRecords,
    pub shed: ShedConfig,
    /// Each tenant's limits on `POST /v1/commands` (see `crate::limits`).
    pub submit_limits: PerTenant<SubmitLimits>,
    pub group_commit: GroupCommitConfig,
    pub webhooks: CallbackConfig,
    /// Consumer group of the job-status projection.
    pub results_group_id: String,
    /// API keys, stored as SHA-256 hex digests, and the tenant each belongs
    /// to (none by default; ingest does not start without one).
    #[serde(default)]
    pub tenants: Vec<TenantKey>,
    /// The operator's endpoints (parked result records).
    #[serde(default)]
    pub admin: AdminConfig,
    /// The processor's address (`http://host:port`), where `GET
    /// /v1/jobs/{id}` asks what a job that has not ended waits for; empty:
    /// jobs do not say.
    #[serde(default)]
    pub execution_status_url: String,
    /// A file declaring command types of one's own (see
    /// `onceflow_catalogue`); empty: the built-in ledger only. The processor
    /// must read the same file.
    #[serde(default)]
    pub command_types_file: String,
}

/// How `callback_url` is checked at submission.
#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
pub struct CallbackConfig {
    /// Hosts, addresses or networks a callback may point at although they are
    /// loopback, private or otherwise internal (SSRF protection refuses those
    /// by default). The same setting as the notifier's, which enforces it again
    /// at delivery time.
    pub allowlist: onceflow_webhook::Allowlist,
}

/// Group commit (see `crate::group_commit`).
#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
pub struct GroupCommitConfig {
    /// The most accepted commands committed in one transaction; 1 commits
    /// each request on its own.
    pub max_group: usize,
    /// Groups committed at once (each holds one database connection while it commits).
    pub committers: usize,
}

/// When ingest refuses new commands rather than queue without bound.
#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
pub struct ShedConfig {
    /// Above this many unpublished commands in the outbox, `POST /v1/commands`
    /// answers `503` + `Retry-After`.
    pub max_outbox_backlog: i64,
    /// The `Retry-After` of a shed request, in seconds.
    pub retry_after_secs: u64,
    /// The processor's consumer group, whose lag on the commands topic
    /// drives backpressure (see `crate::backpressure`).
    pub processor_group: String,
    /// The longest the processor's backlog may take to drain at its measured
    /// rate before the commands of tenants over their share are refused
    /// (`429`): about the most an accepted command waits for the processor
    /// under sustained overload.
    pub max_queue_delay_ms: u64,
    /// Past this drain time every tenant's new commands are refused (`503`);
    /// at least `max_queue_delay_ms`.
    pub everyone_after_ms: u64,
    /// Lags up to this many commands are never shed for.
    pub min_lag: i64,
}

#[cfg(test)]
impl ShedConfig {
    /// The defaults' shedding (10 s for tenants over their share, 20 s for
    /// everyone, 1,000 commands at least), for unit tests.
    pub(crate) fn for_tests() -> Self {
        Self {
            max_outbox_backlog: 100_000,
            retry_after_secs: 2,
            processor_group: "onceflow-processor".to_owned(),
            max_queue_delay_ms: 10_000,
            everyone_after_ms: 20_000,
            min_lag: 1_000,
        }
    }
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
