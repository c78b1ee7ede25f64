//! The RED signals of every HTTP port: the duration of each request, by
//! route template, method and status.

use axum::{extract::MatchedPath, http::Request, middleware::Next, response::Response};

use super::HTTP_SERVER_REQUEST_DURATION;

/// Middleware: the duration of every request into
/// [`HTTP_SERVER_REQUEST_DURATION`], labelled with the route template (or
/// `unmatched`), the method and the status code.
pub async fn record_http_request(
    matched: Option<MatchedPath>,
    request: Request<axum::body::Body>,
    next: Next,
) -> Response {
    let started = std::time::Instant::now();
    let route = matched.map_or_else(|| "unmatched".to_owned(), |path| path.as_str().to_owned());
    let method = known_method(request.method());
    let response = next.run(request).await;
    metrics::histogram!(
        HTTP_SERVER_REQUEST_DURATION,
        "http_route" => route,
        "http_request_method" => method,
        "http_response_status_code" => response.status().as_u16().to_string(),
    )
    .record(started.elapsed().as_secs_f64());
    response
}

/// The method as a label: the standard ones by name, any other as `_OTHER`
/// (as OpenTelemetry's conventions say), so a client cannot mint series.
fn known_method(method: &axum::http::Method) -> &'static str {
    use axum::http::Method;
    match *method {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::OPTIONS => "OPTIONS",
        Method::CONNECT => "CONNECT",
        Method::TRACE => "TRACE",
        _ => "_OTHER",
    }
}
