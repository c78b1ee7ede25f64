//! Hostile input at ingest's door, through the whole stack (G7, G8): each
//! case gets its typed answer and changes nothing, and then a command of the
//! canary tenant still goes all the way through.

use std::time::Duration;

use onceflow_tests::{ApiResponse, CANARY_TIMEOUT, DEV_API_KEY, TestEnv, TopicReader};
use serde_json::{Value, json};
use sqlx::PgPool;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
};

const PROBLEM: &str = "https://onceflow.dev/problems/";

async fn dev_jobs(stack_db: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM jobs WHERE tenant = 'dev'").fetch_one(stack_db).await.unwrap()
}

fn explain(response: &ApiResponse) -> String {
    format!("{} {}", response.status, String::from_utf8_lossy(&response.body))
}

/// Send `head`, then `body` piece by piece, on a fresh connection to `addr`,
/// and return everything the server answers until it closes the connection
/// or goes quiet. Sending stops as soon as the server answers, so it has read
/// all that was sent and closes cleanly (an unread remainder would make it
/// reset the connection, which can discard its answer).
async fn raw_exchange(addr: std::net::SocketAddr, head: &str, body: &[u8]) -> String {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    let mut buffer = [0u8; 4096];
    for piece in std::iter::once(&[][..]).chain(body.chunks(4096)) {
        if stream.write_all(piece).await.is_err() {
            break;
        }
        if let Ok(read) = tokio::time::timeout(Duration::from_millis(50), stream.read(&mut buffer)).await {
            if let Ok(n) = read {
                answer.extend_from_slice(&buffer[..n]);
            }
            break;
        }
    }
    loop {
        match tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buffer)).await {
            Ok(Ok(0) | Err(_)) | Err(_) => break,
            Ok(Ok(n)) => answer.extend_from_slice(&buffer[..n]),
        }
    }
    String::from_utf8_lossy(&answer).into_owned()
}

