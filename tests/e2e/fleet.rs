//! What the tests of a fleet of service processes (`chaos.rs`,
//! `scale_out.rs`) share: a service process that is killed or restarted and
//! started again, and a careful client of the fleet, who retries each key
//! until it is accepted (on another ingest when one is away), puts a steady
//! load of deposits on it, waits for jobs to succeed, and reads the event
//! stream resuming with `Last-Event-ID` whenever its notifier goes away.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use futures::StreamExt as _;
use onceflow_tests::{DEV_API_KEY, OUTCOME_TIMEOUT, ServiceProcess, eventually};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

/// How long one deposit's client keeps retrying its key before the test fails.
const CLIENT_PATIENCE: Duration = Duration::from_secs(90);

/// One service process and how to start it again.
pub(crate) struct Managed {
    binary: &'static str,
    env: Vec<(&'static str, String)>,
    log: std::path::PathBuf,
    process: Option<ServiceProcess>,
    pub(crate) addr: String,
}

impl Managed {
    /// Binary `binary` with `env`, logging to `<logs>/<name>.log`.
    pub(crate) fn new(
        binary: &'static str,
        name: &str,
        env: Vec<(&'static str, String)>,
        logs: &std::path::Path,
        addr: String,
    ) -> Self {
        let log = logs.join(format!("{name}.log"));
        Self { binary, env, log, process: None, addr }
    }

    pub(crate) async fn start(&mut self) {
        self.process = Some(ServiceProcess::spawn(self.binary, &self.env, &self.log));
        let url = format!("http://{}/livez", self.addr);
        eventually(&format!("{} to answer", self.binary), Duration::from_secs(60), || async {
            reqwest::get(&url).await.ok().filter(|r| r.status().is_success()).map(drop)
        })
        .await;
    }

    pub(crate) async fn kill_and_restart(&mut self) {
        self.assert_alive();
        self.process.take().expect("running").kill();
        self.start().await;
    }

    /// Stop it gracefully (SIGTERM) and start it again, as a rolling restart
    /// does; panics if it does not stop within 30 s or stops with an error.
    pub(crate) async fn restart_gracefully(&mut self) {
        self.assert_alive();
        let status = self.process.take().expect("running").terminate(Duration::from_secs(30)).await;
        let status = status.unwrap_or_else(|| panic!("{} did not stop within 30 s of SIGTERM", self.binary));
        assert!(status.success(), "{} stopped with {status}; see {}", self.binary, self.log.display());
        self.start().await;
    }

    pub(crate) fn assert_alive(&mut self) {
        if let Some(process) = self.process.as_mut()
            && let Some(status) = process.exit_status()
        {
            panic!("{} exited by itself ({status}); see {}", self.binary, self.log.display());
        }
    }
}

/// What the client learnt of one idempotency key.
#[derive(Debug, Clone)]
pub(crate) struct Submitted {
    pub(crate) account: &'static str,
    pub(crate) amount: i64,
    pub(crate) job_id: String,
    /// Requests it took (1 = accepted at once).
    pub(crate) attempts: u32,
}

/// Open `accounts` (each key retried on the ingests of `ingests` until
/// accepted) and wait until each opened; their jobs.
pub(crate) async fn open_accounts(
    http: &reqwest::Client,
    ingests: &[&str],
    api: &onceflow_tests::IngestClient,
    accounts: &[&str],
) -> Vec<String> {
    let mut opened = Vec::new();
    for account in accounts {
        let body = json!({"type": "ledger.open_account", "payload": {"account_id": account, "currency": "EUR"}});
        opened.push(submit_until_accepted(http, ingests, &format!("open-{account}"), &body).await.0);
    }
    for job_id in &opened {
        eventually("the accounts to open", OUTCOME_TIMEOUT, || async {
            (api.job(job_id).await.json()["status"] == "succeeded").then_some(())
        })
        .await;
    }
    opened
}

/// Wait until job `job_id` (`what`) ends; panic unless it succeeded.
pub(crate) async fn succeeds(api: &onceflow_tests::IngestClient, what: &str, job_id: &str) {
    eventually(&format!("{what} ({job_id}) to end"), OUTCOME_TIMEOUT, || async {
        let job = api.job(job_id).await.json();
        match job["status"].as_str() {
            Some("succeeded") => Some(()),
            Some("accepted" | "processing") | None => None,
            Some(other) => panic!("{what} ({job_id}) ended {other}: {job}"),
        }
    })
    .await;
}

/// Deposits to `accounts` in turn, `rate` a second until `stop`, each by a
/// client task of its own that retries its key until accepted, starting on
/// the ingests of `ingests` in turn; what each key got, once every client is
/// done.
pub(crate) fn deposit_load(
    accounts: &'static [&'static str],
    ingests: Vec<String>,
    rate: u64,
    http: reqwest::Client,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<HashMap<String, Submitted>> {
    tokio::spawn(async move {
        let submitted: Arc<Mutex<HashMap<String, Submitted>>> = Arc::default();
        let mut clients = tokio::task::JoinSet::new();
        let mut ticker = tokio::time::interval(Duration::from_millis(1000 / rate));
        let mut n: u64 = 0;
        while !stop.is_cancelled() {
            ticker.tick().await;
            n += 1;
            let account = accounts[usize::try_from(n).unwrap_or(0) % accounts.len()];
            let amount = i64::try_from(n % 97 + 1).unwrap_or(1);
            let key = format!("deposit-{n}");
            let mut order = ingests.clone();
            order.rotate_left(usize::try_from(n).unwrap_or(0) % ingests.len());
            let (submitted, http) = (submitted.clone(), http.clone());
            clients.spawn(async move {
                let body = json!({"type": "ledger.deposit", "payload": {"account_id": account, "amount": amount}});
                let order: Vec<&str> = order.iter().map(String::as_str).collect();
                let (job_id, attempts) = submit_until_accepted(&http, &order, &key, &body).await;
                submitted.lock().expect("submitted").insert(key, Submitted { account, amount, job_id, attempts });
            });
        }
        while let Some(outcome) = clients.join_next().await {
            outcome.expect("a client task");
        }
        submitted.lock().expect("submitted").clone()
    })
}

/// Submit `body` under `key` until a `202`, retrying the same key on
/// connection errors, timeouts, `409`, `429`, `5xx` (what a careful client
/// does), to the ingests of `ingests` in turn (a load balancer's choice);
/// returns the job and how many requests it took.
pub(crate) async fn submit_until_accepted(
    http: &reqwest::Client,
    ingests: &[&str],
    key: &str,
    body: &Value,
) -> (String, u32) {
    let started = Instant::now();
    let mut attempts = 0;
    loop {
        let ingest = ingests[attempts as usize % ingests.len()];
        attempts += 1;
        assert!(started.elapsed() < CLIENT_PATIENCE, "key {key} not accepted within {CLIENT_PATIENCE:?}");
        let response = http
            .post(format!("http://{ingest}/v1/commands"))
            .bearer_auth(DEV_API_KEY)
            .header("idempotency-key", key)
            .json(body)
            .send()
            .await;
        let wait = match response {
            Ok(response) if response.status() == 202 => {
                let accepted: Value = response.json().await.unwrap_or(Value::Null);
                return (accepted["job_id"].as_str().expect("202 names its job").to_owned(), attempts);
            }
            Ok(response) if matches!(response.status().as_u16(), 409 | 429 | 500..=599) => response
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
                .map_or(Duration::from_millis(200), |s| Duration::from_secs(s).min(Duration::from_secs(1))),
            Ok(response) => {
                let status = response.status();
                panic!("key {key}: unexpected {status}: {}", response.text().await.unwrap_or_default())
            }
            // Ingest killed or restarting: the request may or may not have
            // been committed; the same key makes the retry safe.
            Err(_) => Duration::from_millis(200),
        };
        tokio::time::sleep(wait).await;
    }
}

/// One SSE event as the reader saw it.
#[derive(Debug, Clone)]
pub(crate) struct Seen {
    pub(crate) event_type: String,
    pub(crate) job_id: String,
    pub(crate) event_id: String,
}

/// Read tenant `dev`'s stream until `stop`, reconnecting with `Last-Event-ID`
/// whenever the notifier goes away.
pub(crate) async fn read_events(notifier: String, seen: Arc<Mutex<Vec<Seen>>>, stop: CancellationToken) -> u32 {
    use eventsource_stream::Eventsource as _;
    let http = reqwest::Client::new();
    let mut last_id: Option<String> = None;
    let mut reconnects = 0;
    while !stop.is_cancelled() {
        let mut request = http.get(format!("http://{notifier}/v1/events")).bearer_auth(DEV_API_KEY);
        if let Some(id) = &last_id {
            request = request.header("last-event-id", id);
        }
        let Ok(response) = request.send().await else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        if !response.status().is_success() {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        }
        let mut events = response.bytes_stream().eventsource();
        loop {
            let next = tokio::select! {
                () = stop.cancelled() => return reconnects,
                next = events.next() => next,
            };
            let Some(Ok(event)) = next else { break };
            if event.id.is_empty() || !event.event.starts_with("job.") {
                continue;
            }
            let data: Value = serde_json::from_str(&event.data).expect("event data is JSON");
            seen.lock().expect("seen").push(Seen {
                event_type: event.event.clone(),
                job_id: data["job_id"].as_str().unwrap_or_default().to_owned(),
                event_id: data["event_id"].as_str().unwrap_or_default().to_owned(),
            });
            last_id = Some(event.id.clone());
        }
        reconnects += 1;
    }
    reconnects
}
