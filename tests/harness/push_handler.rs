//! A push handler for the tests: a plain HTTP/1.1 server on 127.0.0.1 that
//! records every request and answers as its behaviour says, including not
//! at all: it can close the connection without a word, as a handler process
//! killed in the middle of a request would.
//!
//! Written on bare TCP (one request per connection, `connection: close`) so
//! that a test controls every byte and every connection it drops.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
};

use crate::eventually;

/// One request the handler received.
#[derive(Debug, Clone)]
pub struct PushRequest {
    pub at: Instant,
    pub path: String,
    /// Header names lower-cased.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl PushRequest {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(key, _)| key == name).map(|(_, value)| value.as_str())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }

    /// The command's job id (the body's `job_id`).
    pub fn job_id(&self) -> String {
        self.json()["job_id"].as_str().unwrap_or_default().to_owned()
    }
}

/// How the handler answers one request.
#[derive(Debug, Clone)]
pub enum PushReply {
    /// This status with this JSON body (and `Retry-After` seconds, if any).
    Json(u16, serde_json::Value, Option<u64>),
    /// Wait, then answer as the inner reply says (a client that gave up
    /// meanwhile gets nothing).
    After(Duration, Box<PushReply>),
    /// Close the connection without answering: a handler killed mid-request.
    Close,
}

impl PushReply {
    /// `200` with `body`.
    pub fn ok(body: serde_json::Value) -> Self {
        Self::Json(200, body, None)
    }
}

type Behaviour = dyn Fn(&PushRequest) -> PushReply + Send + Sync;

/// The test's push handler.
pub struct PushHandler {
    pub addr: std::net::SocketAddr,
    received: Arc<Mutex<Vec<PushRequest>>>,
    server: tokio::task::JoinHandle<()>,
}

impl PushHandler {
    /// A handler answering each request as `behaviour` says.
    pub async fn start(behaviour: impl Fn(&PushRequest) -> PushReply + Send + Sync + 'static) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("a port for the push handler");
        let addr = listener.local_addr().expect("the push handler's address");
        let received: Arc<Mutex<Vec<PushRequest>>> = Arc::default();
        let behaviour: Arc<Behaviour> = Arc::new(behaviour);
        let server = {
            let received = received.clone();
            tokio::spawn(async move {
                while let Ok((stream, _)) = listener.accept().await {
                    let (received, behaviour) = (received.clone(), behaviour.clone());
                    tokio::spawn(async move { serve(stream, &received, behaviour.as_ref()).await });
                }
            })
        };
        Self { addr, received, server }
    }

    /// `http://127.0.0.1:<port><path>`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Every request so far.
    pub fn received(&self) -> Vec<PushRequest> {
        self.received.lock().expect("push handler lock").clone()
    }

    /// The requests of one job so far.
    pub fn of_job(&self, job_id: &str) -> Vec<PushRequest> {
        self.received().into_iter().filter(|request| request.job_id() == job_id).collect()
    }

    /// Wait up to `timeout` for `count` requests in all.
    pub async fn wait_for(&self, count: usize, timeout: Duration) -> Vec<PushRequest> {
        eventually(&format!("{count} requests to the push handler"), timeout, || async {
            let received = self.received();
            (received.len() >= count).then_some(received)
        })
        .await
    }
}

impl Drop for PushHandler {
    fn drop(&mut self) {
        self.server.abort();
    }
}

/// Read one request, record it, answer it (or not).
async fn serve(mut stream: TcpStream, received: &Mutex<Vec<PushRequest>>, behaviour: &Behaviour) {
    let Some(request) = read_request(&mut stream).await else { return };
    received.lock().expect("push handler lock").push(request.clone());
    let mut reply = behaviour(&request);
    loop {
        match reply {
            PushReply::After(delay, inner) => {
                tokio::time::sleep(delay).await;
                reply = *inner;
            }
            PushReply::Close => return,
            PushReply::Json(status, body, retry_after) => {
                let body = body.to_string();
                let retry_after = retry_after.map(|seconds| format!("retry-after: {seconds}\r\n")).unwrap_or_default();
                let response = format!(
                    "HTTP/1.1 {status} Answer\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
                     connection: close\r\n{retry_after}\r\n{body}",
                    body.len()
                );
                let _ = stream.write_all(response.as_bytes()).await;
                let _ = stream.shutdown().await;
                return;
            }
        }
    }
}

/// The request's head and its `content-length` bytes of body.
async fn read_request(stream: &mut TcpStream) -> Option<PushRequest> {
    let mut buffer = Vec::new();
    let mut chunk = [0u8; 8192];
    let head_end = loop {
        let read = stream.read(&mut chunk).await.ok()?;
        if read == 0 {
            return None;
        }
        buffer.extend_from_slice(&chunk[..read]);
        if let Some(end) = buffer.windows(4).position(|window| window == b"\r\n\r\n") {
            break end;
        }
    };
    let head = String::from_utf8_lossy(&buffer[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let path = lines.next()?.split(' ').nth(1)?.to_owned();
    let headers: Vec<(String, String)> = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(name, value)| (name.trim().to_ascii_lowercase(), value.trim().to_owned()))
        .collect();
    let length: usize =
        headers.iter().find(|(name, _)| name == "content-length").and_then(|(_, v)| v.parse().ok()).unwrap_or(0);
    let mut body = buffer[head_end + 4..].to_vec();
    while body.len() < length {
        let read = stream.read(&mut chunk).await.ok()?;
        if read == 0 {
            return None;
        }
        body.extend_from_slice(&chunk[..read]);
    }
    Some(PushRequest { at: Instant::now(), path, headers, body })
}
