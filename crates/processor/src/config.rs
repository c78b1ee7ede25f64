//! The processor's configuration (embedded defaults → file → `ONCEFLOW_` environment).

use std::time::Duration;

use onceflow_runtime::{
    admin::AdminConfig,
    config::{DatabaseConfig, KafkaConfig, TelemetryConfig},
    failure::Backoff,
    http::HttpLimits,
    probe_records::ProbeRecords,
};

/// The defaults, which also document every setting.
pub const DEFAULTS: &str = include_str!("../config/defaults.toml");

#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
pub struct ProcessorConfig {
    /// Address of the health and metrics endpoints.
    pub listen: String,
    pub group_id: String,
    /// Concurrency: assigned partitions are spread over this many lanes; each
    /// lane records its partitions' commands one at a time, in order; only an
    /// outage makes a lane wait (slow work is handed to executions).
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
    /// How commands handed to executions are driven (push handlers, keys
    /// with work queued, long built-in work).
    pub executions: ExecutionsConfig,
    /// API keys of the tenants whose executions `GET /v1/executions/{id}`
    /// shows (the same list as ingest's); none: that endpoint is not served.
    #[serde(default)]
    pub tenants: Vec<onceflow_runtime::auth::TenantKey>,
    /// Pull workers' credentials (`POST /v1/workers/poll`); none: no worker
    /// can poll.
    #[serde(default)]
    pub workers: Vec<WorkerKey>,
    /// A file declaring command types of one's own (see
    /// `onceflow_catalogue`); empty: the built-in ledger only. Ingest must
    /// read the same file.
    #[serde(default)]
    pub command_types_file: String,
    /// When the synthetic probe's inbox rows are deleted (see
    /// `crate::worker::prune_probe_rows`).
    #[serde(default)]
    pub probe_records: ProbeRecords,
}

/// The dispatcher of executions (see `crate::executions`).
#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
pub struct ExecutionsConfig {
    /// How long an inline effect waits for a row someone else holds before
    /// its command is handed to an execution (then only its key waits).
    pub inline_lock_timeout_ms: u64,
    /// How often the dispatcher looks for ready work when no notification
    /// woke it (notifications come at every commit that queues work).
    pub poll_interval_ms: u64,
    /// A running attempt whose processor died is given up this long after
    /// its deadline, and its command called again.
    pub expiry_grace_ms: u64,
    /// Built-in executions of one key applied in one transaction, at most.
    pub max_batch: usize,
    /// How long a running execution whose cancellation was asked may take
    /// to confirm (its handler's answer to the cancel request, its worker's
    /// `fail` or `release`) before it ends `cancelled` anyway.
    pub cancel_grace_ms: u64,
    pub push: PushConfig,
    pub callbacks: CallbacksConfig,
}

/// Callbacks of long work (`crate::executions::callbacks`).
#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
pub struct CallbacksConfig {
    /// Where handlers and workers reach this processor's port (the links
    /// given with each attempt start with it); empty: `http://` and the
    /// address `listen` is bound to.
    #[serde(default)]
    pub base_url: String,
    /// The secret callback tokens are signed with (at least 32 bytes), the
    /// same on every instance so that any takes the others' tokens; empty:
    /// random per process (tokens then die with it).
    #[serde(default)]
    pub token_secret: String,
}

/// A pull worker's credentials: its name, the SHA-256 of its key, and the
/// command types it may take.
#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerKey {
    pub name: String,
    /// Lower-case hex SHA-256 of the key: `printf '%s' "$KEY" | sha256sum`.
    pub api_key_sha256: String,
    pub types: Vec<String>,
}

impl ExecutionsConfig {
    pub fn inline_lock_timeout(&self) -> Duration {
        Duration::from_millis(self.inline_lock_timeout_ms)
    }
}

/// Calls of push handlers.
#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
pub struct PushConfig {
    /// The Standard Webhooks secret (`whsec_...`) every push request is
    /// signed with; required once a push handler is declared.
    #[serde(default)]
    pub signing_secret: Option<onceflow_webhook::Secret>,
    /// Internal hosts, addresses or networks push handlers may be at
    /// (SSRF protection refuses loopback, private and other internal
    /// addresses otherwise), as for callbacks.
    #[serde(default)]
    pub allowlist: onceflow_webhook::Allowlist,
    pub connect_timeout_ms: u64,
    /// The circuit breaker of each handler (scheme, host and port).
    #[serde(default)]
    pub breaker: onceflow_webhook::BreakerPolicy,
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

    /// The wait before the next try of something that met `waits` outages
    /// before (an execution's head, whose waits are counted in the
    /// database): exponential from `base_delay_ms` to `max_delay_ms`, with
    /// full jitter.
    pub fn delay_after(&self, waits: i32) -> Duration {
        let exponent = u32::try_from(waits.clamp(0, 30)).unwrap_or(30);
        let ceiling = self.base_delay_ms.saturating_mul(1u64 << exponent).min(self.max_delay_ms).max(1);
        Duration::from_millis(rand::random_range(ceiling / 2..=ceiling))
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
