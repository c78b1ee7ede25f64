//! The live view: `GET /live`, one small page (plain HTML, JS and CSS
//! embedded in the binary, no build step) that takes a stream token (pasted,
//! or `#token=` in the fragment, which never reaches a server), opens
//! `EventSource` on `/v1/events?token=...`, lists the tenant's job events as
//! they arrive, says when the stream dropped and resumed (the browser
//! resumes with `Last-Event-ID` itself) or ended with its token (expired or
//! revoked: `stream.closed`), and filters by job or correlation
//! id. The page runs only its own script: a strict Content-Security-Policy
//! comes with each file.

use axum::{
    http::{HeaderName, HeaderValue, header},
    response::IntoResponse,
};

const PAGE: &str = include_str!("live/live.html");
const SCRIPT: &str = include_str!("live/live.js");
const STYLE: &str = include_str!("live/live.css");

/// Only this origin's script, style and streams; no plugins, frames, forms
/// or base-URI tricks.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; \
                   img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

fn served(content_type: &'static str, body: &'static str) -> impl IntoResponse {
    let headers: [(HeaderName, HeaderValue); 5] = [
        (header::CONTENT_TYPE, HeaderValue::from_static(content_type)),
        (header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP)),
        (header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff")),
        // The page's URL may hold a token in its fragment; keep it out of referrers.
        (header::REFERRER_POLICY, HeaderValue::from_static("no-referrer")),
        (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
    ];
    (headers, body)
}

/// `GET /live`.
pub async fn page() -> impl IntoResponse {
    served("text/html; charset=utf-8", PAGE)
}

/// `GET /live/live.js`.
pub async fn script() -> impl IntoResponse {
    served("text/javascript; charset=utf-8", SCRIPT)
}

/// `GET /live/live.css`.
pub async fn style() -> impl IntoResponse {
    served("text/css; charset=utf-8", STYLE)
}
