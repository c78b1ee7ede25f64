//! The `onceflow` CLI, run as the built binary (as a user runs it) against
//! the real services, PostgreSQL and broker: submit and job, one key twice,
//! `watch --job`, a watch that outlives a notifier restart, the results
//! topic, dead letters and webhook deliveries, and the exit codes scripts
//! rely on (a refused command, an unreachable service, a missing token).

use std::{
    collections::HashSet,
    net::SocketAddr,
    process::Stdio,
    sync::{Arc, Mutex},
    time::Duration,
};

use onceflow_tests::{
    DEV_API_KEY, IngestClient, OUTCOME_TIMEOUT, ServiceProcess, Stack, TestEnv, WebhookReceiver, canary_tenant_key,
    eventually, kafka_producer, published_event_ids,
};
use rdkafka::producer::FutureRecord;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, BufReader};

const ADMIN_TOKEN: &str = "cli-admin-token";

/// The exit codes the CLI documents.
const OK: i32 = 0;
const JOB_FAILED: i32 = 1;
const USAGE: i32 = 2;
const REJECTED: i32 = 3;
const UNAVAILABLE: i32 = 4;

/// How a run of the CLI ended.
#[derive(Debug)]
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    fn json_lines(&self) -> Vec<Value> {
        self.stdout
            .lines()
            .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}\n{self:?}")))
            .collect()
    }

    fn json(&self) -> Value {
        let lines = self.json_lines();
        assert_eq!(lines.len(), 1, "one JSON document: {self:?}");
        lines.into_iter().next().unwrap()
    }

    fn exits(self, code: i32) -> Self {
        assert_eq!(self.code, code, "exit code: {self:?}");
        self
    }
}

/// The `onceflow` binary, configured through its `ONCEFLOW_*` variables.
#[derive(Debug, Clone)]
struct Cli {
    vars: Vec<(&'static str, String)>,
}

impl Cli {
    fn new(env: &TestEnv) -> Self {
        let vars = vec![
            ("ONCEFLOW_API_KEY", DEV_API_KEY.to_owned()),
            ("ONCEFLOW_KAFKA_BROKERS", env.kafka.brokers.clone()),
            ("ONCEFLOW_TOPIC_PREFIX", env.kafka.topic_prefix.clone()),
        ];
        Self { vars }
    }

    fn with(mut self, name: &'static str, value: impl Into<String>) -> Self {
        self.vars.push((name, value.into()));
        self
    }

    fn for_stack(env: &TestEnv, stack: &Stack) -> Self {
        Self::new(env)
            .with("ONCEFLOW_INGEST_URL", stack.ingest.url(""))
            .with("ONCEFLOW_NOTIFIER_URL", stack.notifier.url(""))
            .with("ONCEFLOW_PROCESSOR_URL", stack.processor.url(""))
    }

    /// The binary with exactly these variables of onceflow's (none inherited).
    fn command(&self, args: &[&str]) -> tokio::process::Command {
        let mut command = tokio::process::Command::new(ServiceProcess::binary("onceflow"));
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("ONCEFLOW_") {
                command.env_remove(key);
            }
        }
        command
            .envs(self.vars.iter().map(|(k, v)| (k, v)))
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        command
    }

    async fn run(&self, args: &[&str]) -> Run {
        let output = tokio::time::timeout(OUTCOME_TIMEOUT, self.command(args).output())
            .await
            .unwrap_or_else(|_| panic!("onceflow {args:?} did not end within {OUTCOME_TIMEOUT:?}"))
            .expect("onceflow runs");
        Run {
            code: output.status.code().expect("an exit code, not a signal"),
            stdout: String::from_utf8(output.stdout).expect("UTF-8 stdout"),
            stderr: String::from_utf8(output.stderr).expect("UTF-8 stderr"),
        }
    }

    /// `submit TYPE --payload PAYLOAD [extra]`: the accepted job id.
    async fn submit(&self, command_type: &str, payload: &Value, extra: &[&str]) -> String {
        let payload = payload.to_string();
        let mut args = vec!["submit", command_type, "--payload", &payload];
        args.extend_from_slice(extra);
        let run = self.run(&args).await.exits(OK);
        let accepted: Value = serde_json::from_str(run.stdout.lines().next().unwrap_or_default()).expect("202 body");
        accepted["job_id"].as_str().expect("a job id").to_owned()
    }
}

