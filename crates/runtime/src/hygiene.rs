//! The HTTP hygiene every service's port gets from [`crate::http::serve`], so
//! that no client, slow or hostile, can hold a service or make it answer
//! outside its contract:
//!
//! - connections: at most [`HttpLimits::max_connections`] open at once; when
//!   full, the server stops accepting and new connections wait in the
//!   kernel's accept backlog until one closes (nothing is answered, so there
//!   is nothing to be slow about). A client must send its request head within
//!   [`HttpLimits::header_read_timeout_ms`], and an idle keep-alive connection
//!   is closed after the same time: a slowloris client is cut off.
//! - requests: at most [`HttpLimits::max_concurrent_requests`] handled at
//!   once; one more gets `503` problem+json with `Retry-After: 1` (the probes
//!   are exempt, so overload does not look like death). A request must be
//!   answered (response head sent) within [`HttpLimits::request_timeout_ms`],
//!   else `408` problem+json; that includes reading its body. Response bodies
//!   are not timed: a Server-Sent-Events stream runs as long as it likes.
//! - errors: every `4xx`/`5xx` any layer answers without a JSON body (axum's
//!   `404` for an unknown route, `405`, extractor rejections such as `400` for
//!   a bad query or `413` from a body limit) is rewritten into RFC 9457
//!   problem+json of the same status, keeping headers such as `Allow`. A `4xx`
//!   keeps its short text as `detail`; a `5xx` says only "internal error".
//!
//! - traces: every request but the probes gets an OpenTelemetry SERVER span
//!   (`axum-tracing-opentelemetry`, with the HTTP semantic conventions:
//!   `http.request.method`, `http.route`, `http.response.status_code`, ...),
//!   a child of the client's `traceparent` when it sends one, and every
//!   answer carries a `traceparent` naming that span, so a client finds its
//!   command's trace from the `202`. The span never sees the query string
//!   (taken off the URI before the span is made, put back before routing):
//!   a query can carry a credential (the notifier's `?token=`), and span
//!   attributes and the JSON log lines inside a span are exported and kept.
//!
//! - held answers: a response carrying [`HoldAnswer`] (ingest's refusals of
//!   a tenant over its limits) is written only after its delay, outside
//!   every other layer: the request was measured, traced and gave back its
//!   place among the concurrent requests; only its connection waits.
//!
//! What hyper itself refuses before any of this (a malformed request line or
//! header, a request head over 400 KiB) gets hyper's bare `400`/`431`, and a
//! header-read timeout closes the connection without an answer.

use std::{sync::Arc, time::Duration};

use axum::{
    Router,
    extract::{Request, State},
    http::{HeaderValue, StatusCode, Uri, header, uri::PathAndQuery},
    middleware::{self, Next},
    response::{IntoResponse, Response},
};
use axum_tracing_opentelemetry::middleware::{OtelAxumLayer, OtelInResponseLayer};
use tokio::sync::Semaphore;

use crate::problem::{PROBLEM_JSON, Problem};

/// Bounds of a service's HTTP port. Every field has a default, so a service's
/// configuration may leave out the whole `[http]` section or any key of it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpLimits {
    /// A client must send a request's head (request line and headers) within
    /// this long, counted from the connection's first byte or the end of its
    /// previous response; else its connection is closed.
    pub header_read_timeout_ms: u64,
    /// A request must be answered within this long (its body read, its
    /// response head sent), else `408`. Streamed response bodies are not timed.
    pub request_timeout_ms: u64,
    /// Connections open at once (each Server-Sent-Events subscriber holds
    /// one); beyond, new ones wait in the accept backlog. Keep it below the
    /// process's open-file limit.
    pub max_connections: usize,
    /// Requests handled at once; beyond, `503` + `Retry-After: 1`.
    pub max_concurrent_requests: usize,
    /// A second address for the operator's probes (`/livez`, `/readyz`,
    /// `/metrics`); when set, the API address serves none of them, so what
    /// they show (dependencies, destinations, internal addresses) is never on
    /// a port clients reach, and a port full of clients never hides them.
    /// Empty: the probes are served on the API address.
    pub operator_listen: String,
}

