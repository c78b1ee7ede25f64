//! The OpenAPI 3.1 document of ingest's HTTP surface, generated from the
//! handlers' annotations and types, served at `/openapi.json`.

use std::sync::Arc;

use axum::{extract::State, http::header, response::IntoResponse};
use onceflow_catalogue::CommandTypes;
use onceflow_runtime::openapi::{BearerSchemes, ProblemDocument};
use serde_json::{Value, json};
use utoipa::OpenApi;

use crate::AppState;

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

/// The body of `POST /v1/commands`. Its schema here is a placeholder that
/// [`document_for`] replaces with one branch per configured command type
/// (`oneOf`, told apart by `type`), each with that type's payload schema.
#[derive(Debug, serde::Deserialize, utoipa::ToSchema)]
#[allow(dead_code)] // Names the request body's schema; the handler parses the body itself.
pub struct CommandRequest {
    #[serde(rename = "type")]
    command_type: String,
    payload: serde_json::Value,
    callback_url: Option<CallbackUrl>,
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
    paths(crate::commands::submit, crate::jobs::get, crate::cancel::cancel),
    components(schemas(ProblemDocument, CallbackUrl)),
    modifiers(&BearerSchemes),
    tags((name = "commands", description = "Asynchronous, idempotent commands and their jobs"))
)]
pub struct ApiDoc;

/// The document with `CommandRequest` as one closed branch per command type
/// of `types` (`additionalProperties: false`, as the handler refuses unknown
/// fields), each payload schema a component of its own (`payload.<type>`).
pub fn document_for(types: &CommandTypes) -> Value {
    let mut document = serde_json::to_value(ApiDoc::openapi()).unwrap_or_else(|_| json!({}));
    let mut branches = Vec::new();
    for command_type in types.iter() {
        let component = format!("payload.{}", command_type.name);
        let mut payload = command_type.schema.clone();
        anchored(&mut payload, &format!("#/components/schemas/{component}"));
        if let Some(schema) = payload.as_object_mut() {
            // The document's own dialect (OpenAPI 3.1's, JSON Schema 2020-12) applies.
            schema.remove("$schema");
            schema.remove("$id");
        }
        document["components"]["schemas"][&component] = payload;
        let mut branch = json!({
            "type": "object",
            "title": command_type.name,
            "required": ["type", "payload"],
            "additionalProperties": false,
            "properties": {
                "type": {"type": "string", "enum": [command_type.name]},
                "payload": {"$ref": format!("#/components/schemas/{component}")},
                // `null` is taken as no callback.
                "callback_url": {"oneOf": [{"type": "null"}, {"$ref": "#/components/schemas/CallbackUrl"}]},
            },
        });
        if let Some(description) = &command_type.description {
            branch["description"] = json!(description);
        }
        branches.push(branch);
    }
    document["components"]["schemas"]["CommandRequest"] = json!({
        "description": "One command: its `type` (a configured command type), the payload that type's schema \
            requires, and optionally `callback_url`: an absolute `http`/`https` URL of at most 2048 bytes without \
            control characters, where the signed result is POSTed.",
        "oneOf": branches,
    });
    document
}

/// A payload schema moved into the document at `base`: its own references
/// (`#/$defs/...`) made to point inside it there.
fn anchored(schema: &mut Value, base: &str) {
    match schema {
        Value::Object(map) => {
            for (key, value) in map.iter_mut() {
                match value {
                    Value::String(reference) if key == "$ref" && reference.starts_with('#') => {
                        *reference = format!("{base}{}", &reference[1..]);
                    }
                    other => anchored(other, base),
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(|item| anchored(item, base)),
        _ => {}
    }
}

/// `GET /openapi.json`: the document made at start.
pub async fn document(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], state.openapi.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each command type is one `oneOf` branch that requires its `type` and
    /// its payload, whose shape is closed, so generated examples are valid.
    #[test]
    fn each_command_type_is_a_closed_branch_of_the_request_body() {
        let types = CommandTypes::builtin();
        let document = document_for(&types);
        let schemas = &document["components"]["schemas"];
        let branches = schemas["CommandRequest"]["oneOf"].as_array().expect("oneOf");
        assert_eq!(branches.len(), types.iter().count());
        for branch in branches {
            let required: Vec<&str> =
                branch["required"].as_array().unwrap().iter().filter_map(|v| v.as_str()).collect();
            assert!(required.contains(&"type") && required.contains(&"payload"), "{branch}");
            assert!(!required.contains(&"callback_url"), "{branch}");
            assert_eq!(branch["additionalProperties"], false, "{branch}");
            let payload = branch["properties"]["payload"]["$ref"].as_str().expect("a payload schema");
            let payload = &schemas[payload.rsplit('/').next().unwrap()];
            assert_eq!(payload["additionalProperties"], false, "{payload}");
            assert!(payload.get("$schema").is_none(), "{payload}");
        }
    }

    #[test]
    fn a_payload_schema_s_own_references_point_inside_it() {
        let mut schema = json!({"$defs": {"id": {"type": "string"}}, "properties": {"a": {"$ref": "#/$defs/id"}},
            "items": [{"$ref": "https://example.com/x"}]});
        anchored(&mut schema, "#/components/schemas/payload.t");
        assert_eq!(schema["properties"]["a"]["$ref"], "#/components/schemas/payload.t/$defs/id");
        assert_eq!(schema["items"][0]["$ref"], "https://example.com/x", "other references are left alone");
    }
}