/// The status code and the body (after the blank line) of a raw answer.
fn status_and_body(answer: &str) -> (u16, Value) {
    let status = answer.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = answer.split_once("\r\n\r\n").map(|(_, body)| body).unwrap_or_default();
    (status, serde_json::from_str(body).unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn malformed_commands_are_refused_with_a_typed_problem_and_store_nothing() {
    let mut env = TestEnv::new();
    let stack = env.start_stack().await;
    let db = PgPool::connect(&env.database_url("ingest")).await.unwrap();
    let dev = stack.dev();
    let deposit_to = |callback_url: &str| json!({"type": "ledger.deposit", "payload": {"account_id": "a", "amount": 5}, "callback_url": callback_url});

    let hostile_callbacks = [
        ("nul", "http://127.0.0.1:9/h\u{0}x".to_owned(), "control character"),
        ("crlf", "http://127.0.0.1:9/h\r\nX-Injected: yes".to_owned(), "control character"),
        ("del", "http://127.0.0.1:9/h\u{7f}".to_owned(), "control character"),
        ("javascript", "javascript:alert(1)".to_owned(), "http or https"),
        ("relative", "/relative/hook".to_owned(), "absolute URL"),
        ("long", format!("http://127.0.0.1:9/{}", "a".repeat(5000)), "longer than 2048"),
        ("metadata", "http://169.254.169.254/latest/meta-data/".to_owned(), "cloud metadata"),
    ];
    for (name, url, explained) in hostile_callbacks {
        let response = dev.submit(&format!("hostile-callback-{name}"), &deposit_to(&url)).await;
        assert_eq!(response.status, 422, "{name}: {}", explain(&response));
        assert_eq!(response.problem_type(), format!("{PROBLEM}invalid-command"), "{name}");
        let detail = response.json()["detail"].as_str().unwrap_or_default().to_owned();
        assert!(detail.contains("callback_url") && detail.contains(explained), "{name}: {detail}");
        stack.canary_completes(CANARY_TIMEOUT).await;
    }

    // Deeper than serde_json's recursion limit (128): refused as malformed
    // JSON, with no stack overflow; within the limit, an invalid command.
    let nested = |depth: usize| format!("{}{}", "[".repeat(depth), "]".repeat(depth));
    let too_deep = format!(r#"{{"type": "ledger.deposit", "payload": {}}}"#, nested(30_000));
    let bare_brackets = "[".repeat(60_000);
    for (name, body, status, problem) in [
        ("too deep", too_deep, 400, "malformed-json"),
        ("unclosed brackets", bare_brackets, 400, "malformed-json"),
        (
            "deep but legal",
            format!(r#"{{"type": "ledger.deposit", "payload": {}}}"#, nested(100)),
            422,
            "invalid-command",
        ),
    ] {
        let response = dev
            .submit_raw(|r| {
                r.bearer_auth(DEV_API_KEY)
                    .header("idempotency-key", format!("nested-{}", name.replace(' ', "-")))
                    .header("content-type", "application/json")
                    .body(body)
            })
            .await;
        assert_eq!(response.status, status, "{name}: {}", explain(&response));
        assert_eq!(response.problem_type(), format!("{PROBLEM}{problem}"), "{name}");
        stack.canary_completes(CANARY_TIMEOUT).await;
    }

    let good = json!({"type": "ledger.open_account", "payload": {"account_id": "x", "currency": "EUR"}});
    for (name, value) in [
        ("space", b"has space".to_vec()),
        ("too long", vec![b'c'; 129]),
        ("empty", Vec::new()),
        ("non-ascii", "café".as_bytes().to_vec()),
        ("tab", b"a\tb".to_vec()),
    ] {
        let value = reqwest::header::HeaderValue::from_bytes(&value).unwrap();
        let response = dev
            .submit_raw(|r| {
                r.bearer_auth(DEV_API_KEY)
                    .header("idempotency-key", format!("correlation-{}", name.replace(' ', "-")))
                    .header("x-correlation-id", value)
                    .json(&good)
            })
            .await;
        assert_eq!(response.status, 400, "{name}: {}", explain(&response));
        assert_eq!(response.problem_type(), format!("{PROBLEM}invalid-correlation-id"), "{name}");
        stack.canary_completes(CANARY_TIMEOUT).await;
    }

    let unknown = dev.submit("unknown-type", &json!({"type": "ledger.mint", "payload": {"amount": 1}})).await;
    assert_eq!(unknown.status, 422, "{}", explain(&unknown));
    assert_eq!(unknown.problem_type(), format!("{PROBLEM}invalid-command"));
    stack.canary_completes(CANARY_TIMEOUT).await;

    assert_eq!(dev_jobs(&db).await, 0, "no refused command was stored");
    let keys: i64 =
        sqlx::query_scalar("SELECT count(*) FROM idempotency_keys WHERE tenant = 'dev'").fetch_one(&db).await.unwrap();
    assert_eq!(keys, 0, "no refused command recorded its key");
    db.close().await;
    env.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_callback_url_is_published_as_checked_normalised() {
    let mut env = TestEnv::new();
    let stack = env.start_stack().await;
    let body = json!({
        "type": "ledger.open_account",
        "payload": {"account_id": "normalised", "currency": "EUR"},
        "callback_url": "HTTP://127.0.0.1:80/a/../hook?x=1",
    });
    let accepted = stack.dev().submit("normalised-callback", &body).await;
    assert_eq!(accepted.status, 202, "{}", explain(&accepted));
    let job_id = accepted.json()["job_id"].as_str().unwrap().to_owned();
    let commands = TopicReader::new(&env.kafka, &env.kafka.topics().commands);
    let record = commands.find(Duration::from_secs(30), |r| r.headers["message-id"] == job_id).await;
    let command = onceflow_contracts::Command::decode(&record.headers["schema-id"], &record.payload).unwrap();
    assert_eq!(command.callback_url.as_deref(), Some("http://127.0.0.1/hook?x=1"));
    stack.canary_completes(CANARY_TIMEOUT).await;
    env.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bodies_are_read_only_after_authentication_and_only_up_to_the_limit() {
    let mut env = TestEnv::new();
    let stack = env.start_stack().await;
    let addr = stack.ingest.addr;
    let head = |auth: &str, length: &str| {
        format!(
            "POST /v1/commands HTTP/1.1\r\nhost: ingest\r\n{auth}idempotency-key: huge\r\n\
             content-type: application/json\r\n{length}\r\n"
        )
    };
    let authorization = format!("authorization: Bearer {DEV_API_KEY}\r\n");
    // 100 MB announced, 1 KB sent: the answer comes without waiting for the rest.
    let declared = "content-length: 100000000\r\n";
    let part = vec![b'['; 1024];

    let (status, body) = status_and_body(&raw_exchange(addr, &head("", declared), &part).await);
    assert_eq!(status, 401, "unauthenticated: refused before the body is read");
    assert_eq!(body["type"], format!("{PROBLEM}unauthorized"));
    stack.canary_completes(CANARY_TIMEOUT).await;

    let (status, body) = status_and_body(&raw_exchange(addr, &head(&authorization, declared), &part).await);
    assert_eq!(status, 413, "a declared length over max_body_bytes is refused before reading");
    assert_eq!(body["type"], format!("{PROBLEM}payload-too-large"));
    stack.canary_completes(CANARY_TIMEOUT).await;

    // No declared length (chunked): read up to the limit, then refused.
    let chunk = vec![b' '; 16 * 1024];
    let mut chunked = Vec::new();
    for _ in 0..8 {
        chunked.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        chunked.extend_from_slice(&chunk);
        chunked.extend_from_slice(b"\r\n");
    }
    let answer = raw_exchange(addr, &head(&authorization, "transfer-encoding: chunked\r\n"), &chunked).await;
    let (status, body) = status_and_body(&answer);
    assert_eq!(status, 413, "{answer}");
    assert_eq!(body["type"], format!("{PROBLEM}payload-too-large"));
    stack.canary_completes(CANARY_TIMEOUT).await;

    // Unknown routes and wrong methods on every service are problem+json.
    let http = reqwest::Client::new();
    for (service, path) in [(&stack.ingest, "/nowhere"), (&stack.processor, "/nowhere"), (&stack.notifier, "/nowhere")]
    {
        let response = http.get(service.url(path)).send().await.unwrap();
        assert_eq!(response.status(), 404, "{path}");
        assert_eq!(response.headers()["content-type"], "application/problem+json");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["type"], format!("{PROBLEM}not-found"));
    }
    for (service, path) in [(&stack.ingest, "/v1/commands"), (&stack.processor, "/livez"), (&stack.notifier, "/readyz")]
    {
        let response = http.delete(service.url(path)).send().await.unwrap();
        assert_eq!(response.status(), 405, "{path}");
        assert_eq!(response.headers()["content-type"], "application/problem+json");
        assert!(response.headers().contains_key("allow"), "{path}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["type"], format!("{PROBLEM}method-not-allowed"));
    }
    // Every service describes its HTTP surface.
    for service in [&stack.ingest, &stack.processor, &stack.notifier] {
        let document: Value = http.get(service.url("/openapi.json")).send().await.unwrap().json().await.unwrap();
        assert!(document["openapi"].as_str().is_some_and(|v| v.starts_with("3.")), "{document}");
        assert!(!document["paths"].as_object().is_none_or(serde_json::Map::is_empty), "{document}");
    }
    stack.canary_completes(CANARY_TIMEOUT).await;

    let db = PgPool::connect(&env.database_url("ingest")).await.unwrap();
    assert_eq!(dev_jobs(&db).await, 0);
    db.close().await;
    env.teardown().await;
}

/// A client that sends its request head a byte at a time, slower than the
/// header-read timeout allows, is cut off; everyone else is served meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_slowloris_client_is_cut_off_and_others_are_served() {
    let mut env = TestEnv::new();
    let stack = env.start_stack().await;
    let head = format!(
        "POST /v1/commands HTTP/1.1\r\nhost: ingest\r\nauthorization: Bearer {DEV_API_KEY}\r\n\
         idempotency-key: slow\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n"
    );
    let timeout = onceflow_runtime::http::HttpLimits::default().header_read_timeout();
    // Sending all of it would take far longer than the timeout.
    let pause = timeout * 4 / u32::try_from(head.len()).unwrap();
    assert!(pause * u32::try_from(head.len()).unwrap() > timeout * 3);
    let mut connections = Vec::new();
    for _ in 0..4 {
        let addr = stack.ingest.addr;
        let head = head.clone();
        connections.push(tokio::spawn(async move {
            let mut stream = TcpStream::connect(addr).await.unwrap();
            for (sent, byte) in head.bytes().enumerate() {
                if stream.write_all(&[byte]).await.is_err() {
                    return sent; // the server closed the connection
                }
                // A closed connection shows as a failed read before a write does.
                let mut probe = [0u8; 1];
                if let Ok(read) = tokio::time::timeout(pause, stream.read(&mut probe)).await {
                    assert!(matches!(read, Ok(0) | Err(_)), "the server answered a half-sent request");
                    return sent + 1;
                }
            }
            head.len()
        }));
    }
    // Meanwhile everyone else is served.
    stack.canary_completes(CANARY_TIMEOUT).await;
    for connection in connections {
        let sent = connection.await.unwrap();
        assert!(sent < head.len(), "cut off before its head was complete ({sent} of {} bytes)", head.len());
    }
    stack.canary_completes(CANARY_TIMEOUT).await;
    env.teardown().await;
}
