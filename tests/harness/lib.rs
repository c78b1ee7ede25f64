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
mod push_handler;
pub use push_handler::{PushHandler, PushReply, PushRequest};

pub const DEV_API_KEY: &str = "dev-onceflow-key";
/// The API key of the development tenant `probe`, the synthetic probe's.
pub const PROBE_API_KEY: &str = "probe-onceflow-key";
/// How long a test waits for an outcome. Generous: a first consumer-group join
/// on the broker takes 20–45 s.
pub const OUTCOME_TIMEOUT: Duration = Duration::from_secs(120);

fn kafka_brokers() -> String {
    std::env::var("ONCEFLOW_TEST_KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".to_owned())
}

/// The PostgreSQL server of the tests, as a URL without a database name.
pub fn database_server() -> String {
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
            replication_factor: 1,
            session_timeout_ms: 6000,
            client: Default::default(),
            consumer: Default::default(),
            producer: Default::default(),
        };
        Self { id, kafka, shutdown: CancellationToken::new(), databases: Vec::new() }
    }

    /// A database of this test for `service`, dropped at teardown.
    pub fn database(&mut self, service: &str) -> DatabaseConfig {
        let name = format!("onceflow_test_{}_{service}", self.id);
        self.databases.push(name.clone());
        DatabaseConfig { url: format!("{}/{name}", database_server()), max_connections: 10, acquire_timeout_ms: 5000 }
    }

    /// The URL of this test's database of `service`.
    pub fn database_url(&self, service: &str) -> String {
        format!("{}/onceflow_test_{}_{service}", database_server(), self.id)
    }

    pub async fn start_ingest(&mut self) -> Service {
        self.start_ingest_with(|_| {}).await
    }

    /// Start ingest with this test's isolation settings, then `customize` applied.
    pub async fn start_ingest_with(&mut self, customize: impl FnOnce(&mut onceflow_ingest::IngestConfig)) -> Service {
        let mut config: onceflow_ingest::IngestConfig =
            config::load(onceflow_ingest::config::DEFAULTS, Some(&development_config("ingest")))
                .expect("ingest's development settings");
        config.listen = "127.0.0.1:0".to_owned();
        config.database = self.database("ingest");
        config.kafka = self.kafka.clone();
        config.results_group_id = format!("ingest-{}", self.id);
        // Backpressure watches the processor of this test.
        config.shed.processor_group = format!("processor-{}", self.id);
        // The tests' webhook receivers listen on loopback.
        config.webhooks.allowlist = onceflow_webhook::Allowlist::new(["127.0.0.1"]).expect("allowlist");
        // A test's processor listens on a port of its own: a test that wants
        // `waiting_for` names it.
        config.execution_status_url = String::new();
        customize(&mut config);
        self.start(|token| onceflow_ingest::start(config, token)).await
    }

    /// Ingest reading the command types of `types` and asking `processor`
    /// about executions (what a job waits for, cancellations).
    pub async fn start_ingest_beside(&mut self, types: &str, processor: &Service) -> Service {
        self.start_ingest_with(|config| {
            config.command_types_file = types.to_owned();
            config.execution_status_url = processor.url("");
        })
        .await
    }

    pub async fn start_processor(&mut self) -> Service {
        self.start_processor_with(|_| {}).await
    }

    pub async fn start_notifier(&mut self) -> Service {
        self.start_notifier_with(|_| {}).await
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
        Self::connect_as(url, DEV_API_KEY, last_event_id).await
    }

    /// Open `url` with `api_key`, resuming after `last_event_id` if given.
    pub async fn connect_as(url: &str, api_key: &str, last_event_id: Option<&str>) -> Self {
        Self::open(reqwest::Client::new().get(url).bearer_auth(api_key), last_event_id).await
    }

    /// Open `url` as a browser does: no `Authorization` header, the URL's
    /// `?token=` is the credential.
    pub async fn connect_with_url_token(url: &str, last_event_id: Option<&str>) -> Self {
        Self::open(reqwest::Client::new().get(url), last_event_id).await
    }

    async fn open(request: reqwest::RequestBuilder, last_event_id: Option<&str>) -> Self {
        use eventsource_stream::Eventsource as _;
        use futures::StreamExt as _;
        let mut request = request.header("accept", "text/event-stream");
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

/// A stream token from `notifier` for the dev tenant, asking for `body`
/// (e.g. `{"job_id": ...}`), or the failed answer.
pub async fn stream_token(notifier: &Service, body: &serde_json::Value) -> Result<String, ApiResponse> {
    let answer = ApiResponse::send(
        reqwest::Client::new().post(notifier.url("/v1/stream-tokens")).bearer_auth(DEV_API_KEY).json(body),
    )
    .await;
    if answer.status != 200 {
        return Err(answer);
    }
    Ok(answer.json()["token"].as_str().expect("a token").to_owned())
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

impl TopicReader {
    /// Every record until none arrives for `quiet`.
    pub async fn records_until_quiet(&self, quiet: Duration) -> Vec<Record> {
        let mut records = Vec::new();
        loop {
            let next = tokio::time::timeout(quiet, self.next(quiet * 2)).await;
            match next {
                Ok(record) => records.push(record),
                Err(_) => return records,
            }
        }
    }
}

/// An HTTP response as a client sees it.
#[derive(Debug, Clone)]
pub struct ApiResponse {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: Vec<u8>,
}

impl ApiResponse {
    /// Send `request` and read the whole answer.
    pub async fn send(request: reqwest::RequestBuilder) -> Self {
        let response = request.send().await.expect("the service answers");
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let body = response.bytes().await.expect("response body").to_vec();
        Self { status, headers, body }
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The `type` of a problem+json body.
    pub fn problem_type(&self) -> String {
        assert_eq!(self.header("content-type"), Some("application/problem+json"), "{self:?}");
        self.json()["type"].as_str().unwrap_or_default().to_owned()
    }
}

/// A client of ingest's API over real HTTP.
#[derive(Debug, Clone)]
pub struct IngestClient {
    base: String,
    http: reqwest::Client,
    api_key: String,
}

impl IngestClient {
    pub fn new(ingest: &Service) -> Self {
        Self::with_key(ingest, DEV_API_KEY)
    }

    pub fn with_key(ingest: &Service, api_key: &str) -> Self {
        Self::at(&ingest.url(""), api_key)
    }

    /// A client of the ingest at `base` (`http://host:port`), e.g. one run as a process.
    pub fn at(base: &str, api_key: &str) -> Self {
        Self { base: base.to_owned(), http: reqwest::Client::new(), api_key: api_key.to_owned() }
    }

    /// `POST /v1/commands` with this client's API key, `key` and a JSON body.
    pub async fn submit(&self, key: &str, body: &serde_json::Value) -> ApiResponse {
        let request = self
            .http
            .post(format!("{}/v1/commands", self.base))
            .bearer_auth(&self.api_key)
            .header("idempotency-key", key)
            .json(body);
        Self::send(request).await
    }

    /// `POST /v1/commands` built by `build` from a bare request (no headers, no body).
    pub async fn submit_raw(
        &self,
        build: impl FnOnce(reqwest::RequestBuilder) -> reqwest::RequestBuilder,
    ) -> ApiResponse {
        Self::send(build(self.http.post(format!("{}/v1/commands", self.base)))).await
    }

    /// `GET /v1/jobs/{job_id}`.
    pub async fn job(&self, job_id: &str) -> ApiResponse {
        Self::send(self.http.get(format!("{}/v1/jobs/{job_id}", self.base)).bearer_auth(&self.api_key)).await
    }

    /// `POST /v1/jobs/{job_id}/cancel`.
    pub async fn cancel(&self, job_id: &str) -> ApiResponse {
        let url = format!("{}/v1/jobs/{job_id}/cancel", self.base);
        Self::send(self.http.post(url).bearer_auth(&self.api_key)).await
    }

    async fn send(request: reqwest::RequestBuilder) -> ApiResponse {
        ApiResponse::send(request).await
    }
}

// ---------------------------------------------------------------------------
// Below the services: raw records on the topics, the consumer groups' offsets,
// and service binaries run as real processes (that a test can SIGKILL).
// ---------------------------------------------------------------------------

impl TestEnv {
    /// This test's database settings of `service`, dropped at teardown: for a
    /// service the test runs itself (e.g. as a separate process).
    pub fn database_config(&mut self, service: &str) -> DatabaseConfig {
        self.database(service)
    }

    /// Start the processor with this test's isolation settings, then `customize` applied.
    pub async fn start_processor_with(
        &mut self,
        customize: impl FnOnce(&mut onceflow_processor::ProcessorConfig),
    ) -> Service {
        let config = self.processor_config(customize);
        self.start(|token| onceflow_processor::start(config, token)).await
    }

    /// Start the processor with this test's isolation settings and
    /// `customize` applied, with `builtins` (a test's own handlers) to serve
    /// the command types its configuration declares.
    pub async fn start_processor_with_handlers(
        &mut self,
        builtins: onceflow_processor::handlers::Builtins,
        customize: impl FnOnce(&mut onceflow_processor::ProcessorConfig),
    ) -> Service {
        let config = self.processor_config(customize);
        self.start(|token| onceflow_processor::start_with_handlers(config, builtins, token)).await
    }

    /// A command types file of this test with `declarations` (TOML, see
    /// `onceflow_catalogue::declaration`), for a service's `command_types_file`.
    pub fn command_types_file(&self, declarations: &str) -> String {
        let path = self.scratch_dir().join("command-types.toml");
        std::fs::write(&path, declarations).expect("write the command types file");
        path.to_string_lossy().into_owned()
    }

    fn processor_config(
        &mut self,
        customize: impl FnOnce(&mut onceflow_processor::ProcessorConfig),
    ) -> onceflow_processor::ProcessorConfig {
        let mut config: onceflow_processor::ProcessorConfig =
            config::load(onceflow_processor::config::DEFAULTS, Some(&development_config("processor")))
                .expect("the processor's development settings");
        config.listen = "127.0.0.1:0".to_owned();
        config.database = self.database("processor");
        config.kafka = self.kafka.clone();
        config.group_id = format!("processor-{}", self.id);
        // The development worker takes a type of the local stack's own file;
        // a test declares its types, and its workers, itself.
        config.workers.clear();
        customize(&mut config);
        config
    }

    /// Create this test's commands, results and dead-letter topics, as the services do.
    pub async fn create_topics(&self) {
        let topics = self.kafka.topics();
        onceflow_runtime::kafka::ensure_topics(&self.kafka, &[&topics.commands, &topics.results, &topics.dead_letter])
            .await
            .expect("create the test's topics");
    }

    /// A directory for this test's files (service logs), kept after the test
    /// so a failure can be read.
    pub fn scratch_dir(&self) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("onceflow-test-{}", self.id));
        std::fs::create_dir_all(&dir).expect("scratch directory");
        dir
    }
}

/// A plain idempotent Kafka producer, independent of the services' code, for
/// tests that put records on a topic themselves (as ingest's relay, a
/// redelivering broker or a misbehaving client would).
pub fn kafka_producer(kafka: &KafkaConfig) -> rdkafka::producer::FutureProducer {
    rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &kafka.brokers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "2")
        .set("message.timeout.ms", "30000")
        .create()
        .expect("producer")
}

