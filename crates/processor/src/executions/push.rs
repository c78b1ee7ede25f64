//! Push handlers: the signed HTTP request of one attempt, and what its
//! answer means.
//!
//! The request is a `POST` of the command as JSON to the handler's URL,
//! signed per Standard Webhooks (`webhook-id` is the job id, the same on every
//! attempt, as a webhook's retries keep theirs), with:
//!
//! - `Idempotency-Key`: the job id, the same for every attempt and redrive,
//!   for the handler to pass on (to a payment provider, its own database);
//! - `Onceflow-Attempt` (1, 2, ...), `Onceflow-Attempt-Id` (fresh per
//!   attempt) and `Onceflow-Deadline` (RFC 3339: no answer by then spends
//!   the attempt);
//! - `traceparent`, so the handler's spans join the command's trace.
//!
//! The body also carries the attempt's callbacks: a token scoped to it and
//! the URLs of `heartbeat`, `complete` and `fail` ([`super::callbacks`]).
//!
//! A job its tenant cancels while the handler works on it gets a cancel
//! request: the same URL, signed, `Onceflow-Action: cancel`, with a body of
//! `{"action": "cancel", "job_id", "type", "tenant", "attempt_id"}`; a `2xx`
//! says the handler stopped.
//!
//! The answer ([`Answer`]): `200` with a JSON body (or `204`) succeeds with
//! that result; `202` accepts it: the handler (or whoever it hands the
//! callbacks to) reports through the callbacks, heartbeats within the type's
//! `heartbeat_timeout_ms`, and completes or fails the job; a `4xx` (but `408` and `429`) refuses: `failed` with the
//! problem's `code` (or the last segment of its `type`), not retried; `429`,
//! `503` and no connection at all are an outage of the handler: wait, spend
//! nothing; any other answer, and no answer by the deadline, spends an
//! attempt. Redirects are not followed, and every address the client
//! connects to passes the SSRF rules ([`onceflow_webhook::SsrfResolver`]).

use std::{sync::Arc, time::Duration};

use futures::StreamExt as _;
use onceflow_webhook::{Secret, SsrfResolver, retry::parse_retry_after, signing};
use reqwest::StatusCode;
use serde_json::Value;

use crate::config::PushConfig;

/// The most bytes of an answer read: more than one result can carry
/// (`onceflow_outbox::MAX_MESSAGE_BYTES`); a larger one ends the job
/// `failed` (`result_too_large`).
const MAX_ANSWER_BYTES: usize = onceflow_outbox::MAX_MESSAGE_BYTES + 1;

/// What one attempt's answer means.
#[derive(Debug, Clone, PartialEq)]
pub enum Answer {
    /// `200` (or `204`): the job succeeded with this result.
    Succeeded(Value),
    /// `202`: the handler took the command on and reports through callbacks.
    Accepted,
    /// A `4xx` problem: the job fails with its code, not retried.
    Refused { code: String, message: String },
    /// The result does not fit in one record: the job fails.
    TooLarge { size: usize },
    /// The handler is down or shedding load: wait, spend no attempt.
    Unavailable { reason: String, retry_after: Option<Duration> },
    /// The handler failed this attempt (`5xx`, a timeout, an answer it
    /// should not give): spend it.
    Failed { reason: String, retry_after: Option<Duration> },
}

/// The request of one attempt.
#[derive(Debug, serde::Serialize)]
pub struct PushRequest<'a> {
    pub job_id: &'a str,
    #[serde(rename = "type")]
    pub command_type: &'a str,
    pub tenant: &'a str,
    pub correlation_id: &'a str,
    /// The payload, as accepted (its canonical JSON, parsed).
    pub payload: &'a Value,
    /// 1 for the first attempt.
    pub attempt: i32,
    pub attempt_id: &'a str,
    /// RFC 3339: an attempt not answered by then is spent.
    pub deadline: &'a str,
    pub callback_url: Option<&'a str>,
    /// Where and how this attempt reports when the handler answers `202`.
    pub callbacks: &'a super::callbacks::Links,
}

