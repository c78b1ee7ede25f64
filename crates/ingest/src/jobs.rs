//! `GET /v1/jobs/{job_id}`: a job's status, from ingest's own projection,
//! and for a job that has not ended, what it waits for and its attempts so
//! far, from the processor (`GET /v1/executions/{job_id}`, asked with the
//! client's own API key): a job driven from the processor's database can say
//! the job ahead of it on its key, its handler's call, a retry's time, a
//! breaker or a limit. A job the processor applies inline, or a processor
//! that does not answer within [`PROCESSOR_TIMEOUT`], leaves them out.

use std::{sync::Arc, time::Duration};

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
    /// `accepted`, `processing`, `succeeded`, `failed`, `dead_lettered` or `cancelled`; only moves forward.
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
    /// Attempts its handler's failures spent so far (a job not ended yet,
    /// that the processor drives from its database).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attempts: Option<i32>,
    /// Why a job that has not ended waits: `{"reason": "job_ahead",
    /// "job_id"}`, `{"reason": "handler", "deadline"}`, `{"reason": "retry" |
    /// "handler_unavailable" | "breaker" | "locked", "until"}`, `{"reason":
    /// "capacity"}`.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub waiting_for: Option<serde_json::Value>,
}

/// The longest `GET /v1/jobs/{id}` waits for the processor.
pub const PROCESSOR_TIMEOUT: Duration = Duration::from_millis(500);

/// Where ingest asks the processor about a job's execution.
#[derive(Clone)]
pub struct ProcessorClient {
    base: Option<url::Url>,
    http: reqwest::Client,
}

impl ProcessorClient {
    /// A client of the processor at `url` (`http://host:port`); empty: none.
    pub fn new(url: &str) -> onceflow_runtime::Result<Self> {
        let base = match url.trim() {
            "" => None,
            url => Some(
                url::Url::parse(url)
                    .map_err(|e| onceflow_runtime::Error::Config(format!("execution_status_url: {e}")))?,
            ),
        };
        let http = reqwest::Client::builder()
            .timeout(PROCESSOR_TIMEOUT)
            .no_proxy()
            .build()
            .map_err(|e| onceflow_runtime::Error::Config(format!("execution_status_url's client: {e}")))?;
        Ok(Self { base, http })
    }

    /// Ask the processor to cancel `job_id` for the holder of
    /// `authorization`: its status and body, if it answered in time; `None`
    /// when it did not, or when none is configured.
    pub async fn cancel(&self, job_id: Uuid, authorization: &HeaderValue) -> Option<(u16, serde_json::Value)> {
        let url = self.base.as_ref()?.join(&format!("/v1/executions/{job_id}/cancel")).ok()?;
        let response = self.http.post(url).header(header::AUTHORIZATION, authorization).send().await.ok()?;
        let status = response.status().as_u16();
        Some((status, response.json().await.unwrap_or_default()))
    }

    /// The execution of `job_id` as the processor shows it to the holder
    /// of `authorization`, if it answers in time.
    async fn execution(&self, job_id: Uuid, authorization: &HeaderValue) -> Option<serde_json::Value> {
        let url = self.base.as_ref()?.join(&format!("/v1/executions/{job_id}")).ok()?;
        let response = self.http.get(url).header(header::AUTHORIZATION, authorization).send().await.ok()?;
        if !response.status().is_success() {
            return None;
        }
        response.json().await.ok()
    }
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
    State(state): State<Arc<AppState>>,
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
        attempts: None,
        waiting_for: None,
    };
    let terminal = job.status.is_terminal();
    let mut job = job;
    if !terminal
        && let Some(authorization) = headers.get(header::AUTHORIZATION)
        && let Some(execution) = state.processor.execution(job.job_id, authorization).await
    {
        job.attempts = execution["attempts"].as_i64().and_then(|n| i32::try_from(n).ok());
        job.waiting_for = execution.get("waiting_for").filter(|w| !w.is_null()).cloned();
    }
    let mut response = Json(job).into_response();
    if !terminal {
        // 1–3 s, so clients polling many jobs do not move in lockstep.
        let seconds: u64 = rand::rng().random_range(1..=3);
        response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(seconds));
    }
    Ok(response)
}
