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
    config::{self, DatabaseConfig, KafkaConfig, LogFormat, TelemetryConfig},
    service::Running,
    telemetry,
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

/// Telemetry of the services under test, once per process, as the binaries
/// set it up (so trace context really crosses Kafka); `RUST_LOG` narrows the logs.
fn init_telemetry() {
    static TELEMETRY: Once = Once::new();
    TELEMETRY.call_once(|| {
        let config =
            TelemetryConfig { log_format: LogFormat::Pretty, log_filter: "warn".to_owned(), otlp_endpoint: None };
        // The guard would only flush an exporter, and the tests configure none.
        std::mem::forget(telemetry::init("onceflow-tests", &config).expect("telemetry"));
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
        init_telemetry();
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

/// A plain Kafka consumer outside the services, reading a topic from the
/// beginning without a consumer group (no group join to wait for).
pub struct TopicReader {
    consumer: rdkafka::consumer::StreamConsumer,
}

impl std::fmt::Debug for TopicReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TopicReader")
    }
}

/// One record as an outside consumer sees it.
#[derive(Debug, Clone)]
pub struct Record {
    pub key: Option<String>,
    pub headers: std::collections::HashMap<String, String>,
    pub payload: Vec<u8>,
}

impl TopicReader {
    pub fn new(kafka: &KafkaConfig, topic: &str) -> Self {
        use rdkafka::{Offset, TopicPartitionList, consumer::Consumer as _};
        let consumer: rdkafka::consumer::StreamConsumer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", &kafka.brokers)
            .set("group.id", format!("outside-reader-{}", uuid::Uuid::new_v4()))
            .set("enable.auto.commit", "false")
            .create()
            .expect("consumer");
        let mut partitions = TopicPartitionList::new();
        for partition in 0..kafka.partitions {
            partitions.add_partition_offset(topic, partition, Offset::Beginning).expect("partition");
        }
        consumer.assign(&partitions).expect("assign");
        Self { consumer }
    }

    /// The next record, waiting up to `timeout`.
    pub async fn next(&self, timeout: Duration) -> Record {
        use rdkafka::message::{Headers as _, Message as _};
        let message = tokio::time::timeout(timeout, self.consumer.recv())
            .await
            .unwrap_or_else(|_| panic!("no record within {timeout:?}"))
            .expect("kafka record");
        let headers = message
            .headers()
            .map(|headers| {
                headers
                    .iter()
                    .map(|h| (h.key.to_owned(), String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned()))
                    .collect()
            })
            .unwrap_or_default();
        Record {
            key: message.key().map(|k| String::from_utf8_lossy(k).into_owned()),
            headers,
            payload: message.payload().unwrap_or_default().to_vec(),
        }
    }

    /// Records until `wanted` matches one, which is returned.
    pub async fn find(&self, timeout: Duration, mut wanted: impl FnMut(&Record) -> bool) -> Record {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let record = self.next(left).await;
            if wanted(&record) {
                return record;
            }
        }
    }
}