/// The HTTP client of every push handler.
pub struct Caller {
    client: reqwest::Client,
    secret: Secret,
}

impl Caller {
    /// A client that follows no redirect, connects only where the SSRF
    /// rules allow, and ignores proxy variables (a proxy would bypass them).
    pub fn new(config: &PushConfig) -> Result<Self, String> {
        let secret = config.signing_secret.clone().ok_or_else(|| {
            "a push handler is declared but executions.push.signing_secret is not set \
             (ONCEFLOW_EXECUTIONS__PUSH__SIGNING_SECRET=whsec_...)"
                .to_owned()
        })?;
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(Duration::from_millis(config.connect_timeout_ms))
            .dns_resolver(Arc::new(SsrfResolver::new(config.allowlist.clone())))
            .user_agent(concat!("onceflow-processor/", env!("CARGO_PKG_VERSION"), " (push handlers)"))
            .pool_idle_timeout(Duration::from_secs(30))
            .no_proxy()
            .build()
            .map_err(|e| format!("push handlers' HTTP client: {e}"))?;
        Ok(Self { client, secret })
    }

    /// POST `request` to `url`, signed, within `timeout`; the answer, and its
    /// status when there was one.
    pub async fn call(
        &self,
        url: &url::Url,
        request: &PushRequest<'_>,
        timeout: Duration,
        traceparent: Option<&str>,
    ) -> (Answer, Option<u16>) {
        let body = match serde_json::to_vec(request) {
            Ok(body) => body,
            Err(error) => return (Answer::Failed { reason: format!("request: {error}"), retry_after: None }, None),
        };
        let mut builder = self
            .signed(url, request.job_id, &body, timeout)
            .header("idempotency-key", request.job_id)
            .header("onceflow-attempt", request.attempt.to_string())
            .header("onceflow-attempt-id", request.attempt_id)
            .header("onceflow-deadline", request.deadline);
        if let Some(traceparent) = traceparent {
            builder = builder.header("traceparent", traceparent);
        }
        let response = match builder.body(body).send().await {
            Ok(response) => response,
            Err(error) => return (answer_of_error(&error), None),
        };
        let status = response.status();
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_retry_after);
        let body = match read_bounded(response).await {
            Ok(body) => body,
            Err(BodyError::TooLarge) => return (Answer::TooLarge { size: MAX_ANSWER_BYTES }, Some(status.as_u16())),
            Err(BodyError::Read(error)) => return (answer_of_error(&error), Some(status.as_u16())),
        };
        (answer_of(status, &body, retry_after), Some(status.as_u16()))
    }

    /// A signed `POST` of `body` to `url`, as Standard Webhooks has it, with
    /// `id` as its `webhook-id`.
    fn signed(&self, url: &url::Url, id: &str, body: &[u8], timeout: Duration) -> reqwest::RequestBuilder {
        let timestamp = chrono::Utc::now().timestamp();
        let signature = signing::sign(std::slice::from_ref(&self.secret), id, timestamp, body);
        self.client
            .post(url.clone())
            .timeout(timeout)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header("webhook-id", id)
            .header("webhook-timestamp", timestamp.to_string())
            .header("webhook-signature", signature)
    }

    /// Tell the handler at `url` that its tenant cancelled the job: a signed
    /// `POST` of `request` with `Onceflow-Action: cancel` (its `webhook-id`
    /// is `<job id>.cancel`). `true` when it answered `2xx`: it stopped, and
    /// the job ends `cancelled` now.
    pub async fn cancel(&self, url: &url::Url, request: &CancelRequest<'_>, timeout: Duration) -> bool {
        let Ok(body) = serde_json::to_vec(request) else { return false };
        let id = format!("{}.cancel", request.job_id);
        let sent = self.signed(url, &id, &body, timeout).header("onceflow-action", "cancel").body(body).send().await;
        match sent {
            Ok(response) => response.status().is_success(),
            Err(error) => {
                tracing::info!(error = %error_chain(&error), "the cancel request reached no handler; the grace decides");
                false
            }
        }
    }
}