/// A CLI process that keeps running (`watch`), read line by line.
struct Running {
    child: tokio::process::Child,
    stdout: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
    stderr: Arc<Mutex<String>>,
}

impl Running {
    fn spawn(cli: &Cli, args: &[&str]) -> Self {
        let mut child = cli.command(args).spawn().expect("onceflow starts");
        let stdout = BufReader::new(child.stdout.take().expect("stdout")).lines();
        let mut stderr_pipe = child.stderr.take().expect("stderr");
        let stderr = Arc::new(Mutex::new(String::new()));
        let collected = stderr.clone();
        tokio::spawn(async move {
            let mut buffer = [0_u8; 4096];
            while let Ok(read @ 1..) = stderr_pipe.read(&mut buffer).await {
                collected.lock().unwrap().push_str(&String::from_utf8_lossy(&buffer[..read]));
            }
        });
        Self { child, stdout, stderr }
    }

    async fn next_json(&mut self, timeout: Duration) -> Value {
        let line = tokio::time::timeout(timeout, self.stdout.next_line())
            .await
            .unwrap_or_else(|_| panic!("no output within {timeout:?}; stderr: {}", self.stderr()))
            .expect("stdout readable")
            .unwrap_or_else(|| panic!("the CLI ended; stderr: {}", self.stderr()));
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"))
    }

    /// Lines until one whose event is `event` of `job_id`, all returned.
    async fn until(&mut self, job_id: &str, event: &str) -> Vec<Value> {
        let mut lines = Vec::new();
        loop {
            let line = self.next_json(OUTCOME_TIMEOUT).await;
            let done = line["data"]["job_id"] == job_id && line["event"] == event;
            lines.push(line);
            if done {
                return lines;
            }
        }
    }

    fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Wait for the process to end: its exit code and the rest of stdout.
    async fn finish(mut self) -> (i32, Vec<String>) {
        let status = tokio::time::timeout(OUTCOME_TIMEOUT, self.child.wait())
            .await
            .unwrap_or_else(|_| panic!("the CLI did not end; stderr: {}", self.stderr()))
            .expect("exit status");
        let mut lines = Vec::new();
        while let Some(line) = self.stdout.next_line().await.expect("stdout readable") {
            lines.push(line);
        }
        (status.code().expect("an exit code"), lines)
    }
}

fn open_account(account: &str) -> Value {
    json!({"account_id": account, "currency": "EUR"})
}

