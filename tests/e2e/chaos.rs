//! The whole stack under faults, as a client sees it: two instances each of
//! ingest, processor and notifier run as real processes on a broker of the
//! test's own (both ingests take commands, both processors share the
//! consumer group, both notifiers serve a reader), while a client submits
//! deposits and retries each one with the same key until it gets its `202`
//! (on the other ingest when one is away). Meanwhile the instances of each
//! service are SIGKILLed and restarted in turn, every database connection is
//! cut, and the broker is paused, then SIGKILLed and restarted (it keeps its
//! data in a file, as the local stack's does).
//!
//! Beside the deposits, commands of a push handler (a server of the test's,
//! which outlives every kill) are submitted in order on two ordering keys,
//! and commands of a pull type are taken by a worker of the test's that
//! misbehaves on purpose: it completes some twice, fails some after
//! completing them, abandons some (their leases end and they are handed out
//! again) and completes those late from the superseded attempt, and retries
//! every callback the processor's kills cut off.
//!
//! Afterwards: every accepted deposit took effect exactly once (the ledger
//! invariant), every job is terminal, a key's retries all named one job, a
//! resuming SSE reader on each notifier saw every job's terminal event
//! exactly once, and each
//! push key's commands were called, and their results streamed, in the order
//! of their 202s (a call may repeat after a processor was killed in the
//! middle of it, always with the job's one key); every pull command ended
//! succeeded with one terminal event, whatever its worker did.
//!
//! The fleet's processes and its careful client are in `fleet.rs`.

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use onceflow_tests::{
    DEV_API_KEY, OUTCOME_TIMEOUT, OwnBroker, PushHandler, PushReply, TestEnv, database_server, development_config,
    eventually, free_addr,
};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::fleet::{Managed, Seen, deposit_load, open_accounts, read_events, submit_until_accepted, succeeds};

const ACCOUNTS: [&str; 4] = ["chaos-a", "chaos-b", "chaos-c", "chaos-d"];
/// Instances of each service.
const INSTANCES: usize = 2;
/// The ordering keys of the push handler's commands.
const GREET_KEYS: [&str; 2] = ["g-0", "g-1"];
/// Deposits submitted per second while the faults run.
const RATE_PER_SEC: u64 = 20;
/// How long the load and the faults last.
const LOAD: Duration = Duration::from_secs(45);

