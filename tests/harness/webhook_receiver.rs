//! A webhook receiver the test runs itself: records every request the
//! notifier makes and answers from a script.

use std::{net::SocketAddr, time::Duration};

use crate::eventually;

/// How a [`WebhookReceiver`] answers one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reply {
    /// This status, empty body.
    Status(u16),
    /// This status with `Retry-After: <seconds>`.
    RetryAfter(u16, u64),
    /// No answer until the client gives up or goes away.
    Hang,
}

/// One request a [`WebhookReceiver`] got.
#[derive(Debug, Clone)]
pub struct ReceivedWebhook {
    pub at: std::time::Instant,
    pub method: String,
    pub path_and_query: String,
    pub headers: axum::http::HeaderMap,
    pub body: Vec<u8>,
}

impl ReceivedWebhook {
    pub fn header(&self, name: &str) -> &str {
        self.headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or_default()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("a JSON body")
    }
}

#[derive(Debug, Default)]
struct ReceiverState {
    received: std::sync::Mutex<Vec<ReceivedWebhook>>,
    script: std::sync::Mutex<std::collections::VecDeque<Reply>>,
    fallback: std::sync::Mutex<Option<Reply>>,
}

/// A webhook receiver on 127.0.0.1 (a real HTTP server on a free port) that
/// records every request and answers from a script: the scripted replies in
/// order, then the fallback reply (`200` unless changed). It verifies
/// nothing itself; tests verify what it recorded.
#[derive(Debug)]
pub struct WebhookReceiver {
    pub addr: SocketAddr,
    state: std::sync::Arc<ReceiverState>,
    server: tokio::task::JoinHandle<()>,
}

impl WebhookReceiver {
    pub async fn start() -> Self {
        use axum::{
            body::Bytes,
            extract::State,
            http::{HeaderMap, Method, StatusCode, Uri},
            response::IntoResponse,
        };
        async fn handle(
            State(state): State<std::sync::Arc<ReceiverState>>,
            method: Method,
            uri: Uri,
            headers: HeaderMap,
            body: Bytes,
        ) -> axum::response::Response {
            state.received.lock().expect("receiver lock").push(ReceivedWebhook {
                at: std::time::Instant::now(),
                method: method.to_string(),
                path_and_query: uri.path_and_query().map(ToString::to_string).unwrap_or_default(),
                headers,
                body: body.to_vec(),
            });
            let scripted = state.script.lock().expect("receiver lock").pop_front();
            let reply = scripted.or(*state.fallback.lock().expect("receiver lock")).unwrap_or(Reply::Status(200));
            let status = |code: u16| StatusCode::from_u16(code).expect("a valid status");
            match reply {
                Reply::Status(code) => status(code).into_response(),
                Reply::RetryAfter(code, seconds) => {
                    (status(code), [("retry-after", seconds.to_string())]).into_response()
                }
                Reply::Hang => {
                    // Dropped with the connection when the client gives up.
                    tokio::time::sleep(Duration::from_secs(3600)).await;
                    status(200).into_response()
                }
            }
        }
        let state = std::sync::Arc::new(ReceiverState::default());
        let router = axum::Router::new().fallback(handle).with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("receiver port");
        let addr = listener.local_addr().expect("receiver address");
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        Self { addr, state, server }
    }

    /// `http://127.0.0.1:<port><path>`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Answer the next requests with `replies`, in order.
    pub fn script(&self, replies: impl IntoIterator<Item = Reply>) {
        self.state.script.lock().expect("receiver lock").extend(replies);
    }

    /// Answer every unscripted request with `reply`.
    pub fn set_fallback(&self, reply: Reply) {
        *self.state.fallback.lock().expect("receiver lock") = Some(reply);
    }

    /// Every request so far.
    pub fn received(&self) -> Vec<ReceivedWebhook> {
        self.state.received.lock().expect("receiver lock").clone()
    }

    /// The first `count` requests, waiting up to `timeout` for them.
    pub async fn wait_for(&self, count: usize, timeout: Duration) -> Vec<ReceivedWebhook> {
        eventually(&format!("{count} webhook requests"), timeout, || async {
            let received = self.received();
            (received.len() >= count).then(|| received[..count].to_vec())
        })
        .await
    }
}

impl Drop for WebhookReceiver {
    fn drop(&mut self) {
        self.server.abort();
    }
}
