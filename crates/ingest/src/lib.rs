//! onceflow-ingest: the front door.
//!
//! - [`commands`]: `POST /v1/commands`, idempotent and durable (`202` only
//!   after the command and its outbox row are committed).
//! - [`jobs`]: `GET /v1/jobs/{id}` from the job projection.
//! - [`cancel`]: `POST /v1/jobs/{id}/cancel`, through the processor.
//! - [`projection`]: consumes the results topic into that projection.
//! - [`endpoints`]: consumes the notifier's webhook endpoint states, so
//!   commands naming a disabled endpoint are refused.
//! - [`maintenance`]: the idempotency-key sweeper, and the synthetic probe's
//!   jobs pruned.
//! - [`group_commit`]: accepted commands committed many per transaction.
//! - [`backpressure`]: refusing commands while the processor's backlog would
//!   take too long to drain.
//! - [`limits`]: each tenant's limits (rate, requests in flight, its share
//!   of an overloaded processor), `429` beyond them.
//! - [`error`]: every HTTP error as RFC 9457 problem+json.
//! - [`openapi`]: the OpenAPI 3.1 document at `/openapi.json`.
//! - [`config`]: settings and their defaults.
//!
//! [`start`] wires it together: migrations, topics, the outbox relay that
//! publishes accepted commands, the projection consumer and the HTTP server.

pub mod backpressure;
pub mod cancel;
pub mod commands;
pub mod config;
pub mod endpoints;
pub mod error;
pub mod group_commit;
pub mod jobs;
pub mod limits;
pub mod maintenance;
pub mod openapi;
pub mod projection;

use std::{
    sync::{Arc, atomic::AtomicI64},
    time::Duration,
};

use axum::{
    Router,
    extract::DefaultBodyLimit,
    routing::{get, post},
};
use onceflow_catalogue::CommandTypes;
use onceflow_contracts::topics::Topics;
use onceflow_outbox::{Relay, RelayConfig};
use onceflow_runtime::{auth::ApiKeys, http, kafka, parking::Parking, postgres, service::Running, vitals::Vitals};
use sqlx::PgPool;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

pub use config::IngestConfig;

/// What every request shares, behind one `Arc` (the router's state is cloned
/// per request: one reference count, not one per handle).
pub struct AppState {
    pub pool: PgPool,
    pub api_keys: ApiKeys,
    pub topics: Arc<Topics>,
    pub config: Arc<IngestConfig>,
    /// Unpublished outbox rows, kept current by [`onceflow_outbox::watch_backlog`].
    pub outbox_backlog: Arc<AtomicI64>,
    /// The processor's lag and drain rate, kept current by [`backpressure::watch`].
    pub processor_pressure: Arc<backpressure::ProcessorPressure>,
    /// Each tenant's limits, its share kept current by [`limits::TenantLimits::watch`].
    pub limits: Arc<limits::TenantLimits>,
    /// Where accepted commands go to be committed together.
    pub committer: group_commit::GroupCommitter,
    /// The command types accepted, and how each payload is checked.
    pub command_types: CommandTypes,
    /// Asks the processor what a job waits for (see [`jobs`]).
    pub processor: jobs::ProcessorClient,
    /// The OpenAPI document as served, made once at start (it lists every
    /// command type).
    pub openapi: axum::body::Bytes,
}

/// The service's migrations: its own, then the outbox's and the parked records'.
pub fn migrators() -> Vec<sqlx::migrate::Migrator> {
    vec![sqlx::migrate!("./migrations"), onceflow_outbox::migrator(), onceflow_runtime::parking::migrator()]
}

/// The HTTP API.
pub fn router(state: AppState, readiness: Vec<http::Dependency>) -> Router {
    // The configured limit is the only one: it replaces axum's 2 MB default.
    let body_limit = DefaultBodyLimit::max(state.config.max_body_bytes);
    Router::new()
        .route("/v1/commands", post(commands::submit))
        .route("/v1/jobs/{job_id}", get(jobs::get))
        .route("/v1/jobs/{job_id}/cancel", post(cancel::cancel))
        .route("/openapi.json", get(openapi::document))
        .with_state(Arc::new(state))
        .merge(http::probes_of(readiness))
        .layer(body_limit)
}

/// Ingest is ready with its database and its tasks; without the broker, or
/// with its projection's consumer out of its group, it is only degraded,
/// because it keeps accepting into its outbox (job status waits).
fn readiness(
    pool: PgPool,
    kafka: &onceflow_runtime::config::KafkaConfig,
    projection: http::ReadinessCheck,
    vitals: &Vitals,
) -> Vec<http::Dependency> {
    vec![
        http::Dependency::required("database", http::database_check(pool)),
        http::Dependency::optional("broker", http::broker_check(kafka)),
        http::Dependency::optional("consumer", projection),
        http::Dependency::required("tasks", vitals.check()),
    ]
}

/// The built-in command types and those declared in `file` (empty: none).
pub fn load_command_types(file: &str) -> onceflow_runtime::Result<CommandTypes> {
    let file = (!file.is_empty()).then(|| std::path::Path::new(file));
    CommandTypes::load(file).map_err(|error| onceflow_runtime::Error::Config(error.to_string()))
}

