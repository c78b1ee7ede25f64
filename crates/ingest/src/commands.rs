//! `POST /v1/commands`: idempotent, durable acceptance.
//!
//! The idempotency record, the job and the outbox row commit in one
//! transaction before `202` is sent, so an accepted command is never lost even
//! if Kafka is down (the relay publishes it later). The record holds the exact
//! response bytes, which every later request with the same key and the same
//! fingerprint gets back.
//!
//! The order of the checks is the contract. First what needs no body: the API
//! key (`401`), the `Idempotency-Key` (`400`), the media type (`415`); then the
//! body, read only now and at most `max_body_bytes` of it (`413`), parsed as
//! JSON (`400`). Then a key with an unexpired record answers with that
//! record (or `422` for another body) whatever else would be judged now, so a
//! retry cannot be refused because the configuration, DNS or the load changed
//! since the first request. The request is judged (`X-Correlation-Id` `400`,
//! the command and its `callback_url` `422`, a `callback_url` whose webhook
//! endpoint the notifier disabled after a `410 Gone` `422
//! endpoint-disabled`, shedding `503`), but a refusal is given only when the
//! key has no record; an acceptable request claims its key, and a claim that
//! meets a record replays it. A fresh key, the ordinary case, is never looked
//! up.
//!
//! Concurrent requests with one key meet at the primary key of
//! `idempotency_keys`: the second `INSERT` waits for the first transaction and
//! then finds its row, so it replays; if the first takes longer than
//! `in_flight_wait_ms` the second gets `409` + `Retry-After` instead. Either
//! way there is never a second job.

mod record;
mod request;

use std::sync::Arc;

use axum::{
    body::Body,
    extract::{Request, State},
    http::{HeaderMap, StatusCode, request::Parts},
    response::{IntoResponse, Response},
};
use onceflow_catalogue::unordered_message_key;
use onceflow_contracts::{Command, Envelope, schema};
use onceflow_outbox::OutboxMessage;
use onceflow_runtime::{auth::Tenant, hygiene::HoldAnswer, openapi::ProblemDocument, telemetry};
use serde::Deserialize as _;
use uuid::Uuid;

pub use self::{
    record::IDEMPOTENT_REPLAYED,
    request::{CORRELATION_ID, IDEMPOTENCY_KEY},
};
use self::{
    record::{in_flight_or_internal, recorded},
    request::{correlation_id, fingerprint, idempotency_key, read_body, require_json},
};
use crate::{
    AppState,
    error::ApiError,
    group_commit::{Acceptance, Grouped, claim_on_conflict},
    openapi::CommandRequest,
};

/// The body of `POST /v1/commands` (documented per type as
/// [`crate::openapi::CommandRequest`]); the payload is checked by the catalogue.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubmitCommand {
    /// The command type: one of the configured ones (see `onceflow_catalogue`).
    #[serde(rename = "type")]
    command_type: String,
    /// The command's payload; its shape is fixed by `type`.
    payload: serde_json::Value,
    /// Where the signed result is POSTed when the job ends (absolute http(s) URL).
    #[serde(default)]
    callback_url: Option<String>,
}

/// The body of the `202` answer.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct Accepted {
    job_id: Uuid,
    /// Follows the command through every service, log line and event.
    correlation_id: String,
    #[schema(example = "accepted")]
    status: &'static str,
    /// Where to poll the job: `/v1/jobs/{job_id}`.
    status_url: String,
}

