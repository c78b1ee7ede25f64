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
        description = "A job's execution for its tenant (served when `tenants` is set), the callbacks of long \
            work and the pull workers' poll, and the operator's endpoints for dead-lettered commands (served when \
            `admin.token` is set)."
    ),
    paths(
        crate::executions::api::execution,
        crate::executions::cancel::cancel,
        crate::executions::callbacks::heartbeat,
        crate::executions::callbacks::complete,
        crate::executions::callbacks::fail,
        crate::executions::callbacks::release,
        crate::executions::pull::poll,
        crate::admin::list,
        crate::admin::redrive
    ),
    components(schemas(
        ProblemDocument,
        crate::executions::store::ExecutionView,
        crate::executions::callbacks::Heartbeat,
        crate::executions::callbacks::Lease,
        crate::executions::callbacks::Completion,
        crate::executions::callbacks::Failure,
        crate::executions::callbacks::Outcome,
        crate::executions::callbacks::Links,
        crate::executions::cancel::Cancellation,
        crate::executions::pull::Poll,
        crate::executions::pull::Task,
        crate::executions::pull::Tasks
    )),
    modifiers(&BearerSchemes),
    tags(
        (name = "executions", description = "Where a job driven from the database stands, and why it waits"),
        (name = "callbacks", description = "How a handler that answered 202, or a pull worker, reports on an attempt"),
        (name = "workers", description = "Pull workers take commands with a lease"),
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
        for path in [
            "/admin/dead-letters",
            "/admin/dead-letters/{message_id}/redrive",
            "/v1/executions/{job_id}",
            "/v1/executions/{job_id}/heartbeat",
            "/v1/executions/{job_id}/complete",
            "/v1/executions/{job_id}/fail",
            "/v1/executions/{job_id}/release",
            "/v1/executions/{job_id}/cancel",
            "/v1/workers/poll",
        ] {
            assert!(document["paths"][path].is_object(), "{path} is documented");
        }
        assert!(document["components"]["securitySchemes"]["admin_token"].is_object());
    }
}
