//! Calls to the services' HTTP APIs: bearer authentication, answers read
//! within a size bound, `application/problem+json` turned into typed errors,
//! and retries bounded by `--timeout` that honour `Retry-After`.

use std::time::Duration;

use onceflow_runtime::failure::Backoff;
use reqwest::{Method, RequestBuilder, StatusCode, header::HeaderMap};
use tokio::time::Instant;

use crate::{error::CliError, output};

/// The largest answer read; the services' own answers are far smaller (their
/// listings are bounded by `limit`), so a longer one is not theirs.
const MAX_BODY_BYTES: usize = 16 * 1024 * 1024;
/// Waits between attempts without a `Retry-After`: exponential and jittered.
const FIRST_RETRY: Duration = Duration::from_millis(200);
const LONGEST_RETRY: Duration = Duration::from_secs(5);
/// How long a connection attempt may take before it counts as failed.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// One service: its name in messages, base URL and bearer credential.
#[derive(Debug, Clone)]
pub struct Service {
    pub name: &'static str,
    base: String,
    bearer: Option<String>,
}

impl Service {
    pub fn new(name: &'static str, base: &str, bearer: Option<&str>) -> Self {
        Self { name, base: base.to_owned(), bearer: bearer.map(str::to_owned) }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// A request to `path` with this service's credential.
    pub fn request(&self, http: &reqwest::Client, method: Method, path: &str) -> RequestBuilder {
        let request = http.request(method, self.url(path));
        match &self.bearer {
            Some(token) => request.bearer_auth(token),
            None => request,
        }
    }
}

/// Whether a request may be sent again after a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Repeat {
    /// Sending it twice is harmless: reads, and submissions under one
    /// idempotency key (whose `409` in-flight answer is waited out too).
    Safe,
    /// Not keyed (a redrive): sent again only when it cannot have reached
    /// the service (no connection), or the service said so (`429`, `503`).
    OnlyIfUnsent,
}

impl Repeat {
    fn retries(self, status: StatusCode) -> bool {
        match self {
            Self::Safe => matches!(status.as_u16(), 408 | 409 | 429 | 502 | 503 | 504),
            Self::OnlyIfUnsent => matches!(status.as_u16(), 429 | 503),
        }
    }
}

/// A successful (`2xx`) answer.
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Vec<u8>,
}

