//! The executions' HTTP surface on the processor's port:
//!
//! - `GET /v1/executions/{job_id}`: where a job that is an execution stands
//!   and why it waits, for the job's tenant (its API key, as ingest's).
//!   Ingest asks here for the `waiting_for` and `attempts` of a job that has
//!   not ended, passing its client's key along. Served only when the
//!   processor has `tenants` configured.
//! - the callbacks of long work ([`super::callbacks`]) and the pull
//!   workers' poll ([`super::pull`]).

use std::sync::Arc;

use axum::{
    Json, Router,
    extract::{Path, State},
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use onceflow_runtime::{auth::ApiKeys, openapi::ProblemDocument};
use tokio::sync::Notify;
use uuid::Uuid;

use super::{
    callbacks::{self, Callbacks},
    cancel,
    pull::{self, Workers},
    push::Caller,
    store::{self, ExecutionView},
};
use crate::{admin::problem, worker::Worker};

/// What the executions' endpoints share.
#[derive(Clone)]
pub struct ApiState {
    pub worker: Worker,
    /// Tenants' keys; none: `GET /v1/executions/{id}` is not served.
    pub keys: Option<ApiKeys>,
    pub callbacks: Arc<Callbacks>,
    pub workers: Workers,
    /// Told when work may have become ready (polls wait on it).
    pub ready: Arc<Notify>,
    /// Push handlers' client (cancel requests), when one is declared.
    pub caller: Option<Arc<Caller>>,
}

/// The routes.
pub fn router(state: ApiState) -> Router {
    let mut router = Router::new()
        .route("/v1/executions/{job_id}/heartbeat", post(callbacks::heartbeat))
        .route("/v1/executions/{job_id}/complete", post(callbacks::complete))
        .route("/v1/executions/{job_id}/fail", post(callbacks::fail))
        .route("/v1/executions/{job_id}/release", post(callbacks::release))
        .route("/v1/workers/poll", post(pull::poll));
    if state.keys.is_some() {
        router = router
            .route("/v1/executions/{job_id}", get(execution))
            .route("/v1/executions/{job_id}/cancel", post(cancel::cancel));
    }
    router.with_state(state)
}

/// A job's execution: its state, attempts and what it waits for.
#[utoipa::path(
    get,
    path = "/v1/executions/{job_id}",
    tag = "executions",
    security(("api_key" = [])),
    params(("job_id" = String, Path, description = "The job id")),
    responses(
        (status = 200, description = "The job's execution", body = ExecutionView),
        (status = 401, description = "No or unknown API key", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 404, description = "The job is no execution of this tenant (applied inline, another tenant's, unknown)", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 503, description = "The database is unavailable", body = ProblemDocument, content_type = "application/problem+json"),
    )
)]
async fn execution(State(state): State<ApiState>, headers: HeaderMap, Path(job_id): Path<String>) -> Response {
    let Some(tenant) = state.keys.as_ref().and_then(|keys| keys.authenticate(&headers)) else {
        return problem(StatusCode::UNAUTHORIZED, "unauthorized", "a tenant's API key is required");
    };
    let not_found = || problem(StatusCode::NOT_FOUND, "not-an-execution", "no execution of this tenant has that id");
    let Ok(job_id) = Uuid::parse_str(&job_id) else { return not_found() };
    match store::view(&state.worker.pool, &tenant.0, job_id).await {
        Ok(Some(view)) => Json(view).into_response(),
        Ok(None) => not_found(),
        Err(error) => {
            tracing::warn!(%error, "cannot read an execution");
            problem(StatusCode::SERVICE_UNAVAILABLE, "unavailable", "the database is unavailable; try again")
        }
    }
}
