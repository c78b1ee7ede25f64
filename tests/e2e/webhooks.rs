//! Webhooks end to end: a command's terminal result POSTed to its
//! `callback_url`, signed per Standard Webhooks and checked with an
//! independent implementation (the `standardwebhooks` crate, not our signer);
//! retried with one `webhook-id` after failures; ended by `410 Gone` or a spent
//! schedule, then redriven; refused by SSRF protection; delivered once across
//! instances, redeliveries and notifier restarts; one waiting behind an
//! earlier webhook of its key lets the worker sleep. Every receiver here is a
//! real HTTP server on 127.0.0.1, which the notifier's allowlist permits.

use std::time::{Duration, Instant};

use onceflow_contracts::JobStatus;
use onceflow_notifier::NotifierConfig;
use onceflow_runtime::auth::TenantKey;
use onceflow_tests::{
    DEV_API_KEY, DeliveriesClient, IngestClient, OUTCOME_TIMEOUT, ReceivedWebhook, Reply, SseClient, TestEnv,
    WebhookReceiver, eventually, result_event,
};
use onceflow_webhook::{Allowlist, RetryPolicy, Secret};
use serde_json::{Value, json};

/// A second tenant's API key, known to the notifier only.
const OTHER_KEY: &str = "other-tenant-key";
const OTHER_KEY_SHA256: &str = "27c05ce3f2f50102dce55afe0f1b96f1a354c6d2b80a6e54bbe4b3bc02b954de";

/// Short retries, so a schedule plays out within a test.
fn retries(max_attempts: u32, initial_backoff_ms: u64, jitter: f64) -> RetryPolicy {
    RetryPolicy { max_attempts, initial_backoff_ms, backoff_multiplier: 2.0, max_backoff_ms: 5_000, jitter }
}

/// The notifier settings of these tests: the receivers on 127.0.0.1 allowed,
/// `retry`, `secrets` for tenant `dev`, and a tenant `other` with an API key
/// but no webhook secret.
fn settings(retry: RetryPolicy, secrets: Vec<Secret>) -> impl FnOnce(&mut NotifierConfig) {
    move |config| {
        config.webhooks.allowlist = Allowlist::new(["127.0.0.1"]).unwrap();
        config.webhooks.retry = retry;
        config.webhooks.timeout_ms = 10_000;
        config.webhooks.poll_interval_ms = 200;
        config.webhooks.secrets.insert("dev".to_owned(), secrets);
        config.tenants.push(TenantKey { tenant: "other".to_owned(), api_key_sha256: OTHER_KEY_SHA256.to_owned() });
    }
}

/// Verify `request` as a receiver holding `secret` would, with the
/// `standardwebhooks` crate (its own HMAC, base64 and header parsing, and its
/// ±5 min timestamp tolerance).
fn verify(request: &ReceivedWebhook, secret: &Secret) -> Result<(), standardwebhooks::WebhookError> {
    standardwebhooks::Webhook::new(&secret.reveal())?.verify(&request.body, &request.headers)
}

fn millis_between(earlier: &ReceivedWebhook, later: &ReceivedWebhook) -> u128 {
    later.at.duration_since(earlier.at).as_millis()
}

fn status_codes(delivery: &Value) -> Vec<Value> {
    delivery["attempts"].as_array().unwrap().iter().map(|a| a["status_code"].clone()).collect()
}

