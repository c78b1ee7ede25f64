//! Issue 23: the synthetic probe's records are pruned. Each service deletes
//! its share (ingest's job and idempotency key, the processor's inbox row,
//! the notifier's events) of the commands that are both of the probe's
//! tenant and of type `onceflow.probe`, once older than
//! `probe_records.retain_secs`, and nothing else: not the probe tenant's
//! other commands, not another tenant's probes.

use std::{num::NonZeroU64, time::Duration};

use onceflow_runtime::probe_records::{COMMAND_TYPE, ProbeRecords};
use onceflow_tests::{IngestClient, OUTCOME_TIMEOUT, PROBE_API_KEY, Service, TestEnv, eventually};
use serde_json::{Value, json};
use sqlx::PgPool;

/// How soon, once old enough, the probe's records must be gone: a few
/// sweeps one second apart.
const PRUNE_TIMEOUT: Duration = Duration::from_secs(20);

/// What each service holds of one job.
#[derive(Debug, PartialEq, Eq)]
struct Records {
    /// Ingest's `jobs` and `idempotency_keys` rows.
    jobs: i64,
    keys: i64,
    /// The processor's `inbox` rows (the job id is the command's message id).
    inbox: i64,
    /// The notifier's `events`, and how many of them are terminal.
    events: i64,
    terminal_events: i64,
}

impl Records {
    const NONE: Self = Self { jobs: 0, keys: 0, inbox: 0, events: 0, terminal_events: 0 };

    /// The job ended and every service has recorded it.
    fn complete(&self) -> bool {
        self.jobs == 1 && self.keys == 1 && self.inbox == 1 && self.terminal_events == 1
    }
}

/// The three services' databases of a test, read directly.
struct Databases {
    ingest: PgPool,
    processor: PgPool,
    notifier: PgPool,
}

impl Databases {
    fn connect(env: &TestEnv) -> Self {
        let connect = |service: &str| PgPool::connect_lazy(&env.database_url(service)).expect("a database URL");
        Self { ingest: connect("ingest"), processor: connect("processor"), notifier: connect("notifier") }
    }

    async fn records(&self, job_id: &str) -> Records {
        Records {
            jobs: count(&self.ingest, "SELECT count(*) FROM jobs WHERE job_id = $1::uuid", job_id).await,
            keys: count(&self.ingest, "SELECT count(*) FROM idempotency_keys WHERE job_id = $1::uuid", job_id).await,
            inbox: count(&self.processor, "SELECT count(*) FROM inbox WHERE message_id = $1::uuid", job_id).await,
            events: count(&self.notifier, "SELECT count(*) FROM events WHERE job_id = $1::uuid", job_id).await,
            terminal_events: count(
                &self.notifier,
                "SELECT count(*) FROM events WHERE job_id = $1::uuid AND terminal",
                job_id,
            )
            .await,
        }
    }
}

/// The one number `sql` counts for `job_id`.
async fn count(pool: &PgPool, sql: &'static str, job_id: &str) -> i64 {
    sqlx::query_scalar(sql).bind(job_id).fetch_one(pool).await.unwrap_or_else(|e| panic!("{sql}: {e}"))
}

/// Ingest, processor and notifier of `env`, each with `probe` as its
/// `[probe_records]`.
async fn start(env: &mut TestEnv, probe: &ProbeRecords) -> [Service; 3] {
    let ingest = env.start_ingest_with(|config| config.probe_records = probe.clone()).await;
    let processor = env.start_processor_with(|config| config.probe_records = probe.clone()).await;
    let notifier = env.start_notifier_with(|config| config.probe_records = probe.clone()).await;
    [ingest, processor, notifier]
}

/// Submit `body` under `key`; its job id.
async fn submit(api: &IngestClient, key: &str, body: &Value) -> String {
    let accepted = api.submit(key, body).await;
    assert_eq!(accepted.status, 202, "{key}: {}", String::from_utf8_lossy(&accepted.body));
    accepted.json()["job_id"].as_str().expect("a job id").to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn only_the_probe_tenants_probe_records_are_pruned() {
    let mut env = TestEnv::new();
    // First the records are kept (retain_secs 0), though the sweeps would
    // look every second: every service records all three commands.
    let keep = ProbeRecords { retain_secs: 0, sweep_interval_secs: NonZeroU64::MIN, ..ProbeRecords::default() };
    let services = start(&mut env, &keep).await;
    let ingest = &services[0];
    let probe_tenant = IngestClient::with_key(ingest, PROBE_API_KEY);
    let probe = json!({"type": COMMAND_TYPE, "payload": {"sent_at": "2026-01-01T00:00:00Z"}});
    let pruned = submit(&probe_tenant, "probe-probe", &probe).await;
    let open = json!({"type": "ledger.open_account", "payload": {"account_id": "kept", "currency": "EUR"}});
    let probe_tenants_open = submit(&probe_tenant, "probe-open", &open).await;
    let dev_probe = submit(&IngestClient::new(ingest), "dev-probe", &probe).await;

    let databases = Databases::connect(&env);
    let all = [&pruned, &probe_tenants_open, &dev_probe];
    for job_id in all {
        eventually("every service to record the job's end", OUTCOME_TIMEOUT, || async {
            databases.records(job_id).await.complete().then_some(())
        })
        .await;
    }
    // A few sweeps later, all still there: 0 keeps them.
    tokio::time::sleep(Duration::from_secs(3)).await;
    for job_id in all {
        let records = databases.records(job_id).await;
        assert!(records.complete(), "retain_secs 0 kept nothing of {job_id}: {records:?}");
    }

    // Restarted to keep them one second: the probe tenant's probe goes from
    // every service, the other two stay whole.
    for service in services {
        service.stop().await;
    }
    let prune = ProbeRecords { retain_secs: 1, sweep_interval_secs: NonZeroU64::MIN, ..ProbeRecords::default() };
    let services = start(&mut env, &prune).await;
    eventually("the probe tenant's probe records to be pruned", PRUNE_TIMEOUT, || async {
        (databases.records(&pruned).await == Records::NONE).then_some(())
    })
    .await;
    for job_id in [&probe_tenants_open, &dev_probe] {
        let records = databases.records(job_id).await;
        assert!(records.complete(), "{job_id} is not the probe tenant's probe, yet lost records: {records:?}");
    }
    let api = IngestClient::with_key(&services[0], PROBE_API_KEY);
    assert_eq!(api.job(&pruned).await.status, 404, "the pruned job is gone");
    assert_eq!(api.job(&probe_tenants_open).await.json()["status"], "succeeded");
    let metrics = reqwest::get(services[0].url("/metrics")).await.expect("metrics").text().await.expect("text");
    let counted = metrics
        .lines()
        .find_map(|line| line.strip_prefix("onceflow_probe_records_pruned_total "))
        .and_then(|value| value.parse::<f64>().ok());
    assert!(counted.is_some_and(|rows| rows >= 1.0), "the pruned rows are counted: {counted:?}");
    env.teardown().await;
}
