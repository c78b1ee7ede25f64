//! The test harness: starts onceflow's services in-process against the real
//! PostgreSQL and the real Kafka-compatible broker, each test in its own
//! databases, topics and consumer groups so tests never see each other's state.
//!
//! Where to find the real parts (the README's test command starts the broker):
//! - `ONCEFLOW_TEST_KAFKA_BROKERS` (default `127.0.0.1:9092`)
//! - `ONCEFLOW_TEST_DATABASE_URL`, a server URL without database name
//!   (default `postgres://postgres@127.0.0.1:5432`)

use std::{net::SocketAddr, sync::Once, time::Duration};

use onceflow_runtime::{
    config::{self, DatabaseConfig, KafkaConfig},
    service::Running,
};
use tokio_util::sync::CancellationToken;

/// The development API key every test tenant `dev` uses (from the defaults).
pub const DEV_API_KEY: &str = "dev-onceflow-key";
/// How long a test waits for an outcome. Generous: a first consumer-group join
/// on the broker takes 20–45 s.
pub const OUTCOME_TIMEOUT: Duration = Duration::from_secs(120);

fn kafka_brokers() -> String {
    std::env::var("ONCEFLOW_TEST_KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".to_owned())
}

fn database_server() -> String {
    std::env::var("ONCEFLOW_TEST_DATABASE_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".to_owned())
}

/// Logs of the services under test, once per process; `RUST_LOG` narrows them.
fn init_logs() {
    static LOGS: Once = Once::new();
    LOGS.call_once(|| {
        let filter = tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,onceflow=info"));
        let _ = tracing_subscriber::fmt().with_env_filter(filter).with_test_writer().try_init();
    });
}

/// One test's isolated world.
#[derive(Debug)]
pub struct TestEnv {
    /// Unique per test; names its databases, topics and groups.
    pub id: String,
    pub kafka: KafkaConfig,
    shutdown: CancellationToken,
    databases: Vec<String>,
}

/// A service started by the harness.
#[derive(Debug)]
pub struct Service {
    pub addr: SocketAddr,
    pub running: Running,
    /// Stops just this service (the env's shutdown stops every service).
    pub shutdown: CancellationToken,
}

impl Service {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Stop the service and wait until all its tasks ended.
    pub async fn stop(self) {
        self.shutdown.cancel();
        self.running.wait().await;
    }
}

impl TestEnv {
    pub fn new() -> Self {
        init_logs();
        let id = uuid::Uuid::new_v4().simple().to_string()[..12].to_owned();
        let kafka = KafkaConfig {
            brokers: kafka_brokers(),
            topic_prefix: format!("t{id}."),
            partitions: 2,
            session_timeout_ms: 6000,
        };
        Self { id, kafka, shutdown: CancellationToken::new(), databases: Vec::new() }
    }

    fn database(&mut self, service: &str) -> DatabaseConfig {
        let name = format!("onceflow_test_{}_{service}", self.id);
        self.databases.push(name.clone());
        DatabaseConfig { url: format!("{}/{name}", database_server()), max_connections: 10, acquire_timeout_ms: 5000 }
    }

    /// The URL of this test's database of `service`.
    pub fn database_url(&self, service: &str) -> String {
        format!("{}/onceflow_test_{}_{service}", database_server(), self.id)
    }

    pub async fn start_ingest(&mut self) -> Service {
        let mut config: onceflow_ingest::IngestConfig =
            config::load(onceflow_ingest::config::DEFAULTS, None).expect("ingest defaults");
        config.listen = "127.0.0.1:0".to_owned();
        config.database = self.database("ingest");
        config.kafka = self.kafka.clone();
        config.results_group_id = format!("ingest-{}", self.id);
        self.start(|token| onceflow_ingest::start(config, token)).await
    }

    pub async fn start_processor(&mut self) -> Service {
        let mut config: onceflow_processor::ProcessorConfig =
            config::load(onceflow_processor::config::DEFAULTS, None).expect("processor defaults");
        config.listen = "127.0.0.1:0".to_owned();
        config.database = self.database("processor");
        config.kafka = self.kafka.clone();
        config.group_id = format!("processor-{}", self.id);
        self.start(|token| onceflow_processor::start(config, token)).await
    }

    pub async fn start_notifier(&mut self) -> Service {
        let mut config: onceflow_notifier::NotifierConfig =
            config::load(onceflow_notifier::config::DEFAULTS, None).expect("notifier defaults");
        config.listen = "127.0.0.1:0".to_owned();
        config.database = self.database("notifier");
        config.kafka = self.kafka.clone();
        config.group_id = format!("notifier-{}", self.id);
        self.start(|token| onceflow_notifier::start(config, token)).await
    }

    async fn start<F, Fut>(&self, start: F) -> Service
    where
        F: FnOnce(CancellationToken) -> Fut,
        Fut: std::future::Future<Output = onceflow_runtime::Result<Running>>,
    {
        let shutdown = self.shutdown.child_token();
        let running = start(shutdown.clone()).await.expect("service starts");
        Service { addr: running.http_addr, running, shutdown }
    }

    /// Stop every service and drop this test's databases.
    pub async fn teardown(self) {
        self.shutdown.cancel();
        // Let the services' tasks notice and release their connections.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let Ok(admin) = sqlx::PgPool::connect(&format!("{}/postgres", database_server())).await else { return };
        for name in &self.databases {
            let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)")).execute(&admin).await;
        }
    }
}

impl Default for TestEnv {
    fn default() -> Self {
        Self::new()
    }
}

/// Poll `check` every 100 ms until it returns `Some`, or panic after `timeout`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A Server-Sent-Events client over a real HTTP connection.
pub struct SseClient {
    events: std::pin::Pin<Box<dyn futures::Stream<Item = eventsource_stream::Event> + Send>>,
}

impl std::fmt::Debug for SseClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SseClient")
    }
}

impl SseClient {
    /// Open `url` with the dev API key, resuming after `last_event_id` if given.
    pub async fn connect(url: &str, last_event_id: Option<&str>) -> Self {
        use eventsource_stream::Eventsource as _;
        use futures::StreamExt as _;
        let mut request =
            reqwest::Client::new().get(url).bearer_auth(DEV_API_KEY).header("accept", "text/event-stream");
        if let Some(id) = last_event_id {
            request = request.header("last-event-id", id);
        }
        let response = request.send().await.expect("SSE request");
        assert_eq!(response.status(), 200, "SSE status");
        assert_eq!(response.headers()["content-type"], "text/event-stream");
        let events = response.bytes_stream().eventsource().filter_map(|event| async move { event.ok() });
        Self { events: Box::pin(events) }
    }

    /// The next event with an id (skipping the `retry:` preamble), or `None`
    /// when the stream ended.
    pub async fn next_event(&mut self, timeout: Duration) -> Option<eventsource_stream::Event> {
        use futures::StreamExt as _;
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let event = tokio::time::timeout_at(deadline, self.events.next())
                .await
                .unwrap_or_else(|_| panic!("no SSE event within {timeout:?}"))?;
            if !event.id.is_empty() || !event.data.is_empty() {
                return Some(event);
            }
        }
    }
}
