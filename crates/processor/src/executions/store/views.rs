//! An execution as a client sees it: its state and why it waits.

use chrono::{DateTime, Utc};
use sqlx::{PgPool, Row as _};
use uuid::Uuid;

/// An execution as a client may see it: where it stands and why it waits.
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
pub struct ExecutionView {
    pub job_id: Uuid,
    #[serde(rename = "type")]
    pub command_type: String,
    /// `queued`, `running`, `succeeded`, `failed` or `dead_lettered`.
    pub state: String,
    /// Attempts its handler's failures spent.
    pub attempts: i32,
    /// Calls that met its handler unavailable (no attempt spent).
    pub outages: i32,
    /// The last failure, `{"code", "message"}`.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub last_error: Option<serde_json::Value>,
    /// Why it has not ended yet: `{"reason": "job_ahead", "job_id"}` (the job
    /// before it on its key), `{"reason": "handler", "deadline"}` (its call
    /// is out), `{"reason": "handler" | "worker", "lease_expires_at",
    /// "last_heartbeat_at"}` (a handler that answered `202`, or a pull
    /// worker, holds it; a worker's name too), `{"reason": "retry" |
    /// "handler_unavailable" | "breaker" | "locked" | "released", "until"}`,
    /// `{"reason": "capacity"}` (ready: for a free slot of its type's
    /// concurrency, or a pull worker's poll).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub waiting_for: Option<serde_json::Value>,
    /// What the last heartbeat reported.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub progress_percent: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub progress_details: Option<serde_json::Value>,
}

/// The execution of `tenant`'s job `job_id`, if the job has one.
pub async fn view(pool: &PgPool, tenant: &str, job_id: Uuid) -> Result<Option<ExecutionView>, sqlx::Error> {
    let Some(row) = sqlx::query(
        "SELECT e.job_id, e.command_type, e.state, e.attempts, e.outages, e.last_error, e.deadline, e.holder,
                e.worker, e.progress_percent, e.progress_details, e.heartbeat_at,
                q.head, q.ready_at, q.waiting, q.ready_at <= now() AS ready
         FROM executions e
         LEFT JOIN key_queues q USING (tenant, scope, ordering_key)
         WHERE e.job_id = $1 AND e.tenant = $2",
    )
    .bind(job_id)
    .bind(tenant)
    .fetch_optional(pool)
    .await?
    else {
        return Ok(None);
    };
    let state: String = row.try_get("state")?;
    let head: Option<Uuid> = row.try_get("head")?;
    let ready_at: Option<DateTime<Utc>> = row.try_get("ready_at")?;
    let waiting: Option<String> = row.try_get("waiting")?;
    let deadline: Option<DateTime<Utc>> = row.try_get("deadline")?;
    let holder: Option<String> = row.try_get("holder")?;
    let waiting_for = match state.as_str() {
        // A call waits for its answer until its deadline; an accepted call
        // or a worker's task for a heartbeat or an end until its lease ends.
        "running" => Some(match holder.as_deref() {
            Some("worker") => serde_json::json!({
                "reason": "worker",
                "worker": row.try_get::<Option<String>, _>("worker")?,
                "lease_expires_at": deadline,
                "last_heartbeat_at": row.try_get::<Option<DateTime<Utc>>, _>("heartbeat_at")?,
            }),
            Some("handler") => serde_json::json!({
                "reason": "handler",
                "lease_expires_at": deadline,
                "last_heartbeat_at": row.try_get::<Option<DateTime<Utc>>, _>("heartbeat_at")?,
            }),
            _ => serde_json::json!({"reason": "handler", "deadline": deadline}),
        }),
        // A head held back says why until it starts again (also while it is
        // being tried again); a ready head that was never held waits for a
        // slot of its type's concurrency.
        "queued" => Some(match (head, waiting) {
            (Some(head), _) if head != job_id => serde_json::json!({"reason": "job_ahead", "job_id": head}),
            (_, Some(waiting)) => serde_json::json!({"reason": waiting, "until": ready_at}),
            _ if row.try_get::<Option<bool>, _>("ready")? == Some(true) => serde_json::json!({"reason": "capacity"}),
            _ => serde_json::json!({"reason": "retry", "until": ready_at}),
        }),
        _ => None,
    };
    Ok(Some(ExecutionView {
        progress_percent: row.try_get("progress_percent")?,
        progress_details: row.try_get("progress_details")?,
        job_id: row.try_get("job_id")?,
        command_type: row.try_get("command_type")?,
        state,
        attempts: row.try_get("attempts")?,
        outages: row.try_get("outages")?,
        last_error: row.try_get("last_error")?,
        waiting_for,
    }))
}
