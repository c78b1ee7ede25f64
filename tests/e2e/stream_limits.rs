//! Fair share of the notifier's streams (G8), against the real notifier,
//! PostgreSQL and broker: each tenant's stream limits (streams, streams per
//! stream token, replays) refuse with `429` naming the limit and leave other
//! tenants alone; replays read through their own pool, so a storm of them
//! never starves the results consumer; a stream token's stream ends when it
//! expires or is revoked (on every instance); the token endpoint checks the
//! API key before it reads a body.

use std::{net::SocketAddr, time::Duration};

use onceflow_contracts::JobStatus;
use onceflow_tests::{
    ApiResponse, CANARY_API_KEY, CANARY_TENANT, DEV_API_KEY, Service, SseClient, TestEnv, canary_tenant_key,
    eventually, result_event, stream_token,
};
use serde_json::{Value, json};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpSocket, TcpStream},
};

const SECRET: &str = "a-test-secret-of-at-least-32-bytes!";
/// Generous: the first consumer-group join on the broker takes 20-45 s.
const FIRST_EVENT_TIMEOUT: Duration = Duration::from_secs(120);
const EVENT_TIMEOUT: Duration = Duration::from_secs(10);

/// A notifier serving `dev` and the canary tenant with `limits` as its
/// `[stream_limits]`, then `customize` applied.
async fn notifier(
    env: &mut TestEnv,
    limits: Value,
    customize: impl FnOnce(&mut onceflow_notifier::NotifierConfig),
) -> Service {
    env.start_notifier_with(|config| {
        config.tenants.push(canary_tenant_key());
        config.sse.token_secret = SECRET.to_owned();
        // A client that went away is noticed at the next heartbeat.
        config.sse.heartbeat_secs = 1;
        config.stream_limits = serde_json::from_value(limits).expect("stream limits");
        customize(config);
    })
    .await
}

/// Open a stream at `path` (holding a `?token=`, or with `api_key`),
/// resuming after `last_event_id`; the body is left unread.
async fn stream(
    notifier: &Service,
    path: &str,
    api_key: Option<&str>,
    last_event_id: Option<&str>,
) -> reqwest::Response {
    let mut request = reqwest::Client::new().get(notifier.url(path)).header("accept", "text/event-stream");
    if let Some(key) = api_key {
        request = request.bearer_auth(key);
    }
    if let Some(id) = last_event_id {
        request = request.header("last-event-id", id);
    }
    request.send().await.expect("the notifier answers")
}

/// `response` is a `429` problem naming `limit`, with `Retry-After: retry_after`.
async fn assert_refused(response: reqwest::Response, limit: &str, retry_after: &str) {
    // Before the body: an open stream's never ends.
    assert_eq!(response.status().as_u16(), 429, "{limit}: not refused");
    let retry = response.headers().get("retry-after").and_then(|v| v.to_str().ok()).map(str::to_owned);
    let media = response.headers().get("content-type").and_then(|v| v.to_str().ok()).map(str::to_owned);
    let body: Value = response.json().await.unwrap_or(Value::Null);
    assert_eq!(retry.as_deref(), Some(retry_after), "{limit}: {body}");
    assert_eq!(media.as_deref(), Some("application/problem+json"));
    assert_eq!(body["limit"], limit, "{body}");
    assert!(body["type"].as_str().unwrap_or_default().ends_with("/stream-limit"), "{body}");
    assert!(body["detail"].as_str().unwrap_or_default().contains(limit), "{body}");
}

/// `count` events of tenant `dev` of about `bytes` bytes each, written
/// straight into the notifier's events table (as if consumed long ago): a
/// backlog a replay must read. Returns the last one's id.
async fn store_backlog(env: &TestEnv, count: i32, bytes: i32) -> i64 {
    let pool = sqlx::PgPool::connect(&env.database_url("notifier")).await.expect("the notifier's database");
    sqlx::query(
        "INSERT INTO events (event_id, tenant, job_id, correlation_id, event_type, terminal, data)
         SELECT gen_random_uuid()::text, 'dev', gen_random_uuid(), 'backlog', 'job.succeeded', true,
                jsonb_build_object('pad', repeat('x', $2))
         FROM generate_series(1, $1)",
    )
    .bind(count)
    .bind(bytes)
    .execute(&pool)
    .await
    .expect("backlog stored");
    sqlx::query_scalar("SELECT max(seq) FROM events").fetch_one(&pool).await.expect("the last id")
}

