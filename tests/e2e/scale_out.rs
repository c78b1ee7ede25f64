//! Scale-out (issue 22): two instances of each service, as real processes on
//! one broker and one set of databases: both ingests take commands (a client
//! retries a key on the other when one is away), both processors share the
//! consumer group, both notifiers serve SSE readers. Under load, every
//! instance is restarted in turn (SIGTERM, as an orchestrator's rolling
//! restart does). Afterwards every accepted deposit took effect exactly once,
//! every key named one job, and a reader on each notifier, resuming with
//! `Last-Event-ID` across its notifier's restart, saw every job's terminal
//! event exactly once: no command and no stream event lost.

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use onceflow_tests::{DEV_API_KEY, OUTCOME_TIMEOUT, TestEnv, development_config, eventually, free_addr};
use tokio_util::sync::CancellationToken;

use crate::fleet::{Managed, Seen, Submitted, deposit_load, open_accounts, read_events, succeeds};

const ACCOUNTS: [&str; 4] = ["scale-a", "scale-b", "scale-c", "scale-d"];
/// Deposits submitted per second while the instances restart.
const RATE_PER_SEC: u64 = 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rolling_restart_of_two_instances_of_each_service_loses_no_command_and_no_stream_event() {
    let began = Instant::now();
    let mut env = TestEnv::new();
    env.create_topics().await;
    let logs = env.scratch_dir();
    eprintln!("scale-out test: logs in {}", logs.display());
    let kafka = env.kafka.clone();
    let common = |database: String, service: &str| {
        vec![
            ("ONCEFLOW_DATABASE__URL", database),
            ("ONCEFLOW_KAFKA__BROKERS", kafka.brokers.clone()),
            ("ONCEFLOW_KAFKA__TOPIC_PREFIX", kafka.topic_prefix.clone()),
            ("ONCEFLOW_KAFKA__PARTITIONS", kafka.partitions.to_string()),
            ("ONCEFLOW_TELEMETRY__LOG_FILTER", "warn".to_owned()),
            ("ONCEFLOW_CONFIG", development_config(service).display().to_string()),
        ]
    };
    let (ingest_db, processor_db, notifier_db) =
        (env.database("ingest").url, env.database("processor").url, env.database("notifier").url);
    let mut instances = Vec::new();
    for n in 1..=2 {
        let addr = free_addr();
        let mut vars = common(ingest_db.clone(), "ingest");
        vars.extend([
            ("ONCEFLOW_LISTEN", addr.clone()),
            ("ONCEFLOW_RESULTS_GROUP_ID", format!("ingest-{}", env.id)),
            ("ONCEFLOW_SHED__PROCESSOR_GROUP", format!("processor-{}", env.id)),
        ]);
        instances.push(Managed::new("onceflow-ingest", &format!("ingest-{n}"), vars, &logs, addr));
    }
    for n in 1..=2 {
        let addr = free_addr();
        let mut vars = common(processor_db.clone(), "processor");
        vars.extend([("ONCEFLOW_LISTEN", addr.clone()), ("ONCEFLOW_GROUP_ID", format!("processor-{}", env.id))]);
        instances.push(Managed::new("onceflow-processor", &format!("processor-{n}"), vars, &logs, addr));
    }
    for n in 1..=2 {
        let addr = free_addr();
        let mut vars = common(notifier_db.clone(), "notifier");
        vars.extend([("ONCEFLOW_LISTEN", addr.clone()), ("ONCEFLOW_GROUP_ID", format!("notifier-{}", env.id))]);
        instances.push(Managed::new("onceflow-notifier", &format!("notifier-{n}"), vars, &logs, addr));
    }
    for instance in &mut instances {
        instance.start().await;
    }
    let ingests: Vec<String> = instances[0..2].iter().map(|i| i.addr.clone()).collect();
    let notifiers: Vec<String> = instances[4..6].iter().map(|i| i.addr.clone()).collect();

    // A reader on each notifier.
    let stop_readers = CancellationToken::new();
    let readers: Vec<_> = notifiers
        .iter()
        .map(|notifier| {
            let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
            (seen.clone(), tokio::spawn(read_events(notifier.clone(), seen, stop_readers.clone())))
        })
        .collect();

    let http = reqwest::Client::builder().timeout(Duration::from_secs(5)).build().expect("client");
    let ingest_refs: Vec<&str> = ingests.iter().map(String::as_str).collect();
    let api = onceflow_tests::IngestClient::at(&format!("http://{}", ingests[0]), DEV_API_KEY);
    let opened = open_accounts(&http, &ingest_refs, &api, &ACCOUNTS).await;

    // The load: deposits spread over both ingests, each key retried until
    // accepted (on the other ingest when one is away).
    let stop_load = CancellationToken::new();
    let load = deposit_load(&ACCOUNTS, ingests.clone(), RATE_PER_SEC, http.clone(), stop_load.clone());

    // The rolling restart: every instance in turn, a few seconds apart, one
    // instance of each service, then the other (a consumer group settles
    // between its two members' restarts: nisshi 0.7.0-pre.2 can keep a group
    // rebalancing for good when its leader leaves during a rebalance, with the
    // departed leader still named in every JoinGroup answer).
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut restarts = Vec::new();
    for n in [0, 2, 4, 1, 3, 5] {
        let instance = &mut instances[n];
        let started = Instant::now();
        instance.restart_gracefully().await;
        restarts.push(format!("{} {:.1} s", instance.addr, started.elapsed().as_secs_f64()));
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
    stop_load.cancel();
    let submitted = load.await.expect("the load");
    for instance in &mut instances {
        instance.assert_alive();
    }

    // Every accepted deposit ends succeeded, once.
    for (key, Submitted { job_id, .. }) in &submitted {
        succeeds(&api, &format!("deposit {key}"), job_id).await;
    }
    let distinct: HashSet<&str> = submitted.values().map(|deposit| deposit.job_id.as_str()).collect();
    assert_eq!(distinct.len(), submitted.len(), "one job per key, and no two keys share one");
    let processor_pool = sqlx::PgPool::connect(&env.database_url("processor")).await.expect("processor db");
    let balances: HashMap<String, i64> = sqlx::query_as::<_, (String, i64)>("SELECT account_id, balance FROM accounts")
        .fetch_all(&processor_pool)
        .await
        .expect("balances")
        .into_iter()
        .collect();
    for account in ACCOUNTS {
        let expected: i64 = submitted.values().filter(|d| d.account == account).map(|d| d.amount).sum();
        assert_eq!(balances.get(account).copied().unwrap_or(0), expected, "{account}: each deposit exactly once");
    }

    // Each reader saw every job's terminal event, each event once.
    let wanted: HashSet<String> =
        submitted.values().map(|deposit| deposit.job_id.clone()).chain(opened.iter().cloned()).collect();
    for (n, (seen, _)) in readers.iter().enumerate() {
        eventually(&format!("reader {n} to see every terminal event"), OUTCOME_TIMEOUT, || async {
            let seen = seen.lock().expect("seen");
            let terminal: HashSet<&str> =
                seen.iter().filter(|s| s.event_type == "job.succeeded").map(|s| s.job_id.as_str()).collect();
            wanted.iter().all(|job| terminal.contains(job.as_str())).then_some(())
        })
        .await;
    }
    stop_readers.cancel();
    let mut reconnects = Vec::new();
    for (n, (seen, reader)) in readers.into_iter().enumerate() {
        reconnects.push(reader.await.expect("a reader"));
        let seen = seen.lock().expect("seen");
        let mut by_event: HashMap<&str, usize> = HashMap::new();
        for event in seen.iter() {
            *by_event.entry(event.event_id.as_str()).or_default() += 1;
        }
        let repeated: Vec<_> = by_event.iter().filter(|(_, count)| **count > 1).collect();
        assert!(repeated.is_empty(), "reader {n}: events seen more than once: {repeated:?}");
    }
    eprintln!(
        "scale-out test: {} deposits over 2 ingests, 2 processors, 2 notifiers; restarts {restarts:?}; SSE \
         reconnects {reconnects:?}; {:.1} s",
        submitted.len(),
        began.elapsed().as_secs_f64()
    );
    processor_pool.close().await;
    drop(instances);
    env.teardown().await;
    let _ = std::fs::remove_dir_all(logs);
}
