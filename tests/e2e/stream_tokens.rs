//! Browser streaming done safely, against the real notifier: stream tokens
//! are issued for the API key in the header, open the tenant's streams in
//! `?token=` (a job-scoped one only its job's), and expire; the API key in a
//! URL is refused; CORS answers configured origins only; and neither a token
//! nor any query string reaches the notifier's spans or logs.

use std::time::Duration;

use onceflow_contracts::JobStatus;
use onceflow_notifier::tokens::{Claims, StreamTokens};
use onceflow_tests::{
    ApiResponse, DEV_API_KEY, OtlpReceiver, ServiceProcess, SseClient, TestEnv, development_config, eventually,
    result_event, stream_token,
};
use serde_json::json;

const SECRET: &str = "a-test-secret-of-at-least-32-bytes!";
const EVENT_TIMEOUT: Duration = Duration::from_secs(30);

fn succeeded() -> onceflow_contracts::ResultEvent {
    result_event(JobStatus::Succeeded, None)
}

async fn get(url: &str) -> ApiResponse {
    ApiResponse::send(reqwest::Client::new().get(url)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_token_opens_its_tenants_streams_and_a_job_token_only_its_job() {
    let mut env = TestEnv::new();
    let notifier = env.start_notifier_with(|config| config.sse.token_secret = SECRET.to_owned()).await;

    // Issuing: the API key in the header only; a bad body changes nothing.
    let http = reqwest::Client::new();
    let anonymous = ApiResponse::send(http.post(notifier.url("/v1/stream-tokens"))).await;
    assert_eq!((anonymous.status, anonymous.problem_type().ends_with("unauthorized")), (401, true));
    for (body, status, problem) in [
        (json!({"ttl_secs": 0}), 400, "invalid-ttl"),
        (json!({"ttl_secs": 3601}), 400, "invalid-ttl"),
        (json!({"job_id": "not-a-uuid"}), 400, "invalid-job-id"),
        (json!({"scope": "write"}), 422, "unprocessable-content"),
    ] {
        let refused = stream_token(&notifier, &body).await.expect_err("refused");
        assert_eq!(refused.status, status, "{body}: {refused:?}");
        assert!(refused.problem_type().ends_with(problem), "{body}: {refused:?}");
    }
    let bare = ApiResponse::send(http.post(notifier.url("/v1/stream-tokens")).bearer_auth(DEV_API_KEY)).await;
    assert_eq!(bare.status, 200, "no body at all: {bare:?}");
    assert_eq!(bare.header("cache-control"), Some("no-store"));
    let issued = bare.json();
    assert_eq!((issued["tenant"].as_str(), issued["expires_in"].as_u64()), (Some("dev"), Some(600)), "{issued}");
    let tenant_token = issued["token"].as_str().unwrap().to_owned();

    // A tenant token opens the tenant's stream, as a browser would open it.
    // (From the start, so that events stored before it subscribes count.)
    let mut tenant_stream =
        SseClient::connect_with_url_token(&notifier.url(&format!("/v1/events?token={tenant_token}")), Some("0")).await;
    let (job_a, job_b) = (succeeded(), succeeded());
    env.publish_result(&job_a).await;
    env.publish_result(&job_b).await;
    let mut seen = Vec::new();
    for _ in 0..2 {
        let event = tenant_stream.next_event(EVENT_TIMEOUT).await.expect("an event");
        seen.push(
            serde_json::from_str::<serde_json::Value>(&event.data).unwrap()["job_id"].as_str().unwrap().to_owned(),
        );
    }
    seen.sort();
    let mut expected = vec![job_a.job_id.clone(), job_b.job_id.clone()];
    expected.sort();
    assert_eq!(seen, expected);

    // A token of job A: A's streams only.
    let job_token = stream_token(&notifier, &json!({"job_id": job_a.job_id, "ttl_secs": 60})).await.unwrap();
    let mut job_stream = SseClient::connect_with_url_token(
        &notifier.url(&format!("/v1/jobs/{}/events?token={job_token}", job_a.job_id)),
        None,
    )
    .await;
    let event = job_stream.next_event(EVENT_TIMEOUT).await.expect("job A's event");
    assert!(event.data.contains(&job_a.job_id), "{}", event.data);
    for url in [
        format!("/v1/jobs/{}/events?token={job_token}", job_b.job_id),
        format!("/v1/events?token={job_token}&job_id={}", job_b.job_id),
    ] {
        let refused = get(&notifier.url(&url)).await;
        assert_eq!(refused.status, 403, "{url}");
        assert!(refused.problem_type().ends_with("token-scope"), "{refused:?}");
    }
    // On the tenant stream without a filter, the job token still sees only A:
    // B's second event is skipped, A's second arrives.
    let mut scoped_tenant_stream =
        SseClient::connect_with_url_token(&notifier.url(&format!("/v1/events?token={job_token}")), None).await;
    let first = scoped_tenant_stream.next_event(EVENT_TIMEOUT).await.expect("A's first event");
    assert!(first.data.contains(&job_a.job_id), "{}", first.data);
    let mut b_again = succeeded();
    b_again.job_id.clone_from(&job_b.job_id);
    let mut a_again = succeeded();
    a_again.job_id.clone_from(&job_a.job_id);
    env.publish_result(&b_again).await;
    env.publish_result(&a_again).await;
    let second = scoped_tenant_stream.next_event(EVENT_TIMEOUT).await.expect("A's second event");
    assert!(second.data.contains(&a_again.event_id), "only job A's events: {}", second.data);

    // Expired, altered, or the API key itself in the URL: 401, saying why.
    let tokens = StreamTokens::from_config(SECRET, onceflow_notifier::tokens::SETTING).unwrap().0;
    let expired = tokens.issue(&Claims { tenant: "dev".to_owned(), job_id: None, exp: 1, epoch: 0 });
    // One character of the signature changed (not the last, whose low bits
    // base64 ignores).
    let cut = tenant_token.len() - 10;
    let swapped = if &tenant_token[cut..=cut] == "A" { "B" } else { "A" };
    let altered = format!("{}{swapped}{}", &tenant_token[..cut], &tenant_token[cut + 1..]);
    for (query, detail) in [
        (format!("token={expired}"), "expired"),
        (format!("token={altered}"), "signature"),
        ("token=dev-onceflow-key".to_owned(), "malformed"),
        (format!("access_token={DEV_API_KEY}"), "stream token"),
    ] {
        let refused = get(&notifier.url(&format!("/v1/events?{query}"))).await;
        assert_eq!(refused.status, 401, "{query}");
        let detail_text = refused.json()["detail"].as_str().unwrap_or_default().to_owned();
        assert!(detail_text.contains(detail), "{query}: {detail_text}");
    }
    // The header still works for the CLI and servers; a token is no API key.
    let listing = ApiResponse::send(
        http.get(notifier.url(&format!("/v1/jobs/{}/deliveries", job_a.job_id))).bearer_auth(&tenant_token),
    )
    .await;
    assert_eq!(listing.status, 401, "a token opens streams only");
    drop((tenant_stream, job_stream, scoped_tenant_stream));
    env.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_answers_the_configured_origins_only() {
    const ALLOWED: &str = "http://app.example.test:3000";
    let mut env = TestEnv::new();
    let notifier = env.start_notifier_with(|config| config.sse.cors_origins = vec![ALLOWED.to_owned()]).await;
    let http = reqwest::Client::new();
    let preflight = |path: &str, origin: &str, method: &str, headers: &str| {
        ApiResponse::send(
            http.request(reqwest::Method::OPTIONS, notifier.url(path))
                .header("origin", origin)
                .header("access-control-request-method", method)
                .header("access-control-request-headers", headers),
        )
    };

    for (path, method, headers) in
        [("/v1/events", "GET", "last-event-id"), ("/v1/stream-tokens", "POST", "authorization,content-type")]
    {
        let allowed = preflight(path, ALLOWED, method, headers).await;
        assert!(allowed.status < 300, "{path}: {allowed:?}");
        assert_eq!(allowed.header("access-control-allow-origin"), Some(ALLOWED), "{path}");
        let allowed_methods = allowed.header("access-control-allow-methods").unwrap_or_default().to_owned();
        assert!(allowed_methods.contains(method), "{path}: {allowed_methods}");
        let allowed_headers = allowed.header("access-control-allow-headers").unwrap_or_default().to_owned();
        assert!(headers.split(',').all(|h| allowed_headers.contains(h)), "{path}: {allowed_headers}");

        let denied = preflight(path, "https://evil.example.test", method, headers).await;
        assert_eq!(denied.header("access-control-allow-origin"), None, "{path}: {denied:?}");
    }

    // The actual cross-origin requests carry the header too.
    let token = ApiResponse::send(
        http.post(notifier.url("/v1/stream-tokens")).header("origin", ALLOWED).bearer_auth(DEV_API_KEY),
    )
    .await;
    assert_eq!(token.header("access-control-allow-origin"), Some(ALLOWED));
    let stream = http
        .get(notifier.url(&format!("/v1/events?token={}", token.json()["token"].as_str().unwrap())))
        .header("origin", ALLOWED)
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), 200);
    assert_eq!(stream.headers()["access-control-allow-origin"], ALLOWED);
    drop(stream);

    // Other endpoints get no CORS at all.
    let deliveries = preflight("/v1/webhook-endpoints", ALLOWED, "GET", "authorization").await;
    assert_eq!(deliveries.header("access-control-allow-origin"), None, "{deliveries:?}");

    // Without configured origins, nothing is allowed.
    let plain = env.start_notifier().await;
    let refused = ApiResponse::send(
        http.request(reqwest::Method::OPTIONS, plain.url("/v1/events"))
            .header("origin", ALLOWED)
            .header("access-control-request-method", "GET"),
    )
    .await;
    assert_eq!(refused.header("access-control-allow-origin"), None, "{refused:?}");
    env.teardown().await;
}

/// The notifier binary exports its spans to a receiver of the test and logs
/// at debug to a file: a stream opened with a token, and refused requests
/// with tokens and an API key in the URL, leave neither in any span
/// attribute nor in any log line; the request spans are there (by path).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_and_query_strings_stay_out_of_spans_and_logs() {
    let mut env = TestEnv::new();
    let receiver = OtlpReceiver::start().await;
    let database = env.database("notifier");
    let addr = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let log = env.scratch_dir().join("onceflow-notifier.log");
    let filter = "debug,sqlx=warn,rdkafka=warn,h2=warn,hyper=warn,reqwest=warn";
    let _notifier = ServiceProcess::spawn(
        "onceflow-notifier",
        &[
            ("ONCEFLOW_LISTEN", addr.to_string()),
            ("ONCEFLOW_CONFIG", development_config("notifier").display().to_string()),
            ("ONCEFLOW_DATABASE__URL", database.url.clone()),
            ("ONCEFLOW_KAFKA__BROKERS", env.kafka.brokers.clone()),
            ("ONCEFLOW_KAFKA__TOPIC_PREFIX", env.kafka.topic_prefix.clone()),
            ("ONCEFLOW_KAFKA__PARTITIONS", env.kafka.partitions.to_string()),
            ("ONCEFLOW_GROUP_ID", format!("notifier-{}", env.id)),
            ("ONCEFLOW_SSE__TOKEN_SECRET", SECRET.to_owned()),
            ("ONCEFLOW_TELEMETRY__LOG_FILTER", filter.to_owned()),
            ("RUST_LOG", filter.to_owned()),
            ("ONCEFLOW_TELEMETRY__OTLP_ENDPOINT", receiver.traces_url()),
            ("OTEL_BSP_SCHEDULE_DELAY", "100".to_owned()),
        ],
        &log,
    );
    let base = format!("http://{addr}");
    eventually("the notifier to answer", Duration::from_secs(60), || async {
        reqwest::get(format!("{base}/livez")).await.ok().filter(|r| r.status().is_success()).map(drop)
    })
    .await;

    let http = reqwest::Client::new();
    let issued =
        ApiResponse::send(http.post(format!("{base}/v1/stream-tokens")).bearer_auth(DEV_API_KEY).json(&json!({})))
            .await;
    let token = issued.json()["token"].as_str().expect("a token").to_owned();
    let stream = http.get(format!("{base}/v1/events?token={token}")).send().await.unwrap();
    assert_eq!(stream.status(), 200);
    drop(stream);
    let forged = format!("{token}forged");
    for query in [format!("token={forged}"), format!("access_token={DEV_API_KEY}")] {
        let refused = http.get(format!("{base}/v1/events?{query}")).send().await.unwrap();
        assert_eq!(refused.status(), 401, "{query}");
    }

    // Four requests to /v1/events: the refused two and the stream (its span
    // ends when the stream does).
    let spans = eventually("the request spans to be exported", Duration::from_secs(60), || async {
        let spans = receiver.spans();
        let requests = spans.iter().filter(|span| span.attribute("url.path") == Some("/v1/events")).count();
        (requests >= 3).then_some(spans)
    })
    .await;
    for span in &spans {
        for (key, value) in &span.attributes {
            for secret in [&token, &forged, &DEV_API_KEY.to_owned()] {
                assert!(
                    !value.contains(secret.as_str()),
                    "span {} attribute {key} holds a credential: {value}",
                    span.name
                );
            }
        }
        assert_eq!(span.attribute("url.query"), None, "span {} records the query", span.name);
    }
    let logged = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(!logged.is_empty(), "the notifier logs at debug");
    for secret in [&token, &forged, &DEV_API_KEY.to_owned()] {
        assert!(!logged.contains(secret.as_str()), "a credential in the log {}", log.display());
    }
    env.teardown().await;
}