/// The full flow: ingest → processor → notifier → a receiver that fails
/// twice (500, then 429 with `Retry-After`) and then accepts. Every attempt
/// carries the same `webhook-id` and body, signed with both secrets of a
/// rotation; the attempts are listed per job, for its tenant only.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_command_s_result_is_signed_retried_under_one_id_and_delivered() {
    let mut env = TestEnv::new();
    let receiver = WebhookReceiver::start().await;
    receiver.script([Reply::Status(500), Reply::RetryAfter(429, 1)]);
    let (new_secret, old_secret) = (Secret::generate(), Secret::generate());
    let ingest = env.start_ingest().await;
    let processor = env.start_processor().await;
    let notifier =
        env.start_notifier_with(settings(retries(5, 400, 0.2), vec![new_secret.clone(), old_secret.clone()])).await;
    let api = IngestClient::new(&ingest);

    let callback_url = receiver.url("/hooks/onceflow?source=e2e");
    let command = json!({
        "type": "ledger.open_account",
        "payload": {"account_id": "webhook-alice", "currency": "EUR"},
        "callback_url": callback_url,
    });
    let submitted = Instant::now();
    let accepted = api.submit("webhook-open-alice", &command).await;
    assert_eq!(accepted.status, 202, "{}", String::from_utf8_lossy(&accepted.body));
    let job_id = accepted.json()["job_id"].as_str().unwrap().to_owned();
    let correlation_id = accepted.json()["correlation_id"].as_str().unwrap().to_owned();

    let requests = receiver.wait_for(3, OUTCOME_TIMEOUT).await;
    let first_attempt_after = requests[0].at.duration_since(submitted);

    // Each attempt verifies, independently, with the old and the new secret:
    // a receiver mid-rotation accepts either. A stranger's secret or a
    // changed body does not verify.
    for (n, request) in requests.iter().enumerate() {
        assert_eq!(request.method, "POST");
        assert_eq!(request.path_and_query, "/hooks/onceflow?source=e2e", "the callback URL as given");
        assert_eq!(request.header("content-type"), "application/json");
        verify(request, &new_secret).unwrap_or_else(|e| panic!("attempt {n} with the new secret: {e}"));
        verify(request, &old_secret).unwrap_or_else(|e| panic!("attempt {n} with the old secret: {e}"));
        assert!(verify(request, &Secret::generate()).is_err(), "an unrelated secret must not verify");
        let mut tampered = request.clone();
        tampered.body.extend_from_slice(b" ");
        assert!(verify(&tampered, &new_secret).is_err(), "a changed body must not verify");
        let signatures: Vec<&str> = request.header("webhook-signature").split(' ').collect();
        assert_eq!(signatures.len(), 2, "one signature per active secret");
        assert!(signatures.iter().all(|s| s.starts_with("v1,")));
        let timestamp: i64 = request.header("webhook-timestamp").parse().unwrap();
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
        assert!((now - timestamp).abs() < 120, "timestamp {timestamp} is the attempt's time, not the event's");
    }
    let webhook_id = requests[0].header("webhook-id").to_owned();
    assert!(!webhook_id.is_empty());
    assert!(requests.iter().all(|r| r.header("webhook-id") == webhook_id), "one webhook-id for every retry");
    assert!(requests.iter().all(|r| r.body == requests[0].body), "the same bytes on every retry");

    // The body is the result event as SSE shows it.
    let body = requests[0].json();
    assert_eq!(body["type"], "job.succeeded");
    assert_eq!(body["job_id"], job_id);
    assert_eq!(body["correlation_id"], correlation_id);
    assert_eq!(body["command_type"], "ledger.open_account");
    assert!(body.get("callback_url").is_none() && body.get("tenant").is_none(), "{body}");
    let mut stream = SseClient::connect(&notifier.url(&format!("/v1/jobs/{job_id}/events")), None).await;
    let streamed = stream.next_event(OUTCOME_TIMEOUT).await.expect("the job's terminal event");
    assert_eq!(serde_json::from_str::<Value>(&streamed.data).unwrap(), body, "webhook body = SSE data");

    // Backoff: ~400 ms (±20 %) after the 500; after the 429, its Retry-After
    // (1 s) wins over the shorter computed delay (800 ms ±20 %).
    let (gap_after_500, gap_after_429) =
        (millis_between(&requests[0], &requests[1]), millis_between(&requests[1], &requests[2]));
    assert!((320..2_000).contains(&gap_after_500), "{gap_after_500} ms after the 500");
    assert!((1_000..3_000).contains(&gap_after_429), "{gap_after_429} ms after the 429");

    // Acknowledged: no further attempt.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assert_eq!(receiver.received().len(), 3, "no attempt after the 200");

    // Every attempt is listed for the job, to its tenant.
    let dev = DeliveriesClient::new(&notifier, Some(DEV_API_KEY));
    let delivery = dev.wait_for_delivery(&job_id, OUTCOME_TIMEOUT, |d| d["status"] == "succeeded").await;
    assert_eq!(delivery["id"], webhook_id, "the delivery id is the webhook-id");
    assert_eq!(delivery["url"], callback_url);
    assert_eq!(delivery["event_type"], "job.succeeded");
    assert_eq!(delivery["attempt_count"], 3);
    assert_eq!(status_codes(&delivery), [json!(500), json!(429), json!(200)]);
    let attempts = delivery["attempts"].as_array().unwrap();
    assert_eq!(attempts.iter().map(|a| a["attempt"].as_i64().unwrap()).collect::<Vec<_>>(), [1, 2, 3]);
    assert_eq!(attempts[0]["error"], "HTTP 500");
    assert_eq!(attempts[1]["error"], "HTTP 429");
    assert!(attempts[2]["error"].is_null() && attempts[2]["succeeded"] == true);
    assert!(attempts[0]["next_attempt_at"].is_string() && attempts[2]["next_attempt_at"].is_null());
    assert!(delivery["next_attempt_at"].is_null() && delivery["finished_at"].is_string());
    let latencies: Vec<i64> = attempts.iter().map(|a| a["latency_ms"].as_i64().unwrap()).collect();
    assert!(latencies.iter().all(|ms| (0..2_000).contains(ms)), "{latencies:?}");
    assert_eq!(dev.get(&webhook_id).await.json()["id"], webhook_id);

    // Another tenant sees nothing of it; no key, no answer.
    let other = DeliveriesClient::new(&notifier, Some(OTHER_KEY));
    let theirs = other.for_job(&job_id).await;
    assert_eq!(theirs.status, 200);
    assert_eq!(theirs.json()["deliveries"], json!([]));
    assert_eq!(other.get(&webhook_id).await.status, 404);
    let anonymous = DeliveriesClient::new(&notifier, None);
    assert_eq!(anonymous.for_job(&job_id).await.status, 401);
    assert_eq!(anonymous.for_job(&job_id).await.problem_type(), "https://onceflow.dev/problems/unauthorized");
    assert_eq!(dev.for_job("not-a-uuid").await.status, 400);

    eprintln!(
        "webhook figures: first attempt {} ms after submission; gaps {gap_after_500} ms (after 500, nominal 400 ±20 %) \
         and {gap_after_429} ms (after 429 with Retry-After: 1); attempt latencies {latencies:?} ms",
        first_attempt_after.as_millis()
    );
    drop((ingest, processor, notifier));
    env.teardown().await;
}

