//! The webhook deliveries API, per tenant (`Authorization: Bearer <api key>`;
//! no `?access_token=` here, which exists only for browsers' `EventSource`):
//!
//! - `GET /v1/jobs/{job_id}/deliveries`: `{"job_id", "deliveries": [...]}`,
//!   each delivery with every attempt (status code, latency, error). A job
//!   without deliveries — or another tenant's job — gives an empty list, so
//!   nothing tells one tenant what another submitted.
//! - `GET /v1/deliveries/{delivery_id}`: one delivery; `404` if it is not the
//!   caller's.
//! - `POST /v1/deliveries/{delivery_id}/redrive`: a failed (or
//!   `endpoint_disabled`) delivery becomes pending again with a fresh retry
//!   schedule and the same `webhook-id`; `202` with the delivery, `404` if not
//!   the caller's, `409` if it is not failed (still pending, or delivered) or
//!   its endpoint is still disabled.
//! - `GET /v1/webhook-endpoints`: the caller's endpoints (callback URLs) that
//!   were ever disabled, with their state; `GET /v1/webhook-endpoints/{id}`:
//!   one of them.
//! - `POST /v1/webhook-endpoints/{id}/enable`: enable an endpoint disabled by
//!   a `410 Gone`; ingest accepts commands naming it again once the change
//!   has reached it (through Kafka, usually within a second).

use axum::{
    Json,
    extract::{Path, State},
    http::{HeaderMap, StatusCode},
    response::IntoResponse,
};
use onceflow_runtime::{auth::Tenant, openapi::ProblemDocument, problem::Problem};
use uuid::Uuid;

use super::{
    endpoints::{self, Enable, EndpointView},
    store::{self, DeliveryView, Redrive},
};
use crate::AppState;

/// The job's webhook deliveries with every attempt (an empty list for a job
/// without deliveries, or another tenant's).
#[utoipa::path(
    get,
    path = "/v1/jobs/{job_id}/deliveries",
    tag = "webhooks",
    security(("api_key" = [])),
    params(("job_id" = String, Path, description = "The job id (UUID)")),
    responses(
        (status = 200, description = "`{\"job_id\", \"deliveries\": [...]}`", body = JobDeliveries),
        (status = 400, description = "Malformed id", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 401, description = "No or unknown API key", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 503, description = "The database is unavailable; retry after Retry-After", body = ProblemDocument, content_type = "application/problem+json"),
    )
)]
pub async fn job_deliveries(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(job_id): Path<String>,
) -> Result<impl IntoResponse, Problem> {
    let tenant = authenticate(&state, &headers)?;
    let job_id = parse_id(&job_id, "job")?;
    let deliveries = store::for_job(&state.pool, &tenant.0, job_id).await.map_err(|e| unavailable(&e))?;
    Ok(Json(JobDeliveries { job_id, deliveries }))
}

/// One webhook delivery with every attempt.
#[utoipa::path(
    get,
    path = "/v1/deliveries/{delivery_id}",
    tag = "webhooks",
    security(("api_key" = [])),
    params(("delivery_id" = String, Path, description = "The delivery id, also its `webhook-id` header")),
    responses(
        (status = 200, description = "The delivery", body = DeliveryView),
        (status = 404, description = "Not the caller's delivery", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 400, description = "Malformed id", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 401, description = "No or unknown API key", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 503, description = "The database is unavailable; retry after Retry-After", body = ProblemDocument, content_type = "application/problem+json"),
    )
)]
pub async fn delivery(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(delivery_id): Path<String>,
) -> Result<impl IntoResponse, Problem> {
    let tenant = authenticate(&state, &headers)?;
    let id = parse_id(&delivery_id, "delivery")?;
    match store::get(&state.pool, &tenant.0, id).await.map_err(|e| unavailable(&e))? {
        Some(delivery) => Ok(Json(delivery)),
        None => Err(not_found(id)),
    }
}

/// Make a failed delivery pending again, due now, with a fresh retry
/// schedule and the same `webhook-id`.
#[utoipa::path(
    post,
    path = "/v1/deliveries/{delivery_id}/redrive",
    tag = "webhooks",
    security(("api_key" = [])),
    params(("delivery_id" = String, Path, description = "The delivery id")),
    responses(
        (status = 202, description = "Pending again", body = DeliveryView),
        (status = 404, description = "Not the caller's delivery", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 409, description = "Not failed (still pending, or delivered)", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 400, description = "Malformed id", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 401, description = "No or unknown API key", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 503, description = "The database is unavailable; retry after Retry-After", body = ProblemDocument, content_type = "application/problem+json"),
    )
)]
pub async fn redrive(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(delivery_id): Path<String>,
) -> Result<impl IntoResponse, Problem> {
    let tenant = authenticate(&state, &headers)?;
    let id = parse_id(&delivery_id, "delivery")?;
    match store::redrive(&state.pool, &tenant.0, id).await.map_err(|e| unavailable(&e))? {
        Redrive::Redriven(delivery) => {
            tracing::info!(webhook_id = %id, tenant = %tenant.0, "webhook delivery redriven");
            Ok((StatusCode::ACCEPTED, Json(*delivery)))
        }
        Redrive::NotFailed(status) => Err(Problem::new(
            StatusCode::CONFLICT,
            "delivery-not-failed",
            "Delivery not failed",
            format!("delivery {id} is {}; only a failed delivery can be redriven", json_name(status)),
        )),
        Redrive::EndpointDisabled(endpoint) => Err(Problem::new(
            StatusCode::CONFLICT,
            "endpoint-disabled",
            "Webhook endpoint disabled",
            format!(
                "the webhook endpoint of delivery {id} is disabled; enable it with \
                 POST /v1/webhook-endpoints/{endpoint}/enable, then redrive"
            ),
        )),
        Redrive::NotFound => Err(not_found(id)),
    }
}

