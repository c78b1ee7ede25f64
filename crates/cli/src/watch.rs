//! `onceflow watch [--job ID | --correlation ID] [--from EVENT_ID]`: the
//! notifier's Server-Sent Events, followed across disconnects.
//!
//! Each event's `id` is remembered and sent back as `Last-Event-ID` when the
//! stream is opened again, so the notifier resumes right after it (also
//! after its own restart): nothing missed, nothing twice. A lost connection
//! is reported on stderr, and so is the reconnection. With `--job` the
//! notifier ends the stream after the job's terminal event, and so does the
//! CLI, with exit 0 if the job succeeded and 1 if not. A service that stays
//! unreachable for `--timeout` ends it with exit 4 and the id to resume from.

use std::time::Duration;

use eventsource_stream::Eventsource as _;
use onceflow_contracts::JobStatus;
use onceflow_runtime::failure::Backoff;
use reqwest::Method;
use serde_json::Value;
use tokio::time::Instant;
use tokio_stream::StreamExt as _;

use crate::{
    Context,
    api::{self, Answer},
    args::WatchArgs,
    error::CliError,
    output,
};

/// Without a byte for this long (the notifier sends a heartbeat every 15 s
/// by default), the connection counts as lost: a peer that vanished without
/// closing it would otherwise hold the CLI forever.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Waits before reconnecting: from the SSE default `retry`, growing while
/// the notifier stays away.
const FIRST_RECONNECT: Duration = Duration::from_millis(500);
const LONGEST_RECONNECT: Duration = Duration::from_secs(5);

/// Where the stream stands, across connections.
#[derive(Debug, Default)]
struct Position {
    /// The id of the last event received: the next `Last-Event-ID`.
    last_id: Option<String>,
    /// The job's status if the last event ended it.
    ended: Option<(JobStatus, Value)>,
}

/// Why a connection ended.
enum Ended {
    /// The notifier closed the stream.
    Closed,
    /// It went away or fell silent.
    Lost(String),
}

pub async fn run(ctx: &Context, args: WatchArgs) -> Result<(), CliError> {
    let notifier = &ctx.notifier;
    let (path, mut query) = match args.job {
        Some(job) => (format!("/v1/jobs/{job}/events"), Vec::new()),
        None => ("/v1/events".to_owned(), Vec::new()),
    };
    if let Some(correlation) = &args.correlation {
        query.push(("correlation_id", correlation.clone()));
    }
    let mut position = Position { last_id: args.from.map(|id| id.to_string()), ended: None };
    let mut connected_before = false;
    let mut failing_since: Option<Instant> = None;
    let mut backoff = Backoff::new(FIRST_RECONNECT, LONGEST_RECONNECT);
    loop {
        let request = notifier
            .request(&ctx.api.http, Method::GET, &path)
            .query(&query)
            .header(reqwest::header::ACCEPT, "text/event-stream");
        let request = match &position.last_id {
            Some(id) => request.header("last-event-id", id),
            None => request,
        };
        // The stream itself is not timed, only the wait for its head.
        let reason = match tokio::time::timeout(ctx.api.timeout, request.send()).await {
            Err(_) => format!("no answer within {}s", ctx.api.timeout.as_secs_f64()),
            Ok(Ok(response)) if response.status().is_success() => {
                if connected_before {
                    output::note(&format!(
                        "reconnected to the notifier; resuming after event {}",
                        resume_point(&position)
                    ));
                }
                connected_before = true;
                failing_since = None;
                backoff = Backoff::new(FIRST_RECONNECT, LONGEST_RECONNECT);
                match follow(ctx, response, &mut position).await? {
                    Ended::Closed if args.job.is_some() && position.ended.is_some() => {
                        return job_outcome(&position);
                    }
                    Ended::Closed => "the notifier closed the stream".to_owned(),
                    Ended::Lost(reason) => reason,
                }
            }
            Ok(Ok(response)) => {
                let status = response.status();
                let retry_after = api::retry_after(response.headers());
                let body = response.bytes().await.map(|b| b.to_vec()).unwrap_or_default();
                let answer = Answer { status, headers: reqwest::header::HeaderMap::new(), body };
                let error = api::refusal(notifier, &answer);
                if !matches!(error, CliError::Unavailable { .. }) && status.as_u16() != 429 {
                    return Err(error);
                }
                if let Some(wait) = retry_after {
                    backoff = Backoff::new(wait, LONGEST_RECONNECT.max(wait));
                }
                error.to_string()
            }
            Ok(Err(error)) => api::describe(&error),
        };
        let since = *failing_since.get_or_insert_with(|| {
            if connected_before {
                output::note(&format!(
                    "lost the stream ({reason}); reconnecting after event {}",
                    resume_point(&position)
                ));
            } else {
                output::note(&format!("cannot open the stream ({reason}); retrying"));
            }
            Instant::now()
        });
        let wait = backoff.next_delay();
        if since.elapsed() + wait > ctx.api.timeout {
            let resume = position.last_id.as_deref().map(|id| format!("; resume with --from {id}")).unwrap_or_default();
            return Err(CliError::Unavailable {
                service: notifier.name,
                reason: format!("{reason} (gave up after {}s; see --timeout){resume}", ctx.api.timeout.as_secs_f64()),
            });
        }
        tokio::time::sleep(wait).await;
    }
}