/// Submit a command.
///
/// Answers `202` once the command is committed (it is never lost after that,
/// even while Kafka is down). See the idempotency contract above.
#[utoipa::path(
    post,
    path = "/v1/commands",
    tag = "commands",
    security(("api_key" = [])),
    params(
        ("Idempotency-Key" = String, Header, min_length = 1, max_length = 255, pattern = "^[!-~]{1,255}$",
            description = "1-255 visible ASCII characters, unique per intended command"),
        ("X-Correlation-Id" = Option<String>, Header, min_length = 1, max_length = 128, pattern = "^[!-~]{1,128}$",
            description = "Optional correlation id to use instead of a generated one"),
    ),
    request_body(content = CommandRequest, content_type = "application/json"),
    responses(
        (status = 202, description = "Accepted (or replayed)", body = Accepted, headers(
            ("Location" = String, description = "/v1/jobs/{job_id}"),
            ("Idempotent-Replayed" = Option<String>, description = "`true` on a replayed response"),
            ("RateLimit-Policy" = Option<String>, description = "The tenant's limits (IETF draft-ietf-httpapi-ratelimit-headers), when any is set: `\"rate\";q=<burst>;w=<seconds>`, `\"in-flight\";q=<n>;qu=\"concurrent-requests\"`"),
            ("RateLimit" = Option<String>, description = "What is left of them: `\"rate\";r=<left>;t=<seconds until whole>`, `\"in-flight\";r=<free places>`"),
        )),
        (status = 400, description = "Missing or malformed Idempotency-Key or X-Correlation-Id, or malformed JSON", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 401, description = "No or unknown API key", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 408, description = "The request (its body included) was not completed within the request timeout", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 409, description = "A request with this key is still in flight; retry after Retry-After", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 413, description = "Body too large", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 415, description = "Content-Type is not application/json", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 422, description = "Invalid command (`invalid-command`), a `callback_url` whose webhook endpoint is disabled (`endpoint-disabled`), or the key was used with another request (`idempotency-key-reused`)", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 429, description = "Over one of the tenant's limits (`rate-limited`, `too-many-in-flight`), or sending at least an equal share of the work while the processor is behind (`over-share`); the Idempotency-Key stays free; retry after Retry-After", body = ProblemDocument, content_type = "application/problem+json", headers(
            ("Retry-After" = String, description = "Seconds to wait"),
            ("RateLimit-Policy" = Option<String>, description = "The tenant's limits"),
            ("RateLimit" = Option<String>, description = "What is left of them"),
        )),
        (status = 503, description = "Shedding load for every tenant (outbox backlog, database pool, the processor's backlog past `shed.everyone_after_ms`, or too many requests at once); retry after Retry-After", body = ProblemDocument, content_type = "application/problem+json"),
    )
)]
#[tracing::instrument(name = "submit_command", skip_all, fields(tenant, idempotency_key, correlation_id, job_id))]
pub async fn submit(State(state): State<Arc<AppState>>, request: Request) -> Result<Response, ApiError> {
    let (parts, body) = request.into_parts();
    let headers = &parts.headers;
    // Everything that needs no body comes first: an unauthenticated or
    // malformed request is answered without reading a byte of its body.
    let tenant = state.api_keys.authenticate(headers).ok_or(ApiError::Unauthorized)?;
    let key = idempotency_key(headers)?;
    require_json(headers)?;
    // The tenant's limits, before its body is read (a refusal is cheap, and
    // held before it is answered: see `crate::limits`).
    let admission = match state.limits.admit(&tenant.0) {
        Ok(admission) => admission,
        Err(refusal) => {
            let hold = state.limits.refusal_hold(&tenant.0, &refusal);
            let mut response = refusal.into_response();
            response.extensions_mut().insert(HoldAnswer(hold));
            return Ok(response);
        }
    };
    let mut response = match submit_admitted(&state, &tenant, key, &parts, body).await {
        Ok(response) => response,
        Err(error) => error.into_response(),
    };
    admission.describe(response.headers_mut());
    Ok(response)
}

/// The rest of [`submit`], once the tenant's limits let the request in.
async fn submit_admitted(
    state: &AppState,
    tenant: &Tenant,
    key: &str,
    parts: &Parts,
    body: Body,
) -> Result<Response, ApiError> {
    let headers = &parts.headers;
    let span = tracing::Span::current();
    span.record("tenant", tenant.0.as_str());
    span.record("idempotency_key", key);
    let body = read_body(state, parts, body).await?;

    let request: serde_json::Value =
        serde_json::from_slice(&body).map_err(|e| ApiError::MalformedJson(e.to_string()))?;
    let fingerprint = fingerprint(&request);

    // A request whose key is recorded gets the recorded answer (or 422 for
    // another body), whatever validation, the callback allowlist, DNS or load
    // would say now: judged again, a retry of an accepted command could get a
    // 422, and a client told 422 resubmits under a new key, a duplicate
    // effect. So a refusal is given only to a key with no record; and a
    // request judged acceptable is not looked up at all: its claim of the key
    // finds any record, and the one-request path then replays it. A fresh
    // key, the ordinary case, costs no lookup.
    let acceptance = match judge(state, tenant, key, headers, &request, fingerprint, &span).await {
        Ok(acceptance) => acceptance,
        Err(refusal) => {
            return match recorded(state, tenant, key).await? {
                Some(recorded) => recorded.answer(&fingerprint),
                None => Err(refusal),
            };
        }
    };
    let acceptance = match state.committer.commit(acceptance).await {
        Some(Grouped::Committed(acceptance)) => {
            tracing::info!("command accepted");
            state.processor_pressure.note_accepted();
            return Ok(acceptance.accepted_response());
        }
        Some(Grouped::Alone(acceptance)) => acceptance,
        // A retry: its record answers, read without a lock. Expired since
        // the group looked: the key is free again, claimed alone.
        Some(Grouped::Recorded(acceptance)) => match recorded(state, tenant, &acceptance.key).await? {
            Some(recorded) => return recorded.answer(&acceptance.fingerprint),
            None => acceptance,
        },
        None => {
            return Err(ApiError::Overloaded {
                reason: "ingest is shutting down; retry with the same key".to_owned(),
                retry_after_secs: 1,
            });
        }
    };
    commit_alone(state, tenant, acceptance).await
}

