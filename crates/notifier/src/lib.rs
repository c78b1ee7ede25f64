//! onceflow-notifier: tells clients how their commands ended.
//!
//! ```text
//! onceflow.results ──consumer group──▶ store::record ──▶ events table ──NOTIFY──▶ hub (every instance)
//!                                            │                                     │
//!                                            │                   SSE subscribers ◀─┘
//!                   │                        └─(terminal, callback_url)─▶ webhook_deliveries ──▶ worker ──▶ POST callback_url
//!                   └─(never applicable)─▶ parked_records ◀── GET /admin/parked, POST /admin/parked/{id}/redrive
//!
//! 410 Gone / POST /v1/webhook-endpoints/{id}/enable ──tx{endpoint, outbox}──▶ relay ──▶ onceflow.webhook-endpoints
//! ```
//!
//! Every results record ends as stored, or parked (`onceflow_runtime::parking`)
//! when it can never be stored (not a result event, or refused by the
//! database); a database outage makes the consumer wait and parks nothing.
//!
//! - [`store`]: the events table, each result once, numbered for resumption.
//! - [`hub`]: tails the table and broadcasts to this instance's subscribers.
//! - [`sse`]: the `GET /v1/events` and `GET /v1/jobs/{id}/events` streams.
//! - [`access`]: who may open a stream, and until when.
//! - [`admission`]: each tenant's stream limits (`[stream_limits]`).
//! - [`tokens`]: `POST /v1/stream-tokens`, short-lived stream tokens for browsers.
//! - [`revocation`]: `POST /v1/stream-tokens/revoke`, the tenants' token epochs.
//! - [`cors`]: CORS of the streams and the token endpoint (`sse.cors_origins`).
//! - [`live`]: the live view at `GET /live`.
//! - [`webhooks`]: signed, retried webhook deliveries and their API.
//! - [`openapi`]: the OpenAPI document at `/openapi.json`.
//! - [`config`]: settings and their defaults.
//!
//! With `admin.token` set, the operator's `GET /admin/parked` and
//! `POST /admin/parked/{id}/redrive` are served beside the API.

pub mod access;
pub mod admission;
pub mod config;
pub mod cors;
pub mod hub;
pub mod live;
pub mod openapi;
pub mod revocation;
pub mod sse;
pub mod store;
pub mod tokens;
pub mod webhooks;

use std::{sync::Arc, time::Duration};

use axum::{
    Router,
    routing::{get, post},
};
use onceflow_outbox::{Relay, RelayConfig};
use onceflow_runtime::{
    auth::ApiKeys,
    http, kafka,
    parking::{self, Parking},
    postgres,
    service::Running,
    vitals::Vitals,
};
use rdkafka::consumer::Consumer as _;
use sqlx::PgPool;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

pub use config::NotifierConfig;

/// Cheap handles shared by every request.
#[derive(Clone)]
pub struct AppState {
    pub pool: PgPool,
    /// The streams' own pool (see [`sse`]): what they read never takes a
    /// connection the results consumer needs.
    pub stream_pool: PgPool,
    pub admission: admission::Admission,
    pub epochs: revocation::Epochs,
    pub api_keys: ApiKeys,
    pub hub: hub::Hub,
    pub tokens: tokens::StreamTokens,
    pub config: Arc<NotifierConfig>,
    /// Ends open streams on shutdown, so graceful shutdown does not wait on them.
    pub shutdown: CancellationToken,
}

/// The service's migrations: its own, then the outbox's (endpoint state
/// changes) and the parked records'.
pub fn migrators() -> Vec<sqlx::migrate::Migrator> {
    vec![sqlx::migrate!("./migrations"), onceflow_outbox::migrator(), parking::migrator()]
}

/// The most result events stored in one transaction: a backlog of results
/// (after an outage, or a processor draining a burst) costs one commit per
/// batch instead of one per event.
const RESULTS_BATCH: usize = 256;

/// The name the results consumer parks records under.
pub const RESULTS_CONSUMER: &str = "notifier.results";

/// The results consumer's handler, as a redrive runs it.
fn redrive_handler(pool: PgPool) -> parking::Handler {
    Arc::new(move |message| {
        let pool = pool.clone();
        Box::pin(async move { store::record(&pool, message).await })
    })
}

