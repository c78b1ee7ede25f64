//! The OpenAPI 3.1 document of the processor's port, served at
//! `/openapi.json`: the operator's dead-letter endpoints (the probes are the
//! same on every service: `/livez`, `/readyz`, `/metrics`).

use axum::{Json, response::IntoResponse};
use onceflow_runtime::openapi::{BearerSchemes, ProblemDocument};
use utoipa::OpenApi;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "onceflow processor",
        description = "The operator's endpoints for dead-lettered commands, served when `admin.token` is set."
    ),
    paths(crate::admin::list, crate::admin::redrive),
    components(schemas(ProblemDocument)),
    modifiers(&BearerSchemes),
    tags((name = "admin", description = "Dead letters: list and redrive"))
)]
pub struct ApiDoc;

/// `GET /openapi.json`.
pub async fn document() -> impl IntoResponse {
    Json(ApiDoc::openapi())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documents_both_admin_endpoints() {
        let document = serde_json::to_value(ApiDoc::openapi()).unwrap();
        for path in ["/admin/dead-letters", "/admin/dead-letters/{message_id}/redrive"] {
            assert!(document["paths"][path].is_object(), "{path} is documented");
        }
        assert!(document["components"]["securitySchemes"]["admin_token"].is_object());
    }
}