/// The caller's webhook endpoints that were ever disabled (most recently
/// changed first, at most 1000).
#[utoipa::path(
    get,
    path = "/v1/webhook-endpoints",
    tag = "webhooks",
    security(("api_key" = [])),
    responses(
        (status = 200, description = "`{\"endpoints\": [...]}`", body = EndpointList),
        (status = 401, description = "No or unknown API key", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 503, description = "The database is unavailable; retry after Retry-After", body = ProblemDocument, content_type = "application/problem+json"),
    )
)]
pub async fn endpoints(State(state): State<AppState>, headers: HeaderMap) -> Result<impl IntoResponse, Problem> {
    let tenant = authenticate(&state, &headers)?;
    let endpoints = endpoints::list(&state.pool, &tenant.0).await.map_err(|e| unavailable(&e))?;
    Ok(Json(EndpointList { endpoints }))
}

/// One webhook endpoint.
#[utoipa::path(
    get,
    path = "/v1/webhook-endpoints/{endpoint_id}",
    tag = "webhooks",
    security(("api_key" = [])),
    params(("endpoint_id" = String, Path, description = "The endpoint id (UUID)")),
    responses(
        (status = 200, description = "The endpoint", body = EndpointView),
        (status = 404, description = "Not the caller's endpoint", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 400, description = "Malformed id", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 401, description = "No or unknown API key", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 503, description = "The database is unavailable; retry after Retry-After", body = ProblemDocument, content_type = "application/problem+json"),
    )
)]
pub async fn endpoint(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(endpoint_id): Path<String>,
) -> Result<impl IntoResponse, Problem> {
    let tenant = authenticate(&state, &headers)?;
    let id = parse_id(&endpoint_id, "webhook endpoint")?;
    match endpoints::get(&state.pool, &tenant.0, id).await.map_err(|e| unavailable(&e))? {
        Some(endpoint) => Ok(Json(endpoint)),
        None => Err(endpoint_not_found(id)),
    }
}

/// Enable a webhook endpoint disabled by a `410 Gone`: later deliveries to
/// it are attempted again, and ingest accepts commands naming it once the
/// change has reached it. Deliveries that ended as `endpoint_disabled` stay
/// so until redriven. Enabling an enabled endpoint changes nothing.
#[utoipa::path(
    post,
    path = "/v1/webhook-endpoints/{endpoint_id}/enable",
    tag = "webhooks",
    security(("api_key" = [])),
    params(("endpoint_id" = String, Path, description = "The endpoint id (UUID)")),
    responses(
        (status = 200, description = "Enabled (now or already)", body = EndpointView),
        (status = 404, description = "Not the caller's endpoint", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 400, description = "Malformed id", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 401, description = "No or unknown API key", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 503, description = "The database is unavailable; retry after Retry-After", body = ProblemDocument, content_type = "application/problem+json"),
    )
)]
pub async fn enable_endpoint(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(endpoint_id): Path<String>,
) -> Result<impl IntoResponse, Problem> {
    let tenant = authenticate(&state, &headers)?;
    let id = parse_id(&endpoint_id, "webhook endpoint")?;
    let topic = state.config.kafka.topics().webhook_endpoints;
    let enabled = endpoints::enable(&state.pool, &tenant.0, id, &topic).await.map_err(|error| {
        tracing::warn!(%error, "cannot enable the webhook endpoint");
        Problem::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "Service unavailable",
            "the database is unavailable",
        )
        .retry_after(1)
    })?;
    match enabled {
        Enable::Enabled(endpoint) | Enable::AlreadyEnabled(endpoint) => Ok(Json(endpoint)),
        Enable::NotFound => Err(endpoint_not_found(id)),
    }
}

/// A tenant's webhook endpoints.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct EndpointList {
    endpoints: Vec<EndpointView>,
}

/// A job's deliveries.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct JobDeliveries {
    job_id: Uuid,
    deliveries: Vec<DeliveryView>,
}

fn json_name(status: store::Status) -> String {
    serde_json::to_value(status).ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default()
}

fn authenticate(state: &AppState, headers: &HeaderMap) -> Result<Tenant, Problem> {
    state.api_keys.authenticate(headers).ok_or_else(Problem::unauthorized)
}

fn parse_id(raw: &str, what: &str) -> Result<Uuid, Problem> {
    Uuid::parse_str(raw).map_err(|_| {
        Problem::new(StatusCode::BAD_REQUEST, "invalid-id", "Invalid id", format!("`{raw}` is not a {what} id (UUID)"))
    })
}

fn not_found(id: Uuid) -> Problem {
    Problem::new(StatusCode::NOT_FOUND, "delivery-not-found", "Delivery not found", format!("no delivery {id}"))
}

fn endpoint_not_found(id: Uuid) -> Problem {
    Problem::new(
        StatusCode::NOT_FOUND,
        "endpoint-not-found",
        "Webhook endpoint not found",
        format!("no webhook endpoint {id}"),
    )
}

fn unavailable(error: &sqlx::Error) -> Problem {
    tracing::warn!(%error, "deliveries query failed");
    Problem::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", "Service unavailable", "the database is unavailable")
        .retry_after(1)
}
