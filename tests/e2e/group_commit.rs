//! Group commit in ingest: many concurrent first requests, with concurrent
//! duplicates among them, share transactions, and still every key gets one
//! job, and every answer to a key is that job's `202` byte for byte (or a
//! `409` while the first was still being committed).

use std::collections::HashMap;

use onceflow_tests::{IngestClient, TestEnv};
use serde_json::json;
use sqlx::PgPool;

const KEYS: usize = 150;
/// Keys sent twice, concurrently.
const DUPLICATED: usize = 50;
const CLIENTS: usize = 32;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_first_requests_share_commits_and_each_key_gets_one_job() {
    let mut env = TestEnv::new();
    let ingest = env.start_ingest().await;
    let api = std::sync::Arc::new(IngestClient::new(&ingest));

    let mut requests: Vec<usize> = (0..KEYS).chain(0..DUPLICATED).collect();
    // Duplicates interleaved with first requests, not all at the end.
    requests.sort_by_key(|n| (n * 7919) % KEYS);
    let queue = std::sync::Arc::new(tokio::sync::Mutex::new(requests));
    let mut clients = tokio::task::JoinSet::new();
    for _ in 0..CLIENTS {
        let (api, queue) = (api.clone(), queue.clone());
        clients.spawn(async move {
            let mut answers = Vec::new();
            loop {
                let Some(n) = queue.lock().await.pop() else { return answers };
                let body = json!({"type": "ledger.deposit", "payload": {"account_id": format!("gc-{n}"), "amount": 1}});
                let response = api.submit(&format!("gc-{n}"), &body).await;
                answers.push((n, response.status, response.body.clone()));
            }
        });
    }
    let mut by_key: HashMap<usize, Vec<(u16, Vec<u8>)>> = HashMap::new();
    while let Some(answers) = clients.join_next().await {
        for (n, status, body) in answers.expect("a client") {
            by_key.entry(n).or_default().push((status, body));
        }
    }
    assert_eq!(by_key.len(), KEYS);
    for (n, answers) in &by_key {
        let accepted: Vec<&Vec<u8>> = answers.iter().filter(|(s, _)| *s == 202).map(|(_, b)| b).collect();
        assert!(!accepted.is_empty(), "key gc-{n}: no 202 among {answers:?}");
        assert!(accepted.iter().all(|b| *b == accepted[0]), "key gc-{n}: different 202 bodies");
        assert!(answers.iter().all(|(s, _)| matches!(s, 202 | 409)), "key gc-{n}: {answers:?}");
    }

    let db = PgPool::connect(&env.database_url("ingest")).await.expect("ingest database");
    let count = |sql: &'static str| {
        let db = db.clone();
        async move { sqlx::query_scalar::<_, i64>(sql).fetch_one(&db).await.expect(sql) }
    };
    assert_eq!(count("SELECT count(*) FROM jobs").await, KEYS as i64, "one job per key");
    assert_eq!(count("SELECT count(*) FROM idempotency_keys").await, KEYS as i64);
    // Shared commits: the records were written by fewer transactions than
    // there are keys (rows of one transaction share its id, `xmin`).
    let transactions = count("SELECT count(DISTINCT xmin::text) FROM idempotency_keys").await;
    assert!(transactions < KEYS as i64, "{transactions} transactions for {KEYS} keys: nothing was grouped");
    eprintln!("group commit: {KEYS} keys in {transactions} transactions");
    db.close().await;
    env.teardown().await;
}

/// Defect 6 of issue 22: a retry of a recorded key went into a group, whose
/// claim of the key locked its row; a transaction holding that row (another
/// retry's group, a sweep) made the group wait, then the retry waited again
/// alone and got `409` although its answer was recorded. A retry is now
/// answered from its record without a lock, while the row is held.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_retry_of_a_recorded_key_replays_while_its_row_is_locked() {
    let mut env = TestEnv::new();
    let ingest = env.start_ingest().await;
    let api = IngestClient::new(&ingest);
    let body = json!({"type": "ledger.deposit", "payload": {"account_id": "locked-row", "amount": 1}});
    let first = api.submit("locked-row", &body).await;
    assert_eq!(first.status, 202, "{first:?}");

    // Another session holds the record's row for longer than a request
    // waits for an in-flight duplicate (`in_flight_wait_ms`, 2 s).
    let db = PgPool::connect(&env.database_url("ingest")).await.expect("ingest database");
    let mut holder = db.begin().await.expect("a transaction");
    sqlx::query("SELECT 1 FROM idempotency_keys WHERE idempotency_key = 'locked-row' FOR UPDATE")
        .execute(&mut *holder)
        .await
        .expect("lock the record's row");

    let started = std::time::Instant::now();
    let (retry, fresh) = tokio::join!(api.submit("locked-row", &body), async {
        let mut answers = Vec::new();
        for n in 0..20 {
            let body = json!({"type": "ledger.deposit", "payload": {"account_id": format!("beside-{n}"), "amount": 1}});
            answers.push(api.submit(&format!("beside-{n}"), &body).await.status);
        }
        answers
    });
    let waited = started.elapsed();
    holder.rollback().await.expect("release the row");

    assert_eq!(retry.status, 202, "the retry is answered from its record, not 409: {retry:?}");
    assert_eq!(retry.header("idempotent-replayed"), Some("true"));
    assert_eq!(retry.body, first.body, "byte for byte");
    assert!(fresh.iter().all(|status| *status == 202), "{fresh:?}");
    eprintln!("retry and 20 fresh keys answered in {waited:?} while the record's row was locked");
    db.close().await;
    env.teardown().await;
}