/// A push command accepted: its ordering key, its number on that key (the
/// order of its 202) and its job.
type Greeted = (&'static str, u64, String);

/// End every session of the test's databases, as a database restart or a
/// network cut would.
async fn cut_database_connections(admin: &sqlx::PgPool, env_id: &str) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity
         WHERE datname LIKE $1 AND pid <> pg_backend_pid()) cut",
    )
    .bind(format!("onceflow_test_{env_id}_%"))
    .fetch_one(admin)
    .await
    .expect("terminate sessions")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_whole_stack_survives_kills_cuts_and_a_paused_broker_with_every_effect_once() {
    let began = Instant::now();
    let mut env = TestEnv::new();
    let logs = env.scratch_dir();
    let mut broker = OwnBroker::start(&logs).await;
    env.kafka.brokers = broker.addr.clone();
    eprintln!("chaos test: logs in {}", logs.display());
    let common = |kafka: &onceflow_runtime::config::KafkaConfig, database: String| {
        vec![
            ("ONCEFLOW_DATABASE__URL", database),
            ("ONCEFLOW_KAFKA__BROKERS", kafka.brokers.clone()),
            ("ONCEFLOW_KAFKA__TOPIC_PREFIX", kafka.topic_prefix.clone()),
            ("ONCEFLOW_KAFKA__PARTITIONS", kafka.partitions.to_string()),
            ("ONCEFLOW_TELEMETRY__LOG_FILTER", "warn".to_owned()),
        ]
    };
    let kafka = env.kafka.clone();
    // The push handler answers at once; it lives in the test, so no kill
    // reaches it.
    let handler = PushHandler::start(|request| PushReply::ok(json!({"n": request.json()["payload"]["n"]}))).await;
    let types = env.command_types_file(&format!(
        r#"
[types."chaos.greet"]
schema = {{ type = "object", required = ["key", "n"], properties = {{ key = {{ type = "string" }}, n = {{ type = "integer" }} }} }}
ordering_key = "/key"
handler = {{ push = "{}" }}
attempt_timeout_ms = 5000
retry = {{ max_attempts = 20, initial_backoff_ms = 200, max_backoff_ms = 1000 }}

# Taken by the test's worker with the development worker key (its type).
[types."demo.report"]
schema = {{ type = "object", required = ["n"], properties = {{ n = {{ type = "integer" }} }} }}
handler = "pull"
attempt_timeout_ms = 120000
heartbeat_timeout_ms = 5000
retry = {{ max_attempts = 20, initial_backoff_ms = 200, max_backoff_ms = 1000 }}
"#,
        handler.url("/greet")
    ));
    // Two instances of each service, on one broker and one set of databases.
    let (ingest_db, processor_db, notifier_db) =
        (env.database("ingest").url, env.database("processor").url, env.database("notifier").url);
    let (mut ingests, mut processors, mut notifiers) = (Vec::new(), Vec::new(), Vec::new());
    for n in 1..=INSTANCES {
        let addr = free_addr();
        let mut vars = common(&kafka, ingest_db.clone());
        vars.extend([
            ("ONCEFLOW_COMMAND_TYPES_FILE", types.clone()),
            ("ONCEFLOW_LISTEN", addr.clone()),
            ("ONCEFLOW_CONFIG", development_config("ingest").display().to_string()),
            ("ONCEFLOW_RESULTS_GROUP_ID", format!("ingest-{}", env.id)),
            ("ONCEFLOW_SHED__PROCESSOR_GROUP", format!("processor-{}", env.id)),
        ]);
        ingests.push(Managed::new("onceflow-ingest", &format!("ingest-{n}"), vars, &logs, addr));
        let addr = free_addr();
        let mut vars = common(&kafka, processor_db.clone());
        vars.extend([
            ("ONCEFLOW_LISTEN", addr.clone()),
            ("ONCEFLOW_GROUP_ID", format!("processor-{}", env.id)),
            ("ONCEFLOW_CONFIG", development_config("processor").display().to_string()),
            ("ONCEFLOW_COMMAND_TYPES_FILE", types.clone()),
            ("ONCEFLOW_EXECUTIONS__PUSH__ALLOWLIST", "[\"127.0.0.1\"]".to_owned()),
        ]);
        processors.push(Managed::new("onceflow-processor", &format!("processor-{n}"), vars, &logs, addr));
        let addr = free_addr();
        let mut vars = common(&kafka, notifier_db.clone());
        vars.extend([
            ("ONCEFLOW_LISTEN", addr.clone()),
            ("ONCEFLOW_CONFIG", development_config("notifier").display().to_string()),
            ("ONCEFLOW_GROUP_ID", format!("notifier-{}", env.id)),
        ]);
        notifiers.push(Managed::new("onceflow-notifier", &format!("notifier-{n}"), vars, &logs, addr));
    }
    for service in ingests.iter_mut().chain(&mut processors).chain(&mut notifiers) {
        service.start().await;
    }
    let ingest_addrs: Vec<String> = ingests.iter().map(|ingest| ingest.addr.clone()).collect();
    let ingest_refs: Vec<&str> = ingest_addrs.iter().map(String::as_str).collect();

    // A resuming reader on each notifier.
    let stop_reader = CancellationToken::new();
    let readers: Vec<_> = notifiers
        .iter()
        .map(|notifier| {
            let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
            (seen.clone(), tokio::spawn(read_events(notifier.addr.clone(), seen, stop_reader.clone())))
        })
        .collect();

    let http = reqwest::Client::builder().timeout(Duration::from_secs(5)).build().expect("client");
    let api = onceflow_tests::IngestClient::at(&format!("http://{}", ingest_addrs[0]), DEV_API_KEY);
    let opened = open_accounts(&http, &ingest_refs, &api, &ACCOUNTS).await;

    // The load: RATE_PER_SEC deposits a second, each by its own client task.
    let stop_load = CancellationToken::new();
    let load = deposit_load(&ACCOUNTS, ingest_addrs.clone(), RATE_PER_SEC, http.clone(), stop_load.clone());

    // The push handler's commands: per key, one after another, each once
    // accepted, so their 202s come in the order of `n`.
    let greeted: Arc<Mutex<Vec<Greeted>>> = Arc::default();
    let greeters: Vec<_> = GREET_KEYS
        .iter()
        .map(|&key| {
            let (greeted, stop_load, http, ingest_addrs) =
                (greeted.clone(), stop_load.clone(), http.clone(), ingest_addrs.clone());
            tokio::spawn(async move {
                let mut n = 0;
                while !stop_load.is_cancelled() {
                    n += 1;
                    let body = json!({"type": "chaos.greet", "payload": {"key": key, "n": n}});
                    let ingests: Vec<&str> = ingest_addrs.iter().map(String::as_str).collect();
                    let (job_id, _) = submit_until_accepted(&http, &ingests, &format!("greet-{key}-{n}"), &body).await;
                    greeted.lock().expect("greeted").push((key, n, job_id));
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            })
        })
        .collect();

    // Pull commands, one every 200 ms, and the misbehaving worker.
    let pulled: Arc<Mutex<Vec<String>>> = Arc::default();
    let reporter = {
        let (pulled, stop_load, http, ingest_addrs) =
            (pulled.clone(), stop_load.clone(), http.clone(), ingest_addrs.clone());
        tokio::spawn(async move {
            let mut n: u64 = 0;
            while !stop_load.is_cancelled() {
                n += 1;
                let body = json!({"type": "demo.report", "payload": {"n": n}});
                let ingests: Vec<&str> = ingest_addrs.iter().map(String::as_str).collect();
                let (job_id, _) = submit_until_accepted(&http, &ingests, &format!("report-{n}"), &body).await;
                pulled.lock().expect("pulled").push(job_id);
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    };
    let stop_worker = CancellationToken::new();
    let worker = tokio::spawn(misbehaving_worker(format!("http://{}", processors[0].addr), stop_worker.clone()));

    // The faults, one every few seconds while the load runs.
    let admin = sqlx::PgPool::connect(&format!("{}/postgres", database_server())).await.expect("admin connection");
    let pause = Duration::from_secs(4);
    let mut faults = Vec::new();
    let fault_started = Instant::now();
    let mut round = 0;
    while fault_started.elapsed() < LOAD {
        tokio::time::sleep(pause).await;
        // Each kill takes the instances in turn.
        let instance = (round / 6) % INSTANCES;
        let fault = match round % 6 {
            0 => {
                processors[instance].kill_and_restart().await;
                format!("SIGKILL processor-{}", instance + 1)
            }
            1 => {
                ingests[instance].kill_and_restart().await;
                format!("SIGKILL ingest-{}", instance + 1)
            }
            2 => {
                notifiers[instance].kill_and_restart().await;
                format!("SIGKILL notifier-{}", instance + 1)
            }
            3 => format!("cut {} database connections", cut_database_connections(&admin, &env.id).await),
            4 => {
                broker.stop();
                tokio::time::sleep(Duration::from_secs(5)).await;
                broker.resume();
                "broker paused 5 s".to_owned()
            }
            _ => {
                broker.kill_and_restart().await;
                "SIGKILL broker, restarted on its data".to_owned()
            }
        };
        faults.push(fault);
        round += 1;
    }
    stop_load.cancel();
    let submitted = load.await.expect("the load");
    for greeter in greeters {
        greeter.await.expect("a greeter");
    }
    reporter.await.expect("the reporter");
    assert!(faults.iter().any(|f| f.starts_with("SIGKILL broker")), "the broker was never restarted: {faults:?}");
    for service in ingests.iter_mut().chain(&mut processors).chain(&mut notifiers) {
        service.assert_alive();
    }

    // Every accepted deposit ends, and ends succeeded (the accounts exist).
    for (key, deposit) in &submitted {
        succeeds(&api, &format!("deposit {key}"), &deposit.job_id).await;
    }
    let distinct_jobs: HashSet<&str> = submitted.values().map(|d| d.job_id.as_str()).collect();
    assert_eq!(distinct_jobs.len(), submitted.len(), "one job per key, and no two keys share one");
    // Every key, asked again after the storm, replays the job its 202 named.
    for (key, deposit) in &submitted {
        let body =
            json!({"type": "ledger.deposit", "payload": {"account_id": deposit.account, "amount": deposit.amount}});
        let replay = api.submit(key, &body).await;
        assert_eq!(replay.status, 202, "replay of {key}");
        assert_eq!(replay.header("idempotent-replayed"), Some("true"), "replay of {key}");
        assert_eq!(replay.json()["job_id"], deposit.job_id.as_str(), "replay of {key} names its job");
    }

    // The ledger: every deposit once, nothing else.
    let processor_db = sqlx::PgPool::connect(&env.database_url("processor")).await.expect("processor db");
    let balances: Vec<(String, i64)> =
        sqlx::query_as("SELECT account_id, balance FROM accounts").fetch_all(&processor_db).await.expect("balances");
    let balances: HashMap<String, i64> = balances.into_iter().collect();
    for account in ACCOUNTS {
        let expected: i64 = submitted.values().filter(|d| d.account == account).map(|d| d.amount).sum();
        assert_eq!(balances.get(account).copied().unwrap_or(0), expected, "{account}: each deposit exactly once");
    }
    let deposited: i64 = submitted.values().map(|d| d.amount).sum();
    assert_eq!(balances.get("world:EUR").copied().unwrap_or(0), -deposited, "the books balance");
    let postings: i64 = sqlx::query_scalar("SELECT count(*) FROM postings WHERE kind = 'deposit'")
        .fetch_one(&processor_db)
        .await
        .expect("postings");
    assert_eq!(postings, i64::try_from(submitted.len()).unwrap_or(0), "one posting per accepted deposit");

    // Every push command ended succeeded, each call with its job's key.
    let greeted = greeted.lock().expect("greeted").clone();
    for (key, n, job_id) in &greeted {
        succeeds(&api, &format!("{key} #{n}"), job_id).await;
    }
    let calls = handler.received();
    for request in &calls {
        assert_eq!(request.header("idempotency-key"), Some(request.job_id().as_str()), "one key per job");
    }
    for key in GREET_KEYS {
        let jobs: Vec<&String> = greeted.iter().filter(|(k, ..)| *k == key).map(|(.., job)| job).collect();
        let mut first_calls: Vec<&String> = Vec::new();
        for request in &calls {
            if let Some(job) = jobs.iter().find(|job| ***job == request.job_id())
                && !first_calls.contains(job)
            {
                first_calls.push(job);
            }
        }
        assert_eq!(first_calls, jobs, "{key}: first calls in the order of the 202s");
    }

    // Every pull command ended succeeded, whatever its worker did.
    let pulled = pulled.lock().expect("pulled").clone();
    for job_id in &pulled {
        succeeds(&api, "pull job", job_id).await;
    }
    stop_worker.cancel();
    let misdeeds = worker.await.expect("the worker");

    // The stream: each job's terminal event exactly once, across reconnects.
    let wanted: HashSet<String> = submitted
        .values()
        .map(|d| d.job_id.clone())
        .chain(opened.iter().cloned())
        .chain(greeted.iter().map(|(.., job)| job.clone()))
        .chain(pulled.iter().cloned())
        .collect();
    for (n, (seen, _)) in readers.iter().enumerate() {
        eventually(&format!("reader {n} to see every job's terminal event"), OUTCOME_TIMEOUT, || async {
            let seen = seen.lock().expect("seen");
            let terminal: HashSet<&str> =
                seen.iter().filter(|s| s.event_type == "job.succeeded").map(|s| s.job_id.as_str()).collect();
            wanted.iter().all(|job| terminal.contains(job.as_str())).then_some(())
        })
        .await;
    }
    stop_reader.cancel();
    let (mut reconnects, mut streamed_events) = (Vec::new(), 0);
    for (n, (seen, reader)) in readers.into_iter().enumerate() {
        reconnects.push(reader.await.expect("a reader"));
        let seen = seen.lock().expect("seen").clone();
        streamed_events += seen.len();
        let mut by_event: HashMap<&str, usize> = HashMap::new();
        let mut terminal_by_job: HashMap<&str, usize> = HashMap::new();
        for event in &seen {
            *by_event.entry(event.event_id.as_str()).or_default() += 1;
            if event.event_type.starts_with("job.") && event.event_type != "job.processing" {
                *terminal_by_job.entry(event.job_id.as_str()).or_default() += 1;
            }
        }
        let repeated: Vec<_> = by_event.iter().filter(|(_, count)| **count > 1).collect();
        assert!(repeated.is_empty(), "reader {n}: events seen more than once on the resumed stream: {repeated:?}");
        let doubled: Vec<_> = terminal_by_job.iter().filter(|(_, count)| **count > 1).collect();
        assert!(doubled.is_empty(), "reader {n}: jobs with more than one terminal event: {doubled:?}");
        for key in GREET_KEYS {
            let jobs: Vec<&String> = greeted.iter().filter(|(k, ..)| *k == key).map(|(.., job)| job).collect();
            let streamed: Vec<&String> = seen
                .iter()
                .filter(|event| event.event_type == "job.succeeded")
                .filter_map(|event| jobs.iter().find(|job| ***job == event.job_id).copied())
                .collect();
            assert_eq!(streamed, jobs, "reader {n}, {key}: results streamed in the order of the 202s");
        }
    }

    let retried = submitted.values().filter(|d| d.attempts > 1).count();
    eprintln!(
        "chaos test: {} deposits accepted ({retried} needed retries of their key), {} push commands ({} calls), \
         {} pull commands (their worker: {misdeeds:?}), {} faults {faults:?}, SSE reconnects {reconnects:?}, {} \
         events streamed; {:.1} s",
        submitted.len(),
        greeted.len(),
        calls.len(),
        pulled.len(),
        faults.len(),
        streamed_events,
        began.elapsed().as_secs_f64()
    );
    processor_db.close().await;
    admin.close().await;
    drop((ingests, processors, notifiers));
    env.teardown().await;
    let _ = std::fs::remove_dir_all(logs);
}

/// What the misbehaving worker did, by kind.
#[derive(Debug, Default)]
struct Misdeeds {
    completed_twice: u32,
    failed_after_completing: u32,
    abandoned: u32,
    completed_late_when_superseded: u32,
    callbacks_retried: u32,
}

/// POST `body` to a callback link until the processor answers (its kills cut
/// some off); the status.
async fn callback(http: &reqwest::Client, task: &Value, action: &str, body: &Value, misdeeds: &mut Misdeeds) -> u16 {
    let (url, token) = (
        task["callbacks"][action].as_str().unwrap_or_default(),
        task["callbacks"]["token"].as_str().unwrap_or_default(),
    );
    loop {
        match http.post(url).bearer_auth(token).json(body).send().await {
            Ok(response) if response.status().as_u16() != 503 => return response.status().as_u16(),
            _ => {
                misdeeds.callbacks_retried += 1;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

/// A pull worker of demo.report that repeats, contradicts and abandons.
async fn misbehaving_worker(processor: String, stop: CancellationToken) -> Misdeeds {
    let http = reqwest::Client::builder().timeout(Duration::from_secs(35)).build().expect("client");
    let mut misdeeds = Misdeeds::default();
    let mut abandoned: HashMap<String, Value> = HashMap::new();
    let mut taken: u64 = 0;
    while !stop.is_cancelled() {
        let polled = http
            .post(format!("{processor}/v1/workers/poll"))
            .bearer_auth("dev-worker-key")
            .json(&json!({"types": ["demo.report"], "max_tasks": 4, "wait_ms": 1000}))
            .send()
            .await;
        let Ok(polled) = polled else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        let tasks: Value = polled.json().await.unwrap_or_default();
        for task in tasks["tasks"].as_array().cloned().unwrap_or_default() {
            let job_id = task["job_id"].as_str().unwrap_or_default().to_owned();
            let result = json!({"result": {"n": task["payload"]["n"]}});
            // A task seen again after its lease ended: the abandoned attempt
            // completes first (late, superseded: it still wins), then this one
            // repeats the same outcome.
            if let Some(old) = abandoned.remove(&job_id) {
                assert_eq!(callback(&http, &old, "complete", &result, &mut misdeeds).await, 200, "a late success wins");
                misdeeds.completed_late_when_superseded += 1;
                let repeat = callback(&http, &task, "complete", &result, &mut misdeeds).await;
                assert_eq!(repeat, 200, "the same outcome again");
                continue;
            }
            taken += 1;
            match taken % 4 {
                0 => {
                    abandoned.insert(job_id, task);
                    misdeeds.abandoned += 1;
                }
                1 => {
                    assert_eq!(callback(&http, &task, "complete", &result, &mut misdeeds).await, 200);
                    assert_eq!(callback(&http, &task, "complete", &result, &mut misdeeds).await, 200, "a repeat");
                    misdeeds.completed_twice += 1;
                }
                2 => {
                    callback(&http, &task, "heartbeat", &json!({"progress_percent": 50}), &mut misdeeds).await;
                    assert_eq!(callback(&http, &task, "complete", &result, &mut misdeeds).await, 200);
                    let contradiction = json!({"code": "changed_my_mind"});
                    assert_eq!(
                        callback(&http, &task, "fail", &contradiction, &mut misdeeds).await,
                        409,
                        "after the end"
                    );
                    misdeeds.failed_after_completing += 1;
                }
                _ => assert_eq!(callback(&http, &task, "complete", &result, &mut misdeeds).await, 200),
            }
        }
    }
    misdeeds
}