/// The body of a cancel request.
#[derive(Debug, serde::Serialize)]
pub struct CancelRequest<'a> {
    /// Always `cancel`.
    pub action: &'static str,
    pub job_id: &'a str,
    #[serde(rename = "type")]
    pub command_type: &'a str,
    pub tenant: &'a str,
    /// The running attempt the handler should stop.
    pub attempt_id: &'a str,
}

enum BodyError {
    TooLarge,
    Read(reqwest::Error),
}

/// The body, or [`BodyError::TooLarge`] as soon as it passes
/// [`MAX_ANSWER_BYTES`].
async fn read_bounded(response: reqwest::Response) -> Result<Vec<u8>, BodyError> {
    let mut body = Vec::new();
    let mut chunks = response.bytes_stream();
    while let Some(chunk) = chunks.next().await {
        let chunk = chunk.map_err(BodyError::Read)?;
        if body.len() + chunk.len() > MAX_ANSWER_BYTES {
            return Err(BodyError::TooLarge);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// No answer: a timeout spends the attempt (the handler may be working on
/// it); anything else (refused, reset, DNS, TLS, an address the SSRF rules
/// forbid) is an outage.
fn answer_of_error(error: &reqwest::Error) -> Answer {
    let reason = error_chain(error);
    if error.is_timeout() {
        Answer::Failed { reason: format!("no answer within the attempt's deadline ({reason})"), retry_after: None }
    } else {
        Answer::Unavailable { reason: format!("no answer: {reason}"), retry_after: None }
    }
}

/// An error with its sources: reqwest's own message alone says little.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// What an answer with `status` and `body` means.
pub fn answer_of(status: StatusCode, body: &[u8], retry_after: Option<Duration>) -> Answer {
    match status.as_u16() {
        200 if body.iter().all(u8::is_ascii_whitespace) => Answer::Succeeded(Value::Null),
        200 => match serde_json::from_slice(body) {
            Ok(result) if holds_nul(&result) => Answer::Refused {
                code: "invalid_result".to_owned(),
                message: "the handler's result holds a NUL character (\\u0000), which no consumer of results can store"
                    .to_owned(),
            },
            Ok(result) => Answer::Succeeded(result),
            Err(error) => Answer::Failed {
                reason: format!("the handler answered 200 with a body that is not JSON: {error}"),
                retry_after: None,
            },
        },
        204 => Answer::Succeeded(Value::Null),
        202 => Answer::Accepted,
        429 | 503 => Answer::Unavailable { reason: format!("the handler answered {status}"), retry_after },
        408 => Answer::Failed { reason: format!("the handler answered {status}"), retry_after },
        400..=499 => refusal(status, body),
        _ => Answer::Failed { reason: format!("the handler answered {status}"), retry_after },
    }
}

/// A `4xx` as a job error: the problem's `code` member, or the last segment
/// of its `type`, or `handler_refused`; its `detail`, or `title`, or the
/// status.
fn refusal(status: StatusCode, body: &[u8]) -> Answer {
    let problem: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let text = |name: &str| problem.get(name).and_then(Value::as_str).map(str::to_owned);
    let from_type = text("type")
        .filter(|kind| kind != "about:blank")
        .and_then(|kind| kind.rsplit('/').next().map(str::to_owned))
        .filter(|segment| !segment.is_empty());
    let code =
        text("code").or(from_type).filter(|code| fits_code(code)).unwrap_or_else(|| "handler_refused".to_owned());
    let message = text("detail").or_else(|| text("title")).unwrap_or_else(|| format!("the handler answered {status}"));
    Answer::Refused { code, message: bounded_message(&message) }
}

/// Whether `value` holds a NUL character in a string or a key: PostgreSQL's
/// `jsonb` (ingest's jobs, the notifier's events) cannot store it, so such a
/// result would reach no client.
pub(super) fn holds_nul(value: &Value) -> bool {
    match value {
        Value::String(text) => text.contains('\0'),
        Value::Array(items) => items.iter().any(holds_nul),
        Value::Object(members) => members.iter().any(|(key, member)| key.contains('\0') || holds_nul(member)),
        _ => false,
    }
}

/// A handler's message as a job error keeps it: at most 1,000 characters,
/// without NUL, which no text or JSON column of PostgreSQL takes.
pub(super) fn bounded_message(message: &str) -> String {
    message.chars().take(1000).map(|c| if c == '\0' { '\u{FFFD}' } else { c }).collect()
}

/// A code as a job error carries it: 1-64 characters of `[A-Za-z0-9._-]`.
pub(super) fn fits_code(code: &str) -> bool {
    (1..=64).contains(&code.len()) && code.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn answer(status: u16, body: &str) -> Answer {
        answer_of(StatusCode::from_u16(status).unwrap(), body.as_bytes(), None)
    }

    #[test]
    fn each_answer_means_what_the_protocol_says() {
        assert_eq!(answer(200, r#"{"ok": true}"#), Answer::Succeeded(json!({"ok": true})));
        assert_eq!(answer(200, ""), Answer::Succeeded(Value::Null));
        assert_eq!(answer(204, ""), Answer::Succeeded(Value::Null));
        assert!(matches!(answer(200, "<html>"), Answer::Failed { .. }), "a 200 that is not JSON spends an attempt");
        assert_eq!(answer(202, ""), Answer::Accepted, "the handler reports through callbacks");
        let nul = answer(200, r#"{"note": ["a\u0000b"]}"#);
        assert!(matches!(nul, Answer::Refused { ref code, .. } if code == "invalid_result"), "{nul:?}");
        assert!(matches!(answer(429, ""), Answer::Unavailable { .. }));
        assert!(matches!(answer(503, ""), Answer::Unavailable { .. }));
        for status in [500, 502, 504, 408, 301] {
            assert!(matches!(answer(status, ""), Answer::Failed { .. }), "{status}");
        }
        let retry = answer_of(StatusCode::SERVICE_UNAVAILABLE, b"", Some(Duration::from_secs(7)));
        assert_eq!(
            retry,
            Answer::Unavailable {
                reason: "the handler answered 503 Service Unavailable".to_owned(),
                retry_after: Some(Duration::from_secs(7))
            }
        );
    }

    #[test]
    fn a_refusal_carries_the_problem_s_code_and_detail() {
        let problem = r#"{"type": "https://greeter.example/problems/unknown-name", "title": "Unknown", "detail": "no such name", "status": 422}"#;
        assert_eq!(
            answer(422, problem),
            Answer::Refused { code: "unknown-name".to_owned(), message: "no such name".to_owned() }
        );
        let coded = r#"{"type": "about:blank", "code": "card_declined", "title": "Declined"}"#;
        assert_eq!(
            answer(402, coded),
            Answer::Refused { code: "card_declined".to_owned(), message: "Declined".to_owned() }
        );
        let bare = answer(404, "not found");
        assert_eq!(
            bare,
            Answer::Refused {
                code: "handler_refused".to_owned(),
                message: "the handler answered 404 Not Found".to_owned()
            }
        );
        let hostile = format!(r#"{{"code": "{}", "detail": "\u0000{}"}}"#, "x y", "d".repeat(5000));
        let Answer::Refused { code, message } = answer(400, &hostile) else { panic!("a refusal") };
        assert_eq!(code, "handler_refused", "a code that does not fit is replaced");
        assert_eq!(message.chars().count(), 1000, "the message is bounded");
        assert!(!message.contains('\0'), "and holds no NUL");
    }
}
