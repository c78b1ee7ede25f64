//! `GET /v1/jobs/{job_id}`: a job's status, from ingest's own projection.

use axum::{
    Json,
    extract::{Path, State},
    http::{HeaderMap, HeaderValue, header},
    response::{IntoResponse, Response},
};
use onceflow_contracts::JobStatus;
use rand::Rng as _;
use sqlx::Row as _;
use uuid::Uuid;

use onceflow_runtime::openapi::ProblemDocument;

use crate::{AppState, error::ApiError};

/// The job as clients see it.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct JobView {
    pub job_id: Uuid,
    pub correlation_id: String,
    #[serde(rename = "type")]
    pub command_type: String,
    /// `accepted`, `processing`, `succeeded`, `failed` or `dead_lettered`; only moves forward.
    #[schema(value_type = String, example = "succeeded")]
    pub status: JobStatus,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub progress_percent: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub result: Option<serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    /// `{"code", "message"}` of a failed or dead-lettered job.
    #[schema(value_type = Option<Object>)]
    pub error: Option<serde_json::Value>,
    pub created_at: chrono::DateTime<chrono::Utc>,
    pub updated_at: chrono::DateTime<chrono::Utc>,
}

/// A job's status, result or error.
#[utoipa::path(
    get,
    path = "/v1/jobs/{job_id}",
    tag = "commands",
    security(("api_key" = [])),
    params(("job_id" = String, Path, description = "The job id from the 202 answer")),
    responses(
        (status = 200, description = "The job; `Retry-After` (1-3 s, jittered) while it is not finished", body = JobView),
        (status = 401, description = "No or unknown API key", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 404, description = "No such job for this tenant", body = ProblemDocument, content_type = "application/problem+json"),
    )
)]
#[tracing::instrument(name = "get_job", skip_all, fields(job_id = %job_id))]
pub async fn get(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(job_id): Path<String>,
) -> Result<Response, ApiError> {
    let tenant = state.api_keys.authenticate(&headers).ok_or(ApiError::Unauthorized)?;
    // A malformed id names no job: the same 404 as another tenant's job.
    let job_id = Uuid::parse_str(&job_id).map_err(|_| ApiError::JobNotFound)?;
    let row = sqlx::query(
        "SELECT job_id, correlation_id, command_type, status, progress_percent, result, error, created_at, updated_at
         FROM jobs WHERE job_id = $1 AND tenant = $2",
    )
    .bind(job_id)
    .bind(&tenant.0)
    .fetch_optional(&state.pool)
    .await?
    .ok_or(ApiError::JobNotFound)?;
    let status: String = row.try_get("status")?;
    let job = JobView {
        job_id: row.try_get("job_id")?,
        correlation_id: row.try_get("correlation_id")?,
        command_type: row.try_get("command_type")?,
        status: JobStatus::parse(&status).ok_or_else(|| anyhow::anyhow!("unknown status {status} in jobs"))?,
        progress_percent: row.try_get("progress_percent")?,
        result: row.try_get("result")?,
        error: row.try_get("error")?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
    };
    let terminal = job.status.is_terminal();
    let mut response = Json(job).into_response();
    if !terminal {
        // 1–3 s, so clients polling many jobs do not move in lockstep.
        let seconds: u64 = rand::rng().random_range(1..=3);
        response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(seconds));
    }
    Ok(response)
}
