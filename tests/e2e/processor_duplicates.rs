//! A command delivered twice (three times) to the processor takes effect
//! once: one inbox row, one posting, one result.

use onceflow_contracts::JobStatus;
use onceflow_tests::{OUTCOME_TIMEOUT, PositionedRecord, TestEnv, kafka_producer, read_topic_to_end};
use serde_json::Value;

use crate::processor::{
    CommandMessage, balance, count, inbox, processor_db, published_results, results_of, send, wait_handled,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_command_delivered_twice_takes_effect_once() {
    let mut env = TestEnv::new();
    let processor = env.start_processor().await;
    let topics = env.kafka.topics();
    let producer = kafka_producer(&env.kafka);
    let db = processor_db(&env).await;

    // An account opening delivered twice: applied a second time, it would be
    // refused (`account_exists`) and show as a second, failed result.
    let open = CommandMessage::open_account("alice");
    let open_at = send(&producer, &topics.commands, &open, None).await;
    send(&producer, &topics.commands, &open, None).await;
    // A command behind the copies on their partition: once it is handled, so
    // are the copies (a partition is consumed in order). It also makes sure
    // the account is open before any copy of the deposit arrives.
    let behind_open = CommandMessage::open_account("bob");
    send(&producer, &topics.commands, &behind_open, Some(open_at.partition)).await;
    wait_handled(&db, &[open.job_id, behind_open.job_id], OUTCOME_TIMEOUT).await;

    // A deposit delivered three times. The identical record again, as a relay
    // that died between publishing and deleting its outbox row publishes it...
    let deposit = CommandMessage::deposit("alice", 500);
    let first = send(&producer, &topics.commands, &deposit, None).await;
    let second = send(&producer, &topics.commands, &deposit, None).await;
    assert_eq!(second.partition, first.partition, "same key, same partition");
    // ...and once more on another partition, where another consumer of the
    // group may be the one to get it.
    let other_partition = (first.partition + 1) % env.kafka.partitions;
    send(&producer, &topics.commands, &deposit, Some(other_partition)).await;
    let behind_first = CommandMessage::open_account("carol");
    let behind_other = CommandMessage::open_account("dave");
    send(&producer, &topics.commands, &behind_first, Some(first.partition)).await;
    send(&producer, &topics.commands, &behind_other, Some(other_partition)).await;
    wait_handled(&db, &[deposit.job_id, behind_first.job_id, behind_other.job_id], OUTCOME_TIMEOUT).await;

    // The copies really were on the topic, byte for byte the same.
    let commands = read_topic_to_end(&env.kafka, &topics.commands, OUTCOME_TIMEOUT).await;
    let copies_of = |message: &CommandMessage| -> Vec<&PositionedRecord> {
        commands.iter().filter(|r| r.record.headers.get("message-id") == Some(&message.id())).collect()
    };
    assert_eq!(copies_of(&open).len(), 2, "the opening was delivered twice");
    let copies = copies_of(&deposit);
    assert_eq!(copies.len(), 3, "the deposit was delivered three times");
    assert!(copies.iter().all(|c| c.record.payload == deposit.payload), "the copies are identical");

    // One inbox row, one posting, the balance moved once.
    let inbox = inbox(&db).await;
    assert_eq!(inbox.len(), 5, "one inbox row per distinct command: {inbox:?}");
    assert_eq!(inbox.get(&open.job_id).map(String::as_str), Some("succeeded"));
    assert_eq!(inbox.get(&deposit.job_id).map(String::as_str), Some("succeeded"));
    assert_eq!(count(&db, "SELECT count(*) FROM postings").await, 1, "one posting");
    let entries: Vec<(String, i64)> =
        sqlx::query_as("SELECT account_id, amount FROM entries WHERE posting_id = $1 ORDER BY amount")
            .bind(deposit.job_id)
            .fetch_all(&db)
            .await
            .unwrap();
    assert_eq!(entries, [("world:EUR".to_owned(), -500), ("alice".to_owned(), 500)]);
    assert_eq!(balance(&db, "alice").await, 500, "the deposit moved the balance once");
    assert_eq!(balance(&db, "world:EUR").await, -500);

    // Exactly one result for the deposit's job, and one for each other job.
    let results = published_results(&env, &db).await;
    let open_results = results_of(&results, &open.id());
    assert_eq!(open_results.len(), 1, "one result for the opening: {open_results:?}");
    assert_eq!(open_results[0].status, JobStatus::Succeeded);
    let deposit_results = results_of(&results, &deposit.id());
    assert_eq!(deposit_results.len(), 1, "one result for the deposit: {deposit_results:?}");
    assert_eq!(deposit_results[0].status, JobStatus::Succeeded);
    let result: Value = serde_json::from_str(deposit_results[0].result_json.as_deref().unwrap()).unwrap();
    assert_eq!(result["balance"], 500);
    let (record, _) = results.iter().find(|(_, event)| event.job_id == deposit.id()).unwrap();
    assert_eq!(record.headers["causation-id"], deposit.id());
    assert_eq!(record.headers["correlation-id"], deposit.envelope.correlation_id);
    assert_eq!(results.len(), 5, "one result per distinct command");

    processor.stop().await;
    db.close().await;
    env.teardown().await;
}
