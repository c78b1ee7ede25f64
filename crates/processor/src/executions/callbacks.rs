//! Callbacks of long work: how a push handler that answered `202`, a third
//! party it handed the links to, or a pull worker reports on an attempt.
//!
//! - `POST /v1/executions/{id}/heartbeat` `{"progress_percent", "details"}`:
//!   extends the attempt's lease by its type's `heartbeat_timeout_ms` (never
//!   past the attempt's end); a new percent becomes a `job.processing`
//!   event. Answers the lease's new end.
//! - `POST /v1/executions/{id}/complete` `{"result"}`: the job succeeds.
//! - `POST /v1/executions/{id}/fail` `{"code", "message", "retryable"}`: the
//!   job fails with that code, or, when retryable, the attempt is spent and
//!   the next one follows the type's retry policy (dead-lettered after the
//!   last).
//! - `POST /v1/executions/{id}/release`: a worker hands its task back (on
//!   shutdown); it is ready again at once and no attempt is spent.
//!
//! Once its tenant cancelled the job ([`super::cancel`]), a heartbeat's
//! answer says `cancel_requested`, and a `fail` or `release` confirms: the
//! job ends `cancelled`.
//!
//! Each takes `Authorization: Bearer <token>`: the token given with the
//! attempt, scoped to that job and attempt, expiring a grace after the
//! attempt's end ([`onceflow_runtime::signed_tokens`], signed with
//! `executions.callbacks.token_secret`, so any instance takes it).
//!
//! **Once.** A callback locks its execution's row, so callbacks of one job
//! take turns, and ends it through the same fenced end as a push call's
//! answer. The first success of any attempt wins (the work is done, whoever
//! did it); a repeat of the stored outcome answers it again (`200`); a
//! different outcome after the end, or a heartbeat, failure or release of an
//! attempt that is no longer running, gets `409` with the stored outcome.

use std::time::Duration;

use axum::{
    Json,
    extract::{Path, State},
    http::{HeaderMap, StatusCode, header},
};
use chrono::{DateTime, Utc};
use onceflow_contracts::{JobError, JobStatus};
use onceflow_runtime::{
    problem::Problem,
    signed_tokens::{Expiring, SignedTokens},
};
use serde_json::Value;
use uuid::Uuid;

use super::{
    api::ApiState,
    endings::{AfterFailure, End},
    leases::{self, Counted, Stored},
    push::{bounded_message, fits_code, holds_nul},
    store::{Execution, Wait},
};
use sqlx::{Postgres, Transaction};

use crate::{config::CallbacksConfig, worker::Worker};

/// The setting of the tokens' secret.
pub const SECRET_SETTING: &str = "executions.callbacks.token_secret";

/// The most bytes of a heartbeat's `details`, as JSON.
const MAX_DETAILS_BYTES: usize = 4096;

/// What a callback token grants: reports on one attempt of one job.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct Claims {
    job: Uuid,
    attempt: Uuid,
    exp: i64,
}

impl Expiring for Claims {
    fn expires_at(&self) -> i64 {
        self.exp
    }
}

/// Where and how one attempt reports.
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
pub struct Links {
    /// `Authorization: Bearer <token>` of every callback of this attempt.
    pub token: String,
    pub heartbeat: String,
    pub complete: String,
    pub fail: String,
    pub release: String,
    /// When the token stops working.
    pub expires_at: DateTime<Utc>,
}

/// Issues and checks callback tokens.
pub struct Callbacks {
    tokens: SignedTokens,
    base_url: String,
    /// How long after an attempt's end its token still works.
    grace: Duration,
}

impl Callbacks {
    /// From the settings; `false` when the secret is random for this process
    /// (tokens then work on this instance only, until it restarts).
    pub fn new(config: &CallbacksConfig, grace: Duration) -> Result<(Self, bool), String> {
        let (tokens, configured) = SignedTokens::from_config(&config.token_secret, SECRET_SETTING)?;
        let base_url = config.base_url.trim_end_matches('/').to_owned();
        url::Url::parse(&base_url).map_err(|e| format!("executions.callbacks.base_url `{base_url}`: {e}"))?;
        Ok((Self { tokens, base_url, grace }, configured))
    }

