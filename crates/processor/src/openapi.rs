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
        description = "A job's execution for its tenant (served when `tenants` is set), and the operator's \
            endpoints for dead-lettered commands (served when `admin.token` is set)."
    ),
    paths(crate::executions::api::execution, crate::admin::list, crate::admin::redrive),
    components(schemas(ProblemDocument, crate::executions::store::ExecutionView)),
    modifiers(&BearerSchemes),
    tags(
        (name = "executions", description = "Where a job driven from the database stands, and why it waits"),
        (name = "admin", description = "Dead letters: list and redrive")
    )
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
    fn documents_both_admin_endpoints_and_executions() {
        let document = serde_json::to_value(ApiDoc::openapi()).unwrap();
        for path in ["/admin/dead-letters", "/admin/dead-letters/{message_id}/redrive", "/v1/executions/{job_id}"] {
            assert!(document["paths"][path].is_object(), "{path} is documented");
        }
        assert!(document["components"]["securitySchemes"]["admin_token"].is_object());
    }
}
