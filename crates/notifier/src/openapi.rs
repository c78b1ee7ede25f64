//! The OpenAPI 3.1 document of the notifier's HTTP surface, served at
//! `/openapi.json`: the SSE streams, the webhook deliveries API and the
//! operator's parked-records endpoints (the probes are the same on every
//! service: `/livez`, `/readyz`, `/metrics`).

use axum::{Json, response::IntoResponse};
use onceflow_runtime::{
    openapi::{BearerSchemes, ProblemDocument},
    parking::ParkingApi,
};
use utoipa::OpenApi;

use crate::{
    revocation, sse, tokens,
    webhooks::{
        api,
        endpoints::EndpointView,
        store::{AttemptView, BreakerView, DeliveryView, Status},
    },
};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "onceflow notifier",
        description = "How commands ended: a tenant's result events as Server-Sent Events (resumable with \
            `Last-Event-ID`, also across restarts), and the webhook deliveries of `callback_url`s. The `data:` of \
            every event and the body of every webhook are the result event as JSON (see asyncapi.yaml)."
    ),
    paths(
        sse::tenant_events,
        sse::job_events,
        tokens::issue,
        revocation::revoke,
        api::job_deliveries,
        api::delivery,
        api::redrive,
        api::endpoints,
        api::endpoint,
        api::enable_endpoint
    ),
    components(schemas(
        ProblemDocument,
        tokens::TokenRequest,
        tokens::TokenResponse,
        revocation::Revoked,
        DeliveryView,
        AttemptView,
        BreakerView,
        Status,
        api::JobDeliveries,
        EndpointView,
        api::EndpointList
    )),
    modifiers(&BearerSchemes),
    tags(
        (name = "streams", description = "Server-Sent Events of result events"),
        (name = "webhooks", description = "Webhook deliveries and their attempts"),
        (name = "admin", description = "Parked result records (served when admin.token is set)"),
    )
)]
pub struct ApiDoc;

/// The whole document: the notifier's own paths and the parked-records ones.
pub fn document_value() -> utoipa::openapi::OpenApi {
    let mut document = ApiDoc::openapi();
    document.merge(ParkingApi::openapi());
    document
}

/// `GET /openapi.json`.
pub async fn document() -> impl IntoResponse {
    Json(document_value())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documents_every_route_of_the_notifier() {
        let document = serde_json::to_value(document_value()).unwrap();
        for path in [
            "/v1/events",
            "/v1/jobs/{job_id}/events",
            "/v1/stream-tokens",
            "/v1/stream-tokens/revoke",
            "/v1/jobs/{job_id}/deliveries",
            "/v1/deliveries/{delivery_id}",
            "/v1/deliveries/{delivery_id}/redrive",
            "/v1/webhook-endpoints",
            "/v1/webhook-endpoints/{endpoint_id}",
            "/v1/webhook-endpoints/{endpoint_id}/enable",
            "/admin/parked",
            "/admin/parked/{id}/redrive",
        ] {
            assert!(document["paths"][path].is_object(), "{path} is documented");
        }
        let stream = &document["paths"]["/v1/events"]["get"]["responses"]["200"]["content"];
        assert!(stream["text/event-stream"].is_object(), "{stream}");
    }
}