impl Default for HttpLimits {
    fn default() -> Self {
        Self {
            header_read_timeout_ms: 10_000,
            request_timeout_ms: 30_000,
            max_connections: 4096,
            max_concurrent_requests: 512,
            operator_listen: String::new(),
        }
    }
}

impl HttpLimits {
    pub fn header_read_timeout(&self) -> Duration {
        Duration::from_millis(self.header_read_timeout_ms)
    }

    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms)
    }
}

/// Paths never shed: an orchestrator must tell "busy" from "dead".
pub(crate) const PROBE_PATHS: [&str; 3] = ["/livez", "/readyz", "/metrics"];

/// The largest error body kept as a problem's `detail`.
const MAX_DETAIL_BYTES: usize = 1024;

/// `router` with the request bound, the request timeout and the problem+json
/// rewrite applied to every route and to the fallback, all of it traced and
/// measured (see [`crate::instruments::record_http_request`]): the span and
/// the metric see the status the client gets.
pub fn apply(router: Router, limits: &HttpLimits) -> Router {
    let permits = Arc::new(Semaphore::new(limits.max_concurrent_requests));
    router
        .layer(middleware::from_fn_with_state(limits.request_timeout(), time_out))
        .layer(middleware::from_fn_with_state(permits, bound_concurrency))
        .layer(middleware::map_response(problem_for_every_error))
        .layer(middleware::from_fn(restore_query))
        // Inside the span's layer, so the `traceparent` it answers is the span's.
        .layer(OtelInResponseLayer)
        .layer(OtelAxumLayer::default().filter(is_traced))
        .layer(middleware::from_fn(hide_query))
        .layer(middleware::from_fn(crate::instruments::record_http_request))
        .layer(middleware::from_fn(hold_answers))
}

/// A response extension: write this response only after the delay (see the
/// module's docs). An HTTP/1.1 connection carries its next request only after
/// this answer, so a client that sends again the moment it is answered is
/// slowed to one request per delay on the connection, at no cost to the
/// service (a timer). Held answers are bounded by the open connections.
#[derive(Debug, Clone, Copy)]
pub struct HoldAnswer(pub Duration);

async fn hold_answers(request: Request, next: Next) -> Response {
    let mut response = next.run(request).await;
    if let Some(HoldAnswer(delay)) = response.extensions_mut().remove::<HoldAnswer>() {
        tokio::time::sleep(delay).await;
    }
    response
}

/// Probes are polled every few seconds by an orchestrator: spans of them
/// would only bury the traces of real work.
fn is_traced(path: &str) -> bool {
    !PROBE_PATHS.contains(&path)
}

/// A request's URI with its query, while the span's layer sees it without.
#[derive(Clone)]
struct HiddenQuery(Uri);

/// Take the query off the URI (into [`HiddenQuery`]) so that the span made
/// next records `url.path` only.
async fn hide_query(mut request: Request, next: Next) -> Response {
    if request.uri().query().is_some() {
        let original = request.uri().clone();
        let mut parts = original.clone().into_parts();
        parts.path_and_query = original.path().parse::<PathAndQuery>().ok();
        if let Ok(without_query) = Uri::from_parts(parts) {
            *request.uri_mut() = without_query;
            request.extensions_mut().insert(HiddenQuery(original));
        }
    }
    next.run(request).await
}

/// Put the query back, inside the span, for the router and its extractors.
async fn restore_query(mut request: Request, next: Next) -> Response {
    if let Some(HiddenQuery(original)) = request.extensions_mut().remove::<HiddenQuery>() {
        *request.uri_mut() = original;
    }
    next.run(request).await
}

async fn time_out(State(timeout): State<Duration>, request: Request, next: Next) -> Response {
    match tokio::time::timeout(timeout, next.run(request)).await {
        Ok(response) => response,
        Err(_) => {
            metrics::counter!("onceflow_http_timed_out_total").increment(1);
            Problem::new(
                StatusCode::REQUEST_TIMEOUT,
                "request-timeout",
                "Request timeout",
                format!("the request was not completed within {} ms", timeout.as_millis()),
            )
            .into_response()
        }
    }
}

