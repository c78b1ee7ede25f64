//! The Server-Sent-Events API.
//!
//! - `GET /v1/events`: a tenant's result events, optionally only those of one
//!   `job_id` or `correlation_id`.
//! - `GET /v1/jobs/{job_id}/events`: one job's events; ends after its latest
//!   terminal event.
//!
//! A job can have more than one terminal event: a dead-lettered command that
//! an operator redrives gets a second outcome (e.g. `dead_lettered`, then
//! `succeeded`). So the per-job stream sends every stored event of the job,
//! in order, and ends when the last one it has sent is terminal once the
//! stored events are exhausted; live, it ends at the next terminal event. A
//! client connecting after a redrive sees both outcomes and the stream ends
//! after the redriven one; a client that saw the first outcome end its stream
//! and resumes with `Last-Event-ID` waits for the next one.
//!
//! Each event's `id:` is its `seq` in the events table. A client reconnecting
//! with `Last-Event-ID` (header, or `?last_event_id=`) first gets every stored
//! event after that id, then the live feed, with none missed and none twice:
//! the subscription to the hub is taken *before* the catch-up query, and live
//! events at or below the last id sent are skipped. A stream without
//! `Last-Event-ID` starts at the beginning when it names a job or correlation
//! id (so a job that already ended still shows its outcome), and at "now"
//! otherwise. A `Last-Event-ID` older than the retention mark gets a
//! `stream.gap` event first, naming what is no longer retained.
//!
//! Opening is checked by [`crate::access`]: the credential, the tenant's
//! stream limits (`429` beyond one), a token's revocation. A stream opened
//! with a stream token ends when the token expires or is revoked, with a
//! `stream.closed` event saying which and the id to resume after (with a new
//! token). Every read of a stream (its start, its catch-up) goes through the
//! streams' own pool (`sse.pool_connections`), never the pool the results
//! consumer stores events with, so no number of streams can starve it.

use std::{convert::Infallible, time::Duration};

use axum::{
    extract::{Path, Query, State},
    http::{HeaderMap, StatusCode},
    response::{
        IntoResponse,
        sse::{Event, KeepAlive, Sse},
    },
};
use futures::Stream;
use onceflow_runtime::{openapi::ProblemDocument, problem::Problem, telemetry};
use tokio::sync::broadcast::error::RecvError;
use uuid::Uuid;

use crate::{
    AppState,
    access::{self, Access, Opened},
    admission::Admitted,
    store::{self, Filter, StoredEvent},
};

const CATCH_UP_PAGE: i64 = 500;

#[derive(Debug, Default, serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct StreamQuery {
    /// Only this job's events (from the start when no `Last-Event-ID`).
    job_id: Option<String>,
    /// Only this correlation id's events (from the start when no `Last-Event-ID`).
    correlation_id: Option<String>,
    /// A stream token (`POST /v1/stream-tokens`), for browsers'
    /// `EventSource`, which cannot set headers.
    token: Option<String>,
    /// No longer accepted: the API key in a URL. Refused with a `401` that
    /// says to use a stream token.
    #[param(ignore)]
    access_token: Option<String>,
    /// Resume after this event id (as the `Last-Event-ID` header does).
    last_event_id: Option<String>,
}

/// The tenant's result events as Server-Sent Events, resumable with `Last-Event-ID`.
#[utoipa::path(
    get,
    path = "/v1/events",
    tag = "streams",
    security(("api_key" = []), ()),
    params(StreamQuery, ("Last-Event-ID" = Option<String>, Header, description = "Resume after this event id")),
    responses(
        (status = 200, description = "`text/event-stream`: `retry:` first, then one event per result (`id:` its sequence number, `event:` e.g. `job.succeeded`, `data:` the result event as JSON), `stream.gap` / `stream.lagged` when events were missed, heartbeat comments while idle", content_type = "text/event-stream", body = String),
        (status = 400, description = "Malformed job id or Last-Event-ID", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 401, description = "No or unknown API key, an invalid, expired or revoked stream token, or an API key in the URL", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 403, description = "A job-scoped stream token asking for another job", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 429, description = "A stream limit of the tenant or the token is reached (`limit` names it: max_streams, max_streams_per_token, max_replays); retry after `Retry-After`", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 503, description = "The database is unreachable; retry", body = ProblemDocument, content_type = "application/problem+json"),
    )
)]
pub async fn tenant_events(
    State(state): State<AppState>,
    headers: HeaderMap,
    Query(query): Query<StreamQuery>,
) -> Result<impl IntoResponse, Problem> {
    let access = authenticate(&state, &headers, &query)?;
    let job_id = query.job_id.as_deref().map(parse_job_id).transpose()?;
    // A job-scoped token sees its job only, named or not.
    let job_id = access.scope(job_id)?.or(access.job_id);
    let filter = Filter { tenant: access.tenant.clone(), job_id, correlation_id: query.correlation_id.clone() };
    let after = last_event_id(&headers, &query)?;
    let opened = access.open(&state, replays(&filter, after)).await?;
    Ok(sse(&state, event_stream(state.clone(), filter, after, false, opened)))
}