/// Start ingest: returns once it is serving.
pub async fn start(config: IngestConfig, shutdown: CancellationToken) -> onceflow_runtime::Result<Running> {
    let api_keys = ApiKeys::configured(&config.tenants)?;
    let command_types = load_command_types(&config.command_types_file)?;
    let pool = postgres::prepare(&config.database, migrators()).await?;
    let topics = config.kafka.topics();
    let mut tasks = JoinSet::new();
    let vitals = Vitals::default();
    tasks.spawn(maintenance::sweep_expired_keys(
        pool.clone(),
        Duration::from_secs(config.sweep_interval_secs.get()),
        config.sweep_batch,
        shutdown.clone(),
    ));
    tasks.spawn(maintenance::prune_probe_jobs(pool.clone(), config.probe_records.clone(), shutdown.clone()));
    let outbox_backlog = Arc::new(AtomicI64::new(0));
    tasks.spawn(onceflow_outbox::watch_backlog(
        pool.clone(),
        outbox_backlog.clone(),
        Duration::from_millis(500),
        shutdown.clone(),
    ));

    onceflow_runtime::instruments::watch_service(
        &mut tasks,
        &pool,
        &config.kafka,
        &config.results_group_id,
        &[&topics.results],
        &shutdown,
    );
    let processor_pressure = Arc::new(backpressure::ProcessorPressure::default());
    let probe = kafka::LagProbe::new(&config.kafka, &config.shed.processor_group, &topics.commands)?;
    tasks.spawn(backpressure::watch(probe, processor_pressure.clone(), shutdown.clone()));
    let tenant_limits = Arc::new(limits::TenantLimits::new(
        &config.submit_limits,
        config.tenants.iter().map(|key| key.tenant.as_str()),
        processor_pressure.clone(),
        config.shed.clone(),
    ));
    tasks.spawn(tenant_limits.clone().watch(shutdown.clone()));

    let relay = Relay::new(pool.clone(), kafka::producer(&config.kafka)?, RelayConfig::default());
    tasks.spawn(vitals.watch("relay", &shutdown, relay.run(shutdown.clone())));

    let consumer = kafka::consumer(&config.kafka, &config.results_group_id)?;
    let projection_pool = pool.clone();
    let projection_shutdown = shutdown.clone();
    let kafka_config = config.kafka.clone();
    let needed_topics = vec![topics.commands.clone(), topics.results.clone()];
    let results_topic = topics.results.clone();
    let endpoints_topic = topics.webhook_endpoints.clone();
    // Its own group (every ingest instance shares the database, so one
    // consumer per group suffices), named after the projection's.
    let endpoints_consumer = kafka::consumer(&config.kafka, &format!("{}.webhook-endpoints", config.results_group_id))?;
    let projection_check = http::consumer_check(&consumer);
    let consume = async move {
        // Ingest accepts commands while Kafka is down (they wait in the
        // outbox), so its topics are created whenever the broker answers, not
        // before it starts; the consumers subscribe only then, because a
        // subscription to a topic that does not exist yet is noticed late.
        kafka::ensure_topics_eventually(
            kafka_config,
            needed_topics,
            vec![endpoints_topic.clone()],
            projection_shutdown.clone(),
        )
        .await;
        if let Err(error) = rdkafka::consumer::Consumer::subscribe(&consumer, &[&results_topic]) {
            tracing::error!(%error, "cannot subscribe to the results topic; job status will not advance");
            return;
        }
        if let Err(error) = rdkafka::consumer::Consumer::subscribe(&endpoints_consumer, &[&endpoints_topic]) {
            tracing::error!(%error, "cannot subscribe to the webhook endpoints topic; disabled endpoints go unseen");
        }
        let parking = Parking::new(projection_pool.clone(), projection::PARKING_CONSUMER);
        let endpoints_parking = Parking::new(projection_pool.clone(), endpoints::PARKING_CONSUMER);
        tokio::join!(
            kafka::consume_parking_batched(
                &consumer,
                &projection_shutdown,
                &parking,
                projection::BATCH,
                |messages| projection::apply_batch(&projection_pool, messages),
                |message| projection::apply(&projection_pool, message),
            ),
            kafka::consume_parking(&endpoints_consumer, &projection_shutdown, &endpoints_parking, |message| {
                endpoints::apply(&projection_pool, message)
            }),
        );
    };
    tasks.spawn(vitals.watch("projection", &shutdown, consume));

    let state = AppState {
        pool: pool.clone(),
        api_keys,
        topics: Arc::new(topics),
        config: Arc::new(config.clone()),
        outbox_backlog,
        processor_pressure,
        limits: tenant_limits,
        committer: group_commit::GroupCommitter::start(&pool, &config.group_commit, &mut tasks, &vitals, &shutdown),
        openapi: serde_json::to_vec(&openapi::document_for(&command_types)).unwrap_or_default().into(),
        processor: jobs::ProcessorClient::new(&config.execution_status_url)?,
        command_types,
    };
    let mut router = router(state, readiness(pool.clone(), &config.kafka, projection_check, &vitals));
    if let Some(admin) = projection::admin_router(pool, &config.admin.token) {
        router = router.merge(admin);
    }
    Running::with_http(tasks, &config.listen, router, config.http.clone(), shutdown).await
}
