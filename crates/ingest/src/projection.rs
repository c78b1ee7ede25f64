//! The job-status projection: consumes the results topic into the `jobs`
//! table that `GET /v1/jobs/{id}` reads.
//!
//! The transitions, whatever order and however often events arrive:
//!
//! - `accepted` → `processing` → a terminal status (`succeeded`, `failed`,
//!   `dead_lettered`, `cancelled`): status moves forward only; `processing` events only
//!   raise the progress, and never override a terminal status.
//! - terminal → terminal: the job follows its *latest* terminal result, by
//!   the event's `occurred_at`. A dead-lettered command that an operator
//!   redrives gets a second terminal result (e.g. `succeeded`), later than the
//!   first, and the job shows it, with its result or error. A redelivered
//!   duplicate (same `occurred_at`) or an older terminal result arriving late
//!   changes nothing, so a job never moves back.
//!
//! A record that is not a result event, or that the database refuses (e.g.
//! `\u0000` in the result's JSON), is a data error: the consumer ends it and
//! moves on (parked under [`PARKING_CONSUMER`] when run with
//! `onceflow_runtime::kafka::consume_parking`); a database outage makes it
//! wait. [`admin_router`] serves the parked records to an operator.

use std::sync::Arc;

use onceflow_contracts::{Envelope, JobStatus, ResultEvent};
use onceflow_runtime::{
    kafka::{BatchError, RecordError},
    parking::{self, Parking},
};
use rdkafka::{Message as _, message::OwnedMessage};
use sqlx::{PgExecutor, PgPool};
use tracing::Instrument as _;

/// The most result events projected in one transaction: a backlog of
/// results costs one commit per batch instead of one per event.
pub const BATCH: usize = 256;

/// The name this projection parks records under.
pub const PARKING_CONSUMER: &str = "ingest.projection";

/// `GET /admin/parked` and `POST /admin/parked/{id}/redrive` for the records
/// this projection parked (a redrive runs [`apply`] again), behind `token`;
/// `None` when `token` is empty.
pub fn admin_router(pool: PgPool, token: &str) -> Option<axum::Router> {
    let handler_pool = pool.clone();
    let handler: parking::Handler = Arc::new(move |message| {
        let pool = handler_pool.clone();
        Box::pin(async move { apply(&pool, message).await })
    });
    parking::router(Parking::new(pool, PARKING_CONSUMER), token, handler)
}

/// Apply one result event to the `jobs` table, in a CONSUMER span that is a
/// child of the event's publish.
pub async fn apply(pool: &PgPool, message: OwnedMessage) -> Result<(), RecordError> {
    let Some((envelope, event)) = decode(&message)? else { return Ok(()) };
    // `instrument`, not `enter`: a guard held across an `.await` corrupts the
    // span stack of whatever else runs on the thread meanwhile.
    project(pool, &event).instrument(project_span(&message, &envelope, &event)).await
}

/// [`apply`] of every message, in order, in one transaction (one commit, not
/// one per event): all projected, or nothing and an error, on which the
/// consumer takes them one at a time through [`apply`] (see
/// `onceflow_runtime::kafka::consume_parking_batched`).
pub async fn apply_batch(pool: &PgPool, messages: Vec<OwnedMessage>) -> Result<(), BatchError> {
    let decoded = BatchError::decode_all(&messages, decode)?;
    let mut tx = pool.begin().await.map_err(BatchError::whole)?;
    for (position, (message, decoded)) in messages.iter().zip(&decoded).enumerate() {
        if let Some((envelope, event)) = decoded {
            let span = project_span(message, envelope, event);
            project(&mut *tx, event).instrument(span).await.map_err(BatchError::at(position))?;
        }
    }
    tx.commit().await.map_err(BatchError::whole)?;
    Ok(())
}

fn project_span(message: &OwnedMessage, envelope: &Envelope, event: &ResultEvent) -> tracing::Span {
    onceflow_runtime::consumer_span!(
        "project_result",
        message,
        envelope,
        job_id = %event.job_id,
        event_type = %envelope.message_type,
    )
}

async fn project(executor: impl PgExecutor<'_>, event: &ResultEvent) -> Result<(), RecordError> {
    let job_id = uuid::Uuid::parse_str(&event.job_id)
        .map_err(|_| RecordError::data(format!("result event with a malformed job id `{}`", event.job_id)))?;
    let result: Option<serde_json::Value> =
        event.result_json.as_deref().and_then(|json| serde_json::from_str(json).ok());
    let error = event.error.as_ref().map(|e| serde_json::json!({"code": e.code, "message": e.message}));
    let updated = sqlx::query(
        "UPDATE jobs
         SET status = $3, progress_percent = $4, result = $5, error = $6, updated_at = now(),
             terminal_occurred_at_ms = CASE WHEN $7 = 2 THEN $8 ELSE terminal_occurred_at_ms END
         WHERE job_id = $1 AND tenant = $2
           AND ((CASE status WHEN 'accepted' THEN 0 WHEN 'processing' THEN 1 ELSE 2 END) < $7
                OR (status = 'processing' AND $3 = 'processing'
                    AND coalesce(progress_percent, -1) < coalesce($4, -1))
                OR ($7 = 2 AND status IN ('succeeded', 'failed', 'dead_lettered', 'cancelled')
                    AND coalesce(terminal_occurred_at_ms, -1) < $8))",
    )
    .bind(job_id)
    .bind(&event.tenant)
    .bind(event.status.as_str())
    .bind(event.progress_percent)
    .bind(result)
    .bind(error)
    .bind(i32::from(event.status.rank()))
    .bind(event.occurred_at)
    .execute(executor)
    .await?;
    tracing::debug!(status = event.status.as_str(), moved = updated.rows_affected() == 1, "job status projected");
    Ok(())
}

/// The envelope and event in `message`; `None` for an `accepted` event, which
/// ingest itself wrote when it took the command. A record that is not a
/// result event is a data error.
fn decode(message: &OwnedMessage) -> Result<Option<(Envelope, ResultEvent)>, RecordError> {
    let envelope = onceflow_runtime::kafka::envelope_of(message)
        .map_err(|error| RecordError::data(format!("result without a valid envelope: {error}")))?;
    let event = ResultEvent::decode(&envelope.schema_id, message.payload().unwrap_or_default())
        .map_err(|error| RecordError::data(format!("undecodable result: {error}")))?;
    Ok((event.status != JobStatus::Accepted).then_some((envelope, event)))
}