/// `410 Gone` ends a delivery after one attempt; a receiver that keeps
/// failing spends the schedule and the delivery is failed; a redrive (by its
/// tenant only) delivers it under the same `webhook-id`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_410_ends_a_delivery_a_spent_schedule_fails_it_and_a_redrive_delivers_it() {
    let mut env = TestEnv::new();
    let secret = Secret::generate();
    let notifier = env.start_notifier_with(settings(retries(3, 200, 0.2), vec![secret.clone()])).await;
    let gone = WebhookReceiver::start().await;
    gone.set_fallback(Reply::Status(410));
    let flaky = WebhookReceiver::start().await;
    flaky.set_fallback(Reply::Status(503));
    let gone_event = result_event(JobStatus::Succeeded, Some(&gone.url("/hook")));
    let mut flaky_event = result_event(JobStatus::Failed, Some(&flaky.url("/hook")));
    flaky_event.result_json = None;
    flaky_event.error =
        Some(onceflow_contracts::JobError { code: "insufficient_funds".to_owned(), message: "no".to_owned() });
    env.publish_result(&gone_event).await;
    env.publish_result(&flaky_event).await;
    let dev = DeliveriesClient::new(&notifier, Some(DEV_API_KEY));

    let ended = dev.wait_for_delivery(&gone_event.job_id, OUTCOME_TIMEOUT, |d| d["status"] == "failed").await;
    assert_eq!(ended["attempt_count"], 1, "{ended}");
    assert_eq!(ended["last_status_code"], 410);
    assert!(ended["attempts"][0]["error"].as_str().unwrap().contains("410 Gone"), "{ended}");
    assert!(ended["attempts"][0]["next_attempt_at"].is_null());

    let spent = dev.wait_for_delivery(&flaky_event.job_id, OUTCOME_TIMEOUT, |d| d["status"] == "failed").await;
    assert_eq!(spent["attempt_count"], 3, "max_attempts = 3: {spent}");
    assert_eq!(status_codes(&spent), [json!(503), json!(503), json!(503)]);
    let failed_body = flaky.received()[0].json();
    assert_eq!(failed_body["type"], "job.failed");
    assert_eq!(failed_body["error"]["code"], "insufficient_funds");
    verify(&flaky.received()[0], &secret).expect("signature of a failed job's webhook");

    // Neither is retried any further.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assert_eq!(gone.received().len(), 1, "410 stops retries");
    assert_eq!(flaky.received().len(), 3, "the schedule is bounded");
    let schedule_gaps: Vec<u128> = flaky.received().windows(2).map(|w| millis_between(&w[0], &w[1])).collect();
    assert!((160..1_500).contains(&schedule_gaps[0]) && (320..2_000).contains(&schedule_gaps[1]), "{schedule_gaps:?}");

    // Only its tenant may redrive it; only a failed delivery can be redriven.
    let id = spent["id"].as_str().unwrap().to_owned();
    let other = DeliveriesClient::new(&notifier, Some(OTHER_KEY));
    assert_eq!(other.redrive(&id).await.status, 404);
    assert_eq!(DeliveriesClient::new(&notifier, None).redrive(&id).await.status, 401);
    flaky.set_fallback(Reply::Status(204));
    let redriven = dev.redrive(&id).await;
    assert_eq!(redriven.status, 202, "{}", String::from_utf8_lossy(&redriven.body));
    assert_eq!(redriven.json()["status"], "pending");
    let delivered = dev.wait_for_delivery(&flaky_event.job_id, OUTCOME_TIMEOUT, |d| d["status"] == "succeeded").await;
    assert_eq!(delivered["attempt_count"], 4);
    assert_eq!(status_codes(&delivered), [json!(503), json!(503), json!(503), json!(204)]);
    let received = flaky.received();
    assert_eq!(received.len(), 4);
    assert!(received.iter().all(|r| r.header("webhook-id") == id), "a redrive keeps the webhook-id");
    verify(&received[3], &secret).expect("the redriven attempt is signed");
    let again = dev.redrive(&id).await;
    assert_eq!(again.status, 409);
    assert_eq!(again.problem_type(), "https://onceflow.dev/problems/delivery-not-failed");

    drop(notifier);
    env.teardown().await;
}