pub fn router(state: AppState, readiness: Vec<(&'static str, http::ReadinessCheck)>) -> Router {
    // What a page on another origin may call (config validated at start).
    let mut browser_facing = Router::new()
        .route("/v1/events", get(sse::tenant_events))
        .route("/v1/jobs/{job_id}/events", get(sse::job_events))
        .route("/v1/stream-tokens", post(tokens::issue));
    if let Ok(Some(cors)) = cors::layer(&state.config.sse.cors_origins) {
        browser_facing = browser_facing.layer(cors);
    }
    Router::new()
        .merge(browser_facing)
        .route("/live", get(live::page))
        .route("/live/live.js", get(live::script))
        .route("/live/live.css", get(live::style))
        .route("/v1/jobs/{job_id}/deliveries", get(webhooks::api::job_deliveries))
        .route("/v1/deliveries/{delivery_id}", get(webhooks::api::delivery))
        .route("/v1/deliveries/{delivery_id}/redrive", post(webhooks::api::redrive))
        .route("/v1/webhook-endpoints", get(webhooks::api::endpoints))
        .route("/v1/webhook-endpoints/{endpoint_id}", get(webhooks::api::endpoint))
        .route("/v1/webhook-endpoints/{endpoint_id}/enable", post(webhooks::api::enable_endpoint))
        .route("/v1/stream-tokens/revoke", post(revocation::revoke))
        .route("/openapi.json", get(openapi::document))
        .with_state(state)
        .merge(http::probes(readiness))
}

/// Start the notifier: returns once it is serving.
pub async fn start(config: NotifierConfig, shutdown: CancellationToken) -> onceflow_runtime::Result<Running> {
    // Refuse bad settings before touching anything.
    let api_keys = ApiKeys::configured(&config.tenants)?;
    config.webhooks.validate().map_err(onceflow_runtime::Error::Config)?;
    config.sse.validate().map_err(onceflow_runtime::Error::Config)?;
    admission::validate(&config.stream_limits).map_err(onceflow_runtime::Error::Config)?;
    let (stream_tokens, secret_configured) =
        tokens::StreamTokens::from_config(&config.sse.token_secret, tokens::SETTING)
            .map_err(onceflow_runtime::Error::Config)?;
    if !secret_configured {
        tracing::warn!(
            "sse.token_secret is not set: stream tokens are signed with a random secret of this process, so they \
             stop working when it restarts and other instances refuse them"
        );
    }
    let pool = postgres::prepare(&config.database, migrators()).await?;
    let stream_pool = postgres::connect(&config.stream_database()).await?;
    let topics = config.kafka.topics();
    kafka::ensure_topics(&config.kafka, &[&topics.results]).await?;
    kafka::ensure_compacted_topics(&config.kafka, &[&topics.webhook_endpoints]).await?;
    let mut tasks = JoinSet::new();
    let vitals = Vitals::default();

    // Publishes endpoint state changes (webhooks::endpoints) to ingest.
    let relay = Relay::new(pool.clone(), kafka::producer(&config.kafka)?, RelayConfig::default());
    tasks.spawn(vitals.watch("relay", &shutdown, relay.run(shutdown.clone())));

    let consumer = kafka::consumer(&config.kafka, &config.group_id)?;
    consumer.subscribe(&[&topics.results])?;
    onceflow_runtime::instruments::watch_service(
        &mut tasks,
        &pool,
        &config.kafka,
        &config.group_id,
        &[&topics.results],
        &shutdown,
    );
    let record_pool = pool.clone();
    let consumer_shutdown = shutdown.clone();
    let results_parking = Parking::new(pool.clone(), RESULTS_CONSUMER);
    let checks = http::standard_checks(pool.clone(), config.kafka.clone(), &consumer, &vitals);
    let consume = async move {
        kafka::consume_parking_batched(
            &consumer,
            &consumer_shutdown,
            &results_parking,
            RESULTS_BATCH,
            |messages| store::record_batch(&record_pool, messages),
            |message| store::record(&record_pool, message),
        )
        .await;
    };
    tasks.spawn(vitals.watch("results consumer", &shutdown, consume));

    for tenant in &config.tenants {
        if config.webhooks.secrets_of(&tenant.tenant).is_empty() {
            tracing::warn!(tenant = %tenant.tenant, "no webhook signing secret: this tenant's webhooks will fail");
        }
    }
    let worker = webhooks::worker::Worker::new(pool.clone(), config.webhooks.clone(), &topics.webhook_endpoints)
        .map_err(onceflow_runtime::Error::Config)?;
    tasks.spawn(vitals.watch("webhook worker", &shutdown, worker.run(shutdown.clone())));

    let hub = hub::Hub::new(config.sse.buffer);
    tasks.spawn(vitals.watch("stream hub", &shutdown, hub.clone().run(pool.clone(), shutdown.clone())));
    tasks.spawn(store::prune_expired(
        pool.clone(),
        Duration::from_secs(config.sse.retention_secs),
        Duration::from_secs(config.sse.prune_interval_secs.get()),
        config.sse.prune_batch,
        shutdown.clone(),
    ));
    tasks.spawn(store::prune_probe_events(pool.clone(), config.probe_records.clone(), shutdown.clone()));

    let epochs = revocation::Epochs::default();
    tasks.spawn(vitals.watch(
        "token revocations",
        &shutdown,
        epochs.clone().run(config.database.url.clone(), shutdown.clone()),
    ));

    let state = AppState {
        pool: pool.clone(),
        stream_pool,
        admission: admission::Admission::new(config.stream_limits.clone()),
        epochs,
        api_keys,
        hub,
        tokens: stream_tokens,
        config: Arc::new(config.clone()),
        shutdown: shutdown.clone(),
    };
    let mut router = router(state, checks);
    let results_parking = Parking::new(pool.clone(), RESULTS_CONSUMER);
    if let Some(admin) = parking::router(results_parking, &config.admin.token, redrive_handler(pool)) {
        router = router.merge(admin);
    }
    Running::with_http(tasks, &config.listen, router, config.http.clone(), shutdown).await
}