/// A record read back with its place on the topic.
#[derive(Debug, Clone)]
pub struct PositionedRecord {
    pub partition: i32,
    pub offset: i64,
    pub record: Record,
}

/// How long a topic must stay quiet before [`read_topic_to_end`] takes its end
/// as reached.
const TOPIC_QUIET: Duration = Duration::from_millis(1500);

/// The `message-id` (event id) of every result of `correlation_id` on the
/// results topic of `kafka`, read to its end.
pub async fn published_event_ids(kafka: &KafkaConfig, correlation_id: &str) -> std::collections::HashSet<String> {
    read_topic_to_end(kafka, &kafka.topics().results, OUTCOME_TIMEOUT)
        .await
        .into_iter()
        .filter(|r| r.record.headers.get("correlation-id").map(String::as_str) == Some(correlation_id))
        .map(|r| r.record.headers["message-id"].clone())
        .collect()
}

/// Every record of `topic` that is on the broker when this is called,
/// partitions interleaved, each in offset order. Panics if they cannot be read
/// within `timeout`.
///
/// The high watermarks are only a lower bound of the end: the broker reports
/// the last batch's base offset + 1, which falls short when a producer
/// pipelined several records into one batch. So reading goes past them until
/// no record has arrived for [`TOPIC_QUIET`].
pub async fn read_topic_to_end(kafka: &KafkaConfig, topic: &str, timeout: Duration) -> Vec<PositionedRecord> {
    use rdkafka::{
        Message as _, Offset, TopicPartitionList,
        consumer::{BaseConsumer, Consumer as _},
        message::Headers as _,
    };
    let (kafka, topic) = (kafka.clone(), topic.to_owned());
    tokio::task::spawn_blocking(move || {
        let started = std::time::Instant::now();
        let consumer: BaseConsumer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", &kafka.brokers)
            .set("group.id", format!("outside-reader-{}", uuid::Uuid::new_v4()))
            .set("enable.auto.commit", "false")
            .set("fetch.wait.max.ms", "100")
            .create()
            .expect("consumer");
        let mut below_watermark = std::collections::HashMap::new();
        let mut assignment = TopicPartitionList::new();
        for partition in 0..kafka.partitions {
            let (low, high) = consumer.fetch_watermarks(&topic, partition, timeout).expect("watermarks");
            if high > low {
                below_watermark.insert(partition, high);
            }
            assignment.add_partition_offset(&topic, partition, Offset::Beginning).expect("partition");
        }
        consumer.assign(&assignment).expect("assign");
        let mut records = Vec::new();
        let mut last_arrival = std::time::Instant::now();
        while !below_watermark.is_empty() || last_arrival.elapsed() < TOPIC_QUIET {
            assert!(
                started.elapsed() < timeout,
                "could not read {topic} to its end within {timeout:?}: partitions {below_watermark:?} short of their watermark"
            );
            let Some(received) = consumer.poll(Duration::from_millis(100)) else { continue };
            let message = received.expect("kafka record");
            last_arrival = std::time::Instant::now();
            let (partition, offset) = (message.partition(), message.offset());
            if below_watermark.get(&partition).is_some_and(|&high| offset + 1 >= high) {
                below_watermark.remove(&partition);
            }
            let headers = message
                .headers()
                .map(|headers| {
                    headers
                        .iter()
                        .map(|h| (h.key.to_owned(), String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned()))
                        .collect()
                })
                .unwrap_or_default();
            let record = Record {
                key: message.key().map(|k| String::from_utf8_lossy(k).into_owned()),
                headers,
                payload: message.payload().unwrap_or_default().to_vec(),
            };
            records.push(PositionedRecord { partition, offset, record });
        }
        records
    })
    .await
    .expect("topic reader")
}

