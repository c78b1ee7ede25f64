//! The operator's admin endpoints, on the processor's health port, for
//! dead-lettered commands:
//!
//! - `GET /admin/dead-letters?limit=N` lists them, newest first (default 100);
//! - `POST /admin/dead-letters/{message_id}/redrive` puts the original record
//!   (key, envelope headers, bytes) back on the commands topic through the
//!   outbox and marks the dead letter `redrive_pending`.
//!
//! Both need `Authorization: Bearer <admin.token>`; with no token configured
//! the endpoints are not served at all.
//!
//! A redriven command still takes effect at most once: the worker applies a
//! message whose inbox outcome is `dead_lettered` only while a redrive of it is
//! pending, and consumes the pending flag in the transaction of the effect.
//! A redrive is refused (`409`) while one is pending or once the message was
//! applied after a redrive; an id that is not a dead letter is `404`. Only
//! dead letters with an envelope (a message id) are kept and redrivable; a
//! record without headers is only on the dead-letter topic.
//!
//! A dead letter is listed as kept (see migration 0003): its key as text, or
//! as `key_base64` when it is not UTF-8; its headers as `{"name", "value"}` or
//! `{"name", "base64"}`; `on_topic` false with `topic_error` when the broker
//! refused it on the dead-letter topic. A record whose key or envelope cannot
//! go back on the commands topic as it was (not UTF-8 text without NUL) is
//! not redriven (`409 not-redrivable`).

use std::sync::Arc;

