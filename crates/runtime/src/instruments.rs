//! What the services measure, as Prometheus metrics on `/metrics`:
//!
//! - the recorder: real histograms with buckets (which, unlike summaries,
//!   add up across instances), and `# HELP` with a unit for every metric
//!   onceflow records ([`CATALOGUE`]);
//! - the RED signals of every HTTP port ([`record_http_request`]):
//!   `http_server_request_duration_seconds` by route template, method and
//!   status (OpenTelemetry's HTTP server metric, in Prometheus naming);
//! - the database pool's use ([`watch_pool`]) and each consumer group's lag
//!   per partition ([`watch_consumer_lag`]).
//!
//! No label carries a tenant, an id or anything else a client chooses: a
//! route is its template (`/v1/jobs/{job_id}`), a command type one the
//! processor knows, so the number of series stays bounded.

use std::{sync::Arc, time::Duration};

use axum::{extract::MatchedPath, http::Request, middleware::Next, response::Response};
use metrics::Unit;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusRecorder};
use tokio_util::sync::CancellationToken;

use crate::{config::KafkaConfig, kafka::LagProbe};

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

#[derive(Clone, Copy)]
enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// Every metric onceflow records: name, kind, unit, help.
const CATALOGUE: &[(&str, Kind, Option<Unit>, &str)] = &[
    (
        HTTP_SERVER_REQUEST_DURATION,
        Kind::Histogram,
        Some(Unit::Seconds),
        "Duration of HTTP requests until the response head, by route template, method and status.",
    ),
    (
        CONSUMER_LAG,
        Kind::Gauge,
        Some(Unit::Count),
        "Records on a topic partition that the consumer group has not committed yet.",
    ),
    (
        DB_POOL_CONNECTIONS,
        Kind::Gauge,
        Some(Unit::Count),
        "Connections of the service's database pool, by state (idle, in_use) and the pool's bound (max).",
    ),
    (
        "onceflow_command_duration_seconds",
        Kind::Histogram,
        Some(Unit::Seconds),
        "Time from the processor taking a command to its end being committed, by command type and outcome.",
    ),
    ("onceflow_command_batch_size", Kind::Histogram, Some(Unit::Count), "Commands applied per processor transaction."),
    (
        "onceflow_command_batch_fallbacks_total",
        Kind::Counter,
        Some(Unit::Count),
        "Processor batches rolled back and handed to the one-message path, by reason.",
    ),
    (
        "onceflow_commands_processed_total",
        Kind::Counter,
        Some(Unit::Count),
        "Commands the processor applied or refused, by status.",
    ),
    (
        "onceflow_commands_duplicate_total",
        Kind::Counter,
        Some(Unit::Count),
        "Deliveries of commands the processor had already handled (no effect).",
    ),
    (
        "onceflow_commands_deferred_total",
        Kind::Counter,
        Some(Unit::Count),
        "Commands the processor handed to an execution (push handler, long work, busy or locked key), by type.",
    ),
    (
        "onceflow_handler_calls_total",
        Kind::Counter,
        Some(Unit::Count),
        "Calls of push handlers, by command type and outcome (succeeded, accepted: a 202, refused, unavailable, \
         failed).",
    ),
    (
        "onceflow_handler_call_duration_seconds",
        Kind::Histogram,
        Some(Unit::Seconds),
        "Time from a push handler's call to its answer, by command type.",
    ),
    (
        "onceflow_handler_breaker_transitions_total",
        Kind::Counter,
        Some(Unit::Count),
        "Changes of a push handler's circuit breaker, by the state entered.",
    ),
    (
        "onceflow_execution_attempts_expired_total",
        Kind::Counter,
        Some(Unit::Count),
        "Attempts given up because their lease ended without an answer, heartbeat or completion (a dead \
         processor, handler or worker), by command type.",
    ),
    (
        "onceflow_lane_pauses_total",
        Kind::Counter,
        Some(Unit::Count),
        "Times a processor lane's queue was full and its partitions were paused (the other lanes went on).",
    ),
    (
        "onceflow_executions",
        Kind::Gauge,
        Some(Unit::Count),
        "Executions not ended, by command type and state (queued, running); the same on every processor instance.",
    ),
    (
        "onceflow_execution_oldest_queued_seconds",
        Kind::Gauge,
        Some(Unit::Seconds),
        "How long the oldest queued execution of a command type has waited since its 202.",
    ),
    (
        "onceflow_executions_ended_total",
        Kind::Counter,
        Some(Unit::Count),
        "Executions ended, by command type and outcome (succeeded, failed, dead_lettered, cancelled).",
    ),
    (
        "onceflow_execution_timeouts_total",
        Kind::Counter,
        Some(Unit::Count),
        "Jobs ended failed with timed_out, by command type and timeout (attempt: its last lease; start; job).",
    ),
    (
        "onceflow_executions_cancelled_total",
        Kind::Counter,
        Some(Unit::Count),
        "Jobs ended cancelled by their tenants, by command type.",
    ),
    (
        "onceflow_worker_tasks_total",
        Kind::Counter,
        Some(Unit::Count),
        "Tasks handed to pull workers (each attempt once), by command type.",
    ),
    (
        "onceflow_commands_dead_lettered_total",
        Kind::Counter,
        Some(Unit::Count),
        "Commands sent to the dead-letter topic, by error code.",
    ),
    ("onceflow_commands_redriven_total", Kind::Counter, Some(Unit::Count), "Redriven dead letters applied once more."),
    (
        "onceflow_dead_letters_off_topic_total",
        Kind::Counter,
        Some(Unit::Count),
        "Dead letters the dead-letter topic refused, kept in the table only.",
    ),
    ("onceflow_dead_letters_redriven_total", Kind::Counter, Some(Unit::Count), "Dead letters an operator redrove."),
    (
        "onceflow_dead_letters_unrecorded_total",
        Kind::Counter,
        Some(Unit::Count),
        "Dead letters that could not be recorded in the table.",
    ),
    (
        "onceflow_progress_events_total",
        Kind::Counter,
        Some(Unit::Count),
        "Progress events of long-running commands committed to the outbox.",
    ),
    (
        "onceflow_results_too_large_total",
        Kind::Counter,
        Some(Unit::Count),
        "Commands whose result did not fit in one record (failed, effect rolled back).",
    ),
    (
        "onceflow_outage_waits_total",
        Kind::Counter,
        Some(Unit::Count),
        "Waits of a record on an outage (database or broker down), by stage.",
    ),
    ("onceflow_outbox_backlog", Kind::Gauge, Some(Unit::Count), "Outbox rows not yet published."),
    (
        "onceflow_outbox_published_total",
        Kind::Counter,
        Some(Unit::Count),
        "Outbox rows published and acknowledged by the broker.",
    ),
    (
        "onceflow_outbox_parked_total",
        Kind::Counter,
        Some(Unit::Count),
        "Outbox rows the broker refused for what they hold, moved to onceflow_outbox_parked for an operator.",
    ),
    (
        "onceflow_outbox_order_breaks_total",
        Kind::Counter,
        Some(Unit::Count),
        "Rows the broker acknowledged after refusing an earlier row of their key in one pipelined round.",
    ),
    (
        "onceflow_outbox_commit_to_publish_seconds",
        Kind::Histogram,
        Some(Unit::Seconds),
        "Time from an outbox row's commit to the broker's acknowledgement.",
    ),
    (
        "onceflow_record_batch_fallbacks_total",
        Kind::Counter,
        Some(Unit::Count),
        "Batches of a results consumer (notifier.results, ingest.projection) not applied and split up, by consumer.",
    ),
    (
        "onceflow_records_parked_total",
        Kind::Counter,
        Some(Unit::Count),
        "Records a consumer could never apply, parked for an operator.",
    ),
    ("onceflow_records_refused_total", Kind::Counter, Some(Unit::Count), "Records a consumer refused as data errors."),
    ("onceflow_parked_records_redriven_total", Kind::Counter, Some(Unit::Count), "Parked records an operator redrove."),
    (
        "onceflow_http_shed_total",
        Kind::Counter,
        Some(Unit::Count),
        "Requests refused with 503 because too many were in flight.",
    ),
    (
        "onceflow_http_timed_out_total",
        Kind::Counter,
        Some(Unit::Count),
        "Requests answered 408 because they took too long.",
    ),
    (
        "onceflow_webhook_breakers",
        Kind::Gauge,
        Some(Unit::Count),
        "Webhook circuit breakers (one per tenant and destination) by state.",
    ),
    (
        "onceflow_webhook_breaker_longest_open_seconds",
        Kind::Gauge,
        Some(Unit::Seconds),
        "How long the webhook breaker open longest has been open or probing without closing (0 when none is).",
    ),
    (
        "onceflow_webhook_breaker_transitions_total",
        Kind::Counter,
        Some(Unit::Count),
        "Circuit breaker transitions, by the state entered.",
    ),
    (
        "onceflow_webhook_deliveries_waiting",
        Kind::Gauge,
        Some(Unit::Count),
        "Pending webhook deliveries held by an open breaker.",
    ),
    (
        "onceflow_webhook_queue_depth",
        Kind::Gauge,
        Some(Unit::Count),
        "Pending webhook deliveries, by state: due (their attempt's time has come) or scheduled (in a retry's backoff).",
    ),
    (
        "onceflow_webhook_endpoint_changes_total",
        Kind::Counter,
        Some(Unit::Count),
        "Webhook endpoints disabled (410 Gone) or enabled again, by the state entered.",
    ),
    (
        "onceflow_ingest_commit_batch_size",
        Kind::Histogram,
        Some(Unit::Count),
        "Accepted commands committed per group-commit transaction.",
    ),
    (
        "onceflow_ingest_group_fallbacks_total",
        Kind::Counter,
        Some(Unit::Count),
        "Group commits that failed, whose requests then committed one by one.",
    ),
    (
        "onceflow_ingest_shed_total",
        Kind::Counter,
        Some(Unit::Count),
        "Commands ingest refused with 503, by reason (outbox_backlog, processor_lag, database_pool).",
    ),
    (
        "onceflow_ingest_tenant_refusals_total",
        Kind::Counter,
        Some(Unit::Count),
        "Commands ingest refused with 429 for a tenant's limit, by limit (rate, in_flight, over_share).",
    ),
    (
        "onceflow_processor_lag_messages",
        Kind::Gauge,
        Some(Unit::Count),
        "The processor group's lag on the commands topic, as ingest's backpressure sees it.",
    ),
    (
        "onceflow_processor_drain_per_second",
        Kind::Gauge,
        None,
        "Commands the processor applies per second, smoothed, as ingest's backpressure sees it.",
    ),
    ("onceflow_sse_connections", Kind::Gauge, Some(Unit::Count), "Open Server-Sent Events streams."),
    (
        "onceflow_probe_success",
        Kind::Gauge,
        None,
        "1 when the last synthetic probe (onceflow probe) went through every stage within its deadline, 0 when not.",
    ),
    (
        "onceflow_probe_duration_seconds",
        Kind::Gauge,
        Some(Unit::Seconds),
        "The last synthetic probe's time per stage (accept, status, stream); NaN for a stage it did not complete.",
    ),
    (
        "onceflow_probe_runs_total",
        Kind::Counter,
        Some(Unit::Count),
        "Synthetic probes run, by outcome (success, failure).",
    ),
    (
        crate::probe_records::PRUNED_TOTAL,
        Kind::Counter,
        Some(Unit::Count),
        "Rows of the synthetic probe's records deleted once older than probe_records.retain_secs: ingest's jobs (their idempotency keys go with them), the processor's inbox rows, the notifier's events.",
    ),
    (
        "onceflow_sse_refused_total",
        Kind::Counter,
        Some(Unit::Count),
        "Server-Sent Events streams refused at open, by the stream limit reached (max_streams, max_streams_per_token, max_replays).",
    ),
    ("onceflow_webhook_attempts_total", Kind::Counter, Some(Unit::Count), "Webhook delivery attempts, by outcome."),
    (
        "onceflow_webhook_deliveries_total",
        Kind::Counter,
        Some(Unit::Count),
        "Webhook deliveries that ended, by outcome.",
    ),
    (
        "onceflow_webhook_attempt_duration_seconds",
        Kind::Histogram,
        Some(Unit::Seconds),
        "Duration of one webhook POST.",
    ),
];

