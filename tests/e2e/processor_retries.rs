//! The processor's retries of transient failures: a shutdown in the middle
//! of a command's retries leaves the command for redelivery instead of
//! skipping it; a retrying command holds up only its own partition; a
//! database outage dead-letters nothing and every command applies once.

use std::time::Duration;

use onceflow_contracts::JobStatus;
use onceflow_tests::{OUTCOME_TIMEOUT, TestEnv, allow_postings, eventually, kafka_producer, refuse_postings};
use sqlx::PgPool;

use crate::processor::{
    CommandMessage, balance, count, inbox, processor_db, published_results, results_of, send, wait_handled,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_shutdown_during_retries_leaves_the_command_for_redelivery() {
    let mut env = TestEnv::new();
    // Retries that outlast the test's patience: the shutdown comes mid-retry.
    let patient = |config: &mut onceflow_processor::ProcessorConfig| {
        config.retry.base_delay_ms = 20;
        config.retry.max_delay_ms = 100;
    };
    let processor = env.start_processor_with(patient).await;
    let topics = env.kafka.topics();
    let producer = kafka_producer(&env.kafka);
    let db = processor_db(&env).await;

    // A database fault that the processor sees as transient, counted outside
    // every transaction.
    refuse_postings(&db, "serialization_failure").await;

    let open = CommandMessage::open_account("rita");
    let deposit = CommandMessage::deposit("rita", 500);
    send(&producer, &topics.commands, &open, None).await;
    send(&producer, &topics.commands, &deposit, None).await;
    wait_handled(&db, &[open.job_id], OUTCOME_TIMEOUT).await;
    eventually("the deposit to be retried", OUTCOME_TIMEOUT, || async {
        let failures: i64 =
            sqlx::query_scalar("SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM refused_postings")
                .fetch_one(&db)
                .await
                .ok()?;
        (failures >= 3).then_some(())
    })
    .await;

    // A graceful stop while the deposit is being retried.
    processor.stop().await;
    assert!(!inbox(&db).await.contains_key(&deposit.job_id), "the deposit did not take effect");

    // The fault is repaired; the next processor of the group gets the deposit again.
    allow_postings(&db).await;
    let processor = env.start_processor_with(patient).await;
    wait_handled(&db, &[deposit.job_id], OUTCOME_TIMEOUT).await;
    assert_eq!(inbox(&db).await.get(&deposit.job_id).map(String::as_str), Some("succeeded"));
    assert_eq!(balance(&db, "rita").await, 500);
    let results = published_results(&env, &db).await;
    let events = results_of(&results, &deposit.id());
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0].status, JobStatus::Succeeded);

    processor.stop().await;
    db.close().await;
    env.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_retrying_command_holds_up_only_its_own_partition() {
    let mut env = TestEnv::new();
    let processor = env
        .start_processor_with(|config| {
            config.lanes = 4;
            config.retry.base_delay_ms = 20;
            config.retry.max_delay_ms = 100;
        })
        .await;
    let topics = env.kafka.topics();
    let producer = kafka_producer(&env.kafka);
    let db = processor_db(&env).await;

    // Postings of account `stuck` fail transiently until repaired.
    sqlx::raw_sql(
        "CREATE FUNCTION fail_stuck() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
             IF NEW.account_id = 'stuck' THEN
                 RAISE EXCEPTION 'injected fault' USING ERRCODE = 'serialization_failure';
             END IF;
             RETURN NEW;
         END $$;
         CREATE TRIGGER fail_stuck BEFORE INSERT ON entries FOR EACH ROW EXECUTE FUNCTION fail_stuck();",
    )
    .execute(&db)
    .await
    .expect("inject the fault");

    // `stuck` on partition 0, `free` on partition 1: different lanes.
    let opens = [CommandMessage::open_account("stuck"), CommandMessage::open_account("free")];
    send(&producer, &topics.commands, &opens[0], Some(0)).await;
    send(&producer, &topics.commands, &opens[1], Some(1)).await;
    wait_handled(&db, &[opens[0].job_id, opens[1].job_id], OUTCOME_TIMEOUT).await;
    let stuck = CommandMessage::deposit("stuck", 100);
    send(&producer, &topics.commands, &stuck, Some(0)).await;
    let free: Vec<CommandMessage> = (0..5).map(|_| CommandMessage::deposit("free", 10)).collect();
    for message in &free {
        send(&producer, &topics.commands, message, Some(1)).await;
    }

    // The other partition's commands all apply while `stuck` is still retrying.
    wait_handled(&db, &free.iter().map(|m| m.job_id).collect::<Vec<_>>(), OUTCOME_TIMEOUT).await;
    assert!(!inbox(&db).await.contains_key(&stuck.job_id), "the stuck deposit is still being retried");
    assert_eq!(balance(&db, "free").await, 50);

    // Repaired, the stuck one applies too, once.
    sqlx::raw_sql("DROP TRIGGER fail_stuck ON entries").execute(&db).await.expect("repair");
    wait_handled(&db, &[stuck.job_id], OUTCOME_TIMEOUT).await;
    assert_eq!(balance(&db, "stuck").await, 100);
    processor.stop().await;
    db.close().await;
    env.teardown().await;
}