/// A stream over a plain connection: its status, and the connection.
struct RawStream {
    status: u16,
    connection: TcpStream,
}

/// Send `request` (a whole head) on a new connection to `addr` and read the
/// answer's head. With `small_buffer`, the connection's receive buffer is a
/// few KiB, so a stream whose client reads nothing stops where it is.
async fn raw(addr: SocketAddr, request: &str, small_buffer: bool) -> RawStream {
    let socket = TcpSocket::new_v4().expect("a socket");
    if small_buffer {
        socket.set_recv_buffer_size(4096).expect("a small receive buffer");
    }
    let mut connection = socket.connect(addr).await.expect("the notifier accepts");
    connection.write_all(request.as_bytes()).await.expect("request sent");
    let mut head = Vec::new();
    let mut byte = [0; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(connection.read(&mut byte).await.expect("the answer"), 1, "closed before the head ended");
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let status = head.split(' ').nth(1).and_then(|status| status.parse().ok()).expect("a status line");
    RawStream { status, connection }
}

/// `GET /v1/events` as `dev` from `Last-Event-ID: after`, over [`raw`] with
/// a small buffer: a replay that stays where its client stops reading.
async fn raw_replay(addr: SocketAddr, after: i64) -> RawStream {
    let request = format!(
        "GET /v1/events HTTP/1.1\r\nhost: notifier\r\naccept: text/event-stream\r\n\
         authorization: Bearer {DEV_API_KEY}\r\nlast-event-id: {after}\r\n\r\n"
    );
    raw(addr, &request, true).await
}

/// The samples of `name{limit="..."}` in the `/metrics` text of `notifier`.
async fn refusals(notifier: &Service) -> Vec<String> {
    let text = reqwest::get(notifier.url("/metrics")).await.unwrap().text().await.unwrap();
    text.lines().filter(|line| line.starts_with("onceflow_sse_refused_total")).map(str::to_owned).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn beyond_a_stream_limit_an_open_is_refused_with_429_naming_it() {
    let mut env = TestEnv::new();
    let limits = json!({
        "max_streams": 3, "max_streams_per_token": 2, "max_replays": 1,
        "tenants": {"canary": {"max_streams": 5}},
    });
    let notifier = notifier(&mut env, limits, |_| {}).await;

    // One token: two streams, not three.
    let token = stream_token(&notifier, &json!({})).await.unwrap();
    let with_token = format!("/v1/events?token={token}");
    let first = stream(&notifier, &with_token, None, None).await;
    let second = stream(&notifier, &with_token, None, None).await;
    assert_eq!((first.status().as_u16(), second.status().as_u16()), (200, 200));
    assert_refused(stream(&notifier, &with_token, None, None).await, "max_streams_per_token", "5").await;

    // The tenant: three streams, whatever the credential.
    let by_key = stream(&notifier, "/v1/events", Some(DEV_API_KEY), None).await;
    assert_eq!(by_key.status(), 200);
    let other_token = stream_token(&notifier, &json!({})).await.unwrap();
    let with_other_token = format!("/v1/events?token={other_token}");
    assert_refused(stream(&notifier, &with_other_token, None, None).await, "max_streams", "5").await;
    assert_refused(stream(&notifier, "/v1/events", Some(DEV_API_KEY), None).await, "max_streams", "5").await;

    // Another tenant is not held back, and has its own (overridden) limit.
    let mut canary = Vec::new();
    for _ in 0..5 {
        let opened = stream(&notifier, "/v1/events", Some(CANARY_API_KEY), None).await;
        assert_eq!(opened.status(), 200, "the canary's streams");
        canary.push(opened);
    }
    assert_refused(stream(&notifier, "/v1/events", Some(CANARY_API_KEY), None).await, "max_streams", "5").await;

    // A stream that ends gives its place back.
    drop(first);
    let reopened = eventually("a closed stream's place to be given back", EVENT_TIMEOUT, || async {
        let opened = stream(&notifier, &with_other_token, None, None).await;
        (opened.status() == 200).then_some(opened)
    })
    .await;
    drop((second, by_key, reopened, canary));

    // Replays: one at a time for this tenant. A client that reads nothing
    // holds its replay where it is (10 MB of backlog, a 4 KiB buffer).
    let last = store_backlog(&env, 10_000, 1000).await;
    let stalled = eventually("the streams to be closed", EVENT_TIMEOUT, || async {
        let opened = raw_replay(notifier.addr, 0).await;
        (opened.status == 200).then_some(opened)
    })
    .await;
    assert_refused(stream(&notifier, "/v1/events", Some(DEV_API_KEY), Some("0")).await, "max_replays", "1").await;
    // A stream that starts live is no replay.
    let live = stream(&notifier, "/v1/events", Some(DEV_API_KEY), None).await;
    assert_eq!(live.status(), 200);
    drop(stalled.connection);
    let caught_up = eventually("the replay's place to be given back", EVENT_TIMEOUT, || async {
        let opened = stream(&notifier, "/v1/events", Some(DEV_API_KEY), Some(&last.to_string())).await;
        (opened.status() == 200).then_some(opened)
    })
    .await;
    drop((live, caught_up));

    // Counted by limit, without any tenant in the labels.
    let samples = refusals(&notifier).await;
    for limit in ["max_streams", "max_streams_per_token", "max_replays"] {
        assert!(
            samples.iter().any(|s| s.starts_with(&format!("onceflow_sse_refused_total{{limit=\"{limit}\"}}"))),
            "{samples:?}"
        );
    }
    assert!(
        samples.iter().all(|s| !s.contains("tenant") && !s.contains("dev") && !s.contains(CANARY_TENANT)),
        "{samples:?}"
    );
    env.teardown().await;
}

/// The figure of the goal: with one tenant holding its every stream (the
/// default limit), another opens streams at once and gets its events.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_tenant_at_its_limit_leaves_every_other_tenant_able_to_open_streams() {
    let mut env = TestEnv::new();
    let notifier = env.start_notifier_with(|config| config.tenants.push(canary_tenant_key())).await;
    let defaults: onceflow_notifier::NotifierConfig =
        onceflow_runtime::config::load(onceflow_notifier::config::DEFAULTS, None).expect("the defaults");
    let max_streams = defaults.stream_limits.default_limits().max_streams;

    let started = std::time::Instant::now();
    let mut held = Vec::new();
    for _ in 0..max_streams {
        let opened = stream(&notifier, "/v1/events", Some(DEV_API_KEY), None).await;
        assert_eq!(opened.status(), 200, "dev's stream {} of {max_streams}", held.len() + 1);
        held.push(opened);
    }
    let filling = started.elapsed();
    assert_refused(stream(&notifier, "/v1/events", Some(DEV_API_KEY), None).await, "max_streams", "5").await;

    let started = std::time::Instant::now();
    let mut canary = Vec::new();
    for _ in 0..50 {
        let opened = stream(&notifier, "/v1/events", Some(CANARY_API_KEY), None).await;
        assert_eq!(opened.status(), 200, "the canary opens while dev holds {max_streams}");
        canary.push(opened);
    }
    let canary_opens = started.elapsed();
    // From the start (nothing is stored yet), so the event below cannot come first.
    let mut watching = SseClient::connect_as(&notifier.url("/v1/events"), CANARY_API_KEY, Some("0")).await;
    let mut event = result_event(JobStatus::Succeeded, None);
    event.tenant = CANARY_TENANT.to_owned();
    env.publish_result(&event).await;
    let got = watching.next_event(FIRST_EVENT_TIMEOUT).await.expect("the canary's event");
    assert!(got.data.contains(&event.event_id), "{}", got.data);
    eprintln!(
        "figure: dev opened its {max_streams} streams in {filling:?}; its next was refused (429 max_streams); \
         the canary then opened 50 streams in {canary_opens:?} ({:?} each) and got its event",
        canary_opens / 50
    );
    drop((held, canary));
    env.teardown().await;
}

/// Replays that take long (here each is held at its first read by a lock
/// the test takes, standing in for a database slow under their load) hold
/// connections of the streams' own pool only: however many there are, the
/// results consumer stores another tenant's events and they stream at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replays_that_take_long_never_starve_the_results_consumer() {
    const REPLAYS: usize = 100;
    let mut env = TestEnv::new();
    // No stream limit in the way: only the pools keep the consumer apart.
    let limits = json!({"max_streams": 100_000, "max_streams_per_token": 100_000, "max_replays": 100_000});
    let notifier = notifier(&mut env, limits, |config| {
        // Three of them are the listeners' (hub, relay, webhook worker).
        config.database.max_connections = 8;
        config.sse.pool_connections = 2;
    })
    .await;
    store_backlog(&env, 1000, 100).await;
    let mut canary = SseClient::connect_as(&notifier.url("/v1/events"), CANARY_API_KEY, None).await;
    let canary_event = || {
        let mut event = result_event(JobStatus::Succeeded, None);
        event.tenant = CANARY_TENANT.to_owned();
        event
    };
    // Warm: the consumer has joined its group.
    let first = canary_event();
    env.publish_result(&first).await;
    assert!(canary.next_event(FIRST_EVENT_TIMEOUT).await.expect("the first event").data.contains(&first.event_id));

    // Every replay now waits at its first read (the retention mark).
    let database = sqlx::PgPool::connect(&env.database_url("notifier")).await.unwrap();
    let mut lock = database.begin().await.unwrap();
    sqlx::query("LOCK TABLE events_retention IN ACCESS EXCLUSIVE MODE").execute(&mut *lock).await.unwrap();
    let mut replays = Vec::new();
    for _ in 0..REPLAYS {
        let replay = stream(&notifier, "/v1/events", Some(DEV_API_KEY), Some("0")).await;
        assert_eq!(replay.status(), 200);
        replays.push(replay);
    }
    let waiting = eventually("the replays to wait for the database", EVENT_TIMEOUT, || async {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'",
        )
        .fetch_one(&database)
        .await
        .unwrap();
        (waiting >= 2).then_some(waiting)
    })
    .await;

    // Meanwhile the canary's new events stream promptly.
    let mut latencies = Vec::new();
    for _ in 0..3 {
        let event = canary_event();
        let started = std::time::Instant::now();
        env.publish_result(&event).await;
        let got = canary.next_event(Duration::from_secs(20)).await.expect("the canary's event");
        assert!(got.data.contains(&event.event_id), "{}", got.data);
        latencies.push(started.elapsed());
    }
    lock.rollback().await.unwrap();
    eprintln!("figure: with {REPLAYS} replays of dev held ({waiting} queries waiting), canary latencies {latencies:?}");
    let slowest = latencies.iter().max().copied().unwrap_or_default();
    // Publishing (a new producer each time) is most of it: on a shared pool
    // the canary waits for the pool's acquire timeout (5 s in the tests).
    assert!(slowest < Duration::from_secs(3), "the canary waited {slowest:?} behind dev's replays: {latencies:?}");
    drop(replays);
    env.teardown().await;
}