/// The Prometheus recorder every service installs, with histogram buckets.
pub(crate) fn recorder() -> PrometheusRecorder {
    PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".to_owned()), SECONDS_BUCKETS)
        .and_then(|builder| builder.set_buckets_for_metric(Matcher::Suffix("_batch_size".to_owned()), BATCH_BUCKETS))
        .expect("the bucket lists are not empty")
        .build_recorder()
}

/// Whether `name` is in [`CATALOGUE`], so gets its `# HELP`.
pub fn is_described(name: &str) -> bool {
    CATALOGUE.iter().any(|(described, ..)| *described == name)
}

/// Give every metric of [`CATALOGUE`] its `# HELP` and unit; call once the
/// recorder is installed.
pub(crate) fn describe() {
    for &(name, kind, unit, help) in CATALOGUE {
        match (kind, unit) {
            (Kind::Counter, Some(unit)) => metrics::describe_counter!(name, unit, help),
            (Kind::Counter, None) => metrics::describe_counter!(name, help),
            (Kind::Gauge, Some(unit)) => metrics::describe_gauge!(name, unit, help),
            (Kind::Gauge, None) => metrics::describe_gauge!(name, help),
            (Kind::Histogram, Some(unit)) => metrics::describe_histogram!(name, unit, help),
            (Kind::Histogram, None) => metrics::describe_histogram!(name, help),
        }
    }
}

