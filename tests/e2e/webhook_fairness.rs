//! Webhooks are fair across tenants (G8), end to end with the notifier's
//! default worker settings (16 workers, a tenant's share 4): tenant `dev`
//! has 64 deliveries queued to a receiver that answers after 12 s, and the
//! canary tenant's webhook still goes out at once, because `dev` fills only
//! its share of the workers and the claim lets tenants take turns.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use onceflow_contracts::JobStatus;
use onceflow_tests::{
    CANARY_TENANT, OUTCOME_TIMEOUT, TestEnv, WebhookReceiver, canary_tenant_key, eventually, result_event,
};
use onceflow_webhook::{Allowlist, Secret};

/// How long the slow tenant's receiver takes to answer: under the default
/// 15 s timeout, so each of its attempts succeeds, slowly.
const SLOW_ANSWER: Duration = Duration::from_secs(12);
/// The slow tenant's backlog: four times the default workers.
const BACKLOG: usize = 64;

/// A receiver that answers `200` after [`SLOW_ANSWER`] and counts how many
/// requests it holds at once (the [`WebhookReceiver`] answers at once).
struct SlowReceiver {
    addr: SocketAddr,
    received: Arc<AtomicUsize>,
    most_at_once: Arc<AtomicUsize>,
    server: tokio::task::JoinHandle<()>,
}

impl SlowReceiver {
    async fn start() -> Self {
        let (received, at_once, most_at_once): (Arc<AtomicUsize>, Arc<AtomicUsize>, Arc<AtomicUsize>) =
            Default::default();
        let counters = (Arc::clone(&received), at_once, Arc::clone(&most_at_once));
        let router = axum::Router::new().fallback(move || {
            let (received, at_once, most_at_once) = counters.clone();
            async move {
                received.fetch_add(1, Ordering::SeqCst);
                let now = at_once.fetch_add(1, Ordering::SeqCst) + 1;
                most_at_once.fetch_max(now, Ordering::SeqCst);
                tokio::time::sleep(SLOW_ANSWER).await;
                at_once.fetch_sub(1, Ordering::SeqCst);
                axum::http::StatusCode::OK
            }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        Self { addr, received, most_at_once, server }
    }
}

impl Drop for SlowReceiver {
    fn drop(&mut self) {
        self.server.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_tenant_with_slow_receivers_does_not_delay_another_tenant_s_webhooks() {
    let mut env = TestEnv::new();
    let notifier = env
        .start_notifier_with(|config| {
            config.webhooks.allowlist = Allowlist::new(["127.0.0.1"]).unwrap();
            config.webhooks.secrets.insert(CANARY_TENANT.to_owned(), vec![Secret::generate()]);
            config.tenants.push(canary_tenant_key());
        })
        .await;
    let slow = SlowReceiver::start().await;
    let canary_receiver = WebhookReceiver::start().await;

    // Tenant `dev` queues 64 deliveries to its slow receiver (published at
    // once, so all are queued before its first attempts end); wait until they
    // are all stored and its first attempts are being answered slowly.
    let backlog: Vec<_> = (0..BACKLOG)
        .map(|n| result_event(JobStatus::Succeeded, Some(&format!("http://{}/slow/{n}", slow.addr))))
        .collect();
    futures::future::join_all(backlog.iter().map(|event| env.publish_result(event))).await;
    let db = sqlx::PgPool::connect(&env.database_url("notifier")).await.unwrap();
    eventually("the slow tenant's deliveries stored", OUTCOME_TIMEOUT, || async {
        let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM webhook_deliveries WHERE tenant = 'dev'")
            .fetch_one(&db)
            .await
            .unwrap();
        (stored == BACKLOG as i64 && slow.received.load(Ordering::SeqCst) > 0).then_some(())
    })
    .await;
    // Let the claims settle: every worker the slow tenant can get, it has.
    tokio::time::sleep(Duration::from_millis(500)).await;

    // The canary's webhook, queued behind them.
    let mut canary = result_event(JobStatus::Succeeded, Some(&canary_receiver.url("/canary")));
    canary.tenant = CANARY_TENANT.to_owned();
    let published = Instant::now();
    env.publish_result(&canary).await;
    let received = canary_receiver.wait_for(1, OUTCOME_TIMEOUT).await;
    let canary_delay = received[0].at.duration_since(published);
    // What the webhook queue added: from the delivery's creation (with its
    // stored event) to its attempt, both in the notifier's clock.
    let queued_ms: f64 = sqlx::query_scalar(
        "SELECT EXTRACT(EPOCH FROM a.started_at - d.created_at)::float8 * 1000
           FROM webhook_deliveries d JOIN webhook_attempts a ON a.delivery_id = d.id
          WHERE d.event_id = $1",
    )
    .bind(&canary.event_id)
    .fetch_one(&db)
    .await
    .unwrap();
    let at_once = slow.most_at_once.load(Ordering::SeqCst);
    eprintln!(
        "webhook fairness figures: the canary's webhook arrived {} ms after its result was published ({queued_ms:.0} \
         ms of it queued in the notifier), with {} of the slow tenant's {BACKLOG} deliveries sent and at most \
         {at_once} of them in flight at once (default settings: 16 workers, a tenant's share 4; the slow receiver \
         answers after {SLOW_ANSWER:?})",
        canary_delay.as_millis(),
        slow.received.load(Ordering::SeqCst),
    );
    assert!(
        canary_delay < Duration::from_secs(1),
        "the canary's webhook waited {canary_delay:?} behind the slow tenant's deliveries"
    );
    assert!(queued_ms < 1_000.0, "queued {queued_ms} ms");
    assert_eq!(at_once, 4, "the slow tenant holds its share of the workers, no more, no less");
    assert_eq!(received[0].json()["job_id"], canary.job_id);

    db.close().await;
    drop(notifier);
    env.teardown().await;
}
