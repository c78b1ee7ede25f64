//! One test's isolated world: [`TestEnv`] names its databases, topics and
//! consumer groups, starts the services in-process with them ([`Service`]),
//! and drops its databases at teardown.

use std::{net::SocketAddr, sync::Once, time::Duration};

use onceflow_runtime::{
    config::{self, DatabaseConfig, KafkaConfig, LogFormat, TelemetryConfig},
    service::Running,
    telemetry,
};
use tokio_util::sync::CancellationToken;

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

    /// A directory for this test's files (service logs), kept after the test
    /// so a failure can be read.
    pub fn scratch_dir(&self) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("onceflow-test-{}", self.id));
        std::fs::create_dir_all(&dir).expect("scratch directory");
        dir
    }

    /// A command types file of this test with `declarations` (TOML, see
    /// `onceflow_catalogue::declaration`), for a service's `command_types_file`.
    pub fn command_types_file(&self, declarations: &str) -> String {
        let path = self.scratch_dir().join("command-types.toml");
        std::fs::write(&path, declarations).expect("write the command types file");
        path.to_string_lossy().into_owned()
    }

    /// Create this test's commands, results and dead-letter topics, as the services do.
    pub async fn create_topics(&self) {
        let topics = self.kafka.topics();
        onceflow_runtime::kafka::ensure_topics(&self.kafka, &[&topics.commands, &topics.results, &topics.dead_letter])
            .await
            .expect("create the test's topics");
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

    pub async fn start_notifier(&mut self) -> Service {
        self.start_notifier_with(|_| {}).await
    }

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

/// The development settings of `service` (`config/development/<service>.toml`:
/// tenant `dev` with [`DEV_API_KEY`](crate::DEV_API_KEY), and its webhook secret), which tests
/// start ingest and the notifier with, as the local stack does.
pub fn development_config(service: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("../config/development/{service}.toml"))
}