/// A loopback address where nothing listens.
fn closed_address() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn submit_job_watch_and_results_through_the_cli() {
    let mut env = TestEnv::new();
    let stack = env.start_stack().await;
    let cli = Cli::for_stack(&env, &stack);
    let account = format!("cli-{}", env.id);

    // Submit and wait: the 202 body, the generated key on stderr, then the job.
    let payload = open_account(&account).to_string();
    let run = cli.run(&["submit", "ledger.open_account", "--payload", &payload, "--wait", "--json"]).await.exits(OK);
    assert!(run.stderr.contains("Idempotency-Key: "), "{run:?}");
    let [accepted, job] = run.json_lines().try_into().expect("the 202 body and the job");
    let opened = accepted["job_id"].as_str().unwrap().to_owned();
    assert_eq!(accepted["status"], "accepted");
    assert_eq!((&job["job_id"], &job["status"]), (&accepted["job_id"], &json!("succeeded")));
    let shown = cli.run(&["job", &opened]).await.exits(OK);
    assert!(shown.stdout.contains("status       succeeded"), "{shown:?}");
    assert!(shown.stdout.contains("ledger.open_account"), "{shown:?}");

    // One key twice, payload from a file: the same 202 and one job.
    let file = env.scratch_dir().join("deposit.json");
    std::fs::write(&file, json!({"account_id": account, "amount": 500}).to_string()).unwrap();
    let payload = format!("@{}", file.display());
    let key = format!("cli-deposit-{}", env.id);
    let submit = ["submit", "ledger.deposit", "--payload", &payload, "--idempotency-key", &key];
    let first = cli.run(&submit).await.exits(OK);
    let second = cli.run(&submit).await.exits(OK);
    assert_eq!(first.stdout, second.stdout, "the same answer, byte for byte");
    assert!(second.stderr.contains("replayed"), "{second:?}");
    let deposit = first.json()["job_id"].as_str().unwrap().to_owned();

    // Watching the job ends with it, exit 0, having printed its events.
    let watched = cli.run(&["watch", "--job", &deposit, "--json"]).await.exits(OK);
    let events = watched.json_lines();
    let last = events.last().expect("events");
    assert_eq!((&last["event"], &last["data"]["job_id"]), (&json!("job.succeeded"), &json!(deposit)));
    assert_eq!(last["data"]["result"]["balance"], 500);
    assert!(last["id"].as_i64().is_some(), "{last}");
    let human = cli.run(&["watch", "--job", &deposit]).await.exits(OK);
    assert!(human.stdout.lines().any(|l| l.contains("job.succeeded") && l.contains(&deposit)), "{human:?}");

    // Refused at the door (exit 3) and refused by the ledger (exit 1).
    let bad = json!({"account_id": account, "amount": -5}).to_string();
    let refused = cli.run(&["submit", "ledger.deposit", "--payload", &bad]).await.exits(REJECTED);
    assert!(refused.stderr.contains("422 invalid-command"), "{refused:?}");
    let overdraw = json!({"from": account, "to": format!("nobody-{}", env.id), "amount": 1}).to_string();
    let failed = cli.run(&["submit", "ledger.transfer", "--payload", &overdraw, "--wait"]).await.exits(JOB_FAILED);
    assert!(failed.stderr.contains("ended failed"), "{failed:?}");
    let failed_job = serde_json::from_str::<Value>(failed.stdout.lines().next().unwrap()).unwrap()["job_id"]
        .as_str()
        .unwrap()
        .to_owned();
    cli.run(&["watch", "--job", &failed_job]).await.exits(JOB_FAILED);
    cli.run(&["job", &failed_job]).await.exits(JOB_FAILED);
    let unknown = uuid::Uuid::new_v4().to_string();
    cli.run(&["job", &unknown]).await.exits(REJECTED);

    // The results topic, decoded: the deposit's result is on it.
    let results = cli.run(&["results", "--from-offset", "0", "--json"]).await.exits(OK);
    let records = results.json_lines();
    let result = records
        .iter()
        .find(|r| r["event"]["job_id"] == deposit.as_str() && r["event"]["status"] == "succeeded")
        .unwrap_or_else(|| panic!("the deposit's result: {results:?}"));
    let balance: Value = serde_json::from_str(result["event"]["result_json"].as_str().unwrap()).unwrap();
    assert_eq!(balance["balance"], 500);
    assert_eq!(result["key"], format!("dev/ledger/{account}"), "keyed by the command's tenant and ordering key");
    assert!(records.iter().all(|r| r["event"]["tenant"] == "dev" || r["event"]["tenant"] == "canary"));
    let since = result["timestamp"].as_i64().expect("a record timestamp");
    let since_text = chrono::DateTime::from_timestamp_millis(since).unwrap().to_rfc3339();
    let later = cli.run(&["results", "--from-time", &since_text, "--json"]).await.exits(OK).json_lines();
    assert!(later.iter().any(|r| r["event"]["job_id"] == deposit.as_str()), "{later:?}");
    assert!(later.iter().all(|r| r["timestamp"].as_i64().unwrap() >= since), "{later:?}");
    assert!(later.len() < records.len(), "the account opening came before: {later:?}");
    let none = cli.run(&["results", "--from-time", "2999-01-01T00:00:00Z"]).await.exits(OK);
    assert_eq!(none.stdout, "", "nothing after a future time");
    let human = cli.run(&["results"]).await.exits(OK);
    assert!(human.stdout.lines().any(|l| l.contains(&deposit) && l.contains("job.succeeded")), "{human:?}");
    cli.clone().with("ONCEFLOW_TOPIC_PREFIX", "no-such-prefix.").run(&["results"]).await.exits(REJECTED);

    // This processor has no admin token: no admin API, and the CLI says why.
    let no_admin = cli.clone().with("ONCEFLOW_ADMIN_TOKEN", "x").run(&["dead-letters", "list"]).await.exits(REJECTED);
    assert!(no_admin.stderr.contains("admin.token"), "{no_admin:?}");

    env.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn watch_resumes_after_a_notifier_restart_without_missing_an_event() {
    let mut env = TestEnv::new();
    let stack = env.start_stack().await;
    let cli = Cli::for_stack(&env, &stack);
    let Stack { ingest, processor, notifier } = stack;
    let notifier_addr = notifier.addr;
    let (id, correlation) = (env.id.clone(), format!("cli-watch-{}", env.id));
    let submit_opening = |n: u32| {
        let (cli, correlation, account) = (cli.clone(), correlation.clone(), format!("watch-{n}-{id}"));
        async move { cli.submit("ledger.open_account", &open_account(&account), &["--correlation-id", &correlation]).await }
    };

    let first = submit_opening(1).await;
    let mut watch = Running::spawn(&cli, &["watch", "--correlation", &correlation, "--json", "--timeout", "120"]);
    let mut lines = watch.until(&first, "job.succeeded").await;

    // The notifier goes away; a command completes meanwhile; the notifier
    // comes back on the same address with its events stored.
    notifier.stop().await;
    let second = submit_opening(2).await;
    let notifier = env
        .start_notifier_with(|config| {
            config.listen = notifier_addr.to_string();
            config.tenants.push(canary_tenant_key());
        })
        .await;
    lines.extend(watch.until(&second, "job.succeeded").await);
    let _ = watch.child.kill().await;
    let stderr = watch.stderr();
    assert!(stderr.contains("lost the stream"), "{stderr}");
    assert!(stderr.contains("reconnected to the notifier"), "{stderr}");

    // Every event of the correlation on the results topic, each once, in id order.
    let ids: Vec<i64> = lines.iter().map(|line| line["id"].as_i64().expect("an event id")).collect();
    assert!(ids.windows(2).all(|pair| pair[0] < pair[1]), "ids increase: {ids:?}");
    let seen: Vec<String> = lines.iter().map(|line| line["data"]["event_id"].as_str().unwrap().to_owned()).collect();
    let unique: HashSet<&String> = seen.iter().collect();
    assert_eq!(unique.len(), seen.len(), "no event twice: {seen:?}");
    let published = published_event_ids(&env.kafka, &correlation).await;
    assert_eq!(unique.into_iter().cloned().collect::<HashSet<_>>(), published, "every event of the correlation");

    notifier.stop().await;
    processor.stop().await;
    ingest.stop().await;
    env.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dead_letters_and_deliveries_are_listed_and_redriven() {
    let mut env = TestEnv::new();
    let ingest = env.start_ingest().await;
    let processor = env.start_processor_with(|config| config.admin.token = ADMIN_TOKEN.to_owned()).await;
    let notifier = env
        .start_notifier_with(|config| {
            config.webhooks.allowlist = onceflow_webhook::Allowlist::new(["127.0.0.1"]).unwrap();
            config.webhooks.poll_interval_ms = 200;
        })
        .await;
    let receiver = WebhookReceiver::start().await;
    let cli = Cli::new(&env)
        .with("ONCEFLOW_INGEST_URL", ingest.url(""))
        .with("ONCEFLOW_NOTIFIER_URL", notifier.url(""))
        .with("ONCEFLOW_PROCESSOR_URL", processor.url(""));

    // A command with a callback: its delivery is listed; a delivered one
    // cannot be redriven (409, exit 3).
    let hook = receiver.url("/hook");
    let account = format!("cli-hook-{}", env.id);
    let job = cli.submit("ledger.open_account", &open_account(&account), &["--callback-url", &hook, "--wait"]).await;
    receiver.wait_for(1, OUTCOME_TIMEOUT).await;
    let delivery = eventually("the delivery to be recorded as delivered", OUTCOME_TIMEOUT, || async {
        let listing = cli.run(&["deliveries", "list", &job, "--json"]).await.exits(OK).json();
        let delivery = listing["deliveries"].as_array()?.first()?.clone();
        (delivery["status"] == "succeeded").then_some(delivery)
    })
    .await;
    let id = delivery["id"].as_str().unwrap();
    assert_eq!(receiver.received()[0].header("webhook-id"), id);
    let human = cli.run(&["deliveries", "list", &job]).await.exits(OK);
    assert!(human.stdout.contains(id) && human.stdout.contains("succeeded"), "{human:?}");
    let refused = cli.run(&["deliveries", "redrive", id]).await.exits(REJECTED);
    assert!(refused.stderr.contains("409 delivery-not-failed"), "{refused:?}");

    // A poison command (a body that is not Avro) is dead-lettered; the
    // operator lists and redrives it; an id that is no dead letter is refused.
    env.create_topics().await;
    let message_id = uuid::Uuid::now_v7();
    let envelope = onceflow_contracts::Envelope {
        message_id,
        correlation_id: format!("poison-{}", env.id),
        causation_id: None,
        tenant: "dev".to_owned(),
        message_type: "ledger.deposit".to_owned(),
        schema_id: onceflow_contracts::schema::COMMAND.id.clone(),
        traceparent: None,
        tracestate: None,
    };
    let headers = onceflow_runtime::kafka::headers(&envelope);
    let key = message_id.to_string();
    let topic = env.kafka.topics().commands;
    kafka_producer(&env.kafka)
        .send(FutureRecord::to(&topic).key(&key).headers(headers).payload(&b"not avro"[..]), Duration::from_secs(30))
        .await
        .map_err(|(error, _)| error)
        .expect("the poison is on the commands topic");
    let admin = cli.clone().with("ONCEFLOW_ADMIN_TOKEN", ADMIN_TOKEN);
    let listed = eventually("the poison to be dead-lettered", OUTCOME_TIMEOUT, || async {
        let listing = admin.run(&["dead-letters", "list", "--json"]).await.exits(OK).json();
        listing["dead_letters"].as_array()?.iter().find(|d| d["message_id"] == key.as_str()).cloned()
    })
    .await;
    assert_eq!(listed["tenant"], "dev");
    let human = admin.run(&["dead-letters", "list"]).await.exits(OK);
    assert!(human.stdout.contains(&key), "{human:?}");
    let redriven = admin.run(&["dead-letters", "redrive", &key, "--json"]).await.exits(OK).json();
    assert_eq!(redriven["status"], "redriven");
    assert_eq!(redriven["redrive_count"], 1);
    let relisted = admin.run(&["dead-letters", "list", "--json"]).await.exits(OK).json();
    let relisted =
        relisted["dead_letters"].as_array().unwrap().iter().find(|d| d["message_id"] == key.as_str()).cloned();
    assert_eq!(relisted.expect("still kept")["redrive_count"], 1);
    let stranger = uuid::Uuid::new_v4().to_string();
    let refused = admin.run(&["dead-letters", "redrive", &stranger]).await.exits(REJECTED);
    assert!(refused.stderr.contains("404 not-a-dead-letter"), "{refused:?}");
    assert!(!refused.stderr.contains("admin.token"), "no hint when the API answered: {refused:?}");

    // Without the token it is a usage error; with a wrong one, a refusal.
    cli.run(&["dead-letters", "list"]).await.exits(USAGE);
    let wrong = cli.clone().with("ONCEFLOW_ADMIN_TOKEN", "wrong").run(&["dead-letters", "list"]).await.exits(REJECTED);
    assert!(wrong.stderr.contains("401"), "{wrong:?}");

    notifier.stop().await;
    processor.stop().await;
    ingest.stop().await;
    env.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn submit_retries_with_the_same_key_until_ingest_answers() {
    let mut env = TestEnv::new();
    let addr = closed_address();
    let cli = Cli::new(&env).with("ONCEFLOW_INGEST_URL", format!("http://{addr}"));
    let payload = open_account(&format!("late-{}", env.id)).to_string();
    let submit = Running::spawn(&cli, &["submit", "ledger.open_account", "--payload", &payload, "--timeout", "120"]);
    eventually("the CLI to retry", OUTCOME_TIMEOUT, || async { submit.stderr().contains("retrying").then_some(()) })
        .await;

    // Ingest comes up where the CLI keeps trying.
    let ingest = env.start_ingest_with(|config| config.listen = addr.to_string()).await;
    let stderr = submit.stderr.clone();
    let (code, stdout) = submit.finish().await;
    let stderr = stderr.lock().unwrap().clone();
    assert_eq!(code, OK, "{stdout:?} {stderr}");
    let key = stderr
        .lines()
        .find_map(|line| line.strip_prefix("Idempotency-Key: "))
        .unwrap_or_else(|| panic!("the key on stderr: {stderr}"));
    // The same key again: the same answer, replayed, so the retries used it too.
    let again = cli.run(&["submit", "ledger.open_account", "--payload", &payload, "--idempotency-key", key]).await;
    let again = again.exits(OK);
    assert!(again.stderr.contains("replayed"), "{again:?}");
    assert_eq!(again.stdout.lines().collect::<Vec<_>>(), stdout);

    ingest.stop().await;
    env.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_service_or_broker_exits_4_after_the_timeout() {
    let env = TestEnv::new();
    let nowhere = format!("http://{}", closed_address());
    let cli = Cli::new(&env)
        .with("ONCEFLOW_INGEST_URL", nowhere.clone())
        .with("ONCEFLOW_NOTIFIER_URL", nowhere.clone())
        .with("ONCEFLOW_KAFKA_BROKERS", closed_address().to_string());
    let job = uuid::Uuid::new_v4().to_string();

    let submit = cli.run(&["submit", "ledger.deposit", "--payload", "{}", "--timeout", "1"]).await.exits(UNAVAILABLE);
    assert!(submit.stderr.contains("Idempotency-Key: "), "the key to retry with: {submit:?}");
    assert!(submit.stderr.contains("ingest unavailable"), "{submit:?}");
    let shown = cli.run(&["job", &job, "--timeout", "1"]).await.exits(UNAVAILABLE);
    assert!(shown.stderr.contains("ingest unavailable"), "{shown:?}");
    cli.run(&["watch", "--job", &job, "--timeout", "1"]).await.exits(UNAVAILABLE);
    cli.run(&["results", "--timeout", "2"]).await.exits(UNAVAILABLE);
    // A flag wins over its variable.
    cli.run(&["job", &job, "--timeout", "1", "--ingest-url", "not a url"]).await.exits(USAGE);
    cli.run(&["submit", "ledger.deposit", "--payload", "{oops"]).await.exits(USAGE);
}

/// Issue 23: `onceflow probe` sends one `onceflow.probe` command the whole
/// way and times each stage; exit 0 when it went through. Without a
/// processor it exits 4 within its deadline, naming the stage that failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_probe_goes_through_the_stack_and_says_which_stage_fails() {
    let mut env = TestEnv::new();
    let stack = env.start_stack().await;
    let cli = Cli::for_stack(&env, &stack);
    let probe = cli.run(&["probe"]).await.exits(OK).json();
    assert_eq!(probe["ok"], true, "{probe}");
    for stage in ["accept", "status", "stream"] {
        let seconds = probe["seconds"][stage].as_f64().unwrap_or_else(|| panic!("{stage} timed: {probe}"));
        assert!(seconds > 0.0 && seconds < 30.0, "{stage}: {probe}");
    }
    let job_id = probe["job_id"].as_str().expect("the probe's job");
    let job = IngestClient::new(&stack.ingest).job(job_id).await.json();
    assert_eq!(job["type"], "onceflow.probe", "{job}");
    assert_eq!(job["result"]["probe"], "ok", "its result echoes it: {job}");

    // The processor stops: the probe's command is accepted, never applied.
    stack.processor.stop().await;
    let failed = cli.run(&["probe", "--deadline-secs", "3"]).await.exits(UNAVAILABLE).json();
    assert_eq!(failed["ok"], false, "{failed}");
    assert_eq!(failed["failed_stage"], "status", "{failed}");
    assert!(failed["seconds"]["accept"].as_f64().is_some(), "ingest still accepted it: {failed}");
    env.teardown().await;
}
