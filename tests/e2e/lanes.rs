//! One lane that cannot keep up holds up only its own partitions. A built-in
//! test handler applied inline blocks until the test releases it; 200 of its
//! commands on partition 0 fill that lane's queue. Deposits sent afterwards
//! to the other partitions must all apply while it is still blocked: the
//! consumer loop used to wait for the full lane, so every lane stopped about
//! 128 messages behind the blocked one.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use onceflow_processor::handlers::{Builtins, CommandContext, HandlerFuture, Refusals};
use onceflow_tests::{OUTCOME_TIMEOUT, TestEnv, eventually, kafka_producer};
use serde_json::json;
use uuid::Uuid;

use crate::processor::{CommandMessage, balance, processor_db, send, wait_handled};

const BLOCKING: &str = "test.blocking";
static RELEASED: AtomicBool = AtomicBool::new(false);
static ENTERED: AtomicUsize = AtomicUsize::new(0);

/// Waits until the test releases it, then succeeds.
fn blocking<'a>(_tx: &'a mut sqlx::PgConnection, _command: &'a CommandContext) -> HandlerFuture<'a> {
    Box::pin(async move {
        ENTERED.fetch_add(1, Ordering::SeqCst);
        while !RELEASED.load(Ordering::SeqCst) {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        Ok(json!({"released": true}))
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lane_that_cannot_keep_up_pauses_only_its_own_partitions() {
    let mut env = TestEnv::new();
    env.kafka.partitions = 4;
    env.create_topics().await;
    let topics = env.kafka.topics();
    let producer = kafka_producer(&env.kafka);

    let mut builtins = Builtins::shipped();
    builtins.register(BLOCKING, blocking, Refusals::BeforeWriting);
    let types = env.command_types_file(&format!(
        "[types.\"{BLOCKING}\"]\nschema = {{}}\nordering_key = \"/n\"\nhandler = {{ builtin = \"{BLOCKING}\" }}\n"
    ));
    let _processor = env
        .start_processor_with_handlers(builtins, |config| {
            config.command_types_file = types;
            config.lanes = 4;
        })
        .await;
    let db = processor_db(&env).await;

    // Accounts on partitions 1-3 first, while every lane is free.
    let accounts = ["lane-1", "lane-2", "lane-3"];
    let mut opened = Vec::new();
    for (n, account) in accounts.iter().enumerate() {
        let open = CommandMessage::open_account(account);
        send(&producer, &topics.commands, &open, Some(i32::try_from(n + 1).unwrap())).await;
        opened.push(open.job_id);
    }
    wait_handled(&db, &opened, OUTCOME_TIMEOUT).await;

    // Partition 0's lane blocks on its first command; 199 more fill its
    // queue and what the consumer fetched.
    for n in 0..200 {
        let command = CommandMessage::new(BLOCKING, "blocked", &json!({"n": n}));
        send(&producer, &topics.commands, &command, Some(0)).await;
    }
    eventually("the lane to block", OUTCOME_TIMEOUT, || async { (ENTERED.load(Ordering::SeqCst) > 0).then_some(()) })
        .await;
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;

    // Deposits on the other partitions apply while partition 0 is blocked.
    let mut deposits: Vec<Uuid> = Vec::new();
    for round in 0..20 {
        for (n, account) in accounts.iter().enumerate() {
            let deposit = CommandMessage::deposit(account, 1 + round);
            send(&producer, &topics.commands, &deposit, Some(i32::try_from(n + 1).unwrap())).await;
            deposits.push(deposit.job_id);
        }
    }
    wait_handled(&db, &deposits, OUTCOME_TIMEOUT).await;
    assert!(!RELEASED.load(Ordering::SeqCst));
    for account in accounts {
        assert_eq!(balance(&db, account).await, (1..=20).sum::<i64>(), "{account}");
    }

    // Released, partition 0 catches up: every blocked command applies once.
    RELEASED.store(true, Ordering::SeqCst);
    eventually("the blocked commands to apply", OUTCOME_TIMEOUT, || async {
        let applied: i64 =
            sqlx::query_scalar("SELECT count(*) FROM inbox WHERE command_type = $1 AND outcome = 'succeeded'")
                .bind(BLOCKING)
                .fetch_one(&db)
                .await
                .ok()?;
        (applied == 200).then_some(())
    })
    .await;
    db.close().await;
    env.teardown().await;
}
