//! The catalogue of every metric onceflow records, with its kind, unit and
//! `# HELP` text, given to the recorder once it is installed.

use metrics::Unit;

use super::{CONSUMER_LAG, DB_POOL_CONNECTIONS, HTTP_SERVER_REQUEST_DURATION};

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
