//! `POST /v1/executions/{job_id}/cancel`: its tenant (API key) stops a job.
//! Ingest's `POST /v1/jobs/{id}/cancel` asks here.
//!
//! - a queued job (waiting behind its key, for a worker, a handler or a
//!   retry) ends `cancelled` at once, in the transaction that answers, and
//!   its key moves on (`200`);
//! - a running one is told, and the answer is `202`: a push handler gets a
//!   signed cancel request at once (its `2xx` ends the job `cancelled`); a
//!   pull worker learns it from its next heartbeat's answer or poll (a
//!   waiting poll is woken), and confirms with `fail` or `release`, which
//!   then end the job `cancelled`. Without a confirmation it ends
//!   `cancelled` `executions.cancel_grace_ms` after the request, or when its
//!   lease ends ([`super::timeouts`]). A completion that comes first still
//!   wins: the work was done;
//! - an ended job (an execution that ended, or a command applied at once
//!   in the transaction that recorded it): `409` with its outcome;
//! - a job the processor has not recorded yet: `404` (ingest tries again
//!   for a moment: the command is on its way).

use axum::{
    Json,
    extract::{Path, State},
    http::{HeaderMap, StatusCode},
};
use onceflow_runtime::problem::Problem;
use uuid::Uuid;

use super::{
    api::ApiState,
    callbacks::{conflict, not_found, unavailable},
    leases::{self, Stored},
    push::CancelRequest,
    store,
};
use crate::handlers::ServedBy;

/// How long a cancel request to a push handler may take.
const CANCEL_REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// What a cancel did.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct Cancellation {
    pub job_id: Uuid,
    /// `cancelled` (it was queued), or `running` (its handler or worker was
    /// told; it ends `cancelled` when it confirms, or after the grace).
    pub state: String,
    pub cancel_requested: bool,
}

/// Cancel a job of the caller's tenant.
#[utoipa::path(post, path = "/v1/executions/{job_id}/cancel", tag = "executions", security(("api_key" = [])),
    params(("job_id" = Uuid, Path, description = "The job id")),
    responses(
        (status = 200, description = "It was queued: it ended `cancelled`", body = Cancellation),
        (status = 202, description = "It runs: its handler or worker was told", body = Cancellation),
        (status = 401, description = "No or unknown API key", body = onceflow_runtime::openapi::ProblemDocument, content_type = "application/problem+json"),
        (status = 404, description = "No execution of this tenant has that id (applied at once, not recorded yet, another tenant's)", body = onceflow_runtime::openapi::ProblemDocument, content_type = "application/problem+json"),
        (status = 409, description = "It ended; `outcome` says how", body = onceflow_runtime::openapi::ProblemDocument, content_type = "application/problem+json"),
    ))]
pub async fn cancel(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path(job_id): Path<Uuid>,
) -> Result<(StatusCode, Json<Cancellation>), Problem> {
    let tenant = state.keys.as_ref().and_then(|keys| keys.authenticate(&headers)).ok_or_else(Problem::unauthorized)?;
    let worker = &state.worker;
    let mut tx = worker.pool.begin().await.map_err(|e| unavailable(&e))?;
    let stored = leases::load(&mut tx, job_id).await.map_err(|e| unavailable(&e))?;
    let Some(stored) = stored.filter(|stored| stored.execution.key.tenant == tenant.0) else {
        // Applied at once (the ledger's fast path): it ended with its inbox
        // row. Not recorded at all yet: 404, which ingest tries again.
        let applied: Option<String> =
            sqlx::query_scalar("SELECT outcome FROM inbox WHERE message_id = $1 AND tenant = $2")
                .bind(job_id)
                .bind(&tenant.0)
                .fetch_optional(&mut *tx)
                .await
                .map_err(|e| unavailable(&e))?;
        return Err(match applied {
            Some(outcome) => Problem::new(StatusCode::CONFLICT, "already-ended", "Conflict", "the job already ended")
                .with("outcome", serde_json::json!({"job_id": job_id, "state": outcome})),
            None => not_found(),
        });
    };
    if stored.ended() {
        return Err(conflict(&stored, "the job already ended"));
    }
    if stored.state == "queued" {
        let end = worker.cancelled(stored.execution.clone(), "cancelled by its tenant before it ran to its end");
        worker.record_ends(&mut tx, std::slice::from_ref(&end)).await.map_err(|e| unavailable(&e))?;
        tx.commit().await.map_err(|e| unavailable(&e))?;
        tracing::info!(%job_id, "cancelled while queued");
        return Ok((
            StatusCode::OK,
            Json(Cancellation { job_id, state: "cancelled".to_owned(), cancel_requested: true }),
        ));
    }
    leases::request_cancel(&mut tx, job_id).await.map_err(|e| unavailable(&e))?;
    // Wakes the polls of its worker, wherever they wait.
    store::notify(&mut tx).await.map_err(|e| unavailable(&e))?;
    tx.commit().await.map_err(|e| unavailable(&e))?;
    tracing::info!(%job_id, holder = ?stored.holder, "cancellation asked of a running job");
    if stored.holder.as_deref() != Some("worker")
        && let Some(ServedBy::Push(url)) = worker.registry.served_by(&stored.execution.command_type)
    {
        tokio::spawn(tell_handler(state.clone(), url.clone(), stored));
    }
    Ok((StatusCode::ACCEPTED, Json(Cancellation { job_id, state: "running".to_owned(), cancel_requested: true })))
}

/// Send the handler of `stored` its cancel request; a `2xx` ends the job
/// `cancelled` now (if it still runs: an answer may have ended it meanwhile).
async fn tell_handler(state: ApiState, url: url::Url, stored: Stored) {
    let Some(caller) = &state.caller else { return };
    let execution = &stored.execution;
    let (job_id, attempt_id) = (execution.job_id.to_string(), execution.attempt_id.unwrap_or_default().to_string());
    let request = CancelRequest {
        action: "cancel",
        job_id: &job_id,
        command_type: &execution.command_type,
        tenant: &execution.key.tenant,
        attempt_id: &attempt_id,
    };
    if !caller.cancel(&url, &request, CANCEL_REQUEST_TIMEOUT).await {
        return;
    }
    let worker = &state.worker;
    let ended = async {
        let mut tx = worker.pool.begin().await?;
        let Some(stored) = leases::load(&mut tx, execution.job_id).await? else { return Ok(0) };
        if stored.ended() {
            return Ok(0);
        }
        let end = worker.cancelled(stored.execution, "cancelled by its tenant; its handler confirmed");
        let ended = worker.record_ends(&mut tx, std::slice::from_ref(&end)).await?;
        tx.commit().await?;
        Ok::<_, sqlx::Error>(ended)
    };
    match ended.await {
        Ok(_) => {}
        Err(error) => tracing::warn!(%error, %job_id, "cannot record the confirmed cancellation; the grace ends it"),
    }
}
