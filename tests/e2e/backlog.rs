//! A backlog on the broker's persistent (SQLite) storage, as the local stack
//! runs it with `ONCEFLOW_BROKER_STORAGE=persistent`: a few thousand commands
//! accepted while no processor runs are all applied once one starts. Before
//! the broker's file was indexed (scripts/index-broker-storage.py), a
//! backlog of this kind froze its consumers: fetches took minutes. The bound
//! is generous (not a timing test); the benchmark measures the rate.

use futures::{StreamExt as _, stream};
use onceflow_tests::{IngestClient, OUTCOME_TIMEOUT, OwnBroker, TestEnv, eventually};
use serde_json::json;

use crate::processor::processor_db;

/// Commands queued while the processor is stopped.
const BACKLOG: usize = 3_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_backlog_on_persistent_storage_drains_once_the_processor_starts() {
    let mut env = TestEnv::new();
    let broker = OwnBroker::start(&env.scratch_dir()).await;
    env.kafka.brokers = broker.addr.clone();
    // Nothing drains while the processor is stopped, so ingest's shedding
    // would refuse the backlog once the lag it measures passes `min_lag`
    // (how soon depends on the relay's pace on this machine): the backlog is
    // the point here, so the floor sits above it.
    let ingest = env.start_ingest_with(|config| config.shed.min_lag = 2 * BACKLOG as i64).await;
    let client = IngestClient::new(&ingest);

    let open = json!({"type": "ledger.open_account", "payload": {"account_id": "backlog", "currency": "EUR"}});
    assert_eq!(client.submit("open-backlog", &open).await.status, 202);
    let accepted: Vec<u16> = stream::iter(0..BACKLOG)
        .map(|n| {
            let client = &client;
            async move {
                let deposit = json!({"type": "ledger.deposit", "payload": {"account_id": "backlog", "amount": 1}});
                client.submit(&format!("deposit-{n}"), &deposit).await.status
            }
        })
        .buffer_unordered(32)
        .collect()
        .await;
    let refused: Vec<&u16> = accepted.iter().filter(|status| **status != 202).collect();
    assert!(refused.is_empty(), "every deposit accepted, refused with {refused:?}");

    let _processor = env.start_processor().await;
    let db = processor_db(&env).await;
    eventually(&format!("the {BACKLOG} queued deposits to apply"), OUTCOME_TIMEOUT * 2, || async {
        let balance: Option<i64> =
            sqlx::query_scalar("SELECT balance FROM accounts WHERE tenant = 'dev' AND account_id = 'backlog'")
                .fetch_optional(&db)
                .await
                .ok()
                .flatten();
        (balance == Some(BACKLOG as i64)).then_some(())
    })
    .await;
    let postings: i64 = sqlx::query_scalar("SELECT count(*) FROM postings").fetch_one(&db).await.unwrap();
    assert_eq!(postings, BACKLOG as i64, "each deposit once");

    db.close().await;
    // The services first, while their broker still answers: a consumer
    // dropped after its broker is gone waits for it without end in
    // librdkafka's close (a CI run hung here for 25 minutes).
    env.teardown().await;
    drop(broker);
}