    /// The links of `execution`'s running attempt, which ends `timeout` after
    /// it started (about now).
    pub fn links(&self, execution: &Execution, timeout: Duration) -> Links {
        let expires_at = Utc::now() + timeout + self.grace;
        let claims = Claims {
            job: execution.job_id,
            attempt: execution.attempt_id.unwrap_or_default(),
            exp: expires_at.timestamp(),
        };
        let url = |action: &str| format!("{}/v1/executions/{}/{action}", self.base_url, execution.job_id);
        Links {
            token: self.tokens.issue(&claims),
            heartbeat: url("heartbeat"),
            complete: url("complete"),
            fail: url("fail"),
            release: url("release"),
            expires_at,
        }
    }

    /// The attempt the request's token reports on, if it is a token of `job_id`.
    fn attempt(&self, headers: &HeaderMap, job_id: Uuid) -> Result<Uuid, Problem> {
        let token = headers
            .get(header::AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.strip_prefix("Bearer "))
            .ok_or_else(|| unauthorized("the attempt's callback token is required (Authorization: Bearer <token>)"))?;
        let claims: Claims = self
            .tokens
            .verify(token.trim(), Utc::now().timestamp())
            .map_err(|error| unauthorized(&format!("callback token: {error}")))?;
        if claims.job != job_id {
            return Err(unauthorized("the callback token is another job's"));
        }
        Ok(claims.attempt)
    }
}

fn unauthorized(detail: &str) -> Problem {
    Problem::new(StatusCode::UNAUTHORIZED, "unauthorized", "Unauthorized", detail)
}

pub(super) fn unavailable(error: &sqlx::Error) -> Problem {
    tracing::warn!(%error, "a callback met an outage of the database");
    Problem::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", "Service unavailable", "the database is unavailable")
        .retry_after(1)
}

/// Where a job stands after a callback.
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
pub struct Outcome {
    pub job_id: Uuid,
    /// `queued` (a retry follows), `succeeded`, `failed` or `dead_lettered`.
    pub state: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub result: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub error: Option<Value>,
}

impl Outcome {
    /// The outcome `end` records.
    fn of_end(job_id: Uuid, end: &End) -> Self {
        Self {
            job_id,
            state: end.status.as_str().to_owned(),
            result: end.result.as_deref().and_then(|text| serde_json::from_str(text).ok()),
            error: end.error.as_ref().map(|e| serde_json::json!({"code": e.code, "message": e.message})),
        }
    }

    fn of(stored: &Stored) -> Self {
        Self {
            job_id: stored.execution.job_id,
            state: stored.state.clone(),
            result: stored.result.as_deref().and_then(|text| serde_json::from_str(text).ok()),
            error: stored.last_error.clone().filter(|_| stored.state != "succeeded"),
        }
    }
}

/// `409`: the job ended otherwise, or the attempt is no longer running.
pub(super) fn conflict(stored: &Stored, detail: &str) -> Problem {
    let slug = if stored.ended() { "already-ended" } else { "superseded" };
    let outcome = serde_json::to_value(Outcome::of(stored)).unwrap_or_default();
    Problem::new(StatusCode::CONFLICT, slug, "Conflict", detail).with("outcome", outcome)
}

/// A transaction holding the row of execution `job_id`, and the execution;
/// `404` when there is none.
async fn locked(worker: &Worker, job_id: Uuid) -> Result<(Transaction<'static, Postgres>, Stored), Problem> {
    let mut tx = worker.pool.begin().await.map_err(|e| unavailable(&e))?;
    let stored = leases::load(&mut tx, job_id).await.map_err(|e| unavailable(&e))?.ok_or_else(not_found)?;
    Ok((tx, stored))
}

