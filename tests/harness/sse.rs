//! The notifier's event streams as a client reads them: a Server-Sent-Events
//! client, and the stream tokens a browser's stream is opened with.

use std::time::Duration;

use crate::{ApiResponse, DEV_API_KEY, Service};

/// A Server-Sent-Events client over a real HTTP connection.
pub struct SseClient {
    events: std::pin::Pin<Box<dyn futures::Stream<Item = eventsource_stream::Event> + Send>>,
}

impl std::fmt::Debug for SseClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SseClient")
    }
}

impl SseClient {
    /// Open `url` with the dev API key, resuming after `last_event_id` if given.
    pub async fn connect(url: &str, last_event_id: Option<&str>) -> Self {
        Self::connect_as(url, DEV_API_KEY, last_event_id).await
    }

    /// Open `url` with `api_key`, resuming after `last_event_id` if given.
    pub async fn connect_as(url: &str, api_key: &str, last_event_id: Option<&str>) -> Self {
        Self::open(reqwest::Client::new().get(url).bearer_auth(api_key), last_event_id).await
    }

    /// Open `url` as a browser does: no `Authorization` header, the URL's
    /// `?token=` is the credential.
    pub async fn connect_with_url_token(url: &str, last_event_id: Option<&str>) -> Self {
        Self::open(reqwest::Client::new().get(url), last_event_id).await
    }

    async fn open(request: reqwest::RequestBuilder, last_event_id: Option<&str>) -> Self {
        use eventsource_stream::Eventsource as _;
        use futures::StreamExt as _;
        let mut request = request.header("accept", "text/event-stream");
        if let Some(id) = last_event_id {
            request = request.header("last-event-id", id);
        }
        let response = request.send().await.expect("SSE request");
        assert_eq!(response.status(), 200, "SSE status");
        assert_eq!(response.headers()["content-type"], "text/event-stream");
        let events = response.bytes_stream().eventsource().filter_map(|event| async move { event.ok() });
        Self { events: Box::pin(events) }
    }

    /// The next event with an id (skipping the `retry:` preamble), or `None`
    /// when the stream ended.
    pub async fn next_event(&mut self, timeout: Duration) -> Option<eventsource_stream::Event> {
        use futures::StreamExt as _;
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let event = tokio::time::timeout_at(deadline, self.events.next())
                .await
                .unwrap_or_else(|_| panic!("no SSE event within {timeout:?}"))?;
            if !event.id.is_empty() || !event.data.is_empty() {
                return Some(event);
            }
        }
    }
}

/// A stream token from `notifier` for the dev tenant, asking for `body`
/// (e.g. `{"job_id": ...}`), or the failed answer.
pub async fn stream_token(notifier: &Service, body: &serde_json::Value) -> Result<String, ApiResponse> {
    let answer = ApiResponse::send(
        reqwest::Client::new().post(notifier.url("/v1/stream-tokens")).bearer_auth(DEV_API_KEY).json(body),
    )
    .await;
    if answer.status != 200 {
        return Err(answer);
    }
    Ok(answer.json()["token"].as_str().expect("a token").to_owned())
}