async fn bound_concurrency(State(permits): State<Arc<Semaphore>>, request: Request, next: Next) -> Response {
    if PROBE_PATHS.contains(&request.uri().path()) {
        return next.run(request).await;
    }
    // Held until the response head is ready; a streamed body does not hold it.
    let Ok(_permit) = permits.try_acquire_owned() else {
        metrics::counter!("onceflow_http_shed_total").increment(1);
        return Problem::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "overloaded",
            "Service overloaded",
            "too many requests are being handled; retry later",
        )
        .retry_after(1)
        .into_response();
    };
    next.run(request).await
}

/// Rewrite an error response that is not JSON into problem+json.
async fn problem_for_every_error(response: Response) -> Response {
    let status = response.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return response;
    }
    let media_type = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.split(';').next())
        .map(|value| value.trim().to_ascii_lowercase())
        .unwrap_or_default();
    // Already structured (problems, the readiness report) or a stream: leave it.
    if media_type == PROBLEM_JSON || media_type == "application/json" || media_type == "text/event-stream" {
        return response;
    }
    let (parts, body) = response.into_parts();
    let text = if status.is_client_error() && (media_type.is_empty() || media_type == "text/plain") {
        axum::body::to_bytes(body, MAX_DETAIL_BYTES).await.ok().and_then(|bytes| String::from_utf8(bytes.to_vec()).ok())
    } else {
        None
    };
    let detail = text.map(|t| t.trim().to_owned()).filter(|t| !t.is_empty()).unwrap_or_else(|| default_detail(status));
    let mut problem = Problem::for_status(status, detail).into_response();
    let headers = problem.headers_mut();
    for (name, value) in &parts.headers {
        if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH && !headers.contains_key(name) {
            headers.insert(name.clone(), value.clone());
        }
    }
    if status == StatusCode::PAYLOAD_TOO_LARGE {
        // The request body was not read to its end: say the connection ends.
        headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    problem
}

fn default_detail(status: StatusCode) -> String {
    match status {
        StatusCode::NOT_FOUND => "no such resource".to_owned(),
        StatusCode::METHOD_NOT_ALLOWED => "this method is not allowed here; see the Allow header".to_owned(),
        StatusCode::PAYLOAD_TOO_LARGE => "the request body is larger than this endpoint accepts".to_owned(),
        s if s.is_server_error() => "internal error".to_owned(),
        s => s.canonical_reason().unwrap_or("error").to_lowercase(),
    }
}

#[cfg(test)]
mod tests {
    use axum::{
        body::{Body, Bytes},
        extract::{DefaultBodyLimit, Query},
        routing::{get, post},
    };
    use tower::ServiceExt as _;

    use super::*;