/// Only terminal events with a callback get a delivery, one per event however
/// often the event is redelivered; a callback URL the SSRF rules refuse, or a
/// tenant without a signing secret, fails the delivery without a request.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn only_terminal_callbacks_are_delivered_once_and_refused_ones_are_never_sent() {
    let mut env = TestEnv::new();
    let notifier = env.start_notifier_with(settings(retries(3, 200, 0.2), vec![Secret::generate()])).await;
    let receiver = WebhookReceiver::start().await;
    let url = receiver.url("/hook");

    let terminal = result_event(JobStatus::Succeeded, Some(&url));
    let mut progress = result_event(JobStatus::Processing, Some(&url));
    progress.result_json = None;
    let without_callback = result_event(JobStatus::Succeeded, None);
    // Loopback, but not the allowlisted 127.0.0.1.
    let refused = result_event(JobStatus::Succeeded, Some(&format!("http://[::1]:{}/hook", receiver.addr.port())));
    let mut unsigned = result_event(JobStatus::Succeeded, Some(&url));
    unsigned.tenant = "other".to_owned();
    for event in [&terminal, &terminal, &progress, &without_callback, &refused, &unsigned, &terminal] {
        env.publish_result(event).await;
    }

    let dev = DeliveriesClient::new(&notifier, Some(DEV_API_KEY));
    let delivered = dev.wait_for_delivery(&terminal.job_id, OUTCOME_TIMEOUT, |d| d["status"] == "succeeded").await;
    assert_eq!(delivered["attempt_count"], 1);
    let ssrf = dev.wait_for_delivery(&refused.job_id, OUTCOME_TIMEOUT, |d| d["status"] == "failed").await;
    assert_eq!(ssrf["attempt_count"], 1, "a refused URL is not retried: {ssrf}");
    let error = ssrf["last_error"].as_str().unwrap();
    assert!(error.starts_with("refused by SSRF protection") && error.contains("::1, a loopback address"), "{error}");
    assert!(ssrf["attempts"][0]["status_code"].is_null());
    let other = DeliveriesClient::new(&notifier, Some(OTHER_KEY));
    let no_secret = other.wait_for_delivery(&unsigned.job_id, OUTCOME_TIMEOUT, |d| d["status"] == "failed").await;
    assert!(no_secret["last_error"].as_str().unwrap().contains("no webhook signing secret"), "{no_secret}");

    // Every event stored (the redeliveries once), and deliveries only for the
    // three terminal events with a callback.
    let db = sqlx::PgPool::connect(&env.database_url("notifier")).await.unwrap();
    eventually("the five distinct events stored", OUTCOME_TIMEOUT, || async {
        let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM events").fetch_one(&db).await.unwrap();
        (stored == 5).then_some(())
    })
    .await;
    let deliveries: Vec<String> =
        sqlx::query_scalar("SELECT event_id FROM webhook_deliveries ORDER BY event_id").fetch_all(&db).await.unwrap();
    let mut expected = vec![terminal.event_id.clone(), refused.event_id.clone(), unsigned.event_id.clone()];
    expected.sort();
    assert_eq!(deliveries, expected);
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    let received = receiver.received();
    assert_eq!(received.len(), 1, "one request for the thrice-published event, none for the others");
    assert_eq!(received[0].json()["job_id"], terminal.job_id);
    db.close().await;

    drop(notifier);
    env.teardown().await;
}