/// A request as a first request: validated, checked and maybe shed, and
/// everything of it ready to be made durable.
async fn judge(
    state: &AppState,
    tenant: &Tenant,
    key: &str,
    headers: &HeaderMap,
    request: &serde_json::Value,
    fingerprint: [u8; 32],
    span: &tracing::Span,
) -> Result<Acceptance, ApiError> {
    let correlation_id = correlation_id(headers)?;
    let submitted = SubmitCommand::deserialize(request).map_err(|e| ApiError::InvalidCommand(e.to_string()))?;
    let command = state
        .command_types
        .validate(&submitted.command_type, &submitted.payload)
        .map_err(|e| ApiError::InvalidCommand(e.to_string()))?;
    let callback_url = match &submitted.callback_url {
        Some(url) => Some(checked_callback_url(url, &state.config.webhooks.allowlist).await?),
        None => None,
    };
    if let Some(url) = &callback_url
        && let Some(endpoint_id) = crate::endpoints::disabled(&state.pool, &tenant.0, url).await?
    {
        return Err(ApiError::EndpointDisabled { url: url.clone(), endpoint_id });
    }
    shed_if_overloaded(state)?;

    let job_id = Uuid::now_v7();
    span.record("correlation_id", correlation_id.as_str());
    span.record("job_id", tracing::field::display(job_id));
    let location = format!("/v1/jobs/{job_id}");
    let accepted =
        Accepted { job_id, correlation_id: correlation_id.clone(), status: "accepted", status_url: location.clone() };
    let message = Command {
        job_id: job_id.to_string(),
        tenant: tenant.0.clone(),
        command_type: command.command_type.clone(),
        payload_json: command.payload_json,
        callback_url,
        accepted_at: chrono::Utc::now().timestamp_millis(),
    };
    let (traceparent, tracestate) = telemetry::current_trace_context();
    // One key, one partition: the tenant's commands with the same ordering
    // key stay in order on the topic (and their results on theirs).
    let message_key = match &command.ordering_key {
        Some(ordering) => ordering.message_key(&tenant.0),
        None => unordered_message_key(&tenant.0, &job_id.to_string()),
    };
    let outbox = OutboxMessage {
        headers: Vec::new(),
        topic: state.topics.commands.clone(),
        key: Some(message_key),
        payload: message.encode().map_err(anyhow::Error::from)?,
        envelope: Envelope {
            // The job id doubles as the command's message id: one command, one job.
            message_id: job_id,
            correlation_id: correlation_id.clone(),
            causation_id: None,
            tenant: tenant.0.clone(),
            message_type: command.command_type.clone(),
            schema_id: schema::COMMAND.id.clone(),
            traceparent,
            tracestate,
        },
    };
    Ok(Acceptance {
        tenant: tenant.0.clone(),
        key: key.to_owned(),
        fingerprint,
        job_id,
        correlation_id,
        command_type: command.command_type,
        response_status: StatusCode::ACCEPTED.as_u16() as i16,
        response_body: serde_json::to_vec(&accepted).map_err(anyhow::Error::from)?,
        response_location: location,
        ttl_secs: state.config.idempotency_ttl().as_secs_f64(),
        outbox,
    })
}