/// One `dev` event stored straight into the events table (the hub sends it
/// live, as if the results consumer had stored it); returns its id.
async fn store_event(env: &TestEnv) -> i64 {
    store_backlog(env, 1, 10).await
}

/// The next event of `stream` is `stream.closed` for `reason`, resuming
/// after `last`, and then the stream ends.
async fn assert_closed(stream: &mut SseClient, reason: &str, last: i64) {
    let closed = stream.next_event(EVENT_TIMEOUT).await.expect("a stream.closed event");
    assert_eq!(closed.event, "stream.closed", "{}", closed.data);
    let data: Value = serde_json::from_str(&closed.data).unwrap();
    assert_eq!((data["reason"].as_str(), data["resume_after"].as_i64()), (Some(reason), Some(last)), "{data}");
    assert!(stream.next_event(EVENT_TIMEOUT).await.is_none(), "the stream ends");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_token_stream_ends_when_the_token_expires_or_is_revoked_on_every_instance() {
    let mut env = TestEnv::new();
    let limits = json!({"max_streams": 256, "max_streams_per_token": 4, "max_replays": 16});
    let one = notifier(&mut env, limits.clone(), |_| {}).await;
    // A second instance on the same database.
    let two = notifier(&mut env, limits, |_| {}).await;
    let token_stream = |notifier: &Service, token: &str, after: Option<i64>| {
        let url = notifier.url(&format!("/v1/events?token={token}"));
        async move { SseClient::connect_with_url_token(&url, after.map(|a| a.to_string()).as_deref()).await }
    };

    // Expiry: the stream ends with the token, saying where to resume.
    let short = stream_token(&one, &json!({"ttl_secs": 2})).await.unwrap();
    let opened = std::time::Instant::now();
    // From the start (there is nothing yet): a stream from "now" could start
    // after the event below.
    let mut expiring = token_stream(&one, &short, Some(0)).await;
    let seen = store_event(&env).await;
    assert_eq!(expiring.next_event(EVENT_TIMEOUT).await.expect("an event").id, seen.to_string());
    assert_closed(&mut expiring, "token_expired", seen).await;
    assert!(opened.elapsed() < Duration::from_secs(4), "closed at expiry: {:?}", opened.elapsed());
    let refused = ApiResponse::send(reqwest::Client::new().get(one.url(&format!("/v1/events?token={short}")))).await;
    assert_eq!(refused.status, 401);
    // A new token resumes where the old one stopped.
    let missed = store_event(&env).await;
    let fresh = stream_token(&one, &json!({})).await.unwrap();
    let mut resumed = token_stream(&one, &fresh, Some(seen)).await;
    assert_eq!(resumed.next_event(EVENT_TIMEOUT).await.expect("the missed event").id, missed.to_string());

    // Revocation: only with the API key.
    let anonymous = ApiResponse::send(reqwest::Client::new().post(one.url("/v1/stream-tokens/revoke"))).await;
    assert_eq!((anonymous.status, anonymous.problem_type().ends_with("unauthorized")), (401, true));
    let mut on_two = token_stream(&two, &fresh, None).await;
    let mut by_key = SseClient::connect(&two.url("/v1/events"), Some(&missed.to_string())).await;
    let revoked =
        ApiResponse::send(reqwest::Client::new().post(one.url("/v1/stream-tokens/revoke")).bearer_auth(DEV_API_KEY))
            .await;
    assert_eq!(revoked.status, 200, "{revoked:?}");
    assert_eq!((revoked.json()["tenant"].as_str(), revoked.json()["epoch"].as_i64()), (Some("dev"), Some(1)));
    // Streams open with tokens from before end on both instances...
    assert_closed(&mut resumed, "token_revoked", missed).await;
    assert_closed(&mut on_two, "token_revoked", missed).await;
    // ... and the tokens open nothing any more, on either.
    for notifier in [&one, &two] {
        let refused =
            ApiResponse::send(reqwest::Client::new().get(notifier.url(&format!("/v1/events?token={fresh}")))).await;
        assert_eq!(refused.status, 401);
        assert!(refused.json()["detail"].as_str().unwrap_or_default().contains("revoked"), "{refused:?}");
    }
    // A token issued afterwards works, and the API key's stream lives on.
    let after = stream_token(&two, &json!({})).await.unwrap();
    let mut new_stream = token_stream(&one, &after, Some(missed)).await;
    let later = store_event(&env).await;
    assert_eq!(new_stream.next_event(EVENT_TIMEOUT).await.expect("an event").id, later.to_string());
    assert_eq!(by_key.next_event(EVENT_TIMEOUT).await.expect("an event").id, later.to_string());
    env.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_endpoint_refuses_a_missing_key_before_reading_the_body() {
    let mut env = TestEnv::new();
    let notifier = env.start_notifier().await;
    // A body announced but never sent: 401 at once, not a wait for it.
    let head = "POST /v1/stream-tokens HTTP/1.1\r\nhost: notifier\r\ncontent-type: application/json\r\n\
                content-length: 1000\r\n\r\n{\"ttl_secs\": ";
    let answered = tokio::time::timeout(Duration::from_secs(3), raw(notifier.addr, head, false))
        .await
        .expect("an answer without the body");
    assert_eq!(answered.status, 401);
    // With a key, the body is awaited as before.
    let keyed = format!(
        "POST /v1/stream-tokens HTTP/1.1\r\nhost: notifier\r\nauthorization: Bearer {DEV_API_KEY}\r\n\
         content-type: application/json\r\ncontent-length: 2\r\n\r\n{{}}"
    );
    assert_eq!(raw(notifier.addr, &keyed, false).await.status, 200);
    env.teardown().await;
}
