//! The OpenAPI 3.1 document of ingest's HTTP surface, generated from the
//! handlers' annotations and types, served at `/openapi.json`.

use axum::{Json, response::IntoResponse};
use utoipa::{
    Modify, OpenApi,
    openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme},
};

/// An RFC 9457 problem, the body of every error (`application/problem+json`).
#[derive(Debug, utoipa::ToSchema)]
#[allow(dead_code)] // Describes the body `Problem` renders; never built here.
pub struct ProblemDocument {
    /// Stable URI of the kind of problem, e.g. `https://onceflow.dev/problems/idempotency-key-reused`.
    #[schema(rename = "type")]
    kind: String,
    title: String,
    status: u16,
    /// What went wrong with this request, for a person.
    detail: String,
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "onceflow ingest",
        description = "Submit commands idempotently and follow their jobs.\n\n\
            **Idempotency contract of `POST /v1/commands`** (keys are scoped per tenant and live 24 h by default):\n\n\
            | case | answer |\n|---|---|\n\
            | first request with a key | `202`, the command is durable before the answer |\n\
            | same key, same request (method, path, canonical JSON body) | the stored `202`, byte for byte, plus `Idempotent-Replayed: true`, before any validation, callback check or load shedding |\n\
            | same key, different request | `422` `idempotency-key-reused`; nothing is created |\n\
            | same key while the first request is still being handled | a short wait, then the replay; or `409` `request-in-flight` + `Retry-After` |\n\
            | different keys, identical bodies | independent commands |\n\
            | a request that fails validation | an error; nothing is stored, so the key stays usable |\n\
            | the key expired | treated as a first request |\n\n\
            Order of the checks: API key (`401`), `Idempotency-Key` (`400`), `Content-Type` (`415`), body size (`413`, \
            read only after the API key was accepted), JSON syntax (`400`), then the replay; only a first request is \
            validated (`X-Correlation-Id` `400`, command and `callback_url` `422`) and shed (`503`)."
    ),
    paths(crate::commands::submit, crate::jobs::get),
    components(schemas(ProblemDocument)),
    modifiers(&BearerAuth),
    tags((name = "commands", description = "Asynchronous, idempotent commands and their jobs"))
)]
pub struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "api_key",
            SecurityScheme::Http(
                HttpBuilder::new().scheme(HttpAuthScheme::Bearer).description(Some("A tenant's API key")).build(),
            ),
        );
    }
}

/// `GET /openapi.json`.
pub async fn document() -> impl IntoResponse {
    Json(ApiDoc::openapi())
}