/// One job's events as Server-Sent Events; the stream ends after the job's
/// latest terminal event.
#[utoipa::path(
    get,
    path = "/v1/jobs/{job_id}/events",
    tag = "streams",
    security(("api_key" = []), ()),
    params(
        ("job_id" = String, Path, description = "The job id (UUID)"),
        StreamQuery,
        ("Last-Event-ID" = Option<String>, Header, description = "Resume after this event id"),
    ),
    responses(
        (status = 200, description = "`text/event-stream`: `retry:` first, then one event per result (`id:` its sequence number, `event:` e.g. `job.succeeded`, `data:` the result event as JSON), `stream.gap` / `stream.lagged` when events were missed, heartbeat comments while idle", content_type = "text/event-stream", body = String),
        (status = 400, description = "Malformed job id or Last-Event-ID", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 401, description = "No or unknown API key, an invalid, expired or revoked stream token, or an API key in the URL", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 403, description = "A job-scoped stream token of another job", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 429, description = "A stream limit of the tenant or the token is reached (`limit` names it: max_streams, max_streams_per_token, max_replays); retry after `Retry-After`", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 503, description = "The database is unreachable; retry", body = ProblemDocument, content_type = "application/problem+json"),
    )
)]
pub async fn job_events(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(job_id): Path<String>,
    Query(query): Query<StreamQuery>,
) -> Result<impl IntoResponse, Problem> {
    let access = authenticate(&state, &headers, &query)?;
    let job_id = access.scope(Some(parse_job_id(&job_id)?))?;
    let filter = Filter { tenant: access.tenant.clone(), job_id, correlation_id: None };
    let after = last_event_id(&headers, &query)?;
    let opened = access.open(&state, replays(&filter, after)).await?;
    Ok(sse(&state, event_stream(state.clone(), filter, after, true, opened)))
}

/// Whether a stream catches up from stored events before it goes live:
/// resuming, or replaying a job's or a correlation id's from the start.
fn replays(filter: &Filter, after: Option<i64>) -> bool {
    after.is_some() || filter.job_id.is_some() || filter.correlation_id.is_some()
}

fn sse<S>(state: &AppState, stream: S) -> impl IntoResponse + use<S>
where
    S: Stream<Item = Result<Event, Infallible>> + Send + 'static,
{
    Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(state.config.sse.heartbeat_secs)).text("heartbeat"))
}

