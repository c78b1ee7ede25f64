//! Pieces every service's OpenAPI document shares: the problem+json body of
//! every error, the tenant's bearer scheme, and the operator's bearer scheme.
//! Each service serves its own document at `GET /openapi.json`.

use utoipa::{
    Modify,
    openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme},
};

/// An RFC 9457 problem, the body of every error (`application/problem+json`).
#[derive(Debug, utoipa::ToSchema)]
#[allow(dead_code)] // Describes the body `Problem` renders; never built.
pub struct ProblemDocument {
    /// Stable URI of the kind of problem, e.g. `https://onceflow.dev/problems/idempotency-key-reused`.
    #[schema(rename = "type")]
    kind: String,
    title: String,
    status: u16,
    /// What went wrong with this request, for a person.
    detail: String,
}

/// Adds the security schemes the paths name: `api_key` (a tenant's API key)
/// and `admin_token` (the service's `admin.token`), both HTTP bearer.
pub struct BearerSchemes;

impl Modify for BearerSchemes {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        for (name, description) in [
            ("api_key", "A tenant's API key"),
            ("admin_token", "The service's admin.token"),
            ("worker_key", "A pull worker's key (the processor's `[[workers]]`)"),
            ("callback_token", "The token given with an attempt, for its callbacks"),
        ] {
            components.add_security_scheme(
                name,
                SecurityScheme::Http(
                    HttpBuilder::new().scheme(HttpAuthScheme::Bearer).description(Some(description)).build(),
                ),
            );
        }
    }
}