/// The offsets consumer group `group` has committed on `topic`, by partition
/// (partitions without a committed offset are absent). Read with an offset
/// fetch, without joining the group.
pub async fn committed_offsets(kafka: &KafkaConfig, group: &str, topic: &str) -> std::collections::HashMap<i32, i64> {
    use rdkafka::{
        Offset, TopicPartitionList,
        consumer::{BaseConsumer, Consumer as _},
    };
    let (kafka, group, topic) = (kafka.clone(), group.to_owned(), topic.to_owned());
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", &kafka.brokers)
            .set("group.id", &group)
            .set("enable.auto.commit", "false")
            .create()
            .expect("consumer");
        let mut partitions = TopicPartitionList::new();
        for partition in 0..kafka.partitions {
            partitions.add_partition(&topic, partition);
        }
        let committed = consumer.committed_offsets(partitions, Duration::from_secs(10)).expect("committed offsets");
        committed
            .elements()
            .iter()
            .filter_map(|element| match element.offset() {
                Offset::Offset(offset) => Some((element.partition(), offset)),
                _ => None,
            })
            .collect()
    })
    .await
    .expect("offset fetch")
}

/// A service binary run as a separate OS process, configured only through
/// `ONCEFLOW_*` environment variables. Dropping it kills it, so a failing test
/// leaves no process behind.
#[derive(Debug)]
pub struct ServiceProcess {
    child: std::process::Child,
    /// Where its standard output and error go.
    pub log: std::path::PathBuf,
}

impl ServiceProcess {
    /// The service binary `name` built beside the test executable: the test
    /// runs as `target/<profile>/deps/<test>-<hash>`, the binaries of the
    /// workspace land in `target/<profile>/`. Panics, saying how to build it,
    /// when it is missing.
    pub fn binary(name: &str) -> std::path::PathBuf {
        let exe = std::env::current_exe().expect("the test executable's path");
        let profile_dir = exe.parent().and_then(std::path::Path::parent).expect("target/<profile>/deps/<test>");
        let path = profile_dir.join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
        assert!(
            path.is_file(),
            "{} does not exist: build the service binaries before the tests with \
             `cargo build --workspace --bins --locked` (scripts/test.sh does)",
            path.display()
        );
        path
    }

