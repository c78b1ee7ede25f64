//! What the services measure, as Prometheus metrics on `/metrics`:
//!
//! - the recorder: real histograms with buckets (which, unlike summaries,
//!   add up across instances), and `# HELP` with a unit for every metric
//!   onceflow records ([`CATALOGUE`](catalogue::CATALOGUE));
//! - the RED signals of every HTTP port ([`record_http_request`]):
//!   `http_server_request_duration_seconds` by route template, method and
//!   status (OpenTelemetry's HTTP server metric, in Prometheus naming);
//! - the database pool's use ([`watch_pool`]) and each consumer group's lag
//!   per partition ([`watch_consumer_lag`]).
//!
//! No label carries a tenant, an id or anything else a client chooses: a
//! route is its template (`/v1/jobs/{job_id}`), a command type one the
//! processor knows, so the number of series stays bounded.
//!
//! Each of these is a module of its own, re-exported here: `catalogue`
//! (`# HELP` of every metric), `requests` (HTTP RED signals) and `watchers` (pool
//! use and consumer lag); the recorder and the names of the metrics other
//! modules record are here.

mod catalogue;
mod requests;
mod watchers;

pub(crate) use catalogue::describe;
pub use catalogue::is_described;
pub use requests::record_http_request;
pub use watchers::{watch_consumer_lag, watch_pool, watch_service};

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusRecorder};

/// The duration of every HTTP request a service answers.
pub const HTTP_SERVER_REQUEST_DURATION: &str = "http_server_request_duration_seconds";
/// The lag of a consumer group, per topic partition.
pub const CONSUMER_LAG: &str = "onceflow_kafka_consumer_lag_messages";
/// The connections of a service's database pool, by state.
pub const DB_POOL_CONNECTIONS: &str = "onceflow_db_pool_connections";

/// Bucket bounds of every `_seconds` histogram: 1 ms to 30 s.
const SECONDS_BUCKETS: &[f64] = &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];
/// Bucket bounds of every `_batch_size` histogram (commands per transaction).
const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0];

/// The Prometheus recorder every service installs, with histogram buckets.
pub(crate) fn recorder() -> PrometheusRecorder {
    PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".to_owned()), SECONDS_BUCKETS)
        .and_then(|builder| builder.set_buckets_for_metric(Matcher::Suffix("_batch_size".to_owned()), BATCH_BUCKETS))
        .expect("the bucket lists are not empty")
        .build_recorder()
}
