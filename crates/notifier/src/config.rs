//! The notifier's configuration (embedded defaults → file → `ONCEFLOW_` environment).

use std::{
    collections::BTreeMap,
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
use onceflow_webhook::{Allowlist, BreakerPolicy, RetryPolicy, Secret};

use crate::admission::StreamLimits;

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
    /// API keys, stored as SHA-256 hex digests, and the tenant each belongs
    /// to (none by default; the notifier does not start without one).
    #[serde(default)]
    pub tenants: Vec<TenantKey>,
    pub webhooks: WebhooksConfig,
    #[serde(default)]
    pub admin: AdminConfig,
    /// Timeouts and bounds of the HTTP port (see `onceflow_runtime::hygiene`).
    #[serde(default)]
    pub http: HttpLimits,
    /// Each tenant's stream limits (see [`crate::admission`]).
    pub stream_limits: PerTenant<StreamLimits>,
    /// When the synthetic probe's events are deleted (see
    /// `crate::store::prune_probe_events`).
    #[serde(default)]
    pub probe_records: ProbeRecords,
}

#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
pub struct SseConfig {
    pub heartbeat_secs: u64,
    pub reconnect_ms: u64,
    pub buffer: usize,
    /// How long events stay available for resumption.
    pub retention_secs: u64,
    /// How often expired events are pruned, and how many per statement (0
    /// is refused: the pruning would spin).
    pub prune_interval_secs: NonZeroU64,
    pub prune_batch: NonZeroU32,
    /// HMAC key of stream tokens (see [`crate::tokens`]); empty: a random
    /// one per process.
    #[serde(default)]
    pub token_secret: String,
    /// Lifetime of a stream token when the request names none.
    #[serde(default = "default_token_ttl_secs")]
    pub token_ttl_secs: u64,
    /// The longest lifetime a request may ask for.
    #[serde(default = "default_token_max_ttl_secs")]
    pub token_max_ttl_secs: u64,
    /// Origins whose pages may call the streams and the token endpoint
    /// (CORS); empty: none, `"*"`: any.
    #[serde(default)]
    pub cors_origins: Vec<String>,
    /// Connections of the streams' own database pool (their start, their
    /// catch-up, token epochs), apart from `database.max_connections`.
    pub pool_connections: u32,
}

const MAX_TOKEN_TTL_SECS: u64 = 86_400;

fn default_token_ttl_secs() -> u64 {
    600
}

fn default_token_max_ttl_secs() -> u64 {
    3600
}

impl SseConfig {
    /// Refuse token and CORS settings the notifier cannot serve with.
    pub fn validate(&self) -> Result<(), String> {
        if self.token_ttl_secs == 0 || self.token_ttl_secs > self.token_max_ttl_secs {
            return Err("sse.token_ttl_secs must be positive and at most sse.token_max_ttl_secs".to_owned());
        }
        // Short-lived is the point: a leaked token works until it expires.
        if self.token_max_ttl_secs > MAX_TOKEN_TTL_SECS {
            return Err(format!("sse.token_max_ttl_secs must be at most {MAX_TOKEN_TTL_SECS} (a day)"));
        }
        if self.pool_connections == 0 {
            return Err("sse.pool_connections must be at least 1".to_owned());
        }
        crate::tokens::StreamTokens::from_config(&self.token_secret, crate::tokens::SETTING)?;
        crate::cors::layer(&self.cors_origins).map(drop)
    }
}

/// Webhook delivery (see `[webhooks]` in the defaults for every setting's meaning).
#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
pub struct WebhooksConfig {
    pub workers: usize,
    pub timeout_ms: u64,
    pub connect_timeout_ms: u64,
    pub poll_interval_ms: u64,
    pub allowlist: Allowlist,
    #[serde(default)]
    pub proxy: Option<String>,
    pub retry: RetryPolicy,
    /// When a destination's circuit breaker opens and how long it stays open.
    #[serde(default)]
    pub breaker: BreakerPolicy,
    /// Each tenant's share of the workers (see `crate::webhooks::share`).
    pub per_tenant: PerTenant<crate::webhooks::share::TenantShare>,
    /// Tenant → its active signing secrets, newest first.
    #[serde(default)]
    pub secrets: BTreeMap<String, Vec<Secret>>,
}

impl WebhooksConfig {
    /// Refuse settings the delivery worker cannot run with.
    pub fn validate(&self) -> Result<(), String> {
        if self.workers == 0 {
            return Err("webhooks.workers must be at least 1".to_owned());
        }
        if self.timeout_ms == 0 || self.connect_timeout_ms == 0 || self.poll_interval_ms == 0 {
            return Err("webhooks.timeout_ms, connect_timeout_ms and poll_interval_ms must be positive".to_owned());
        }
        self.retry.validate()?;
        crate::webhooks::share::validate(&self.per_tenant)?;
        self.breaker.validate()
    }

    /// How long a claimed delivery stays reserved for its worker: longer than
    /// anything one attempt can take (the SSRF check's DNS lookup, then the
    /// request with its timeout), so a live worker never loses its lease and
    /// a dead one's delivery is retried soon after.
    pub fn lease(&self) -> Duration {
        onceflow_webhook::ssrf::RESOLVE_TIMEOUT + Duration::from_millis(self.timeout_ms) + Duration::from_secs(10)
    }

    /// The active secrets of `tenant` (empty if it has none).
    pub fn secrets_of(&self, tenant: &str) -> &[Secret] {
        self.secrets.get(tenant).map_or(&[], Vec::as_slice)
    }
}

impl NotifierConfig {
    /// The streams' own pool: `database` with `sse.pool_connections`.
    pub fn stream_database(&self) -> DatabaseConfig {
        DatabaseConfig { max_connections: self.sse.pool_connections, ..self.database.clone() }
    }
}

impl onceflow_runtime::cli::ServiceConfig for NotifierConfig {
    fn telemetry(&self) -> &TelemetryConfig {
        &self.telemetry
    }
    fn database(&self) -> &DatabaseConfig {
        &self.database
    }
}