// ---------------------------------------------------------------------------
// A database outage.
// ---------------------------------------------------------------------------

/// How long the outage lasts: longer than the old bound on retries (five
/// attempts, each up to the pool's 5 s acquire timeout, about 30 s), after
/// which the head command of every lane used to be dead-lettered.
const OUTAGE: Duration = Duration::from_secs(35);

/// Refuse (or allow again) every connection to `database`, from a session
/// on another database: ALLOW_CONNECTIONS binds superusers too, which a
/// CONNECTION LIMIT does not.
async fn allow_connections(admin: &PgPool, database: &str, allow: bool) {
    sqlx::query(&format!("ALTER DATABASE \"{database}\" ALLOW_CONNECTIONS {allow}"))
        .execute(admin)
        .await
        .expect("alter the database");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_database_outage_dead_letters_nothing_and_every_command_applies_once() {
    let mut env = TestEnv::new();
    let processor = env.start_processor().await;
    let topics = env.kafka.topics();
    let producer = kafka_producer(&env.kafka);
    let db = processor_db(&env).await;
    let url = env.database_url("processor");
    let (server, database) = url.rsplit_once('/').expect("a database url");
    let admin = PgPool::connect(&format!("{server}/postgres")).await.expect("the server's admin database");

    let accounts = ["ola", "oskar"];
    let opens: Vec<CommandMessage> = accounts.iter().map(|a| CommandMessage::open_account(a)).collect();
    for (partition, open) in (0..).zip(&opens) {
        send(&producer, &topics.commands, open, Some(partition)).await;
    }
    wait_handled(&db, &opens.iter().map(|m| m.job_id).collect::<Vec<_>>(), OUTCOME_TIMEOUT).await;

    // The database goes away: no new session, every session of the processor cut.
    allow_connections(&admin, database, false).await;
    let cut: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                               WHERE datname = $1 AND pid <> pg_backend_pid()) AS t",
    )
    .bind(database)
    .fetch_one(&admin)
    .await
    .expect("cut the processor's sessions");
    eprintln!("outage: {cut} sessions cut");
    db.close().await;

    // Commands arrive on both partitions during the outage.
    let deposits: Vec<CommandMessage> =
        (0..10).map(|i| CommandMessage::deposit(accounts[i % 2], i64::try_from(i).unwrap() + 1)).collect();
    for (i, deposit) in deposits.iter().enumerate() {
        send(&producer, &topics.commands, deposit, Some(i32::try_from(i % 2).unwrap())).await;
    }
    tokio::time::sleep(OUTAGE).await;
    allow_connections(&admin, database, true).await;

    // Back: every command applies, once, and nothing was dead-lettered.
    let db = processor_db(&env).await;
    wait_handled(&db, &deposits.iter().map(|m| m.job_id).collect::<Vec<_>>(), OUTCOME_TIMEOUT).await;
    let outcomes = inbox(&db).await;
    assert!(outcomes.values().all(|outcome| outcome == "succeeded"), "{outcomes:?}");
    assert_eq!(count(&db, "SELECT count(*) FROM dead_letters").await, 0, "an outage dead-letters nothing");
    assert_eq!(balance(&db, "ola").await, 1 + 3 + 5 + 7 + 9);
    assert_eq!(balance(&db, "oskar").await, 2 + 4 + 6 + 8 + 10);
    assert_eq!(count(&db, "SELECT count(*) FROM postings").await, 10, "each deposit applied once");
    let results = published_results(&env, &db).await;
    for deposit in &deposits {
        let events = results_of(&results, &deposit.id());
        assert_eq!(events.len(), 1, "{events:?}");
        assert_eq!(events[0].status, JobStatus::Succeeded);
    }

    processor.stop().await;
    db.close().await;
    admin.close().await;
    env.teardown().await;
}
