//! Circuit breakers and disabled endpoints end to end, with real receivers
//! on 127.0.0.1 (allowed by the notifier's allowlist), the real broker and
//! PostgreSQL:
//! - a receiver that fails opens its destination's breaker: due deliveries
//!   wait without spending attempts (the API shows them waiting, the metrics
//!   show the breaker, with no destination in any label), exactly one probe
//!   goes out per cool-down, and once the receiver recovers everything is
//!   delivered; a receiver on a closed port opens its own breaker while a
//!   healthy destination is not held up;
//! - breakers are per tenant: one tenant's failures at a destination open
//!   its breaker only, and another tenant's deliveries there go out;
//! - a receiver that answers `410 Gone` disables its endpoint: ingest refuses
//!   commands naming it (`422`, for that tenant only) until the tenant
//!   enables it through the notifier's API, then they are accepted and
//!   delivered; a record on the endpoints topic that is no endpoint state is
//!   parked by ingest without stopping it.

use std::time::Duration;

use onceflow_contracts::JobStatus;
use onceflow_notifier::NotifierConfig;
use onceflow_tests::{
    CANARY_API_KEY, CANARY_TENANT, DEV_API_KEY, DeliveriesClient, IngestClient, OUTCOME_TIMEOUT, Reply, Service,
    TestEnv, WebhookReceiver, canary_tenant_key, eventually, kafka_producer, result_event,
};
use onceflow_webhook::{Allowlist, BreakerPolicy, RetryPolicy, Secret};
use serde_json::{Value, json};

/// Receivers on 127.0.0.1, quick constant retries, and `breaker`.
fn settings(breaker: BreakerPolicy) -> impl FnOnce(&mut NotifierConfig) {
    move |config| {
        config.webhooks.allowlist = Allowlist::new(["127.0.0.1"]).unwrap();
        config.webhooks.retry = RetryPolicy {
            max_attempts: 10,
            initial_backoff_ms: 300,
            backoff_multiplier: 1.0,
            max_backoff_ms: 300,
            jitter: 0.0,
        };
        config.webhooks.timeout_ms = 5_000;
        config.webhooks.connect_timeout_ms = 1_000;
        config.webhooks.poll_interval_ms = 200;
        config.webhooks.breaker = breaker;
    }
}

/// Opens after 3 failures in a row (the rate rule kept out of the way);
/// cool-downs of 10 s, then 15 s: long enough for the test to look at the
/// open breaker before the probe goes.
fn breaker() -> BreakerPolicy {
    BreakerPolicy {
        enabled: true,
        failure_threshold: 3,
        failure_rate: 1.0,
        min_attempts: 1_000,
        window_secs: 60,
        cool_down_ms: 10_000,
        cool_down_multiplier: 1.5,
        max_cool_down_ms: 15_000,
    }
}

/// The job's only delivery, as the API shows it now.
async fn delivery_of(api: &DeliveriesClient, job_id: &str) -> Option<Value> {
    let response = api.for_job(job_id).await;
    assert_eq!(response.status, 200, "{}", String::from_utf8_lossy(&response.body));
    response.json()["deliveries"].as_array().and_then(|d| d.first().cloned())
}

async fn metrics(service: &Service) -> String {
    reqwest::get(service.url("/metrics")).await.unwrap().text().await.unwrap()
}