pub(super) fn not_found() -> Problem {
    Problem::new(StatusCode::NOT_FOUND, "not-an-execution", "Not found", "no execution has that id")
}

/// A heartbeat.
#[derive(Debug, Default, serde::Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Heartbeat {
    /// 0-100; a new value becomes a `job.processing` event.
    pub progress_percent: Option<i32>,
    /// Anything the worker wants shown with the job (at most 4 KiB of JSON).
    #[schema(value_type = Option<Object>)]
    pub details: Option<Value>,
}

/// The answer to a heartbeat.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct Lease {
    pub job_id: Uuid,
    /// The attempt is given up if no heartbeat or end comes by then.
    pub lease_expires_at: DateTime<Utc>,
    /// Its tenant cancelled the job: stop, and confirm with `fail` (or
    /// `release`); it ends `cancelled` either way.
    pub cancel_requested: bool,
}

/// Extend the attempt's lease, and report progress.
#[utoipa::path(post, path = "/v1/executions/{job_id}/heartbeat", tag = "callbacks", security(("callback_token" = [])),
    params(("job_id" = Uuid, Path, description = "The job id")),
    request_body(content = Option<Heartbeat>, content_type = "application/json"),
    responses(
        (status = 200, description = "The lease's new end", body = Lease),
        (status = 400, description = "A percent outside 0-100, details too large", body = onceflow_runtime::openapi::ProblemDocument, content_type = "application/problem+json"),
        (status = 401, description = "No, a bad, an expired or another job's token", body = onceflow_runtime::openapi::ProblemDocument, content_type = "application/problem+json"),
        (status = 409, description = "The attempt is no longer running; `outcome` says where the job stands", body = onceflow_runtime::openapi::ProblemDocument, content_type = "application/problem+json"),
    ))]
pub async fn heartbeat(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path(job_id): Path<Uuid>,
    body: Option<Json<Heartbeat>>,
) -> Result<Json<Lease>, Problem> {
    let attempt = state.callbacks.attempt(&headers, job_id)?;
    let Json(beat) = body.unwrap_or_default();
    if beat.progress_percent.is_some_and(|p| !(0..=100).contains(&p)) {
        return Err(bad_request("progress_percent is 0-100"));
    }
    if beat.details.as_ref().is_some_and(|d| d.to_string().len() > MAX_DETAILS_BYTES || holds_nul(d)) {
        return Err(bad_request("details are at most 4096 bytes of JSON, without NUL"));
    }
    let worker = &state.worker;
    let (mut tx, stored) = locked(worker, job_id).await?;
    if !stored.runs(attempt) {
        return Err(conflict(&stored, "this attempt is no longer running"));
    }
    let timeout = worker
        .registry
        .declared(&stored.execution.command_type)
        .map_or(Duration::from_secs(30), |t| t.heartbeat_timeout);
    let Some(lease) =
        leases::heartbeat(&mut tx, job_id, attempt, timeout, beat.progress_percent, beat.details.as_ref())
            .await
            .map_err(|e| unavailable(&e))?
    else {
        return Err(conflict(&stored, "this attempt is no longer running"));
    };
    if let Some(percent) = beat.progress_percent.filter(|p| lease.previous_progress != Some(*p)) {
        worker.record_progress(&mut tx, &stored.execution, percent).await.map_err(|e| unavailable(&e))?;
    }
    tx.commit().await.map_err(|e| unavailable(&e))?;
    Ok(Json(Lease { job_id, lease_expires_at: lease.lease_expires_at, cancel_requested: lease.cancel_requested }))
}

fn bad_request(detail: &str) -> Problem {
    Problem::new(StatusCode::BAD_REQUEST, "invalid-callback", "Invalid callback", detail)
}

/// A completion.
#[derive(Debug, serde::Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Completion {
    /// The job's result (any JSON; `null` when absent).
    #[serde(default)]
    #[schema(value_type = Object)]
    pub result: Value,
}