fn event_stream(
    state: AppState,
    filter: Filter,
    after: Option<i64>,
    end_on_terminal: bool,
    opened: Opened,
) -> impl Stream<Item = Result<Event, Infallible>> {
    async_stream::stream! {
        // Counted while the stream lives: dropped with it when the client goes.
        let _open = OpenStream::new();
        let Opened { admitted: Admitted { streams: _slots, replay }, mut end } = opened;
        // Subscribe first: anything committed from here on reaches us live,
        // anything before is in the catch-up query.
        let mut live = state.hub.subscribe();
        yield Ok(Event::default().retry(Duration::from_millis(state.config.sse.reconnect_ms)));

        let mut last = match after {
            Some(after) => after,
            None if replay.is_some() => 0,
            None => match store::latest_seq(&state.stream_pool).await {
                Ok(seq) => seq,
                Err(error) => {
                    tracing::warn!(%error, "cannot start stream");
                    return;
                }
            },
        };

        // Resuming from an id whose successors may have been pruned: say so,
        // rather than silently skipping what is gone.
        if let Some(after) = after {
            match store::pruned_through(&state.stream_pool).await {
                Ok(pruned) if after < pruned => {
                    let data = serde_json::json!({
                        "reason": "events after the requested Last-Event-ID are no longer retained",
                        "requested_after": after,
                        "pruned_through": pruned,
                    });
                    yield Ok(Event::default().event("stream.gap").data(data.to_string()));
                }
                Ok(_) => {}
                Err(error) => {
                    tracing::warn!(%error, "cannot read the retention mark; the client will resume");
                    return;
                }
            }
        }

        let mut last_was_terminal = false;
        loop {
            if let Some(ending) = end.as_ref().and_then(access::TokenEnd::reached_now) {
                yield Ok(closed(ending, last));
                return;
            }
            let page = match store::events_after(&state.stream_pool, &filter, last, CATCH_UP_PAGE).await {
                Ok(page) => page,
                Err(error) => {
                    tracing::warn!(%error, "catch-up failed; the client will resume");
                    return;
                }
            };
            let full = page.len() == CATCH_UP_PAGE as usize;
            for event in page {
                last = event.seq;
                last_was_terminal = event.terminal;
                yield Ok(to_sse(&event));
            }
            if !full {
                break;
            }
        }
        // Caught up: another of the tenant's streams may catch up now.
        drop(replay);
        // Everything stored is sent: a job whose latest event is terminal has
        // ended, as far as anything is known.
        if end_on_terminal && last_was_terminal {
            return;
        }

        loop {
            let received = tokio::select! {
                () = state.shutdown.cancelled() => return,
                ending = access::ended(&mut end) => {
                    yield Ok(closed(ending, last));
                    return;
                }
                received = live.recv() => received,
            };
            match received {
                Ok(event) if event.seq > last && filter.matches(&event) => {
                    last = event.seq;
                    yield Ok(to_sse(&event));
                    if end_on_terminal && event.terminal {
                        return;
                    }
                }
                Ok(_) => {}
                Err(RecvError::Lagged(missed)) => {
                    tracing::info!(missed, "slow subscriber disconnected; it resumes with Last-Event-ID");
                    let data = serde_json::json!({"reason": "subscriber fell behind", "resume_after": last});
                    yield Ok(Event::default().event("stream.lagged").data(data.to_string()));
                    return;
                }
                Err(RecvError::Closed) => return,
            }
        }
    }
}

/// The last event of a stream whose token ended: why, and where to resume.
fn closed(ending: access::Ending, last: i64) -> Event {
    let data = serde_json::json!({
        "reason": ending.reason(),
        "resume_after": last,
        "detail": "resume with Last-Event-ID and a new stream token",
    });
    Event::default().event("stream.closed").data(data.to_string())
}

/// One open stream in the `onceflow_sse_connections` gauge, for as long as
/// it lives.
struct OpenStream;

impl OpenStream {
    fn new() -> Self {
        metrics::gauge!("onceflow_sse_connections").increment(1.0);
        Self
    }
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        metrics::gauge!("onceflow_sse_connections").decrement(1.0);
    }
}

/// `event` as an SSE frame. When traces are exported, its making is a short
/// span in the event's trace (a child of the step that stored it), so a
/// command's trace shows each stream it reached; otherwise no span is made:
/// one per event and subscriber was the largest cost of a fan-out that
/// nothing reads.
fn to_sse(event: &StoredEvent) -> Event {
    if !telemetry::exporting() {
        return event.frame.clone();
    }
    let span = tracing::info_span!(
        "sse_send",
        otel.name = "sse send",
        correlation_id = %event.correlation_id,
        job_id = %event.job_id,
        sse.event.id = event.seq,
        sse.event.type = %event.event_type,
    );
    telemetry::set_parent_from(&span, event.traceparent.as_deref(), event.tracestate.as_deref());
    let _in_span = span.enter();
    event.frame.clone()
}

/// The token in `?token=`, else the API key in the `Authorization` header.
fn authenticate(state: &AppState, headers: &HeaderMap, query: &StreamQuery) -> Result<Access, Problem> {
    Access::authenticate(state, headers, query.token.as_deref(), query.access_token.is_some())
}

fn parse_job_id(raw: &str) -> Result<Uuid, Problem> {
    Uuid::parse_str(raw).map_err(|_| {
        Problem::new(StatusCode::BAD_REQUEST, "invalid-job-id", "Invalid job id", format!("`{raw}` is not a UUID"))
    })
}

fn last_event_id(headers: &HeaderMap, query: &StreamQuery) -> Result<Option<i64>, Problem> {
    let raw = headers.get("last-event-id").and_then(|v| v.to_str().ok()).or(query.last_event_id.as_deref());
    raw.map(|raw| {
        raw.trim().parse::<i64>().ok().filter(|id| *id >= 0).ok_or_else(|| {
            Problem::new(
                StatusCode::BAD_REQUEST,
                "invalid-last-event-id",
                "Invalid Last-Event-ID",
                format!("`{raw}` is not an event id of this stream"),
            )
        })
    })
    .transpose()
}