/// Deliveries live in the database, not in a notifier: a retry pending at a
/// restart is made by the next instance; an attempt cut off by shutdown is
/// made again at once; and a delivery a crashed instance held is taken over
/// once its lease expires (and the lost attempt is logged).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn deliveries_survive_notifier_restarts_and_crashes() {
    let mut env = TestEnv::new();
    let secret = Secret::generate();
    let configure = || settings(retries(5, 2_000, 0.0), vec![secret.clone()]);
    let first = env.start_notifier_with(configure()).await;
    let (pending, cut_off, crashed) =
        (WebhookReceiver::start().await, WebhookReceiver::start().await, WebhookReceiver::start().await);
    pending.script([Reply::Status(500)]);
    cut_off.script([Reply::Hang]);
    crashed.script([Reply::Status(500)]);
    let events = [
        result_event(JobStatus::Succeeded, Some(&pending.url("/hook"))),
        result_event(JobStatus::Succeeded, Some(&cut_off.url("/hook"))),
        result_event(JobStatus::Succeeded, Some(&crashed.url("/hook"))),
    ];
    for event in &events {
        env.publish_result(event).await;
    }
    for receiver in [&pending, &cut_off, &crashed] {
        receiver.wait_for(1, OUTCOME_TIMEOUT).await;
    }

    // Stop while one request hangs: shutdown does not wait for it.
    let stopping = Instant::now();
    first.stop().await;
    let stop_ms = stopping.elapsed().as_millis();
    assert!(stop_ms < 5_000, "stopping took {stop_ms} ms");

    let db = sqlx::PgPool::connect(&env.database_url("notifier")).await.unwrap();
    let delivery_of = |event: &onceflow_contracts::ResultEvent| {
        let (db, event_id) = (db.clone(), event.event_id.clone());
        async move {
            sqlx::query_scalar::<_, uuid::Uuid>("SELECT id FROM webhook_deliveries WHERE event_id = $1")
                .bind(event_id)
                .fetch_one(&db)
                .await
                .unwrap()
        }
    };
    let crashed_id = delivery_of(&events[2]).await;
    // What a notifier killed in the middle of an attempt leaves behind: the
    // claim (attempt counted, lease held) and no outcome. The lease is
    // shortened to 4 s here; a real one lasts the attempt timeout plus 15 s.
    sqlx::query(
        "UPDATE webhook_deliveries
            SET lease_token = gen_random_uuid(), lease_until = now() + interval '4 seconds',
                attempts = attempts + 1, next_attempt_at = least(next_attempt_at, now())
          WHERE id = $1",
    )
    .bind(crashed_id)
    .execute(&db)
    .await
    .unwrap();
    let crashed_at = Instant::now();

    let second = env.start_notifier_with(configure()).await;
    let started = Instant::now();
    for receiver in [&pending, &cut_off, &crashed] {
        receiver.wait_for(2, OUTCOME_TIMEOUT).await;
    }
    let cut_off_retry_ms = cut_off.received()[1].at.duration_since(started).as_millis();
    let takeover_ms = crashed.received()[1].at.duration_since(crashed_at).as_millis();
    assert!(takeover_ms >= 4_000, "the crashed instance's lease was honoured: taken over after {takeover_ms} ms");
    for receiver in [&pending, &cut_off, &crashed] {
        let received = receiver.received();
        assert_eq!(received[0].header("webhook-id"), received[1].header("webhook-id"), "the same delivery");
        verify(&received[1], &secret).expect("signed after the restart");
    }

    let dev = DeliveriesClient::new(&second, Some(DEV_API_KEY));
    let succeeded = |d: &Value| d["status"] == "succeeded";
    let after_restart = dev.wait_for_delivery(&events[0].job_id, OUTCOME_TIMEOUT, succeeded).await;
    assert_eq!(status_codes(&after_restart), [json!(500), json!(200)]);
    let after_cut = dev.wait_for_delivery(&events[1].job_id, OUTCOME_TIMEOUT, succeeded).await;
    assert_eq!(status_codes(&after_cut), [Value::Null, json!(200)]);
    assert!(after_cut["attempts"][0]["error"].as_str().unwrap().starts_with("interrupted"), "{after_cut}");
    let after_crash = dev.wait_for_delivery(&events[2].job_id, OUTCOME_TIMEOUT, succeeded).await;
    assert_eq!(status_codes(&after_crash), [json!(500), Value::Null, json!(200)]);
    let numbers: Vec<i64> =
        after_crash["attempts"].as_array().unwrap().iter().map(|a| a["attempt"].as_i64().unwrap()).collect();
    assert_eq!(numbers, [1, 2, 3]);
    assert!(after_crash["attempts"][1]["error"].as_str().unwrap().starts_with("abandoned"), "{after_crash}");
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    assert!([&pending, &cut_off, &crashed].iter().all(|r| r.received().len() == 2), "no further attempts");

    eprintln!(
        "webhook restart figures: stop with a hanging attempt took {stop_ms} ms; the interrupted attempt was \
         retried {cut_off_retry_ms} ms after the restart; the crashed one taken over {takeover_ms} ms after its \
         claim (lease 4 s)"
    );
    db.close().await;
    drop(second);
    env.teardown().await;
}