use axum::{
    Json, Router,
    extract::{Path, Query, State},
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use base64::{Engine as _, engine::general_purpose::STANDARD as BASE64};
use onceflow_contracts::{Envelope, topics::Topics};
use onceflow_outbox::OutboxMessage;
use onceflow_runtime::{admin, failure::Failure, openapi::ProblemDocument, problem::Problem};
use sqlx::{PgPool, Row as _};
use uuid::Uuid;

#[derive(Clone)]
struct AdminState {
    pool: PgPool,
    topics: Topics,
    token: Arc<str>,
}

/// The admin routes, or `None` when no admin token is configured.
pub fn router(pool: PgPool, topics: Topics, token: &str) -> Option<Router> {
    if token.is_empty() {
        return None;
    }
    let state = AdminState { pool, topics, token: Arc::from(token) };
    Some(
        Router::new()
            .route("/admin/dead-letters", get(list))
            .route("/admin/dead-letters/{message_id}/redrive", post(redrive))
            .with_state(state),
    )
}

/// A problem+json answer of the processor's port.
pub(crate) fn problem(status: StatusCode, slug: &'static str, detail: impl Into<String>) -> Response {
    Problem::new(status, slug, status.canonical_reason().unwrap_or("Error"), detail).into_response()
}

/// Whether the request carries the admin token.
fn authorized(state: &AdminState, headers: &HeaderMap) -> bool {
    admin::bearer_matches(headers, &state.token)
}

fn internal(error: impl std::fmt::Display) -> Response {
    tracing::error!(%error, "admin request failed");
    problem(StatusCode::SERVICE_UNAVAILABLE, "unavailable", "the database is unavailable; try again")
}

/// A header as the `dead_letters` table keeps it (see migration 0003).
#[derive(Debug, serde::Deserialize)]
struct StoredHeader {
    name: String,
    value: Option<String>,
    base64: Option<String>,
}

impl StoredHeader {
    fn into_pair(self) -> Result<(String, Option<Vec<u8>>), base64::DecodeError> {
        let value = match (self.value, self.base64) {
            (Some(text), _) => Some(text.into_bytes()),
            (None, Some(encoded)) => Some(BASE64.decode(encoded)?),
            (None, None) => None,
        };
        Ok((self.name, value))
    }
}

/// A dead letter whose record cannot go back on the commands topic as it was.
fn not_redrivable(message_id: Uuid, why: &str) -> Response {
    problem(StatusCode::CONFLICT, "not-redrivable", format!("{message_id} cannot be redriven: {why}"))
}

/// Dead-lettered commands, newest first.
#[utoipa::path(
    get,
    path = "/admin/dead-letters",
    tag = "admin",
    security(("admin_token" = [])),
    params(admin::ListQuery),
    responses(
        (status = 200, description = "`{\"dead_letters\": [...]}`: each with its message id, tenant, type, job, original position, key (or `key_base64`), headers, error, `on_topic`/`topic_error` and redrive state", body = Object),
        (status = 401, description = "No or wrong admin token", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 500, description = "Internal error", body = ProblemDocument, content_type = "application/problem+json"),
    )
)]
async fn list(State(state): State<AdminState>, headers: HeaderMap, Query(query): Query<admin::ListQuery>) -> Response {
    if !authorized(&state, &headers) {
        return admin::unauthorized();
    }
    let limit = query.limit();
    let rows = match sqlx::query(
        "SELECT d.*, i.outcome FROM dead_letters d JOIN inbox i USING (message_id)
         ORDER BY d.dead_lettered_at DESC, d.message_id DESC LIMIT $1",
    )
    .bind(limit)
    .fetch_all(&state.pool)
    .await
    {
        Ok(rows) => rows,
        Err(error) => return internal(error),
    };
    let items: Result<Vec<serde_json::Value>, sqlx::Error> = rows
        .iter()
        .map(|row| {
            let key: Option<Vec<u8>> = row.try_get("message_key")?;
            let topic_error: Option<String> = row.try_get("topic_error")?;
            Ok(serde_json::json!({
                "message_id": row.try_get::<Uuid, _>("message_id")?,
                "job_id": row.try_get::<String, _>("job_id")?,
                "tenant": row.try_get::<String, _>("tenant")?,
                "command_type": row.try_get::<String, _>("command_type")?,
                "original_topic": row.try_get::<String, _>("original_topic")?,
                "original_partition": row.try_get::<i32, _>("original_partition")?,
                "original_offset": row.try_get::<i64, _>("original_offset")?,
                "key": key.as_deref().and_then(|key| std::str::from_utf8(key).ok()),
                "key_base64": key.as_deref().filter(|key| std::str::from_utf8(key).is_err()).map(|key| BASE64.encode(key)),
                "headers": row.try_get::<serde_json::Value, _>("headers")?,
                "on_topic": topic_error.is_none(),
                "topic_error": topic_error,
                "payload_size": row.try_get::<Vec<u8>, _>("payload")?.len(),
                "error": {
                    "code": row.try_get::<String, _>("error_code")?,
                    "message": row.try_get::<String, _>("error_message")?,
                },
                "dead_lettered_at": row.try_get::<chrono::DateTime<chrono::Utc>, _>("dead_lettered_at")?,
                "redrive_count": row.try_get::<i32, _>("redrive_count")?,
                "redrive_pending": row.try_get::<bool, _>("redrive_pending")?,
                "last_redriven_at": row.try_get::<Option<chrono::DateTime<chrono::Utc>>, _>("last_redriven_at")?,
                "reapplied_at": row.try_get::<Option<chrono::DateTime<chrono::Utc>>, _>("reapplied_at")?,
                "inbox_outcome": row.try_get::<String, _>("outcome")?,
            }))
        })
        .collect();
    match items {
        Ok(items) => Json(serde_json::json!({"dead_letters": items})).into_response(),
        Err(error) => internal(error),
    }
}

/// Put a dead-lettered command back on the commands topic; it takes effect
/// at most once.
#[utoipa::path(
    post,
    path = "/admin/dead-letters/{message_id}/redrive",
    tag = "admin",
    security(("admin_token" = [])),
    params(("message_id" = String, Path, description = "The command's message id (its job id)")),
    responses(
        (status = 202, description = "Redrive pending: the record is back in the outbox", body = Object),
        (status = 401, description = "No or wrong admin token", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 404, description = "Not a dead letter", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 409, description = "A redrive is pending, it was applied after a redrive, or it cannot go back as it was", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 500, description = "Internal error", body = ProblemDocument, content_type = "application/problem+json"),
    )
)]
async fn redrive(State(state): State<AdminState>, headers: HeaderMap, Path(message_id): Path<String>) -> Response {
    if !authorized(&state, &headers) {
        return admin::unauthorized();
    }
    let Ok(message_id) = Uuid::parse_str(&message_id) else {
        return problem(StatusCode::NOT_FOUND, "not-a-dead-letter", format!("{message_id} is not a message id"));
    };
    match try_redrive(&state, message_id).await {
        Ok(response) => response,
        Err(error) => internal(error),
    }
}