/// The job succeeded with `result`.
#[utoipa::path(post, path = "/v1/executions/{job_id}/complete", tag = "callbacks", security(("callback_token" = [])),
    params(("job_id" = Uuid, Path, description = "The job id")),
    request_body(content = Completion, content_type = "application/json"),
    responses(
        (status = 200, description = "Recorded (or the same result was already)", body = Outcome),
        (status = 400, description = "A result holding a NUL character (`\\u0000`), which no consumer can store", body = onceflow_runtime::openapi::ProblemDocument, content_type = "application/problem+json"),
        (status = 401, description = "No, a bad, an expired or another job's token", body = onceflow_runtime::openapi::ProblemDocument, content_type = "application/problem+json"),
        (status = 409, description = "The job ended otherwise; `outcome` is the stored one", body = onceflow_runtime::openapi::ProblemDocument, content_type = "application/problem+json"),
    ))]
pub async fn complete(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path(job_id): Path<Uuid>,
    Json(completion): Json<Completion>,
) -> Result<Json<Outcome>, Problem> {
    // Any attempt's success counts: the work is done, whoever did it.
    state.callbacks.attempt(&headers, job_id)?;
    if holds_nul(&completion.result) {
        return Err(bad_request("the result holds a NUL character (\\u0000), which no consumer of results can store"));
    }
    let worker = &state.worker;
    let (mut tx, stored) = locked(worker, job_id).await?;
    if stored.ended() {
        let outcome = Outcome::of(&stored);
        return if stored.state == "succeeded" && outcome.result.as_ref().unwrap_or(&Value::Null) == &completion.result {
            Ok(Json(outcome))
        } else {
            Err(conflict(&stored, "the job already ended with another outcome"))
        };
    }
    let result = completion.result.to_string();
    let end = worker.end_of(stored.execution.clone(), JobStatus::Succeeded, Some(result), None, None);
    let outcome = Outcome::of_end(job_id, &end);
    worker.record_ends(&mut tx, std::slice::from_ref(&end)).await.map_err(|e| unavailable(&e))?;
    tx.commit().await.map_err(|e| unavailable(&e))?;
    tracing::info!(%job_id, state = %outcome.state, "completed through a callback");
    Ok(Json(outcome))
}

/// A failure.
#[derive(Debug, serde::Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Failure {
    /// 1-64 characters of `[A-Za-z0-9._-]`: the job error's code.
    pub code: String,
    #[serde(default)]
    pub message: String,
    /// `true`: the attempt is spent and the next follows the type's retry
    /// policy; `false` (the default): the job fails now.
    #[serde(default)]
    pub retryable: bool,
}

/// The attempt failed.
#[utoipa::path(post, path = "/v1/executions/{job_id}/fail", tag = "callbacks", security(("callback_token" = [])),
    params(("job_id" = Uuid, Path, description = "The job id")),
    request_body(content = Failure, content_type = "application/json"),
    responses(
        (status = 200, description = "Recorded: the job failed, was dead-lettered, or is queued for its next attempt", body = Outcome),
        (status = 400, description = "A code that does not fit", body = onceflow_runtime::openapi::ProblemDocument, content_type = "application/problem+json"),
        (status = 401, description = "No, a bad, an expired or another job's token", body = onceflow_runtime::openapi::ProblemDocument, content_type = "application/problem+json"),
        (status = 409, description = "The attempt is no longer running; `outcome` says where the job stands", body = onceflow_runtime::openapi::ProblemDocument, content_type = "application/problem+json"),
    ))]