/// Middleware: the duration of every request into
/// [`HTTP_SERVER_REQUEST_DURATION`], labelled with the route template (or
/// `unmatched`), the method and the status code.
pub async fn record_http_request(
    matched: Option<MatchedPath>,
    request: Request<axum::body::Body>,
    next: Next,
) -> Response {
    let started = std::time::Instant::now();
    let route = matched.map_or_else(|| "unmatched".to_owned(), |path| path.as_str().to_owned());
    let method = known_method(request.method());
    let response = next.run(request).await;
    metrics::histogram!(
        HTTP_SERVER_REQUEST_DURATION,
        "http_route" => route,
        "http_request_method" => method,
        "http_response_status_code" => response.status().as_u16().to_string(),
    )
    .record(started.elapsed().as_secs_f64());
    response
}

/// The method as a label: the standard ones by name, any other as `_OTHER`
/// (as OpenTelemetry's conventions say), so a client cannot mint series.
fn known_method(method: &axum::http::Method) -> &'static str {
    use axum::http::Method;
    match *method {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::OPTIONS => "OPTIONS",
        Method::CONNECT => "CONNECT",
        Method::TRACE => "TRACE",
        _ => "_OTHER",
    }
}

/// Keep [`DB_POOL_CONNECTIONS`] current for `pool`, every `interval`, until `shutdown`.
pub async fn watch_pool(pool: sqlx::PgPool, interval: Duration, shutdown: CancellationToken) {
    loop {
        let idle = pool.num_idle() as f64;
        let size = f64::from(pool.size());
        metrics::gauge!(DB_POOL_CONNECTIONS, "state" => "idle").set(idle);
        metrics::gauge!(DB_POOL_CONNECTIONS, "state" => "in_use").set((size - idle).max(0.0));
        metrics::gauge!(DB_POOL_CONNECTIONS, "state" => "max").set(f64::from(pool.options().get_max_connections()));
        if !crate::shutdown::pause(interval, &shutdown).await {
            return;
        }
    }
}