impl Answer {
    pub fn json(&self, service: &Service) -> Result<serde_json::Value, CliError> {
        serde_json::from_slice(&self.body).map_err(|e| CliError::unreadable(service.name, "answer", e))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// The HTTP client of every command.
#[derive(Debug, Clone)]
pub struct Api {
    pub http: reqwest::Client,
    /// How long one call may keep retrying.
    pub timeout: Duration,
}

impl Api {
    pub fn new(timeout: Duration) -> Result<Self, CliError> {
        let http = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .user_agent(concat!("onceflow-cli/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| CliError::Internal(format!("cannot set up the HTTP client: {e}")))?;
        Ok(Self { http, timeout })
    }

    /// Send the request `build` makes (again on a retry) until a final
    /// answer or `--timeout`: a `2xx` is returned, a `4xx` is
    /// [`CliError::Rejected`], and a `5xx` or no answer is
    /// [`CliError::Unavailable`].
    pub async fn call(
        &self,
        service: &Service,
        repeat: Repeat,
        build: impl Fn(&reqwest::Client) -> RequestBuilder,
    ) -> Result<Answer, CliError> {
        let deadline = Instant::now() + self.timeout;
        let mut backoff = Backoff::new(FIRST_RETRY, LONGEST_RETRY);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let (reason, wait) = match self.attempt(&build, left).await {
                Ok(answer) if answer.status.is_success() => return Ok(answer),
                Ok(answer) if repeat.retries(answer.status) => {
                    let wait = retry_after(&answer.headers).unwrap_or_else(|| backoff.next_delay());
                    (status_reason(&answer), wait)
                }
                Ok(answer) => return Err(refusal(service, &answer)),
                Err(Failure::Unsendable(error)) => {
                    return Err(CliError::Usage(format!("cannot send this request to {}: {error}", service.name)));
                }
                Err(Failure::Transport { reason, sent }) if sent && repeat == Repeat::OnlyIfUnsent => {
                    return Err(CliError::Unavailable {
                        service: service.name,
                        reason: format!("{reason}; the request may have reached it, so it was not repeated"),
                    });
                }
                Err(Failure::Transport { reason, .. }) => (reason, backoff.next_delay()),
            };
            if Instant::now() + wait >= deadline {
                return Err(CliError::Unavailable {
                    service: service.name,
                    reason: format!("{reason} (gave up after {}s; see --timeout)", self.timeout.as_secs_f64()),
                });
            }
            output::note(&format!("{}: {reason}; retrying in {:.1}s", service.name, wait.as_secs_f64()));
            tokio::time::sleep(wait).await;
        }
    }

    async fn attempt(
        &self,
        build: &impl Fn(&reqwest::Client) -> RequestBuilder,
        left: Duration,
    ) -> Result<Answer, Failure> {
        let request = build(&self.http).timeout(left).build().map_err(|e| Failure::Unsendable(describe(&e)))?;
        let mut response = self
            .http
            .execute(request)
            .await
            .map_err(|error| Failure::Transport { reason: describe(&error), sent: !error.is_connect() })?;
        let (status, headers) = (response.status(), response.headers().clone());
        let mut body = Vec::new();
        while let Some(chunk) =
            response.chunk().await.map_err(|error| Failure::Transport { reason: describe(&error), sent: true })?
        {
            if body.len() + chunk.len() > MAX_BODY_BYTES {
                return Err(Failure::Transport {
                    reason: format!("an answer over {MAX_BODY_BYTES} bytes"),
                    sent: true,
                });
            }
            body.extend_from_slice(&chunk);
        }
        Ok(Answer { status, headers, body })
    }
}

/// Why one attempt got no answer.
enum Failure {
    /// The request could not even be built (e.g. a header value with a
    /// control character).
    Unsendable(String),
    /// No (complete) answer; `sent` unless the connection was never made.
    Transport { reason: String, sent: bool },
}

/// A transport error in words, with its cause (reqwest's own message is
/// only "error sending request").
pub fn describe(error: &reqwest::Error) -> String {
    let mut text = if error.is_timeout() { "timed out".to_owned() } else { error.to_string() };
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        text = format!("{text}: {cause}");
        source = cause.source();
    }
    text
}

fn status_reason(answer: &Answer) -> String {
    match problem_detail(&answer.body) {
        Some((_, detail)) => format!("{} ({detail})", answer.status),
        None => answer.status.to_string(),
    }
}

/// The `type` slug and `detail` of a problem+json body.
fn problem_detail(body: &[u8]) -> Option<(Option<String>, String)> {
    #[derive(serde::Deserialize)]
    struct Problem {
        #[serde(rename = "type")]
        kind: Option<String>,
        title: Option<String>,
        detail: Option<String>,
    }
    let problem: Problem = serde_json::from_slice(body).ok()?;
    let slug = problem.kind.map(|uri| uri.rsplit('/').next().unwrap_or(&uri).to_owned());
    let detail = problem.detail.or(problem.title)?;
    Some((slug, detail))
}

/// The error of a final non-`2xx` answer.
pub fn refusal(service: &Service, answer: &Answer) -> CliError {
    let (kind, detail) = problem_detail(&answer.body).unwrap_or_else(|| {
        let text = String::from_utf8_lossy(&answer.body);
        let text = text.trim();
        let detail = if text.is_empty() || text.len() > 500 {
            answer.status.canonical_reason().unwrap_or("no explanation").to_owned()
        } else {
            text.to_owned()
        };
        (None, detail)
    });
    if answer.status.is_client_error() {
        CliError::Rejected { service: service.name, status: answer.status.as_u16(), kind, detail }
    } else {
        CliError::Unavailable { service: service.name, reason: format!("{}: {detail}", answer.status) }
    }
}

/// `Retry-After` in seconds (the services send seconds; an HTTP date is
/// left to the backoff).
pub fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let seconds: u64 = headers.get(reqwest::header::RETRY_AFTER)?.to_str().ok()?.trim().parse().ok()?;
    Some(Duration::from_secs(seconds))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(status: u16, body: &str) -> Answer {
        Answer { status: StatusCode::from_u16(status).unwrap(), headers: HeaderMap::new(), body: body.into() }
    }

    #[test]
    fn problems_become_typed_errors() {
        let ingest = Service::new("ingest", "http://127.0.0.1:8080", None);
        let body = r#"{"type":"https://onceflow.dev/problems/idempotency-key-reused","title":"Unprocessable","status":422,"detail":"the key was used with another request"}"#;
        let CliError::Rejected { status, kind, detail, .. } = refusal(&ingest, &answer(422, body)) else {
            panic!("a 4xx is a refusal")
        };
        assert_eq!((status, kind.as_deref()), (422, Some("idempotency-key-reused")));
        assert_eq!(detail, "the key was used with another request");
        assert!(matches!(refusal(&ingest, &answer(500, "")), CliError::Unavailable { .. }));
        let CliError::Rejected { detail, .. } = refusal(&ingest, &answer(404, "")) else { panic!("404") };
        assert_eq!(detail, "Not Found");
    }

    #[test]
    fn only_safe_requests_are_repeated_on_in_flight_and_gateway_answers() {
        for status in [408, 409, 429, 502, 503, 504] {
            assert!(Repeat::Safe.retries(StatusCode::from_u16(status).unwrap()), "{status}");
        }
        for status in [400, 401, 404, 413, 415, 422, 500] {
            assert!(!Repeat::Safe.retries(StatusCode::from_u16(status).unwrap()), "{status}");
        }
        assert!(!Repeat::OnlyIfUnsent.retries(StatusCode::CONFLICT));
        assert!(Repeat::OnlyIfUnsent.retries(StatusCode::SERVICE_UNAVAILABLE));
    }

    #[test]
    fn retry_after_is_read_in_seconds() {
        let mut headers = HeaderMap::new();
        assert_eq!(retry_after(&headers), None);
        headers.insert("retry-after", "2".parse().unwrap());
        assert_eq!(retry_after(&headers), Some(Duration::from_secs(2)));
        headers.insert("retry-after", "Wed, 21 Oct 2015 07:28:00 GMT".parse().unwrap());
        assert_eq!(retry_after(&headers), None);
    }
}
