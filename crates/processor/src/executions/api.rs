//! `GET /v1/executions/{job_id}`: where a job that is an execution stands
//! and why it waits, for the job's tenant (its API key, as ingest's). Ingest
//! asks here for the `waiting_for` and `attempts` of a job that has not
//! ended, passing its client's key along.
//!
//! Served only when the processor has `tenants` configured.

use axum::{
    Json, Router,
    extract::{Path, State},
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
    routing::get,
};
use onceflow_runtime::{auth::ApiKeys, openapi::ProblemDocument};
use sqlx::PgPool;
use uuid::Uuid;

use super::store::{self, ExecutionView};
use crate::admin::problem;

#[derive(Clone)]
struct ApiState {
    pool: PgPool,
    keys: ApiKeys,
}

/// The route, or `None` when no tenant is configured.
pub fn router(pool: PgPool, keys: Option<ApiKeys>) -> Option<Router> {
    let keys = keys?;
    Some(Router::new().route("/v1/executions/{job_id}", get(execution)).with_state(ApiState { pool, keys }))
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
    let Some(tenant) = state.keys.authenticate(&headers) else {
        return problem(StatusCode::UNAUTHORIZED, "unauthorized", "a tenant's API key is required");
    };
    let not_found = || problem(StatusCode::NOT_FOUND, "not-an-execution", "no execution of this tenant has that id");
    let Ok(job_id) = Uuid::parse_str(&job_id) else { return not_found() };
    match store::view(&state.pool, &tenant.0, job_id).await {
        Ok(Some(view)) => Json(view).into_response(),
        Ok(None) => not_found(),
        Err(error) => {
            tracing::warn!(%error, "cannot read an execution");
            problem(StatusCode::SERVICE_UNAVAILABLE, "unavailable", "the database is unavailable; try again")
        }
    }
}