/// Two notifier instances in different consumer groups both consume and
/// store every result, and their workers race for the same deliveries: each
/// webhook is still POSTed exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_notifiers_deliver_each_webhook_exactly_once() {
    const EVENTS: usize = 30;
    let mut env = TestEnv::new();
    let secret = Secret::generate();
    let first = env.start_notifier_with(settings(retries(3, 200, 0.2), vec![secret.clone()])).await;
    let second_group = format!("notifier-b-{}", env.id);
    let second = env
        .start_notifier_with(|config| {
            settings(retries(3, 200, 0.2), vec![secret.clone()])(config);
            config.group_id = second_group;
        })
        .await;
    let receiver = WebhookReceiver::start().await;
    for n in 0..EVENTS {
        env.publish_result(&result_event(JobStatus::Succeeded, Some(&receiver.url(&format!("/hook/{n}"))))).await;
    }
    let received = receiver.wait_for(EVENTS, OUTCOME_TIMEOUT).await;
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assert_eq!(receiver.received().len(), EVENTS, "no webhook twice");
    let ids: std::collections::HashSet<&str> = received.iter().map(|r| r.header("webhook-id")).collect();
    assert_eq!(ids.len(), EVENTS);
    let db = sqlx::PgPool::connect(&env.database_url("notifier")).await.unwrap();
    let (deliveries, attempts): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM webhook_deliveries WHERE status = 'succeeded' AND attempts = 1),
                (SELECT count(*) FROM webhook_attempts)",
    )
    .fetch_one(&db)
    .await
    .unwrap();
    assert_eq!((deliveries, attempts), (EVENTS as i64, EVENTS as i64));
    db.close().await;
    drop((first, second));
    env.teardown().await;
}