/// The value of the series `series` (name and labels) in a Prometheus text page.
fn gauge(page: &str, series: &str) -> Option<f64> {
    let prefix = format!("{series} ");
    page.lines().find_map(|line| line.strip_prefix(prefix.as_str())).and_then(|value| value.trim().parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failing_destination_opens_its_breaker_waits_without_spending_attempts_and_recovers() {
    let mut env = TestEnv::new();
    // Two instances (each consuming every result, as two consumer groups),
    // whose workers race for the same deliveries: the breaker is theirs
    // together.
    let notifier = env.start_notifier_with(settings(breaker())).await;
    let second_group = format!("notifier-b-{}", env.id);
    let second = env
        .start_notifier_with(|config| {
            settings(breaker())(config);
            config.group_id = second_group;
        })
        .await;
    let api = DeliveriesClient::new(&notifier, Some(DEV_API_KEY));
    let failing = WebhookReceiver::start().await;
    failing.set_fallback(Reply::Status(500));
    let destination = format!("http://{}", failing.addr);

    // Three deliveries fail: the breaker opens.
    let first: Vec<_> =
        (0..3).map(|n| result_event(JobStatus::Succeeded, Some(&failing.url(&format!("/a{n}"))))).collect();
    for event in &first {
        env.publish_result(event).await;
    }
    let open = eventually("the breaker to open", OUTCOME_TIMEOUT, || async {
        let delivery = delivery_of(&api, &first[0].job_id).await?;
        (delivery["breaker"]["state"] == "open").then_some(delivery)
    })
    .await;
    assert_eq!(open["status"], "pending", "waiting is not an outcome: {open}");
    assert_eq!(open["breaker"]["destination"], destination);
    let next_probe_at = open["breaker"]["next_probe_at"].as_str().expect("when the probe goes").to_owned();
    assert_eq!(open["next_attempt_at"].as_str(), Some(next_probe_at.as_str()), "held until the probe: {open}");
    let sent_before_opening = failing.received().len();
    assert!(sent_before_opening >= 3, "three failures open it");

    // Deliveries that become due meanwhile wait, without an attempt; a
    // healthy destination is not held up by the failing one; a closed port
    // (no answer at all) counts as failing and opens its own breaker.
    let later: Vec<_> =
        (0..3).map(|n| result_event(JobStatus::Succeeded, Some(&failing.url(&format!("/b{n}"))))).collect();
    for event in &later {
        env.publish_result(event).await;
    }
    let healthy = WebhookReceiver::start().await;
    let healthy_event = result_event(JobStatus::Succeeded, Some(&healthy.url("/ok")));
    env.publish_result(&healthy_event).await;
    let closed_port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let unreachable: Vec<_> = (0..3)
        .map(|n| result_event(JobStatus::Succeeded, Some(&format!("http://127.0.0.1:{closed_port}/c{n}"))))
        .collect();
    for event in &unreachable {
        env.publish_result(event).await;
    }
    api.wait_for_delivery(&healthy_event.job_id, OUTCOME_TIMEOUT, |d| d["status"] == "succeeded").await;
    for event in &later {
        let waiting =
            eventually("the later delivery to be stored", OUTCOME_TIMEOUT, || delivery_of(&api, &event.job_id)).await;
        assert_eq!(waiting["status"], "pending");
        assert_eq!(waiting["attempt_count"], 0, "no attempt spent while open: {waiting}");
        assert_eq!(waiting["breaker"]["state"], "open", "{waiting}");
    }
    let refused = eventually("the closed port's breaker to open", OUTCOME_TIMEOUT, || async {
        let delivery = delivery_of(&api, &unreachable[0].job_id).await?;
        (delivery["breaker"]["state"] == "open").then_some(delivery)
    })
    .await;
    assert!(refused["attempts"][0]["error"].as_str().unwrap().starts_with("connection failed"), "{refused}");
    assert_eq!(refused["breaker"]["destination"], format!("http://127.0.0.1:{closed_port}"), "{refused}");
    assert_eq!(failing.received().len(), sent_before_opening, "nothing sent to an open destination");

    // Every instance's metrics show them (refreshed from the shared table;
    // the recorder is the test process's, so other tests' notifiers set the
    // same gauges: read until this test's figures show), and no label holds
    // a tenant's destination or the tenant.
    let page = eventually("the breakers' metrics", OUTCOME_TIMEOUT, || async {
        let page = metrics(&notifier).await;
        let both_open = gauge(&page, "onceflow_webhook_breakers{state=\"open\"}").is_some_and(|n| n >= 2.0);
        let open_for = gauge(&page, "onceflow_webhook_breaker_longest_open_seconds").unwrap_or_default();
        (both_open && open_for > 0.0).then_some(page)
    })
    .await;
    assert!(page.contains("onceflow_webhook_deliveries_waiting "), "{page}");
    assert!(!page.contains("onceflow_webhook_breaker_state"), "{page}");
    assert!(!page.contains("destination="), "no destination in labels: {page}");
    assert!(!page.contains("tenant="), "no tenant labels");

    // The cool-down ends: exactly one probe, which fails; open again, longer.
    let reopened = eventually("the failed probe to reopen the breaker", OUTCOME_TIMEOUT, || async {
        let delivery = delivery_of(&api, &later[0].job_id).await?;
        let probe_at = delivery["breaker"]["next_probe_at"].as_str()?.to_owned();
        (probe_at > next_probe_at).then_some(probe_at)
    })
    .await;
    assert_eq!(
        failing.received().len(),
        sent_before_opening + 1,
        "one probe, not one per delivery, worker or instance"
    );
    let attempts_while_open: i64 = total_attempts(&api, first.iter().chain(&later)).await;
    assert_eq!(attempts_while_open as usize, sent_before_opening + 1, "attempts are requests that went out");

    // The receiver recovers: the next probe closes the breaker and every
    // waiting delivery goes out once.
    failing.set_fallback(Reply::Status(204));
    for event in first.iter().chain(&later) {
        let delivered = api.wait_for_delivery(&event.job_id, OUTCOME_TIMEOUT, |d| d["status"] == "succeeded").await;
        assert!(delivered["breaker"].is_null(), "{delivered}");
    }
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    let sent = failing.received().len();
    assert_eq!(sent, sent_before_opening + 1 + 6, "the failed probe, then each of the six once");
    assert_eq!(total_attempts(&api, first.iter().chain(&later)).await as usize, sent);
    let later_attempts: Vec<i64> = {
        let mut counts = vec![];
        for event in &later {
            counts.push(delivery_of(&api, &event.job_id).await.unwrap()["attempt_count"].as_i64().unwrap());
        }
        counts
    };
    assert!(later_attempts.iter().sum::<i64>() <= 4, "the later ones spent at most a probe more: {later_attempts:?}");
    let page = metrics(&notifier).await;
    assert!(page.contains("onceflow_webhook_breaker_transitions_total{to=\"closed\"}"), "{page}");
    eprintln!(
        "breaker figures: {sent_before_opening} requests before it opened, reopened until {reopened}, {sent} in all"
    );

    drop((notifier, second));
    env.teardown().await;
}

/// Breakers are per tenant and destination: tenant `dev`'s receiver fails
/// until its breaker opens; the canary tenant's webhook to the same
/// destination (scheme, host and port) then goes out at once and is
/// delivered, while `dev`'s deliveries there stay held.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_tenant_s_failures_do_not_hold_another_tenant_s_deliveries_to_the_same_destination() {
    let mut env = TestEnv::new();
    let notifier = env
        .start_notifier_with(|config| {
            settings(breaker())(config);
            config.webhooks.secrets.insert(CANARY_TENANT.to_owned(), vec![Secret::generate()]);
            config.tenants.push(canary_tenant_key());
        })
        .await;
    let dev = DeliveriesClient::new(&notifier, Some(DEV_API_KEY));
    let canary = DeliveriesClient::new(&notifier, Some(CANARY_API_KEY));
    let receiver = WebhookReceiver::start().await;
    receiver.set_fallback(Reply::Status(503));

    // `dev`'s three failures open its breaker for the destination.
    let failing: Vec<_> =
        (0..3).map(|n| result_event(JobStatus::Succeeded, Some(&receiver.url(&format!("/dev/{n}"))))).collect();
    for event in &failing {
        env.publish_result(event).await;
    }
    let open = eventually("dev's breaker to open", OUTCOME_TIMEOUT, || async {
        let delivery = delivery_of(&dev, &failing[0].job_id).await?;
        (delivery["breaker"]["state"] == "open").then_some(delivery)
    })
    .await;
    assert_eq!(open["breaker"]["destination"], format!("http://{}", receiver.addr));

    // The receiver answers again; the canary's webhook to the same host and
    // port goes out under a closed breaker of its own, at once, while dev's
    // stay held until its probe (10 s cool-down).
    receiver.set_fallback(Reply::Status(200));
    let mut theirs = result_event(JobStatus::Succeeded, Some(&receiver.url("/canary")));
    theirs.tenant = CANARY_TENANT.to_owned();
    let published = std::time::Instant::now();
    env.publish_result(&theirs).await;
    let delivered = canary.wait_for_delivery(&theirs.job_id, OUTCOME_TIMEOUT, |d| d["status"] == "succeeded").await;
    let took = published.elapsed();
    assert_eq!(delivered["attempt_count"], 1, "{delivered}");
    assert!(took < Duration::from_secs(5), "the canary's delivery took {took:?}: held by dev's breaker?");
    let held = delivery_of(&dev, &failing[1].job_id).await.unwrap();
    assert_eq!((held["status"].as_str(), held["breaker"]["state"].as_str()), (Some("pending"), Some("open")), "{held}");
    let canary_requests = receiver.received().iter().filter(|r| r.path_and_query == "/canary").count();
    assert_eq!(canary_requests, 1);

    drop(notifier);
    env.teardown().await;
}

async fn total_attempts<'a>(
    api: &DeliveriesClient,
    events: impl Iterator<Item = &'a onceflow_contracts::ResultEvent>,
) -> i64 {
    let mut total = 0;
    for event in events {
        total += delivery_of(api, &event.job_id).await.map_or(0, |d| d["attempt_count"].as_i64().unwrap());
    }
    total
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_410_disables_the_endpoint_until_its_tenant_enables_it_again() {
    let mut env = TestEnv::new();
    let ingest = env.start_ingest_with(|config| config.tenants.push(canary_tenant_key())).await;
    let processor = env.start_processor().await;
    let notifier = env
        .start_notifier_with(|config| {
            settings(BreakerPolicy::default())(config);
            config.tenants.push(canary_tenant_key());
        })
        .await;
    let dev = IngestClient::new(&ingest);
    // A record on the endpoints topic that is no endpoint state at all: ingest
    // parks it and goes on (G8).
    let endpoints_topic = env.kafka.topics().webhook_endpoints;
    let junk: rdkafka::producer::FutureRecord<'_, str, [u8]> =
        rdkafka::producer::FutureRecord::to(&endpoints_topic).key("junk").payload(b"\xff\x00junk");
    kafka_producer(&env.kafka).send(junk, Duration::from_secs(30)).await.map_err(|(error, _)| error).unwrap();
    let receiver = WebhookReceiver::start().await;
    receiver.set_fallback(Reply::Status(410));
    let url = receiver.url("/gone");
    let open_account = |account: &str, callback_url: &str| json!({"type": "ledger.open_account", "payload": {"account_id": account, "currency": "EUR"}, "callback_url": callback_url});

    // The endpoint answers 410: the delivery ends, the endpoint is disabled.
    let accepted = dev.submit("gone-1", &open_account("gone-1", &url)).await;
    assert_eq!(accepted.status, 202, "{}", String::from_utf8_lossy(&accepted.body));
    let job_id = accepted.json()["job_id"].as_str().unwrap().to_owned();
    let deliveries = DeliveriesClient::new(&notifier, Some(DEV_API_KEY));
    let ended = deliveries.wait_for_delivery(&job_id, OUTCOME_TIMEOUT, |d| d["status"] == "failed").await;
    assert_eq!((ended["attempt_count"].clone(), ended["last_status_code"].clone()), (json!(1), json!(410)), "{ended}");
    let listed = deliveries.endpoints().await;
    assert_eq!(listed.status, 200);
    let endpoints = listed.json()["endpoints"].as_array().cloned().unwrap();
    assert_eq!(endpoints.len(), 1, "{endpoints:?}");
    assert_eq!((endpoints[0]["url"].as_str(), endpoints[0]["state"].as_str()), (Some(url.as_str()), Some("disabled")));
    let endpoint_id = endpoints[0]["id"].as_str().unwrap().to_owned();
    assert_eq!(receiver.received().len(), 1);

    // Ingest learns of it through the topic and refuses commands naming it,
    // however the URL is spelled; nothing is stored, so the same key can be
    // used again later.
    // A fresh key per try: until ingest knows, the command is accepted (and
    // its delivery ends as endpoint_disabled in the notifier).
    let tries = std::sync::atomic::AtomicUsize::new(0);
    let (refused_key, refused) = eventually("ingest to refuse the disabled endpoint", OUTCOME_TIMEOUT, || async {
        let key = format!("gone-try-{}", tries.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
        let response = dev.submit(&key, &open_account(&key, &url)).await;
        (response.status == 422).then_some((key, response))
    })
    .await;
    assert_eq!(refused.problem_type(), "https://onceflow.dev/problems/endpoint-disabled");
    let detail = refused.json()["detail"].as_str().unwrap().to_owned();
    assert!(detail.contains(&endpoint_id) && detail.contains("/enable"), "{detail}");
    let shouted = url.replace("http://", "HTTP://").replace("/gone", "/./gone");
    assert_eq!(dev.submit("gone-3", &open_account("gone-3", &shouted)).await.status, 422, "normalised first");
    // Another tenant naming the same URL is not affected; nor is this tenant
    // without a callback.
    let canary = IngestClient::with_key(&ingest, CANARY_API_KEY);
    assert_eq!(canary.submit("gone-canary", &open_account("gone-canary", &url)).await.status, 202);
    let plain = json!({"type": "ledger.open_account", "payload": {"account_id": "gone-plain", "currency": "EUR"}});
    assert_eq!(dev.submit("gone-plain", &plain).await.status, 202);

    // Only its tenant can enable it; then commands are accepted and delivered.
    let stranger = DeliveriesClient::new(&notifier, Some(CANARY_API_KEY));
    assert_eq!(stranger.enable_endpoint(&endpoint_id).await.status, 404);
    assert_eq!(stranger.endpoints().await.json()["endpoints"], json!([]));
    assert_eq!(DeliveriesClient::new(&notifier, None).enable_endpoint(&endpoint_id).await.status, 401);
    receiver.set_fallback(Reply::Status(200));
    let enabled = deliveries.enable_endpoint(&endpoint_id).await;
    assert_eq!(enabled.status, 200, "{}", String::from_utf8_lossy(&enabled.body));
    assert_eq!(enabled.json()["state"], "enabled");
    assert!(enabled.json()["version"].as_i64().unwrap() >= 2);
    let accepted = eventually("ingest to accept the enabled endpoint", OUTCOME_TIMEOUT, || async {
        let response = dev.submit(&refused_key, &open_account(&refused_key, &url)).await;
        (response.status == 202).then_some(response)
    })
    .await;
    assert!(accepted.header("idempotent-replayed").is_none(), "the refusal stored nothing");
    let job_id = accepted.json()["job_id"].as_str().unwrap().to_owned();
    deliveries.wait_for_delivery(&job_id, OUTCOME_TIMEOUT, |d| d["status"] == "succeeded").await;
    assert_eq!(receiver.received().iter().filter(|r| r.json()["job_id"] == job_id).count(), 1);
    let ingest_db = sqlx::PgPool::connect(&env.database_url("ingest")).await.unwrap();
    let parked: Vec<String> =
        sqlx::query_scalar("SELECT error FROM parked_records WHERE consumer = 'ingest.webhook-endpoints'")
            .fetch_all(&ingest_db)
            .await
            .unwrap();
    assert_eq!(parked.len(), 1, "{parked:?}");
    assert!(parked[0].contains("without a valid envelope"), "{parked:?}");
    ingest_db.close().await;

    drop((ingest, processor, notifier));
    env.teardown().await;
}
