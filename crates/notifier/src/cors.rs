//! CORS of the browser-facing endpoints (the streams and the token
//! endpoint), so a page on another origin can get a token and open an
//! `EventSource`. Origins come from `sse.cors_origins`; none configured, no
//! CORS headers at all (same-origin pages such as `/live` need none).

use std::time::Duration;

use axum::http::{HeaderName, HeaderValue, Method, header};
use tower_http::cors::{AllowOrigin, CorsLayer};

/// The layer for `origins`, `None` when empty; an entry that is not an
/// origin (`scheme://host[:port]`, or `*` for any) is refused.
pub fn layer(origins: &[String]) -> Result<Option<CorsLayer>, String> {
    if origins.is_empty() {
        return Ok(None);
    }
    let allowed = if origins.iter().any(|origin| origin == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(origins.iter().map(|origin| parse_origin(origin)).collect::<Result<Vec<_>, _>>()?)
    };
    Ok(Some(
        CorsLayer::new()
            .allow_origin(allowed)
            .allow_methods([Method::GET, Method::POST])
            // EventSource sends Last-Event-ID when it reconnects.
            .allow_headers([header::AUTHORIZATION, header::CONTENT_TYPE, HeaderName::from_static("last-event-id")])
            .max_age(Duration::from_secs(600)),
    ))
}

/// An origin as browsers send it: scheme, host, optional port; nothing more.
fn parse_origin(origin: &str) -> Result<HeaderValue, String> {
    let refused = || format!("sse.cors_origins: `{origin}` is not an origin like https://app.example.com");
    let host = origin.strip_prefix("https://").or_else(|| origin.strip_prefix("http://")).ok_or_else(refused)?;
    if host.is_empty() || host.contains(['/', '?', '#', '@', ' ']) {
        return Err(refused());
    }
    HeaderValue::from_str(origin).map_err(|_| refused())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_are_checked() {
        assert!(layer(&[]).unwrap().is_none());
        assert!(layer(&["*".to_owned()]).unwrap().is_some());
        assert!(layer(&["https://app.example.com".to_owned(), "http://127.0.0.1:3000".to_owned()]).unwrap().is_some());
        for bad in ["app.example.com", "https://app.example.com/", "https://", "ftp://x", "https://a/b?c"] {
            assert!(layer(&[bad.to_owned()]).is_err(), "{bad}");
        }
    }
}
