//! The job-status projection: consumes the results topic and moves each job
//! forward. Status only moves forward (`accepted` → `processing` → terminal),
//! so redelivered, duplicated or reordered events cannot move a job back.

use onceflow_contracts::{JobStatus, ResultEvent, envelope::Envelope};
use rdkafka::{Message as _, message::OwnedMessage};
use sqlx::PgPool;
use tracing::Instrument as _;

/// Apply one result event to the `jobs` table.
pub async fn apply(pool: &PgPool, message: OwnedMessage) -> Result<(), sqlx::Error> {
    let Some(event) = decode(&message) else { return Ok(()) };
    let span = tracing::info_span!("project_result", correlation_id = %event.correlation_id, job_id = %event.job_id);
    // `instrument`, not `enter`: a guard held across an `.await` corrupts the
    // span stack of whatever else runs on the thread meanwhile.
    project(pool, &event).instrument(span).await
}

async fn project(pool: &PgPool, event: &ResultEvent) -> Result<(), sqlx::Error> {
    let Ok(job_id) = uuid::Uuid::parse_str(&event.job_id) else {
        tracing::warn!("result event with a malformed job id; skipped");
        return Ok(());
    };
    let result: Option<serde_json::Value> =
        event.result_json.as_deref().and_then(|json| serde_json::from_str(json).ok());
    let error = event.error.as_ref().map(|e| serde_json::json!({"code": e.code, "message": e.message}));
    let updated = sqlx::query(
        "UPDATE jobs
         SET status = $3, progress_percent = $4, result = $5, error = $6, updated_at = now()
         WHERE job_id = $1 AND tenant = $2
           AND ((CASE status WHEN 'accepted' THEN 0 WHEN 'processing' THEN 1 ELSE 2 END) < $7
                OR (status = 'processing' AND $3 = 'processing'
                    AND coalesce(progress_percent, -1) < coalesce($4, -1)))",
    )
    .bind(job_id)
    .bind(&event.tenant)
    .bind(event.status.as_str())
    .bind(event.progress_percent)
    .bind(result)
    .bind(error)
    .bind(i32::from(event.status.rank()))
    .execute(pool)
    .await?;
    tracing::debug!(status = event.status.as_str(), moved = updated.rows_affected() == 1, "job status projected");
    Ok(())
}

/// The event in `message`, or `None` (logged) when it is not one: the
/// projection skips what it cannot read rather than stall on it.
fn decode(message: &OwnedMessage) -> Option<ResultEvent> {
    let envelope: Envelope = match onceflow_runtime::kafka::envelope_of(message) {
        Ok(envelope) => envelope,
        Err(error) => {
            tracing::warn!(%error, offset = message.offset(), "result without a valid envelope; skipped");
            return None;
        }
    };
    match ResultEvent::decode(&envelope.schema_id, message.payload().unwrap_or_default()) {
        Ok(event) if event.status != JobStatus::Accepted => Some(event),
        Ok(_) => None,
        Err(error) => {
            tracing::warn!(%error, correlation_id = %envelope.correlation_id, "undecodable result; skipped");
            None
        }
    }
}
