//! The notifier's streams against the real PostgreSQL and broker: resumption
//! across restarts, the retention gap, and a thousand subscribers.

use std::{collections::HashMap, time::Duration};

use onceflow_contracts::JobStatus;
use onceflow_tests::{ServiceProcess, SseClient, TestEnv, eventually, result_event};
use serde_json::Value;

/// sha256("acme-key"): a second tenant.
const ACME_KEY_SHA256: &str = "afacab3575137afa4e00d9cbcafcb14c9ae25f779d964eb0ea5b2c4eb5dfd163";

fn event_for(tenant: &str) -> onceflow_contracts::ResultEvent {
    let mut event = result_event(JobStatus::Succeeded, None);
    event.tenant = tenant.to_owned();
    event
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_resumed_stream_misses_nothing_and_repeats_nothing_across_a_notifier_restart() {
    let mut env = TestEnv::new();
    let first = env.start_notifier().await;
    let events: Vec<_> = (0..5).map(|_| event_for("dev")).collect();

    let mut stream = SseClient::connect(&first.url("/v1/events"), Some("0")).await;
    for event in &events[..3] {
        env.publish_result(event).await;
    }
    let mut seen = Vec::new();
    for _ in 0..2 {
        let received = stream.next_event(Duration::from_secs(60)).await.expect("an event");
        seen.push(received);
    }
    let resume_from = seen[1].id.clone();
    drop(stream);
    first.stop().await;

    // While no notifier runs, more results arrive, and one is redelivered.
    for event in &events[3..] {
        env.publish_result(event).await;
    }
    env.publish_result(&events[2]).await;

    let second = env.start_notifier().await;
    let mut resumed = SseClient::connect(&second.url("/v1/events"), Some(&resume_from)).await;
    // Results of different jobs lie on different partitions, so their order
    // is the notifier's (the ids); what must hold is: every event after the
    // resume point, each once.
    let event_id = |event: &eventsource_stream::Event| {
        serde_json::from_str::<Value>(&event.data).unwrap()["event_id"].as_str().unwrap().to_owned()
    };
    let mut expected: Vec<String> = events.iter().map(|e| e.event_id.clone()).collect();
    expected.retain(|id| !seen.iter().any(|event| event_id(event) == *id));
    let mut ids = vec![resume_from.parse::<i64>().unwrap()];
    let mut received = Vec::new();
    for _ in 0..expected.len() {
        let event = resumed.next_event(Duration::from_secs(60)).await.expect("an event after the resume point");
        received.push(event_id(&event));
        ids.push(event.id.parse().unwrap());
    }
    assert!(ids.windows(2).all(|pair| pair[0] < pair[1]), "ids increase: {ids:?}");
    let mut sorted = received.clone();
    sorted.sort();
    expected.sort();
    assert_eq!(sorted, expected, "every later event, none missed, none twice");
    // Nothing else: the redelivered event is not streamed twice.
    let extra = tokio::time::timeout(Duration::from_secs(3), resumed.next_event(Duration::from_secs(30))).await;
    assert!(extra.is_err(), "no duplicate after the last event: {extra:?}");
    second.stop().await;
    env.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resuming_from_a_pruned_id_is_told_about_the_gap() {
    let mut env = TestEnv::new();
    let notifier = env
        .start_notifier_with(|config| {
            config.sse.retention_secs = 0;
            config.sse.prune_interval_secs = std::num::NonZeroU64::MIN;
        })
        .await;
    for _ in 0..2 {
        env.publish_result(&event_for("dev")).await;
    }
    let db = sqlx::PgPool::connect(&env.database_url("notifier")).await.unwrap();
    eventually("both events to be stored and pruned", Duration::from_secs(90), || async {
        let pruned: i64 =
            sqlx::query_scalar("SELECT pruned_through FROM events_retention").fetch_one(&db).await.unwrap();
        (pruned >= 2).then_some(())
    })
    .await;
    let mut stream = SseClient::connect(&notifier.url("/v1/events"), Some("0")).await;
    let gap = stream.next_event(Duration::from_secs(10)).await.expect("a gap event");
    assert_eq!(gap.event, "stream.gap");
    let data: Value = serde_json::from_str(&gap.data).unwrap();
    assert_eq!(data["requested_after"], 0);
    assert!(data["pruned_through"].as_i64().unwrap() >= 2);
    db.close().await;
    env.teardown().await;
}

/// Resident memory of a process, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc status");
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_thousand_subscribers_each_receive_every_event_of_their_own_tenant() {
    const SUBSCRIBERS: usize = 1000;
    const EVENTS_PER_TENANT: usize = 3;
    let mut env = TestEnv::new();
    let database = env.database("notifier");
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let log = std::env::temp_dir().join(format!("onceflow-notifier-{}.log", env.id));
    let tenants = format!(
        r#"[{{tenant="dev",api_key_sha256="074c2219380b418dfc50cabcb6c6ab84ba8ec229709d90fdd6932426b3423478"}},{{tenant="acme",api_key_sha256="{ACME_KEY_SHA256}"}}]"#
    );
    let notifier = ServiceProcess::spawn(
        "onceflow-notifier",
        &[
            ("ONCEFLOW_LISTEN", format!("127.0.0.1:{port}")),
            ("ONCEFLOW_DATABASE__URL", database.url.clone()),
            ("ONCEFLOW_KAFKA__BROKERS", env.kafka.brokers.clone()),
            ("ONCEFLOW_KAFKA__TOPIC_PREFIX", env.kafka.topic_prefix.clone()),
            ("ONCEFLOW_KAFKA__PARTITIONS", env.kafka.partitions.to_string()),
            ("ONCEFLOW_GROUP_ID", format!("notifier-{}", env.id)),
            ("ONCEFLOW_TENANTS", tenants),
            // Each tenant opens 500 streams at once, all resuming: over the
            // default limits (256 streams, 16 replays).
            ("ONCEFLOW_STREAM_LIMITS__MAX_STREAMS", SUBSCRIBERS.to_string()),
            ("ONCEFLOW_STREAM_LIMITS__MAX_REPLAYS", SUBSCRIBERS.to_string()),
            ("ONCEFLOW_TELEMETRY__LOG_FILTER", "warn".to_owned()),
        ],
        &log,
    );
    let base = format!("http://127.0.0.1:{port}");
    eventually("the notifier to be ready", Duration::from_secs(60), || async {
        reqwest::get(format!("{base}/livez")).await.ok().filter(|r| r.status().is_success()).map(drop)
    })
    .await;
    let idle_before = rss_kib(notifier.id());

    // Half the subscribers are tenant dev, half acme, all from the beginning.
    let subscribers = futures::future::join_all((0..SUBSCRIBERS).map(|n| {
        let url = format!("{base}/v1/events");
        async move {
            let (tenant, key) = if n % 2 == 0 { ("dev", "dev-onceflow-key") } else { ("acme", "acme-key") };
            (tenant, SseClient::connect_as(&url, key, Some("0")).await)
        }
    }))
    .await;
    let connected = rss_kib(notifier.id());

    let mut published: HashMap<&str, Vec<String>> = HashMap::new();
    for tenant in ["dev", "acme"] {
        for _ in 0..EVENTS_PER_TENANT {
            let event = event_for(tenant);
            published.entry(tenant).or_default().push(event.event_id.clone());
            env.publish_result(&event).await;
        }
    }

    let outcomes: Vec<(&str, Vec<String>)> =
        futures::future::join_all(subscribers.into_iter().map(|(tenant, mut stream)| {
            let expected = published[tenant].clone();
            async move {
                let mut got = Vec::new();
                for _ in 0..EVENTS_PER_TENANT {
                    let event = stream.next_event(Duration::from_secs(120)).await.expect("an event");
                    let data: Value = serde_json::from_str(&event.data).unwrap();
                    got.push(data["event_id"].as_str().unwrap().to_owned());
                }
                // Jobs' results lie on different partitions: the order is the
                // notifier's, the same for every subscriber; the set is the tenant's.
                let mut sorted = got.clone();
                sorted.sort();
                let mut expected = expected;
                expected.sort();
                assert_eq!(sorted, expected, "a {tenant} subscriber gets exactly its tenant's events");
                (tenant, got)
            }
        }))
        .await;
    for tenant in ["dev", "acme"] {
        let orders: std::collections::HashSet<&Vec<String>> =
            outcomes.iter().filter(|(t, _)| *t == tenant).map(|(_, got)| got).collect();
        assert_eq!(orders.len(), 1, "every {tenant} subscriber sees the events in the same order");
    }
    let per_subscriber = connected.saturating_sub(idle_before) as f64 / SUBSCRIBERS as f64;
    println!(
        "notifier RSS: {idle_before} KiB idle, {connected} KiB with {SUBSCRIBERS} idle subscribers \
         ({per_subscriber:.1} KiB each); {} subscribers got all their events",
        outcomes.len()
    );
    drop(outcomes);
    drop(notifier);
    env.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_key_in_a_url_and_strangers_get_401() {
    let mut env = TestEnv::new();
    let notifier = env.start_notifier().await;
    let client = reqwest::Client::new();
    // Browsers use stream tokens (tests/e2e/stream_tokens.rs); the API key
    // itself is refused in a URL, where proxies would log it.
    for url in [
        "/v1/events",
        "/v1/events?access_token=dev-onceflow-key",
        "/v1/events?access_token=nope",
        "/v1/jobs/00000000-0000-7000-8000-000000000000/events",
        "/v1/jobs/00000000-0000-7000-8000-000000000000/events?access_token=dev-onceflow-key",
    ] {
        let refused = client.get(notifier.url(url)).send().await.unwrap();
        assert_eq!(refused.status(), 401, "{url}");
        assert_eq!(refused.headers()["content-type"], "application/problem+json");
    }
    env.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_slow_subscriber_is_cut_off_with_stream_lagged_and_resumes_without_loss() {
    const EVENTS: usize = 2000;
    let mut env = TestEnv::new();
    let notifier = env.start_notifier_with(|config| config.sse.buffer = 8).await;
    // Subscribes to the live feed and then reads nothing for a while.
    let mut slow = SseClient::connect(&notifier.url("/v1/events"), None).await;

    // Large events, so the unread ones fill the socket buffers and the
    // notifier can no longer write to this subscriber.
    let producer = onceflow_tests::kafka_producer(&env.kafka);
    let topic = env.kafka.topics().results;
    let padding = "x".repeat(4096);
    let mut published = std::collections::HashSet::new();
    let sends = (0..EVENTS).map(|_| {
        let mut event = event_for("dev");
        event.result_json = Some(serde_json::json!({"padding": padding}).to_string());
        published.insert(event.event_id.clone());
        let envelope = onceflow_tests::result_envelope(&event);
        let (producer, topic) = (producer.clone(), topic.clone());
        async move {
            let payload = event.encode().unwrap();
            let record = rdkafka::producer::FutureRecord::to(&topic)
                .key(&event.job_id)
                .payload(&payload)
                .headers(onceflow_runtime::kafka::headers(&envelope));
            producer.send(record, Duration::from_secs(30)).await.map_err(|(e, _)| e).unwrap();
        }
    });
    futures::future::join_all(sends).await;
    let db = sqlx::PgPool::connect(&env.database_url("notifier")).await.unwrap();
    eventually("every event to be stored", Duration::from_secs(120), || async {
        let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM events").fetch_one(&db).await.unwrap();
        (stored == EVENTS as i64).then_some(())
    })
    .await;

    // Now read: some events, then the notice, then the end of the stream.
    let event_id = |event: &eventsource_stream::Event| {
        serde_json::from_str::<Value>(&event.data).unwrap()["event_id"].as_str().unwrap().to_owned()
    };
    let mut received = Vec::new();
    let mut last_id = None;
    let lagged = loop {
        let event = slow.next_event(Duration::from_secs(30)).await.expect("the stream ends only after a notice");
        if event.event == "stream.lagged" {
            break event;
        }
        last_id = Some(event.id.clone());
        received.push(event_id(&event));
    };
    assert!(received.len() < EVENTS, "the slow subscriber was cut off before the end");
    let notice: Value = serde_json::from_str(&lagged.data).unwrap();
    assert_eq!(notice["resume_after"].to_string(), last_id.clone().unwrap_or_else(|| "0".to_owned()));
    assert!(slow.next_event(Duration::from_secs(10)).await.is_none(), "the stream ends after the notice");

    // It resumes from where it was cut off and gets the rest, once each.
    let mut resumed = SseClient::connect(&notifier.url("/v1/events"), Some(&notice["resume_after"].to_string())).await;
    while received.len() < EVENTS {
        let event = resumed.next_event(Duration::from_secs(60)).await.expect("the rest of the events");
        received.push(event_id(&event));
    }
    let unique: std::collections::HashSet<String> = received.into_iter().collect();
    assert_eq!(unique, published, "every event once, none lost to the disconnect");
    db.close().await;
    env.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_instance_serves_every_subscriber() {
    let mut env = TestEnv::new();
    // Two instances in one consumer group: each consumes only some partitions.
    let first = env.start_notifier().await;
    let second = env.start_notifier().await;
    let mut on_first = SseClient::connect(&first.url("/v1/events"), Some("0")).await;
    let mut on_second = SseClient::connect(&second.url("/v1/events"), Some("0")).await;
    let events: Vec<_> = (0..10).map(|_| event_for("dev")).collect();
    for event in &events {
        env.publish_result(event).await;
    }
    let mut expected: Vec<String> = events.iter().map(|e| e.event_id.clone()).collect();
    expected.sort();
    for stream in [&mut on_first, &mut on_second] {
        let mut got = Vec::new();
        for _ in 0..events.len() {
            let event = stream.next_event(Duration::from_secs(90)).await.expect("an event");
            got.push(serde_json::from_str::<Value>(&event.data).unwrap()["event_id"].as_str().unwrap().to_owned());
        }
        got.sort();
        assert_eq!(got, expected, "a subscriber of either instance gets every event");
    }
    env.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_streams_get_heartbeats_and_a_retry_hint() {
    use futures::StreamExt as _;
    let mut env = TestEnv::new();
    let notifier = env
        .start_notifier_with(|config| {
            config.sse.heartbeat_secs = 1;
            config.sse.reconnect_ms = 1500;
        })
        .await;
    let response =
        reqwest::Client::new().get(notifier.url("/v1/events")).bearer_auth("dev-onceflow-key").send().await.unwrap();
    let mut body = response.bytes_stream();
    let mut text = String::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !(text.contains("retry: 1500") && text.contains(": heartbeat\n\n")) {
        let chunk = tokio::time::timeout_at(deadline, body.next())
            .await
            .unwrap_or_else(|_| panic!("no heartbeat within 10 s: {text:?}"));
        text.push_str(&String::from_utf8_lossy(&chunk.expect("open stream").unwrap()));
    }
    env.teardown().await;
}