    /// A command running binary `name` without the `ONCEFLOW_*` variables
    /// this process inherited (the caller gives the ones it wants).
    pub fn command(name: &str) -> std::process::Command {
        let mut command = std::process::Command::new(Self::binary(name));
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with(onceflow_runtime::config::ENV_PREFIX) {
                command.env_remove(key);
            }
        }
        command
    }

    /// Start binary `name` with exactly the `ONCEFLOW_*` variables in `env`
    /// (inherited ones are removed), appending its output to `log`.
    pub fn spawn(name: &str, env: &[(&str, String)], log: &std::path::Path) -> Self {
        let output = std::fs::OpenOptions::new().create(true).append(true).open(log).expect("service log file");
        let mut command = Self::command(name);
        command
            .envs(env.iter().map(|(key, value)| (key, value)))
            .stdin(std::process::Stdio::null())
            .stdout(output.try_clone().expect("log file handle"))
            .stderr(output);
        let child = command.spawn().unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        Self { child, log: log.to_owned() }
    }

    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// `None` while it runs; how it ended once it has.
    pub fn exit_status(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().expect("process status")
    }

    /// SIGKILL, then reap: no shutdown code runs, nothing is flushed or
    /// committed. Returns once the process is gone.
    pub fn kill(mut self) {
        self.kill_and_reap();
    }

    /// SIGTERM, as an orchestrator stops a service: it shuts down gracefully.
    /// Returns its exit status once it is gone; after `patience` it is
    /// SIGKILLed and `None` is returned.
    pub async fn terminate(mut self, patience: Duration) -> Option<std::process::ExitStatus> {
        let sent = std::process::Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        assert!(sent.is_ok_and(|status| status.success()), "cannot send SIGTERM to {}", self.child.id());
        let deadline = tokio::time::Instant::now() + patience;
        while tokio::time::Instant::now() < deadline {
            if let Some(status) = self.exit_status() {
                return Some(status);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.kill_and_reap();
        None
    }

    fn kill_and_reap(&mut self) {
        // `Child::kill` sends SIGKILL on Unix; an already exited child is fine.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ServiceProcess {
    fn drop(&mut self) {
        self.kill_and_reap();
    }
}

/// A broker of the test's own (the pinned nisshi) that keeps its data in a
/// SQLite file of the test's scratch directory, as the local stack's
/// persistent broker does: the test may stop it (SIGSTOP: the process stands still, every
/// connection hangs) and start it again (SIGCONT), or SIGKILL it and start a
/// new process on the same port and file, as a broker that crashed and came
/// back with its topics, records and consumer offsets.
#[derive(Debug)]
pub struct OwnBroker {
    pub addr: String,
    /// Where its SQLite file lives (its working directory).
    dir: std::path::PathBuf,
    child: std::process::Child,
}

impl OwnBroker {
    /// Start a broker on a free loopback port, its data in `dir`.
    pub async fn start(dir: &std::path::Path) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0").expect("free port").local_addr().expect("addr").port();
        let addr = format!("127.0.0.1:{port}");
        let dir = dir.to_owned();
        let child = Self::spawn(&addr, &dir);
        let broker = Self { addr, dir, child };
        broker.wait_listening().await;
        // Indexed as the local stack's is (scripts/index-broker-storage.py
        // says why), so the tests meet the broker users run.
        let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/index-broker-storage.py");
        let indexed = std::process::Command::new("python3")
            .arg(script)
            .arg(broker.dir.join("broker.db"))
            .status()
            .expect("python3 runs scripts/index-broker-storage.py");
        assert!(indexed.success(), "the broker's storage is indexed");
        broker
    }

    fn spawn(addr: &str, dir: &std::path::Path) -> std::process::Child {
        let url = format!("tcp://{addr}");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("broker.log"))
            .expect("broker log file");
        std::process::Command::new("nisshi")
            .current_dir(dir)
            .args(["broker", "--listener-url", &url, "--advertised-listener-url", &url])
            // A path relative to the working directory (see scripts/lib.sh).
            .args(["--storage-engine", "sqlite://broker.db"])
            .stdout(log.try_clone().expect("log handle"))
            .stderr(log)
            .spawn()
            .expect("nisshi on PATH (scripts/test.sh installs it)")
    }

    async fn wait_listening(&self) {
        let addr = self.addr.clone();
        eventually("the broker to listen", Duration::from_secs(30), || async {
            tokio::net::TcpStream::connect(&addr).await.ok().map(drop)
        })
        .await;
    }

    /// SIGKILL the broker (nothing of it runs on), then start it again on the
    /// same port with the same data.
    pub async fn kill_and_restart(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.child = Self::spawn(&self.addr, &self.dir);
        self.wait_listening().await;
    }

    /// Stop the broker process where it stands.
    pub fn stop(&self) {
        self.signal("-STOP");
    }

    /// Let it run again.
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, signal: &str) {
        let status = std::process::Command::new("kill")
            .args([signal, &self.child.id().to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill {signal} failed");
    }
}

impl Drop for OwnBroker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------
// Webhooks: a notifier with custom settings, a webhook receiver the test runs
// itself, and result events published as the processor would.
// ---------------------------------------------------------------------------

impl TestEnv {
    /// Start the notifier with this test's isolation settings, then
    /// `customize` applied. Starting it again (after [`Service::stop`]) reuses
    /// its database: a notifier restart.
    pub async fn start_notifier_with(
        &mut self,
        customize: impl FnOnce(&mut onceflow_notifier::NotifierConfig),
    ) -> Service {
        let mut config: onceflow_notifier::NotifierConfig =
            config::load(onceflow_notifier::config::DEFAULTS, Some(&development_config("notifier")))
                .expect("the notifier's development settings");
        config.listen = "127.0.0.1:0".to_owned();
        config.database = self.database("notifier");
        config.kafka = self.kafka.clone();
        config.group_id = format!("notifier-{}", self.id);
        customize(&mut config);
        self.start(|token| onceflow_notifier::start(config, token)).await
    }

    /// Publish `event` on this test's results topic exactly as the processor
    /// does: Avro body, envelope headers (`message-id` = `event_id`), keyed by
    /// job id. Publishing the same event twice is a redelivery.
    pub async fn publish_result(&self, event: &onceflow_contracts::ResultEvent) {
        use rdkafka::producer::FutureRecord;
        let envelope = result_envelope(event);
        let payload = event.encode().expect("encodable result");
        let topic = self.kafka.topics().results;
        let producer = kafka_producer(&self.kafka);
        let record: FutureRecord<'_, str, [u8]> = FutureRecord::to(&topic)
            .key(event.job_id.as_str())
            .payload(payload.as_slice())
            .headers(onceflow_runtime::kafka::headers(&envelope));
        producer.send(record, Duration::from_secs(30)).await.map_err(|(error, _)| error).expect("result published");
    }
}

/// The envelope the processor puts on `event` (`message-id` = `event_id`,
/// caused by the job's command).
pub fn result_envelope(event: &onceflow_contracts::ResultEvent) -> onceflow_contracts::Envelope {
    onceflow_contracts::Envelope {
        message_id: uuid::Uuid::parse_str(&event.event_id).expect("event ids are UUIDs"),
        correlation_id: event.correlation_id.clone(),
        causation_id: Some(event.job_id.clone()),
        tenant: event.tenant.clone(),
        message_type: event.status.event_type(),
        schema_id: onceflow_contracts::schema::RESULT.id.clone(),
        traceparent: None,
        tracestate: None,
    }
}

/// A terminal result event of a new job of tenant `dev`, as the processor
/// would publish it, with `callback_url`.
pub fn result_event(
    status: onceflow_contracts::JobStatus,
    callback_url: Option<&str>,
) -> onceflow_contracts::ResultEvent {
    let job_id = uuid::Uuid::now_v7().to_string();
    onceflow_contracts::ResultEvent {
        event_id: uuid::Uuid::now_v7().to_string(),
        job_id: job_id.clone(),
        tenant: "dev".to_owned(),
        correlation_id: format!("corr-{job_id}"),
        command_type: "ledger.deposit".to_owned(),
        status,
        progress_percent: None,
        result_json: Some(r#"{"balance": 42}"#.to_owned()),
        error: None,
        callback_url: callback_url.map(str::to_owned),
        occurred_at: 1_700_000_000_000,
    }
}

/// How a [`WebhookReceiver`] answers one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reply {
    /// This status, empty body.
    Status(u16),
    /// This status with `Retry-After: <seconds>`.
    RetryAfter(u16, u64),
    /// No answer until the client gives up or goes away.
    Hang,
}

/// One request a [`WebhookReceiver`] got.
#[derive(Debug, Clone)]
pub struct ReceivedWebhook {
    pub at: std::time::Instant,
    pub method: String,
    pub path_and_query: String,
    pub headers: axum::http::HeaderMap,
    pub body: Vec<u8>,
}

impl ReceivedWebhook {
    pub fn header(&self, name: &str) -> &str {
        self.headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or_default()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("a JSON body")
    }
}

#[derive(Debug, Default)]
struct ReceiverState {
    received: std::sync::Mutex<Vec<ReceivedWebhook>>,
    script: std::sync::Mutex<std::collections::VecDeque<Reply>>,
    fallback: std::sync::Mutex<Option<Reply>>,
}

/// A webhook receiver on 127.0.0.1 (a real HTTP server on a free port) that
/// records every request and answers from a script: the scripted replies in
/// order, then the fallback reply (`200` unless changed). It verifies
/// nothing itself; tests verify what it recorded.
#[derive(Debug)]
pub struct WebhookReceiver {
    pub addr: SocketAddr,
    state: std::sync::Arc<ReceiverState>,
    server: tokio::task::JoinHandle<()>,
}

impl WebhookReceiver {
    pub async fn start() -> Self {
        use axum::{
            body::Bytes,
            extract::State,
            http::{HeaderMap, Method, StatusCode, Uri},
            response::IntoResponse,
        };
        async fn handle(
            State(state): State<std::sync::Arc<ReceiverState>>,
            method: Method,
            uri: Uri,
            headers: HeaderMap,
            body: Bytes,
        ) -> axum::response::Response {
            state.received.lock().expect("receiver lock").push(ReceivedWebhook {
                at: std::time::Instant::now(),
                method: method.to_string(),
                path_and_query: uri.path_and_query().map(ToString::to_string).unwrap_or_default(),
                headers,
                body: body.to_vec(),
            });
            let scripted = state.script.lock().expect("receiver lock").pop_front();
            let reply = scripted.or(*state.fallback.lock().expect("receiver lock")).unwrap_or(Reply::Status(200));
            let status = |code: u16| StatusCode::from_u16(code).expect("a valid status");
            match reply {
                Reply::Status(code) => status(code).into_response(),
                Reply::RetryAfter(code, seconds) => {
                    (status(code), [("retry-after", seconds.to_string())]).into_response()
                }
                Reply::Hang => {
                    // Dropped with the connection when the client gives up.
                    tokio::time::sleep(Duration::from_secs(3600)).await;
                    status(200).into_response()
                }
            }
        }
        let state = std::sync::Arc::new(ReceiverState::default());
        let router = axum::Router::new().fallback(handle).with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("receiver port");
        let addr = listener.local_addr().expect("receiver address");
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        Self { addr, state, server }
    }

    /// `http://127.0.0.1:<port><path>`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Answer the next requests with `replies`, in order.
    pub fn script(&self, replies: impl IntoIterator<Item = Reply>) {
        self.state.script.lock().expect("receiver lock").extend(replies);
    }

    /// Answer every unscripted request with `reply`.
    pub fn set_fallback(&self, reply: Reply) {
        *self.state.fallback.lock().expect("receiver lock") = Some(reply);
    }

    /// Every request so far.
    pub fn received(&self) -> Vec<ReceivedWebhook> {
        self.state.received.lock().expect("receiver lock").clone()
    }

    /// The first `count` requests, waiting up to `timeout` for them.
    pub async fn wait_for(&self, count: usize, timeout: Duration) -> Vec<ReceivedWebhook> {
        eventually(&format!("{count} webhook requests"), timeout, || async {
            let received = self.received();
            (received.len() >= count).then(|| received[..count].to_vec())
        })
        .await
    }
}

impl Drop for WebhookReceiver {
    fn drop(&mut self) {
        self.server.abort();
    }
}

/// A client of the notifier's webhook deliveries API over real HTTP.
#[derive(Debug, Clone)]
pub struct DeliveriesClient {
    base: String,
    http: reqwest::Client,
    api_key: Option<String>,
}

impl DeliveriesClient {
    /// With `api_key`, or none at all.
    pub fn new(notifier: &Service, api_key: Option<&str>) -> Self {
        Self { base: notifier.url(""), http: reqwest::Client::new(), api_key: api_key.map(str::to_owned) }
    }

    /// `GET /v1/jobs/{job_id}/deliveries`.
    pub async fn for_job(&self, job_id: &str) -> ApiResponse {
        self.send(self.http.get(format!("{}/v1/jobs/{job_id}/deliveries", self.base))).await
    }

    /// `GET /v1/deliveries/{id}`.
    pub async fn get(&self, id: &str) -> ApiResponse {
        self.send(self.http.get(format!("{}/v1/deliveries/{id}", self.base))).await
    }

    /// `POST /v1/deliveries/{id}/redrive`.
    pub async fn redrive(&self, id: &str) -> ApiResponse {
        self.send(self.http.post(format!("{}/v1/deliveries/{id}/redrive", self.base))).await
    }

    /// `GET /v1/webhook-endpoints`.
    pub async fn endpoints(&self) -> ApiResponse {
        self.send(self.http.get(format!("{}/v1/webhook-endpoints", self.base))).await
    }

    /// `POST /v1/webhook-endpoints/{id}/enable`.
    pub async fn enable_endpoint(&self, id: &str) -> ApiResponse {
        self.send(self.http.post(format!("{}/v1/webhook-endpoints/{id}/enable", self.base))).await
    }

    /// The job's only delivery once `done` says it is where the test wants it.
    pub async fn wait_for_delivery(
        &self,
        job_id: &str,
        timeout: Duration,
        done: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        eventually(&format!("the webhook delivery of job {job_id}"), timeout, || async {
            let response = self.for_job(job_id).await;
            assert_eq!(response.status, 200, "{}", String::from_utf8_lossy(&response.body));
            let deliveries = response.json()["deliveries"].as_array().cloned().unwrap_or_default();
            assert!(deliveries.len() <= 1, "one delivery per job: {deliveries:?}");
            deliveries.into_iter().next().filter(|delivery| done(delivery))
        })
        .await
    }

    async fn send(&self, mut request: reqwest::RequestBuilder) -> ApiResponse {
        if let Some(key) = &self.api_key {
            request = request.bearer_auth(key);
        }
        let response = request.send().await.expect("the notifier answers");
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let body = response.bytes().await.expect("response body").to_vec();
        ApiResponse { status, headers, body }
    }
}

// ---------------------------------------------------------------------------
// The whole stack with a canary tenant: hostile-input tests send something
// nasty as one tenant, then prove that another tenant's command still goes
// all the way through within seconds (guarantee G8).
// ---------------------------------------------------------------------------

/// The second tenant of [`Stack`], whose work must never be stalled by
/// anything tenant `dev` sends.
pub const CANARY_TENANT: &str = "canary";
/// Its API key (configured as its SHA-256 digest, as any tenant's).
pub const CANARY_API_KEY: &str = "canary-onceflow-key";
/// How soon a canary command must complete once the stack is warm.
pub const CANARY_TIMEOUT: Duration = Duration::from_secs(20);

/// The canary tenant's configured key.
pub fn canary_tenant_key() -> onceflow_runtime::auth::TenantKey {
    use sha2::Digest as _;
    onceflow_runtime::auth::TenantKey {
        tenant: CANARY_TENANT.to_owned(),
        api_key_sha256: hex::encode(sha2::Sha256::digest(CANARY_API_KEY.as_bytes())),
    }
}

/// Ingest, processor and notifier of one test, in-process, with tenants
/// `dev` and [`CANARY_TENANT`].
#[derive(Debug)]
pub struct Stack {
    pub ingest: Service,
    pub processor: Service,
    pub notifier: Service,
}

impl TestEnv {
    /// Start all three services and wait until a first canary command has gone
    /// all the way through (consumer groups joined), so later canaries measure
    /// the pipeline, not the warm-up.
    pub async fn start_stack(&mut self) -> Stack {
        let ingest = self.start_ingest_with(|config| config.tenants.push(canary_tenant_key())).await;
        let processor = self.start_processor().await;
        let notifier = self.start_notifier_with(|config| config.tenants.push(canary_tenant_key())).await;
        let stack = Stack { ingest, processor, notifier };
        stack.canary_completes(OUTCOME_TIMEOUT).await;
        stack
    }
}

impl Stack {
    /// A client of ingest as tenant `dev`.
    pub fn dev(&self) -> IngestClient {
        IngestClient::new(&self.ingest)
    }

    /// A client of ingest as the canary tenant.
    pub fn canary(&self) -> IngestClient {
        IngestClient::with_key(&self.ingest, CANARY_API_KEY)
    }

    /// Submit a fresh canary command (an account opening) and assert that,
    /// within `within`, its `job.succeeded` event reaches the canary's SSE
    /// stream and ingest reports the job `succeeded`.
    pub async fn canary_completes(&self, within: Duration) {
        let account = format!("canary-{}", uuid::Uuid::new_v4().simple());
        let body =
            serde_json::json!({"type": "ledger.open_account", "payload": {"account_id": account, "currency": "EUR"}});
        let accepted = self.canary().submit(&account, &body).await;
        assert_eq!(accepted.status, 202, "canary refused: {}", String::from_utf8_lossy(&accepted.body));
        let accepted = accepted.json();
        let job_id = accepted["job_id"].as_str().expect("job id").to_owned();
        let mut stream =
            SseClient::connect_as(&self.notifier.url(&format!("/v1/jobs/{job_id}/events")), CANARY_API_KEY, None).await;
        let event = stream.next_event(within).await.expect("the canary's event");
        assert_eq!(event.event, "job.succeeded", "canary: {}", event.data);
        let canary = self.canary();
        eventually("the canary job to succeed in ingest", within, || async {
            (canary.job(&job_id).await.json()["status"] == "succeeded").then_some(())
        })
        .await;
    }
}

// ---------------------------------------------------------------------------
// Faults injected into a processor's database.
// ---------------------------------------------------------------------------

/// Make `db` (a processor's database) refuse every posting with the
/// PostgreSQL error `errcode` (e.g. `check_violation`, which the processor
/// takes for a data error; `serialization_failure`, an outage) until
/// [`allow_postings`]. Each refusal is counted in the sequence
/// `refused_postings`, outside every transaction (a sequence does not roll
/// back).
pub async fn refuse_postings(db: &sqlx::PgPool, errcode: &str) {
    sqlx::raw_sql(&format!(
        "CREATE SEQUENCE IF NOT EXISTS refused_postings;
         CREATE OR REPLACE FUNCTION refuse_posting() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
             PERFORM nextval('refused_postings');
             RAISE EXCEPTION 'injected fault' USING ERRCODE = '{errcode}';
         END $$;
         CREATE TRIGGER refuse_posting BEFORE INSERT ON postings FOR EACH ROW EXECUTE FUNCTION refuse_posting();"
    ))
    .execute(db)
    .await
    .expect("inject the fault");
}

/// End [`refuse_postings`]: the fault is repaired.
pub async fn allow_postings(db: &sqlx::PgPool) {
    sqlx::raw_sql("DROP TRIGGER refuse_posting ON postings").execute(db).await.expect("repair");
}

// ---------------------------------------------------------------------------
// Traces: an OTLP/HTTP receiver the services export to, and the three service
// binaries run as processes against it.
// ---------------------------------------------------------------------------

/// One span as an OTLP receiver got it, decoded from the protobuf.
#[derive(Debug, Clone)]
pub struct ReceivedSpan {
    /// The resource's `service.name`.
    pub service: String,
    /// Every resource attribute, as text.
    pub resource: std::collections::HashMap<String, String>,
    /// Hex, as in a `traceparent`.
    pub trace_id: String,
    pub span_id: String,
    /// `None` for a root span.
    pub parent_span_id: Option<String>,
    pub name: String,
    /// `SERVER`, `CLIENT`, `PRODUCER`, `CONSUMER`, `INTERNAL` (or `UNSPECIFIED`).
    pub kind: String,
    /// Every attribute, as text.
    pub attributes: std::collections::HashMap<String, String>,
    pub start_unix_nano: u64,
}

impl ReceivedSpan {
    /// Attribute `key`, if the span has it.
    pub fn attribute(&self, key: &str) -> Option<&str> {
        self.attributes.get(key).map(String::as_str)
    }
}

/// An OTLP/HTTP trace receiver on 127.0.0.1 (a real HTTP server on a free
/// port, as a collector's): `POST /v1/traces` with an
/// `application/x-protobuf` `ExportTraceServiceRequest` is decoded and kept.
/// Anything else is refused (`404`, `415`, `400` for bytes that do not
/// decode), as a collector would.
#[derive(Debug)]
pub struct OtlpReceiver {
    pub addr: SocketAddr,
    spans: std::sync::Arc<std::sync::Mutex<Vec<ReceivedSpan>>>,
    server: tokio::task::JoinHandle<()>,
}

impl OtlpReceiver {
    pub async fn start() -> Self {
        use axum::{
            body::Bytes,
            extract::State,
            http::{HeaderMap, StatusCode, header},
            response::IntoResponse,
            routing::post,
        };
        use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
        use prost::Message as _;

        type Spans = std::sync::Arc<std::sync::Mutex<Vec<ReceivedSpan>>>;
        async fn export(State(spans): State<Spans>, headers: HeaderMap, body: Bytes) -> axum::response::Response {
            let content_type = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or_default();
            if content_type != "application/x-protobuf" {
                return (StatusCode::UNSUPPORTED_MEDIA_TYPE, "OTLP/HTTP protobuf only").into_response();
            }
            let Ok(request) = ExportTraceServiceRequest::decode(body) else {
                return (StatusCode::BAD_REQUEST, "not an ExportTraceServiceRequest").into_response();
            };
            spans.lock().expect("receiver lock").extend(OtlpReceiver::decode(request));
            let answer = ExportTraceServiceResponse::default().encode_to_vec();
            ([(header::CONTENT_TYPE, "application/x-protobuf")], answer).into_response()
        }
        let spans = Spans::default();
        let router = axum::Router::new().route("/v1/traces", post(export)).with_state(spans.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("receiver port");
        let addr = listener.local_addr().expect("receiver address");
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        Self { addr, spans, server }
    }

    /// The collector's base URL, as `OTEL_EXPORTER_OTLP_ENDPOINT` takes it.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The traces URL, as `telemetry.otlp_endpoint` takes it.
    pub fn traces_url(&self) -> String {
        format!("http://{}/v1/traces", self.addr)
    }

    /// Every span received so far.
    pub fn spans(&self) -> Vec<ReceivedSpan> {
        self.spans.lock().expect("receiver lock").clone()
    }

    /// The spans of trace `trace_id` received so far.
    pub fn trace(&self, trace_id: &str) -> Vec<ReceivedSpan> {
        self.spans().into_iter().filter(|span| span.trace_id == trace_id).collect()
    }

    fn decode(
        request: opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest,
    ) -> Vec<ReceivedSpan> {
        use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
        let mut spans = Vec::new();
        for resource_spans in request.resource_spans {
            let resource = attributes(resource_spans.resource.map(|r| r.attributes).unwrap_or_default());
            let service = resource.get("service.name").cloned().unwrap_or_default();
            for span in resource_spans.scope_spans.into_iter().flat_map(|scope| scope.spans) {
                let kind = SpanKind::try_from(span.kind).map_or("UNKNOWN", |kind| kind.as_str_name());
                spans.push(ReceivedSpan {
                    service: service.clone(),
                    resource: resource.clone(),
                    trace_id: hex::encode(&span.trace_id),
                    span_id: hex::encode(&span.span_id),
                    parent_span_id: (!span.parent_span_id.is_empty()).then(|| hex::encode(&span.parent_span_id)),
                    name: span.name,
                    kind: kind.trim_start_matches("SPAN_KIND_").to_owned(),
                    attributes: attributes(span.attributes),
                    start_unix_nano: span.start_time_unix_nano,
                });
            }
        }
        spans
    }
}

impl Drop for OtlpReceiver {
    fn drop(&mut self) {
        self.server.abort();
    }
}

/// OTLP key-values as text (`AnyValue`'s scalar as it prints; arrays and
/// maps in their debug form, which no test compares).
fn attributes(
    pairs: Vec<opentelemetry_proto::tonic::common::v1::KeyValue>,
) -> std::collections::HashMap<String, String> {
    use opentelemetry_proto::tonic::common::v1::any_value::Value;
    pairs
        .into_iter()
        .map(|pair| {
            let value = match pair.value.and_then(|value| value.value) {
                Some(Value::StringValue(text)) => text,
                Some(Value::BoolValue(flag)) => flag.to_string(),
                Some(Value::IntValue(number)) => number.to_string(),
                Some(Value::DoubleValue(number)) => number.to_string(),
                Some(other) => format!("{other:?}"),
                None => String::new(),
            };
            (pair.key, value)
        })
        .collect()
}

/// `spans` (one trace) as a tree, each span under its parent, siblings by
/// start time: `service  KIND  name  key attributes`. A span whose parent is
/// not among `spans` (e.g. a client's own span) is shown as a root.
pub fn span_tree(spans: &[ReceivedSpan]) -> String {
    const SHOWN: [&str; 6] = [
        "http.route",
        "http.response.status_code",
        "messaging.destination.name",
        "messaging.destination.partition.id",
        "messaging.kafka.offset",
        "correlation_id",
    ];
    fn walk(spans: &[&ReceivedSpan], parent: Option<&str>, depth: usize, out: &mut String) {
        let mut children: Vec<&&ReceivedSpan> = spans
            .iter()
            .filter(|span| match parent {
                Some(parent) => span.parent_span_id.as_deref() == Some(parent),
                None => span.parent_span_id.as_ref().is_none_or(|id| spans.iter().all(|s| &s.span_id != id)),
            })
            .collect();
        children.sort_by_key(|span| span.start_unix_nano);
        for span in children {
            let shown: Vec<String> =
                SHOWN.iter().filter_map(|key| span.attribute(key).map(|value| format!("{key}={value}"))).collect();
            out.push_str(&format!(
                "{:indent$}{} [{}] {} {{{}}}\n",
                "",
                span.service,
                span.kind,
                span.name,
                shown.join(", "),
                indent = depth * 2
            ));
            walk(spans, Some(&span.span_id), depth + 1, out);
        }
    }
    let spans: Vec<&ReceivedSpan> = spans.iter().collect();
    let mut out = String::new();
    walk(&spans, None, 0, &mut out);
    out
}

/// The development settings of `service` (`config/development/<service>.toml`:
/// tenant `dev` with [`DEV_API_KEY`], and its webhook secret), which tests
/// start ingest and the notifier with, as the local stack does.
pub fn development_config(service: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("../config/development/{service}.toml"))
}

/// A command running `examples/python/<script>` with the Python of those
/// examples' environment, which `ONCEFLOW_TEST_PYTHON` names
/// (`scripts/check-python-examples.sh` makes it and sets the variable).
pub fn python_example(script: &str) -> std::process::Command {
    let python = std::env::var("ONCEFLOW_TEST_PYTHON")
        .expect("ONCEFLOW_TEST_PYTHON names the Python of examples/python (scripts/check-python-examples.sh sets it)");
    let mut command = std::process::Command::new(python);
    command.arg(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/python").join(script));
    command
}

/// A free loopback address for a service process to listen on.
pub fn free_addr() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("free port");
    listener.local_addr().expect("address").to_string()
}

/// Ingest, processor and notifier of one test as processes (the built
/// binaries, see [`ServiceProcess`]), with the test's databases, topics and
/// groups; their logs are in [`ProcessStack::logs`].
#[derive(Debug)]
pub struct ProcessStack {
    pub ingest: String,
    pub processor: String,
    pub notifier: String,
    pub logs: std::path::PathBuf,
    processes: Vec<ServiceProcess>,
}

impl ProcessStack {
    /// The binary names, in start order.
    pub const SERVICES: [&str; 3] = ["onceflow-ingest", "onceflow-processor", "onceflow-notifier"];

    /// The log file of `service` (one of [`Self::SERVICES`]).
    pub fn log(&self, service: &str) -> std::path::PathBuf {
        self.logs.join(format!("{service}.log"))
    }

    /// Panic, naming its log, if a service exited by itself.
    pub fn assert_alive(&mut self) {
        for (service, process) in Self::SERVICES.iter().zip(&mut self.processes) {
            if let Some(status) = process.exit_status() {
                panic!("{service} exited by itself ({status}); see {}", self.log(service).display());
            }
        }
    }

    /// Every line `service` has logged so far.
    pub fn log_lines(&self, service: &str) -> Vec<String> {
        std::fs::read_to_string(self.log(service)).unwrap_or_default().lines().map(str::to_owned).collect()
    }
}

impl TestEnv {
    /// Start the three binaries, each with this test's settings and then
    /// `extra(service)` (more variables, `ONCEFLOW_*` or others), and wait
    /// until each answers `/livez`.
    pub async fn spawn_stack(&mut self, extra: impl Fn(&str) -> Vec<(&'static str, String)>) -> ProcessStack {
        let logs = self.scratch_dir();
        let (ingest, processor, notifier) = (free_addr(), free_addr(), free_addr());
        let mut processes = Vec::new();
        for service in ProcessStack::SERVICES {
            let short = service.trim_start_matches("onceflow-");
            let mut env = vec![
                ("ONCEFLOW_DATABASE__URL", self.database(short).url),
                ("ONCEFLOW_KAFKA__BROKERS", self.kafka.brokers.clone()),
                ("ONCEFLOW_KAFKA__TOPIC_PREFIX", self.kafka.topic_prefix.clone()),
                ("ONCEFLOW_KAFKA__PARTITIONS", self.kafka.partitions.to_string()),
            ];
            let addr = match short {
                "ingest" => {
                    env.push(("ONCEFLOW_CONFIG", development_config(short).display().to_string()));
                    env.push(("ONCEFLOW_RESULTS_GROUP_ID", format!("ingest-{}", self.id)));
                    env.push(("ONCEFLOW_SHED__PROCESSOR_GROUP", format!("processor-{}", self.id)));
                    &ingest
                }
                "processor" => {
                    env.push(("ONCEFLOW_GROUP_ID", format!("processor-{}", self.id)));
                    &processor
                }
                _ => {
                    env.push(("ONCEFLOW_CONFIG", development_config(short).display().to_string()));
                    env.push(("ONCEFLOW_GROUP_ID", format!("notifier-{}", self.id)));
                    &notifier
                }
            };
            env.push(("ONCEFLOW_LISTEN", addr.clone()));
            env.extend(extra(service));
            processes.push(ServiceProcess::spawn(service, &env, &logs.join(format!("{service}.log"))));
            let url = format!("http://{addr}/livez");
            eventually(&format!("{service} to answer"), Duration::from_secs(60), || async {
                reqwest::get(&url).await.ok().filter(|r| r.status().is_success()).map(drop)
            })
            .await;
        }
        ProcessStack { ingest, processor, notifier, logs, processes }
    }
}

/// Put one record on `topic`'s partition 0 by speaking the Kafka protocol by
/// hand (Produce v3, record batch v2): the only way to give a header a name
/// that is not UTF-8, which no Rust client API allows but the protocol and
/// other clients do.
pub async fn produce_by_hand(brokers: &str, topic: &str, key: &[u8], headers: &[(&[u8], &[u8])], value: &[u8]) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    fn varint(out: &mut Vec<u8>, value: usize) {
        // Zig-zag of a non-negative length is twice it.
        let mut rest = u64::try_from(value).expect("a length") << 1;
        loop {
            let byte = u8::try_from(rest & 0x7f).expect("seven bits");
            rest >>= 7;
            if rest == 0 {
                out.push(byte);
                return;
            }
            out.push(byte | 0x80);
        }
    }
    fn crc32c(bytes: &[u8]) -> u32 {
        let mut crc = !0u32;
        for &byte in bytes {
            crc ^= u32::from(byte);
            for _ in 0..8 {
                crc = if crc & 1 == 1 { (crc >> 1) ^ 0x82F6_3B78 } else { crc >> 1 };
            }
        }
        !crc
    }
    let len32 = |len: usize| i32::try_from(len).expect("a length").to_be_bytes();
    let len16 = |len: usize| i16::try_from(len).expect("a length").to_be_bytes();

    // attributes, timestamp delta, offset delta (the varint 0 is one byte 0).
    let mut record = vec![0, 0, 0];
    varint(&mut record, key.len());
    record.extend_from_slice(key);
    varint(&mut record, value.len());
    record.extend_from_slice(value);
    varint(&mut record, headers.len());
    for (name, header_value) in headers {
        varint(&mut record, name.len());
        record.extend_from_slice(name);
        varint(&mut record, header_value.len());
        record.extend_from_slice(header_value);
    }
    let since_epoch = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("a clock");
    let now = i64::try_from(since_epoch.as_millis()).expect("milliseconds").to_be_bytes();
    // What the CRC covers: attributes to the end of the batch.
    let mut checked = Vec::new();
    checked.extend(0i16.to_be_bytes()); // attributes
    checked.extend(0i32.to_be_bytes()); // last offset delta
    checked.extend(now); // first timestamp
    checked.extend(now); // max timestamp
    checked.extend((-1i64).to_be_bytes()); // producer id
    checked.extend((-1i16).to_be_bytes()); // producer epoch
    checked.extend((-1i32).to_be_bytes()); // base sequence
    checked.extend(1i32.to_be_bytes()); // one record
    varint(&mut checked, record.len());
    checked.extend(record);
    let mut batch = Vec::new();
    batch.extend(0i64.to_be_bytes()); // base offset
    batch.extend(len32(4 + 1 + 4 + checked.len())); // leader epoch, magic, crc, the rest
    batch.extend((-1i32).to_be_bytes()); // partition leader epoch
    batch.push(2); // magic
    batch.extend(crc32c(&checked).to_be_bytes());
    batch.extend(checked);

    let client = b"onceflow-test";
    let mut request = Vec::new();
    request.extend(0i16.to_be_bytes()); // Produce
    request.extend(3i16.to_be_bytes()); // version 3
    request.extend(7i32.to_be_bytes()); // correlation id
    request.extend(len16(client.len()));
    request.extend(client);
    request.extend((-1i16).to_be_bytes()); // no transactional id
    request.extend(1i16.to_be_bytes()); // acks: the leader
    request.extend(30_000i32.to_be_bytes()); // timeout
    request.extend(1i32.to_be_bytes()); // one topic
    request.extend(len16(topic.len()));
    request.extend(topic.as_bytes());
    request.extend(1i32.to_be_bytes()); // one partition
    request.extend(0i32.to_be_bytes()); // partition 0
    request.extend(len32(batch.len()));
    request.extend(batch);

    let broker = brokers.split(',').next().expect("a broker");
    let mut stream = tokio::net::TcpStream::connect(broker).await.expect("connect to the broker");
    stream.write_all(&len32(request.len())).await.expect("send the request");
    stream.write_all(&request).await.expect("send the request");
    let size = usize::try_from(stream.read_i32().await.expect("the response size")).expect("a size");
    let mut response = vec![0; size];
    stream.read_exact(&mut response).await.expect("the response");
    // correlation id, topic count, topic name, partition count, partition index, then the error code.
    let at = 4 + 4 + 2 + topic.len() + 4 + 4;
    let error = i16::from_be_bytes([response[at], response[at + 1]]);
    assert_eq!(error, 0, "the broker refused the hand-made record");
}