/// Make one acceptance durable in a transaction of its own: the path of a
/// request that could not share a group (see [`crate::group_commit`]). Waits
/// up to `in_flight_wait_ms` for a concurrent request with the same key, then
/// replays what it recorded (or answers `409`).
async fn commit_alone(state: &AppState, tenant: &Tenant, acceptance: Acceptance) -> Result<Response, ApiError> {
    // The lock timeout set with BEGIN: one round trip, not two.
    let mut tx = state
        .pool
        .begin_with(format!("BEGIN; SET LOCAL lock_timeout = '{}ms'", state.config.in_flight_wait_ms))
        .await?;
    // Claims the key, or takes over one whose record expired. Waits here while
    // another transaction holds the same key (a concurrent duplicate still in
    // flight).
    let claimed = sqlx::query(concat!(
        "INSERT INTO idempotency_keys
             (tenant, idempotency_key, fingerprint, job_id, response_status, response_body, response_location, expires_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, now() + make_interval(secs => $8)) ",
        claim_on_conflict!(),
        " RETURNING job_id",
    ))
    .bind(&acceptance.tenant)
    .bind(&acceptance.key)
    .bind(&acceptance.fingerprint[..])
    .bind(acceptance.job_id)
    .bind(acceptance.response_status)
    .bind(&acceptance.response_body)
    .bind(&acceptance.response_location)
    .bind(acceptance.ttl_secs)
    .fetch_optional(&mut *tx)
    .await
    .map_err(in_flight_or_internal)?;

    if claimed.is_none() {
        tx.rollback().await?;
        // Swept between the INSERT and this lookup: the client may simply retry.
        let recorded =
            recorded(state, tenant, &acceptance.key).await?.ok_or(ApiError::RequestInFlight { retry_after_secs: 1 })?;
        return recorded.answer(&acceptance.fingerprint);
    }

    sqlx::query(
        "INSERT INTO jobs (job_id, tenant, correlation_id, command_type, status) VALUES ($1, $2, $3, $4, 'accepted')",
    )
    .bind(acceptance.job_id)
    .bind(&acceptance.tenant)
    .bind(&acceptance.correlation_id)
    .bind(&acceptance.command_type)
    .execute(&mut *tx)
    .await?;
    onceflow_outbox::enqueue(&mut tx, &acceptance.outbox).await?;
    tx.commit().await?;
    tracing::info!("command accepted");
    state.processor_pressure.note_accepted();
    Ok(acceptance.accepted_response())
}

/// `callback_url` as it is stored and published: parsed and normalised, and
/// refused (`422`) when it is malformed or reaches where callbacks may not go,
/// so the client learns now rather than never getting a webhook.
///
/// A host that does not resolve right now is accepted: DNS may be down for a
/// moment, and the notifier checks the URL again before every delivery (a
/// lookup that keeps failing is retried on the delivery's schedule, an
/// address refused then fails the delivery), so a DNS hiccup at submission
/// must not refuse the command.
async fn checked_callback_url(url: &str, allowlist: &onceflow_webhook::Allowlist) -> Result<String, ApiError> {
    let invalid = |error: onceflow_webhook::SsrfError| ApiError::InvalidCommand(error.to_string());
    let parsed = onceflow_webhook::parse_callback_url(url).map_err(invalid)?;
    match onceflow_webhook::check_url(&parsed, allowlist).await {
        Ok(()) => Ok(parsed.to_string()),
        Err(error) if error.is_transient() => {
            tracing::info!(%error, "callback host does not resolve now; the notifier checks it again at delivery");
            Ok(parsed.to_string())
        }
        Err(error) => Err(invalid(error)),
    }
}

/// Refuse new work of every tenant while the outbox backlog is past its
/// bound (Kafka is down or slow, and accepting more would only grow the
/// queue), or while the processor's backlog would take longer than
/// `shed.everyone_after_ms` to drain (see [`crate::backpressure`]).
fn shed_if_overloaded(state: &AppState) -> Result<(), ApiError> {
    let shed = &state.config.shed;
    let backlog = state.outbox_backlog.load(std::sync::atomic::Ordering::Relaxed);
    if backlog > shed.max_outbox_backlog {
        metrics::counter!("onceflow_ingest_shed_total", "reason" => "outbox_backlog").increment(1);
        return Err(ApiError::Overloaded {
            reason: format!("{backlog} commands are waiting to be published; retry later"),
            retry_after_secs: shed.retry_after_secs,
        });
    }
    // Past the share rule (see `crate::limits`): every tenant waits.
    if let Some((lag, retry_after_secs)) = state.processor_pressure.everyone_retry_after(shed) {
        metrics::counter!("onceflow_ingest_shed_total", "reason" => "processor_lag").increment(1);
        return Err(ApiError::Overloaded {
            reason: format!("{lag} commands are waiting for the processor; retry later"),
            retry_after_secs,
        });
    }
    Ok(())
}
