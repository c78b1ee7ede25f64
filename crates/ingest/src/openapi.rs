//! The OpenAPI 3.1 document of ingest's HTTP surface, generated from the
//! handlers' annotations and types, served at `/openapi.json`.

use axum::{Json, response::IntoResponse};
use onceflow_runtime::openapi::{BearerSchemes, ProblemDocument};
use utoipa::{Modify, OpenApi};

/// Where the signed result is POSTed when the job ends. The pattern gives the
/// URLs this document promises to accept anywhere: http(s) to a host name (not
/// an address literal, which the SSRF rules may refuse) with an optional port
/// and a path of visible ASCII, well below the limit of 2048 bytes. Ingest accepts more (address literals, query
/// strings) as far as `webhooks.allowlist` and the SSRF rules allow, and
/// refuses (`422`) a host name that resolves to an address they forbid.
#[derive(Debug, serde::Deserialize, utoipa::ToSchema)]
#[schema(
    value_type = String,
    pattern = "^https?://([a-z0-9-]{1,20}[.]){1,8}[a-z]{2,20}(:[1-9][0-9]{0,3})?(/[!-~]{0,1000})?$",
    example = "https://hooks.example.com/onceflow"
)]
#[allow(dead_code)] // Describes the field; the handler parses it itself.
pub struct CallbackUrl(String);

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
    OpenAccount { payload: OpenAccountPayload, callback_url: Option<CallbackUrl> },
    /// Credit an account.
    #[serde(rename = "ledger.deposit")]
    Deposit { payload: DepositPayload, callback_url: Option<CallbackUrl> },
    /// Move money between two accounts of the same currency.
    #[serde(rename = "ledger.transfer")]
    Transfer { payload: TransferPayload, callback_url: Option<CallbackUrl> },
    /// A statement of an account's entries (long-running, reports progress).
    #[serde(rename = "ledger.statement")]
    Statement { payload: StatementPayload, callback_url: Option<CallbackUrl> },
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
    /// Minor units (cents), at most `MAX_AMOUNT` (10^15).
    #[schema(minimum = 1, maximum = 1_000_000_000_000_000_i64, example = 500)]
    amount: i64,
}

/// `ledger.transfer`.
#[derive(Debug, serde::Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
pub struct TransferPayload {
    #[schema(min_length = 1, max_length = 64, pattern = "^[A-Za-z0-9_-]{1,64}$", example = "alice")]
    from: String,
    /// A transfer to `from` itself ends the job `failed` with `same_account`.
    #[schema(min_length = 1, max_length = 64, pattern = "^[A-Za-z0-9_-]{1,64}$", example = "bob")]
    to: String,
    /// Minor units (cents), at most `MAX_AMOUNT` (10^15).
    #[schema(minimum = 1, maximum = 1_000_000_000_000_000_i64, example = 250)]
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
    modifiers(&BearerSchemes, &ClosedCommandBranches),
    tags((name = "commands", description = "Asynchronous, idempotent commands and their jobs"))
)]
pub struct ApiDoc;

/// Closes every branch of `CommandRequest` (`additionalProperties: false`),
/// as the handler refuses unknown fields (`deny_unknown_fields`); utoipa
/// closes the payload structs but not an enum's variants.
struct ClosedCommandBranches;

impl Modify for ClosedCommandBranches {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::{
            RefOr,
            schema::{AdditionalProperties, Schema},
        };
        let Some(components) = openapi.components.as_mut() else { return };
        let Some(RefOr::T(Schema::OneOf(request))) = components.schemas.get_mut("CommandRequest") else { return };
        for branch in &mut request.items {
            if let RefOr::T(Schema::Object(branch)) = branch {
                branch.additional_properties = Some(Box::new(AdditionalProperties::FreeForm(false)));
            }
        }
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
            assert_eq!(branch["additionalProperties"], false, "{branch}");
            let payload = branch["properties"]["payload"]["$ref"].as_str().expect("a payload schema");
            let payload = &schemas[payload.rsplit('/').next().unwrap()];
            assert_eq!(payload["additionalProperties"], false, "{payload}");
        }
    }
}