/// While a key's webhook is in flight to a receiver that does not answer,
/// then waits for its retry, the next webhook of that key waits behind it,
/// and the worker sleeps meanwhile: it used to count that waiting delivery
/// as due, and so claimed and looked again every 10 ms for as long as the
/// first one took (some 190 transactions a second in a debug build, against
/// about 6 a second for the rest of the notifier's work). The retry goes out on
/// time, and the next webhook as soon as the retry is answered (the end of
/// its attempt wakes the worker; the poll here is a minute).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_webhook_waiting_for_an_earlier_one_of_its_key_keeps_the_worker_asleep() {
    const TIMEOUT_MS: u64 = 3_000;
    const BACKOFF_MS: u64 = 2_000;
    // When the first webhook's retry is due, from its first attempt.
    let retry_due = Duration::from_millis(TIMEOUT_MS + BACKOFF_MS);
    let mut env = TestEnv::new();
    let _notifier = env
        .start_notifier_with(|config| {
            settings(retries(3, BACKOFF_MS, 0.0), vec![Secret::generate()])(config);
            config.webhooks.timeout_ms = TIMEOUT_MS;
            config.webhooks.poll_interval_ms = 60_000;
        })
        .await;
    let receiver = WebhookReceiver::start().await;
    receiver.script([Reply::Hang]);
    // Two results of one job: one Kafka key, so their webhooks go in order.
    let first = result_event(JobStatus::Succeeded, Some(&receiver.url("/hook")));
    let second = onceflow_contracts::ResultEvent { event_id: uuid::Uuid::now_v7().to_string(), ..first.clone() };
    env.publish_result(&first).await;
    env.publish_result(&second).await;
    let db = sqlx::PgPool::connect(&env.database_url("notifier")).await.unwrap();
    eventually("both deliveries stored, the first one's attempt under way", OUTCOME_TIMEOUT, || async {
        let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM webhook_deliveries").fetch_one(&db).await.unwrap();
        (stored == 2 && receiver.received().len() == 1).then_some(())
    })
    .await;
    db.close().await;

    // The notifier's transactions on its database, read from another one so
    // that reading them adds none, until the first webhook's retry.
    let server = sqlx::PgPool::connect(&format!("{}/postgres", onceflow_tests::database_server())).await.unwrap();
    let notifier_db = format!("onceflow_test_{}_notifier", env.id);
    let transactions = || async {
        let committed: i64 = sqlx::query_scalar("SELECT xact_commit FROM pg_stat_database WHERE datname = $1")
            .bind(&notifier_db)
            .fetch_one(&server)
            .await
            .unwrap();
        committed
    };
    // Until half a second before the retry is due.
    let hung = receiver.received()[0].at;
    let watched = (retry_due - Duration::from_millis(500)).saturating_sub(hung.elapsed());
    assert!(
        watched > Duration::from_secs(2),
        "the attempt was under way for {} ms already",
        hung.elapsed().as_millis()
    );
    let before = transactions().await;
    tokio::time::sleep(watched).await;
    let during = transactions().await - before;
    server.close().await;

    let received = receiver.wait_for(3, OUTCOME_TIMEOUT).await;
    assert_eq!(received[0].header("webhook-id"), received[1].header("webhook-id"), "the first webhook, retried");
    assert_ne!(received[1].header("webhook-id"), received[2].header("webhook-id"));
    let retried_after = received[1].at.duration_since(hung);
    let next_after = received[2].at.duration_since(received[1].at);
    eprintln!(
        "{during} transactions in {} ms while the first webhook was under way and then waiting for its retry; \
         retried after {} ms; the next one {} ms after the retry",
        watched.as_millis(),
        retried_after.as_millis(),
        next_after.as_millis()
    );
    // A claim and a look are a transaction each; the rest of an idle
    // notifier's work (the hub's and the outbox relay's fallback polls, the
    // breaker metrics) makes about six a second.
    let per_second = during as f64 / watched.as_secs_f64();
    assert!(
        per_second < 20.0,
        "the notifier made {per_second:.0} transactions a second while its only due delivery waited behind an earlier one"
    );
    assert!(
        retried_after < retry_due + Duration::from_secs(1),
        "the retry was due {} ms after the first attempt began; it went after {} ms",
        retry_due.as_millis(),
        retried_after.as_millis()
    );
    assert!(next_after < Duration::from_secs(1), "the next webhook went {} ms after the first", next_after.as_millis());
    env.teardown().await;
}
