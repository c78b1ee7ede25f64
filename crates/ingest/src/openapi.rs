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

/// The body of `POST /v1/commands`: one command type, told apart by `type`,
/// with the payload that type requires, and optionally `callback_url`: an
/// absolute `http`/`https` URL of at most 2048 bytes without control
/// characters, where the signed result is POSTed. Mirrors
/// `onceflow_contracts::catalogue`, which is what validates it.
#[derive(Debug, serde::Deserialize, utoipa::ToSchema)]
#[serde(tag = "type", deny_unknown_fields)]
#[allow(dead_code)] // Describes the request body; the handler parses it itself.
pub enum CommandRequest {
    /// Open an account in a currency.
    #[serde(rename = "ledger.open_account")]
    OpenAccount {
        payload: OpenAccountPayload,
        #[schema(max_length = 2048, example = "https://hooks.example.com/onceflow")]
        callback_url: Option<String>,
    },
    /// Credit an account.
    #[serde(rename = "ledger.deposit")]
    Deposit {
        payload: DepositPayload,
        #[schema(max_length = 2048, example = "https://hooks.example.com/onceflow")]
        callback_url: Option<String>,
    },
    /// Move money between two accounts of the same currency.
    #[serde(rename = "ledger.transfer")]
    Transfer {
        payload: TransferPayload,
        #[schema(max_length = 2048, example = "https://hooks.example.com/onceflow")]
        callback_url: Option<String>,
    },
    /// A statement of an account's entries (long-running, reports progress).
    #[serde(rename = "ledger.statement")]
    Statement {
        payload: StatementPayload,
        #[schema(max_length = 2048, example = "https://hooks.example.com/onceflow")]
        callback_url: Option<String>,
    },
}

/// `ledger.open_account`.
#[derive(Debug, serde::Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
pub struct OpenAccountPayload {
    #[schema(min_length = 1, max_length = 64, pattern = "^[A-Za-z0-9_-]{1,64}$", example = "alice")]
    account_id: String,
    /// ISO 4217 code.
    #[schema(pattern = "^[A-Z]{3}$", example = "EUR")]
    currency: String,
}

/// `ledger.deposit`.
#[derive(Debug, serde::Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
pub struct DepositPayload {
    #[schema(min_length = 1, max_length = 64, pattern = "^[A-Za-z0-9_-]{1,64}$", example = "alice")]
    account_id: String,
    /// Minor units (cents).
    #[schema(minimum = 1, example = 500)]
    amount: i64,
}

/// `ledger.transfer`.
#[derive(Debug, serde::Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
pub struct TransferPayload {
    #[schema(min_length = 1, max_length = 64, pattern = "^[A-Za-z0-9_-]{1,64}$", example = "alice")]
    from: String,
    /// Must differ from `from`.
    #[schema(min_length = 1, max_length = 64, pattern = "^[A-Za-z0-9_-]{1,64}$", example = "bob")]
    to: String,
    /// Minor units (cents).
    #[schema(minimum = 1, example = 250)]
    amount: i64,
}

/// `ledger.statement`.
#[derive(Debug, serde::Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
pub struct StatementPayload {
    #[schema(min_length = 1, max_length = 64, pattern = "^[A-Za-z0-9_-]{1,64}$", example = "alice")]
    account_id: String,
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Each command type is one `oneOf` branch that requires its `type` and
    /// its payload, whose shape is closed, so generated examples are valid.
    #[test]
    fn each_command_type_is_a_closed_branch_of_the_request_body() {
        let document = serde_json::to_value(ApiDoc::openapi()).unwrap();
        let schemas = &document["components"]["schemas"];
        let branches = schemas["CommandRequest"]["oneOf"].as_array().expect("oneOf");
        assert_eq!(branches.len(), onceflow_contracts::catalogue::COMMAND_TYPES.len());
        for branch in branches {
            let required: Vec<&str> =
                branch["required"].as_array().unwrap().iter().filter_map(|v| v.as_str()).collect();
            assert!(required.contains(&"type") && required.contains(&"payload"), "{branch}");
            assert!(!required.contains(&"callback_url"), "{branch}");
            let payload = branch["properties"]["payload"]["$ref"].as_str().expect("a payload schema");
            let payload = &schemas[payload.rsplit('/').next().unwrap()];
            assert_eq!(payload["additionalProperties"], false, "{payload}");
        }
    }
}