/// Keep [`CONSUMER_LAG`] current for `group` on each of `topics`, every
/// `interval`, until `shutdown` (measured from outside the group, see
/// [`LagProbe`]). A topic whose lag cannot be measured (the broker is down)
/// keeps its last figures and is logged at debug level.
pub async fn watch_consumer_lag(
    config: KafkaConfig,
    group: String,
    topics: Vec<String>,
    interval: Duration,
    shutdown: CancellationToken,
) {
    let probes: Vec<Arc<LagProbe>> = topics
        .iter()
        .filter_map(|topic| match LagProbe::new(&config, &group, topic) {
            Ok(probe) => Some(Arc::new(probe)),
            Err(error) => {
                tracing::warn!(%error, topic, "cannot measure the consumer lag");
                None
            }
        })
        .collect();
    loop {
        for probe in &probes {
            let measuring = probe.clone();
            match tokio::task::spawn_blocking(move || measuring.measure(Duration::from_secs(2))).await {
                Ok(Ok(lag)) => {
                    for partition in &lag.partitions {
                        metrics::gauge!(
                            CONSUMER_LAG,
                            "topic" => probe.topic().to_owned(),
                            "partition" => partition.partition.to_string(),
                            "group" => group.clone(),
                        )
                        .set(partition.lag as f64);
                    }
                }
                Ok(Err(error)) => tracing::debug!(%error, topic = probe.topic(), "cannot measure the consumer lag"),
                Err(error) => tracing::warn!(%error, "the lag measurement failed"),
            }
        }
        if !crate::shutdown::pause(interval, &shutdown).await {
            return;
        }
    }
}

/// Start the watchers every service runs: its pool's use and its consumer
/// group's lag on `topics`, refreshed every few seconds.
pub fn watch_service(
    tasks: &mut tokio::task::JoinSet<()>,
    pool: &sqlx::PgPool,
    kafka: &KafkaConfig,
    group: &str,
    topics: &[&str],
    shutdown: &CancellationToken,
) {
    tasks.spawn(watch_pool(pool.clone(), Duration::from_secs(5), shutdown.clone()));
    let topics = topics.iter().map(|&topic| topic.to_owned()).collect();
    tasks.spawn(watch_consumer_lag(kafka.clone(), group.to_owned(), topics, Duration::from_secs(5), shutdown.clone()));
}