async fn try_redrive(state: &AdminState, message_id: Uuid) -> anyhow::Result<Response> {
    let mut tx = state.pool.begin().await?;
    let Some(row) = sqlx::query(
        "SELECT d.message_key, d.headers, d.payload, d.redrive_pending, d.redrive_count, i.outcome
         FROM dead_letters d JOIN inbox i USING (message_id) WHERE d.message_id = $1 FOR UPDATE OF d",
    )
    .bind(message_id)
    .fetch_optional(&mut *tx)
    .await?
    else {
        return Ok(problem(StatusCode::NOT_FOUND, "not-a-dead-letter", format!("{message_id} was not dead-lettered")));
    };
    let outcome: String = row.try_get("outcome")?;
    if outcome != "dead_lettered" {
        return Ok(problem(
            StatusCode::CONFLICT,
            "already-redriven",
            format!(
                "{message_id} was already applied after a redrive (outcome {outcome}); it takes effect at most once"
            ),
        ));
    }
    if row.try_get::<bool, _>("redrive_pending")? {
        return Ok(problem(
            StatusCode::CONFLICT,
            "redrive-pending",
            format!("a redrive of {message_id} is already on its way"),
        ));
    }
    let headers: Vec<StoredHeader> = serde_json::from_value(row.try_get("headers")?)?;
    let headers: Vec<(String, Option<Vec<u8>>)> =
        headers.into_iter().map(StoredHeader::into_pair).collect::<Result<_, _>>()?;
    let Ok(envelope) = Envelope::from_headers(headers.iter().map(|(name, value)| (name.as_str(), value.as_deref())))
    else {
        return Ok(not_redrivable(message_id, "its envelope headers are not valid"));
    };
    // The outbox keeps a key as text: a key that is not UTF-8 text without
    // NUL cannot be put back as it was.
    let key: Option<Vec<u8>> = row.try_get("message_key")?;
    let key = match key.map(String::from_utf8) {
        None => None,
        Some(Ok(key)) if !key.contains('\0') => Some(key),
        Some(_) => return Ok(not_redrivable(message_id, "its key is not UTF-8 text without NUL")),
    };
    let message = OutboxMessage {
        topic: state.topics.commands.clone(),
        key,
        payload: row.try_get("payload")?,
        envelope,
        headers: Vec::new(),
    };
    let count: i32 = sqlx::query_scalar(
        "UPDATE dead_letters SET redrive_pending = true, redrive_count = redrive_count + 1, last_redriven_at = now()
         WHERE message_id = $1 RETURNING redrive_count",
    )
    .bind(message_id)
    .fetch_one(&mut *tx)
    .await?;
    match onceflow_outbox::enqueue(&mut tx, &message).await {
        Ok(()) => {}
        Err(onceflow_outbox::Error::Database(error)) if Failure::of_database(&error).is_data() => {
            tracing::warn!(%message_id, %error, "a dead letter cannot be redriven as it is");
            return Ok(not_redrivable(message_id, "its record cannot be put back on the commands topic as it is"));
        }
        Err(onceflow_outbox::Error::TooLarge { .. }) => {
            return Ok(not_redrivable(message_id, "its record is too large for the commands topic"));
        }
        Err(error) => return Err(error.into()),
    }
    tx.commit().await?;
    tracing::info!(%message_id, redrive_count = count, "dead letter redriven");
    metrics::counter!("onceflow_dead_letters_redriven_total").increment(1);
    let body = serde_json::json!({"message_id": message_id, "redrive_count": count, "status": "redriven"});
    Ok((StatusCode::ACCEPTED, Json(body)).into_response())
}
