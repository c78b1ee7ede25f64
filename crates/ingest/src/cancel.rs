//! `POST /v1/jobs/{job_id}/cancel`: a tenant stops one of its jobs.
//!
//! Ingest checks the job is the caller's and has not ended, then asks the
//! processor (`execution_status_url`, `POST /v1/executions/{id}/cancel`
//! with the caller's key), which holds the job's execution: a queued job
//! ends `cancelled` at once (`200`), a running one is told and ends
//! `cancelled` when its handler or worker confirms or after a grace period
//! (`202`). A job the processor has not recorded yet (accepted a moment
//! ago) is asked about again for up to two seconds. The job's status here follows when its `job.cancelled` result
//! arrives, like any other result.

use std::sync::Arc;

use axum::{
    Json,
    extract::{Path, State},
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
};
use onceflow_contracts::JobStatus;
use onceflow_runtime::openapi::ProblemDocument;
use sqlx::Row as _;
use uuid::Uuid;

use crate::{AppState, error::ApiError};

/// How long a cancel waits for the processor to record a job it does not
/// know yet, and how often it asks meanwhile.
const NOT_RECORDED_WAIT: std::time::Duration = std::time::Duration::from_secs(2);
const NOT_RECORDED_POLL: std::time::Duration = std::time::Duration::from_millis(10);

/// What a cancel did.
#[derive(Debug, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct Cancellation {
    pub job_id: Uuid,
    /// `cancelled` (it was queued: it ended now), or `running` (its handler
    /// or worker was told; it ends `cancelled` when it confirms, or after the
    /// grace period, unless it completes first).
    pub state: String,
    pub cancel_requested: bool,
}

/// Cancel a job of the caller's tenant.
#[utoipa::path(
    post,
    path = "/v1/jobs/{job_id}/cancel",
    tag = "commands",
    security(("api_key" = [])),
    params(("job_id" = String, Path, description = "The job id from the 202 answer")),
    responses(
        (status = 200, description = "It was queued: it ended `cancelled`", body = Cancellation),
        (status = 202, description = "It runs: its handler or worker was told; it ends `cancelled` when it confirms or after the grace period", body = Cancellation),
        (status = 401, description = "No or unknown API key", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 404, description = "No such job for this tenant", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 409, description = "The job ended already (`job-ended`), or the processor has not recorded it yet (`not-cancellable`, with `Retry-After`)", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 503, description = "The processor did not answer; `Retry-After`", body = ProblemDocument, content_type = "application/problem+json"),
    )
)]
#[tracing::instrument(name = "cancel_job", skip_all, fields(job_id = %job_id))]
pub async fn cancel(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(job_id): Path<String>,
) -> Result<Response, ApiError> {
    let tenant = state.api_keys.authenticate(&headers).ok_or(ApiError::Unauthorized)?;
    let job_id = Uuid::parse_str(&job_id).map_err(|_| ApiError::JobNotFound)?;
    let row = sqlx::query("SELECT status FROM jobs WHERE job_id = $1 AND tenant = $2")
        .bind(job_id)
        .bind(&tenant.0)
        .fetch_optional(&state.pool)
        .await?
        .ok_or(ApiError::JobNotFound)?;
    let status: String = row.try_get("status")?;
    if JobStatus::parse(&status).is_some_and(JobStatus::is_terminal) {
        return Err(ApiError::JobEnded(format!("the job already ended: {status}")));
    }
    let authorization = headers.get(header::AUTHORIZATION).ok_or(ApiError::Unauthorized)?;
    // A job accepted a moment ago may not have reached the processor yet
    // (its 404): it is on its way, so ask again for a little while.
    let until = tokio::time::Instant::now() + NOT_RECORDED_WAIT;
    let mut answer = state.processor.cancel(job_id, authorization).await;
    while matches!(answer, Some((404, _))) && tokio::time::Instant::now() < until {
        tokio::time::sleep(NOT_RECORDED_POLL).await;
        answer = state.processor.cancel(job_id, authorization).await;
    }
    match answer {
        Some((code @ (200 | 202), body)) => {
            let cancellation: Cancellation =
                serde_json::from_value(body).map_err(|e| anyhow::anyhow!("the processor's cancel answer: {e}"))?;
            let status = StatusCode::from_u16(code).unwrap_or(StatusCode::ACCEPTED);
            tracing::info!(state = %cancellation.state, "cancel asked");
            Ok((status, Json(cancellation)).into_response())
        }
        Some((409, body)) => {
            let state = body["outcome"]["state"].as_str().unwrap_or("ended").to_owned();
            Err(ApiError::JobEnded(format!("the job already ended: {state}")))
        }
        Some((404, _)) => Err(ApiError::NotCancellable),
        Some((code, body)) => Err(anyhow::anyhow!("the processor answered the cancel with {code}: {body}").into()),
        None => Err(ApiError::ProcessorUnavailable),
    }
}