fn resume_point(position: &Position) -> &str {
    position.last_id.as_deref().unwrap_or("(none yet)")
}

/// Print the events of one connection until it ends.
async fn follow(ctx: &Context, response: reqwest::Response, position: &mut Position) -> Result<Ended, CliError> {
    let bytes = response.bytes_stream().timeout(IDLE_TIMEOUT).map(|chunk| match chunk {
        Ok(Ok(bytes)) => Ok(bytes),
        Ok(Err(error)) => Err(api::describe(&error)),
        Err(_) => Err(format!("nothing from the notifier for {}s", IDLE_TIMEOUT.as_secs())),
    });
    let mut events = std::pin::pin!(bytes.eventsource());
    while let Some(event) = events.next().await {
        let event = match event {
            Ok(event) => event,
            Err(error) => return Ok(Ended::Lost(error.to_string())),
        };
        match event.event.as_str() {
            "stream.lagged" => {
                // The notifier drops a subscriber that falls behind; the
                // resume picks up where it was.
                output::note("fell behind the notifier's stream; resuming");
            }
            "stream.gap" => {
                output::note(&format!("events are missing, no longer retained by the notifier: {}", event.data));
                if ctx.json {
                    output::json(&serde_json::json!({"event": event.event, "data": parse(&event.data)}))?;
                }
            }
            _ => {
                let data = parse(&event.data);
                if ctx.json {
                    let id = event.id.parse::<i64>().map_or_else(|_| Value::from(event.id.as_str()), Value::from);
                    output::json(&serde_json::json!({"id": id, "event": event.event, "data": data}))?;
                } else {
                    output::line(&human(&event.id, &event.event, &data))?;
                }
                let status = event.event.strip_prefix("job.").and_then(JobStatus::parse);
                position.ended = status.filter(|s| s.is_terminal()).map(|s| (s, data));
            }
        }
        // The parser keeps the last id across events without one, as
        // `EventSource` does.
        if !event.id.is_empty() {
            position.last_id = Some(event.id);
        }
    }
    Ok(Ended::Closed)
}

fn parse(data: &str) -> Value {
    serde_json::from_str(data).unwrap_or_else(|_| Value::from(data))
}

fn job_outcome(position: &Position) -> Result<(), CliError> {
    match &position.ended {
        Some((JobStatus::Succeeded, _)) | None => Ok(()),
        Some((status, data)) => Err(CliError::JobUnsuccessful {
            job_id: data["job_id"].as_str().unwrap_or_default().to_owned(),
            status: *status,
            error: output::error_text(&data["error"]),
        }),
    }
}

/// One event as a line: id, time, type, job, command and what it says.
fn human(id: &str, event: &str, data: &Value) -> String {
    let at = data["occurred_at"].as_i64().map(output::millis_rfc3339).unwrap_or_default();
    let mut line = format!(
        "{id:>6}  {at}  {event:<17} job {}  {}",
        data["job_id"].as_str().unwrap_or("-"),
        data["command_type"].as_str().unwrap_or("-")
    );
    if let Some(percent) = data["progress_percent"].as_i64() {
        line.push_str(&format!("  {percent}%"));
    }
    if !data["result"].is_null() {
        line.push_str(&format!("  result {}", data["result"]));
    }
    if let Some(error) = output::error_text(&data["error"]) {
        line.push_str(&format!("  error {error}"));
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_reads_as_one_line() {
        let data = serde_json::json!({
            "event_id": "e", "type": "job.failed", "job_id": "j1", "command_type": "ledger.transfer",
            "status": "failed", "progress_percent": null, "result": null,
            "error": {"code": "insufficient_funds", "message": "no"}, "occurred_at": 1_700_000_000_000_i64
        });
        assert_eq!(
            human("41", "job.failed", &data),
            "    41  2023-11-14T22:13:20.000Z  job.failed        job j1  ledger.transfer  error insufficient_funds: no"
        );
        let position = Position { last_id: Some("41".to_owned()), ended: Some((JobStatus::Failed, data)) };
        assert!(matches!(job_outcome(&position), Err(CliError::JobUnsuccessful { status: JobStatus::Failed, .. })));
    }
}