pub async fn fail(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path(job_id): Path<Uuid>,
    Json(failure): Json<Failure>,
) -> Result<Json<Outcome>, Problem> {
    let attempt = state.callbacks.attempt(&headers, job_id)?;
    if !fits_code(&failure.code) {
        return Err(bad_request("code is 1-64 characters of [A-Za-z0-9._-]"));
    }
    let message = bounded_message(&failure.message);
    let worker = &state.worker;
    let (mut tx, stored) = locked(worker, job_id).await?;
    if stored.ended() {
        let code = stored.last_error.as_ref().and_then(|e| e.get("code")).and_then(Value::as_str);
        return if stored.state != "succeeded" && code == Some(failure.code.as_str()) {
            Ok(Json(Outcome::of(&stored)))
        } else {
            Err(conflict(&stored, "the job already ended with another outcome"))
        };
    }
    if !stored.runs(attempt) {
        return Err(conflict(&stored, "this attempt is no longer running"));
    }
    let execution = &stored.execution;
    let error = JobError { code: failure.code.clone(), message: message.clone() };
    let end = if stored.cancel_requested {
        worker.cancelled(execution.clone(), "cancelled by its tenant; its worker or handler confirmed")
    } else if failure.retryable {
        let retry = worker
            .registry
            .declared(&execution.command_type)
            .map(|t| t.retry.clone())
            .unwrap_or_else(onceflow_catalogue::default_retry);
        match worker.after_failure(execution, &retry, &format!("{}: {message}", failure.code), None) {
            AfterFailure::Retry(delay) => {
                let error = serde_json::json!({"code": error.code, "message": error.message});
                leases::requeue(&mut tx, execution, Counted::Attempt, Wait::Retry, delay, Some(&error))
                    .await
                    .map_err(|e| unavailable(&e))?;
                tx.commit().await.map_err(|e| unavailable(&e))?;
                return Ok(Json(Outcome { job_id, state: "queued".to_owned(), result: None, error: Some(error) }));
            }
            AfterFailure::DeadLetter(end) => *end,
        }
    } else {
        worker.end_of(execution.clone(), JobStatus::Failed, None, Some(error), None)
    };
    worker.record_ends(&mut tx, std::slice::from_ref(&end)).await.map_err(|e| unavailable(&e))?;
    tx.commit().await.map_err(|e| unavailable(&e))?;
    Ok(Json(Outcome::of_end(job_id, &end)))
}

/// Hand the task back: it is ready again at once, no attempt spent.
#[utoipa::path(post, path = "/v1/executions/{job_id}/release", tag = "callbacks", security(("callback_token" = [])),
    params(("job_id" = Uuid, Path, description = "The job id")),
    responses(
        (status = 200, description = "Handed back", body = Outcome),
        (status = 401, description = "No, a bad, an expired or another job's token", body = onceflow_runtime::openapi::ProblemDocument, content_type = "application/problem+json"),
        (status = 409, description = "The attempt is no longer running; `outcome` says where the job stands", body = onceflow_runtime::openapi::ProblemDocument, content_type = "application/problem+json"),
    ))]
pub async fn release(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path(job_id): Path<Uuid>,
) -> Result<Json<Outcome>, Problem> {
    let attempt = state.callbacks.attempt(&headers, job_id)?;
    let (mut tx, stored) = locked(&state.worker, job_id).await?;
    if !stored.runs(attempt) {
        return Err(conflict(&stored, "this attempt is no longer running"));
    }
    if stored.cancel_requested {
        let end = state.worker.cancelled(stored.execution, "cancelled by its tenant; its worker handed it back");
        state.worker.record_ends(&mut tx, std::slice::from_ref(&end)).await.map_err(|e| unavailable(&e))?;
        tx.commit().await.map_err(|e| unavailable(&e))?;
        return Ok(Json(Outcome::of_end(job_id, &end)));
    }
    leases::requeue(&mut tx, &stored.execution, Counted::Nothing, Wait::Released, Duration::ZERO, None)
        .await
        .map_err(|e| unavailable(&e))?;
    tx.commit().await.map_err(|e| unavailable(&e))?;
    Ok(Json(Outcome { job_id, state: "queued".to_owned(), result: None, error: None }))
}
