//! No key waits behind another (guarantee G8), through the real stack:
//!
//! - a push handler that takes 45 s for one key holds up only that key's
//!   later commands: a thousand commands of other keys, and another tenant's
//!   deposits, finish meanwhile; the slow key's commands then run one at a
//!   time, in the order they were accepted;
//! - a ledger account whose row another database connection holds locked,
//!   with 200 deposits queued on it, holds up only those: deposits to other
//!   accounts of both tenants keep finishing, and once the lock goes the 200
//!   apply in order (each result's balance one more than the last, on the
//!   results topic in that order);
//! - one account's results keep their order in the notifier's event ids and
//!   in the webhooks to one endpoint, even when the receiver makes the first
//!   one wait for a retry.

use std::{
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use futures::{StreamExt as _, stream};
use onceflow_contracts::JobStatus;
use onceflow_tests::{
    CANARY_API_KEY, IngestClient, OUTCOME_TIMEOUT, PushHandler, PushReply, Reply, TestEnv, WebhookReceiver,
    canary_tenant_key, eventually,
};
use onceflow_webhook::{Allowlist, RetryPolicy, Secret};
use serde_json::{Value, json};

use crate::{
    handlers::{ended, greet, greet_type, stack, submit},
    processor::{processor_db, published_results},
};

/// How long the slow key's first call takes.
const SLOW: Duration = Duration::from_secs(45);

fn deposit(account: &str, amount: i64) -> Value {
    json!({"type": "ledger.deposit", "payload": {"account_id": account, "amount": amount}})
}

fn open(account: &str) -> Value {
    json!({"type": "ledger.open_account", "payload": {"account_id": account, "currency": "EUR"}})
}

/// Submit every body (keys `prefix-0`, `prefix-1`, ...), 32 at a time (so
/// in no particular order); their job ids.
async fn submit_all(client: &IngestClient, prefix: &str, bodies: &[Value]) -> Vec<String> {
    stream::iter(bodies.iter().enumerate())
        .map(|(n, body)| async move { submit(client, &format!("{prefix}-{n}"), body).await })
        .buffered(32)
        .collect()
        .await
}

/// Count the jobs of `ids` that succeeded, from the processor's inbox.
async fn succeeded(db: &sqlx::PgPool, ids: &[String]) -> i64 {
    let ids: Vec<uuid::Uuid> = ids.iter().map(|id| id.parse().unwrap()).collect();
    sqlx::query_scalar("SELECT count(*) FROM inbox WHERE message_id = ANY($1) AND outcome = 'succeeded'")
        .bind(&ids)
        .fetch_one(db)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_slow_key_holds_up_only_its_own_commands() {
    let mut env = TestEnv::new();
    let secret = Secret::generate();
    // The slow key's first call takes 45 s; every other call answers at once.
    let first_slow = AtomicBool::new(true);
    let handler = PushHandler::start(move |request| {
        let job = json!({"job": request.json()["job_id"]});
        if request.json()["payload"]["name"] == "slow" && first_slow.swap(false, Ordering::SeqCst) {
            PushReply::After(SLOW, Box::new(PushReply::ok(job)))
        } else {
            PushReply::ok(job)
        }
    })
    .await;
    let types = greet_type(&env, &handler, 120_000);
    let (ingest, _processor) = stack(&mut env, &types, &secret).await;
    let dev = IngestClient::new(&ingest);
    let canary = IngestClient::with_key(&ingest, CANARY_API_KEY);
    let db = processor_db(&env).await;

    // Three commands of the slow key, then a thousand of other keys.
    let slow: Vec<String> = {
        let mut ids = Vec::new();
        for n in 0..3 {
            ids.push(submit(&dev, &format!("slow-{n}"), &greet("slow")).await);
        }
        ids
    };
    handler.wait_for(1, OUTCOME_TIMEOUT).await;
    let started = Instant::now();
    let others: Vec<Value> = (0..1_000).map(|n| greet(&format!("name-{n}"))).collect();
    let others = submit_all(&dev, "other", &others).await;
    // And another tenant's ledger, beside it.
    submit(&canary, "canary-open", &open("canary-account")).await;
    let canary_deposits: Vec<Value> = (1..=20).map(|amount| deposit("canary-account", amount)).collect();
    let canary_deposits = submit_all(&canary, "canary-deposit", &canary_deposits).await;

    eventually("the other keys' commands to finish", OUTCOME_TIMEOUT, || async {
        (succeeded(&db, &others).await == 1_000 && succeeded(&db, &canary_deposits).await == 20).then_some(())
    })
    .await;
    let took = started.elapsed();
    assert!(
        took < SLOW,
        "the other keys finished after {took:?}, not before the slow call ({SLOW:?}) ended: they waited behind it"
    );
    assert_eq!(succeeded(&db, &slow).await, 0, "the slow key's first call is still out, its others wait");
    assert_eq!(handler.of_job(&slow[1]).len(), 0, "the second command of the slow key was not called yet");
    // Each says why it waits.
    let first = dev.job(&slow[0]).await.json();
    assert_eq!(first["waiting_for"]["reason"], "handler", "{first}");
    assert_eq!(first["attempts"], 0, "{first}");
    let second = dev.job(&slow[1]).await.json();
    assert_eq!(second["waiting_for"], json!({"reason": "job_ahead", "job_id": slow[0]}), "{second}");

    // Then the slow key's commands, one at a time, in order.
    for job in &slow {
        assert_eq!(ended(&dev, job).await["status"], "succeeded");
    }
    let calls: Vec<Instant> = slow.iter().map(|job| handler.of_job(job)[0].at).collect();
    assert!(calls[1] >= calls[0] + SLOW, "the second call waited for the first to end");
    assert!(calls[2] > calls[1], "in order");
    let results = published_results(&env, &db).await;
    let order: Vec<&str> = results
        .iter()
        .filter(|(_, event)| event.status == JobStatus::Succeeded && slow.contains(&event.job_id))
        .map(|(_, event)| event.job_id.as_str())
        .collect();
    assert_eq!(order, slow.iter().map(String::as_str).collect::<Vec<_>>(), "results in the order of the 202s");

    db.close().await;
    env.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_locked_ledger_row_holds_up_only_its_account() {
    let mut env = TestEnv::new();
    let processor = env.start_processor().await;
    let ingest = env
        .start_ingest_with(|config| {
            config.tenants.push(canary_tenant_key());
            config.execution_status_url = processor.url("");
        })
        .await;
    let dev = IngestClient::new(&ingest);
    let canary = IngestClient::with_key(&ingest, CANARY_API_KEY);
    let db = processor_db(&env).await;

    let free: Vec<String> = (0..8).map(|n| format!("free-{n}")).collect();
    let mut opened = Vec::new();
    for account in free.iter().chain([&"locked".to_owned()]) {
        opened.push(submit(&dev, &format!("open-{account}"), &open(account)).await);
    }
    opened.push(submit(&canary, "open-canary", &open("canary-account")).await);
    eventually("the accounts to open", OUTCOME_TIMEOUT, || async {
        (succeeded(&db, &opened).await == opened.len() as i64).then_some(())
    })
    .await;

    // Another connection holds the account's row, as a long transaction would.
    let mut holder = db.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM accounts WHERE tenant = 'dev' AND account_id = 'locked' FOR UPDATE")
        .execute(&mut *holder)
        .await
        .unwrap();

    // One after another, so the order of their 202s is this one.
    let mut queued = Vec::new();
    for n in 0..200 {
        queued.push(submit(&dev, &format!("locked-{n}"), &deposit("locked", 1)).await);
    }
    let moving: Vec<Value> = (0..200).map(|n| deposit(&free[n % free.len()], 1)).collect();
    let moving = submit_all(&dev, "moving", &moving).await;
    let canary_moving: Vec<Value> = (0..50).map(|_| deposit("canary-account", 2)).collect();
    let canary_moving = submit_all(&canary, "canary", &canary_moving).await;

    eventually(
        "deposits to other accounts of both tenants to finish while the row is held",
        OUTCOME_TIMEOUT,
        || async { (succeeded(&db, &moving).await == 200 && succeeded(&db, &canary_moving).await == 50).then_some(()) },
    )
    .await;
    assert_eq!(succeeded(&db, &queued).await, 0, "the held account's deposits wait");
    let waiting: Option<String> = sqlx::query_scalar(
        "SELECT waiting FROM key_queues WHERE tenant = 'dev' AND scope = 'ledger' AND ordering_key = 'locked'",
    )
    .fetch_optional(&db)
    .await
    .unwrap()
    .flatten();
    assert_eq!(waiting.as_deref(), Some("locked"), "the key says why it waits");
    let head = dev.job(&queued[0]).await.json();
    assert_eq!(head["waiting_for"]["reason"], "locked", "{head}");
    let behind = dev.job(&queued[199]).await.json();
    assert_eq!(behind["waiting_for"], json!({"reason": "job_ahead", "job_id": queued[0]}), "{behind}");

    // The row is let go: the 200 apply, in order.
    holder.commit().await.unwrap();
    eventually("the held account's deposits to apply", OUTCOME_TIMEOUT, || async {
        (succeeded(&db, &queued).await == 200).then_some(())
    })
    .await;
    let balance: i64 =
        sqlx::query_scalar("SELECT balance FROM accounts WHERE tenant = 'dev' AND account_id = 'locked'")
            .fetch_one(&db)
            .await
            .unwrap();
    assert_eq!(balance, 200, "each deposit once");
    let results = published_results(&env, &db).await;
    let balances: Vec<i64> = results
        .iter()
        .filter(|(_, event)| queued.contains(&event.job_id))
        .map(|(_, event)| {
            serde_json::from_str::<Value>(event.result_json.as_deref().unwrap()).unwrap()["balance"].as_i64().unwrap()
        })
        .collect();
    assert_eq!(balances, (1..=200).collect::<Vec<_>>(), "applied, and published, in the order accepted");
    let order: Vec<&String> = results.iter().map(|(_, event)| &event.job_id).filter(|id| queued.contains(id)).collect();
    assert_eq!(order, queued.iter().collect::<Vec<_>>(), "one result per deposit, in the order of their 202s");

    db.close().await;
    env.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_key_s_results_keep_their_order_in_event_ids_and_webhooks() {
    let mut env = TestEnv::new();
    let ingest = env.start_ingest().await;
    let _processor = env.start_processor().await;
    let _notifier = env
        .start_notifier_with(|config| {
            config.webhooks.allowlist = Allowlist::new(["127.0.0.1"]).unwrap();
            config.webhooks.poll_interval_ms = 100;
            config.webhooks.retry =
                RetryPolicy { initial_backoff_ms: 200, max_backoff_ms: 1_000, ..config.webhooks.retry.clone() };
        })
        .await;
    let receiver = WebhookReceiver::start().await;
    // The first delivery is told to come back a second later; without order
    // the others would overtake it.
    receiver.script([Reply::RetryAfter(503, 1)]);
    let client = IngestClient::new(&ingest);
    let opened = submit(&client, "open-ordered", &open("ordered")).await;
    assert_eq!(ended(&client, &opened).await["status"], "succeeded");

    let mut jobs = Vec::new();
    for n in 0..20 {
        let mut body = deposit("ordered", 1);
        body["callback_url"] = json!(receiver.url("/hooks"));
        jobs.push(submit(&client, &format!("ordered-{n}"), &body).await);
    }
    let received = receiver.wait_for(21, OUTCOME_TIMEOUT).await;
    let delivered: Vec<i64> = received
        .iter()
        .skip(1)
        .map(|request| {
            let body: Value = serde_json::from_slice(&request.body).unwrap();
            body["result"]["balance"].as_i64().unwrap()
        })
        .collect();
    assert_eq!(delivered, (1..=20).collect::<Vec<_>>(), "the webhooks of one account in the order applied");

    let notifier_db = sqlx::PgPool::connect(&env.database_url("notifier")).await.unwrap();
    let stored: Vec<i64> = sqlx::query_scalar(
        "SELECT (data -> 'result' ->> 'balance')::bigint FROM events
         WHERE job_id = ANY($1) AND terminal ORDER BY seq",
    )
    .bind(jobs.iter().map(|id| id.parse::<uuid::Uuid>().unwrap()).collect::<Vec<_>>())
    .fetch_all(&notifier_db)
    .await
    .unwrap();
    assert_eq!(stored, (1..=20).collect::<Vec<_>>(), "event ids (seq) in the order applied");
    notifier_db.close().await;
    env.teardown().await;
}