    async fn call(router: &Router, request: Request) -> (StatusCode, axum::http::HeaderMap, serde_json::Value) {
        let response = router.clone().oneshot(request).await.unwrap();
        let (parts, body) = response.into_parts();
        let body = axum::body::to_bytes(body, 1 << 20).await.unwrap();
        (parts.status, parts.headers, serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null))
    }

    fn router(limits: &HttpLimits) -> Router {
        #[derive(serde::Deserialize)]
        struct Page {
            #[allow(dead_code)]
            n: u32,
        }
        let app = Router::new()
            .route("/page", get(|Query(_): Query<Page>| async { "ok" }))
            .route("/upload", post(|body: Bytes| async move { body.len().to_string() }))
            .route("/slow", get(|| async { tokio::time::sleep(Duration::from_secs(60)).await }))
            .route("/livez", get(|| async { "ok" }))
            .route(
                "/held",
                get(|| async {
                    let mut refused =
                        (StatusCode::TOO_MANY_REQUESTS, [(header::CONTENT_TYPE, PROBLEM_JSON)], "{}").into_response();
                    refused.extensions_mut().insert(HoldAnswer(Duration::from_secs(2)));
                    refused
                }),
            )
            .layer(DefaultBodyLimit::max(16));
        apply(app, limits)
    }

    fn problem_type(slug: &str) -> String {
        Problem::type_uri(slug)
    }

    #[tokio::test]
    async fn every_layer_error_is_problem_json() {
        let app = router(&HttpLimits::default());
        let get_request = |uri: &str| Request::get(uri).body(Body::empty()).unwrap();

        let (status, headers, body) = call(&app, get_request("/nowhere")).await;
        assert_eq!((status, body["type"].as_str()), (StatusCode::NOT_FOUND, Some(&*problem_type("not-found"))));
        assert_eq!(headers[header::CONTENT_TYPE], PROBLEM_JSON);

        let (status, headers, body) = call(&app, Request::delete("/page").body(Body::empty()).unwrap()).await;
        assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(body["type"], problem_type("method-not-allowed"));
        assert_eq!(headers[header::ALLOW], "GET,HEAD");

        let (status, _, body) = call(&app, get_request("/page?n=minus-one")).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(body["type"], problem_type("bad-request"));
        assert!(body["detail"].as_str().unwrap().contains("query"), "{body}");

        let upload = Request::post("/upload").body(Body::from(vec![b'x'; 17])).unwrap();
        let (status, headers, body) = call(&app, upload).await;
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(body["type"], problem_type("payload-too-large"));
        assert_eq!(body["status"], 413);
        assert_eq!(headers[header::CONTENT_TYPE], PROBLEM_JSON);

        let (status, _, _) = call(&app, Request::post("/upload").body(Body::from("small")).unwrap()).await;
        assert_eq!(status, StatusCode::OK, "a success is left alone");
    }

    #[tokio::test]
    async fn a_held_answer_waits_its_delay_without_holding_a_place() {
        let app = router(&HttpLimits { max_concurrent_requests: 1, ..HttpLimits::default() });
        let started = tokio::time::Instant::now();
        let held = tokio::spawn({
            let app = app.clone();
            async move { call(&app, Request::get("/held").body(Body::empty()).unwrap()).await }
        });
        // Let the held request be handled and reach its hold.
        for _ in 0..20 {
            tokio::task::yield_now().await;
        }
        // Its place among the concurrent requests (one) was given back.
        let (status, _, _) = call(&app, Request::get("/page?n=1").body(Body::empty()).unwrap()).await;
        assert_eq!(status, StatusCode::OK);
        assert!(!held.is_finished(), "answered before its hold ended");
        let (status, _, _) = held.await.unwrap();
        assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
        assert!(started.elapsed() >= Duration::from_secs(2), "held {:?}", started.elapsed());
    }

    #[tokio::test]
    async fn a_slow_request_times_out_with_a_problem() {
        let app = router(&HttpLimits { request_timeout_ms: 50, ..HttpLimits::default() });
        let (status, _, body) = call(&app, Request::get("/slow").body(Body::empty()).unwrap()).await;
        assert_eq!(status, StatusCode::REQUEST_TIMEOUT);
        assert_eq!(body["type"], problem_type("request-timeout"));
    }

    #[tokio::test]
    async fn requests_beyond_the_bound_are_shed_but_probes_are_not() {
        let app = router(&HttpLimits { max_concurrent_requests: 1, ..HttpLimits::default() });
        let slow = tokio::spawn({
            let app = app.clone();
            async move { app.oneshot(Request::get("/slow").body(Body::empty()).unwrap()).await }
        });
        // The slow request holds the only permit once it is being handled.
        let shed = loop {
            let (status, headers, body) = call(&app, Request::get("/page?n=1").body(Body::empty()).unwrap()).await;
            if status != StatusCode::OK {
                break (status, headers, body);
            }
            tokio::task::yield_now().await;
        };
        assert_eq!(shed.0, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(shed.1[header::RETRY_AFTER], "1");
        assert_eq!(shed.2["type"], problem_type("overloaded"));
        let (status, _, _) = call(&app, Request::get("/livez").body(Body::empty()).unwrap()).await;
        assert_eq!(status, StatusCode::OK, "probes are never shed");
        slow.abort();
    }
}
