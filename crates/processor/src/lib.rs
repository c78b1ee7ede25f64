//! onceflow-processor: applies commands exactly once.
//!
//! - [`worker`]: the consume → {inbox, effect, outbox} → store-offset loop;
//!   each command ends applied, refused or dead-lettered, or is handed to an
//!   execution, or waits out an outage.
//! - [`executions`]: commands driven from the database one at a time per
//!   ordering key (push handlers, long work, busy keys), by the dispatcher.
//! - [`handlers`]: the handler registry and the shipped ledger.
//! - [`admin`]: the operator's endpoints to list and redrive dead letters.
//! - [`openapi`]: the OpenAPI document of its port at `/openapi.json`.
//! - [`config`]: settings and their defaults.
//!
//! [`start`] runs migrations, creates the topics, and starts the worker, the
//! outbox relay that publishes results, the sweep of the synthetic probe's
//! inbox rows, and the health endpoints.

pub mod admin;
pub mod config;
pub mod executions;
pub mod handlers;
pub mod openapi;
pub mod worker;

use std::{sync::Arc, time::Duration};

use onceflow_catalogue::CommandTypes;
use onceflow_outbox::{Relay, RelayConfig};
use onceflow_runtime::{auth::ApiKeys, http, kafka, postgres, service::Running, vitals::Vitals};
use rdkafka::consumer::Consumer as _;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

pub use config::ProcessorConfig;

/// The service's migrations: its own, then the outbox's.
pub fn migrators() -> Vec<sqlx::migrate::Migrator> {
    vec![sqlx::migrate!("./migrations"), onceflow_outbox::migrator()]
}

/// Start the processor with the handlers that ship with onceflow: returns
/// once it is consuming.
pub async fn start(config: ProcessorConfig, shutdown: CancellationToken) -> onceflow_runtime::Result<Running> {
    start_with_handlers(config, handlers::Builtins::shipped(), shutdown).await
}

/// Start the processor serving the configured command types, those served
/// in its process by the handlers of `builtins`.
pub async fn start_with_handlers(
    config: ProcessorConfig,
    builtins: handlers::Builtins,
    shutdown: CancellationToken,
) -> onceflow_runtime::Result<Running> {
    let file = (!config.command_types_file.is_empty()).then(|| std::path::Path::new(&config.command_types_file));
    let command_types = CommandTypes::load(file).map_err(|error| onceflow_runtime::Error::Config(error.to_string()))?;
    let registry = handlers::Registry::resolve(&command_types, &builtins).map_err(onceflow_runtime::Error::Config)?;
    let pool = postgres::prepare(&config.database, migrators()).await?;
    let topics = config.kafka.topics();
    kafka::ensure_topics(&config.kafka, &[&topics.commands, &topics.results, &topics.dead_letter]).await?;
    let producer = kafka::producer(&config.kafka)?;
    let mut tasks = JoinSet::new();
    let vitals = Vitals::default();

    let relay = Relay::new(pool.clone(), producer.clone(), RelayConfig::default()).run(shutdown.clone());
    tasks.spawn(vitals.watch("relay", &shutdown, relay));
    tasks.spawn(onceflow_outbox::watch_backlog(pool.clone(), Arc::default(), Duration::from_secs(1), shutdown.clone()));
    tasks.spawn(worker::prune_probe_rows(pool.clone(), config.probe_records.clone(), shutdown.clone()));
    onceflow_runtime::instruments::watch_service(
        &mut tasks,
        &pool,
        &config.kafka,
        &config.group_id,
        &[&topics.commands],
        &shutdown,
    );

    let consumer = kafka::consumer(&config.kafka, &config.group_id)?;
    consumer.subscribe(&[&topics.commands])?;
    let worker = worker::Worker {
        pool: pool.clone(),
        producer,
        registry,
        topics: topics.clone(),
        retry: config.retry.clone(),
        lanes: config.lanes,
        max_batch: config.max_batch,
        inline_lock_timeout: config.executions.inline_lock_timeout(),
        vitals: vitals.clone(),
    };
    // Built-in runs each hold a connection: at most half the pool, so the
    // lanes always have theirs.
    let builtin_runs = (config.database.max_connections as usize / 2).max(1);
    // Bound now: the callbacks' links need the address when none is configured.
    let listener = tokio::net::TcpListener::bind(&config.listen).await?;
    let mut callbacks_config = config.executions.callbacks.clone();
    if callbacks_config.base_url.is_empty() {
        callbacks_config.base_url = format!("http://{}", listener.local_addr()?);
    }
    let grace = Duration::from_millis(config.executions.expiry_grace_ms);
    let (callbacks, shared_secret) =
        executions::callbacks::Callbacks::new(&callbacks_config, grace).map_err(onceflow_runtime::Error::Config)?;
    let long_work =
        worker.registry.command_types().iter().any(|t| !matches!(t.handler, onceflow_catalogue::Handler::Builtin(_)));
    if long_work && !shared_secret {
        tracing::warn!(
            "executions.callbacks.token_secret is not set: callback tokens are signed with a random secret of this \
             process, so they stop working when it restarts and other instances refuse them"
        );
    }
    let callbacks = Arc::new(callbacks);
    let ready = Arc::new(tokio::sync::Notify::new());
    let workers =
        executions::pull::Workers::configured(&config.workers, &worker).map_err(onceflow_runtime::Error::Config)?;
    let dispatcher = executions::Dispatcher::new(
        worker.clone(),
        config.executions.clone(),
        builtin_runs,
        callbacks.clone(),
        ready.clone(),
    )
    .map_err(onceflow_runtime::Error::Config)?;
    let caller = dispatcher.caller();
    let checks = http::standard_checks(pool.clone(), config.kafka.clone(), &consumer, &vitals);
    tasks.spawn(vitals.watch("dispatcher", &shutdown, dispatcher.run(shutdown.clone())));
    let api_worker = worker.clone();
    tasks.spawn(vitals.watch("worker", &shutdown, worker.run(consumer, shutdown.clone())));

    let mut router = http::probes(checks).route("/openapi.json", axum::routing::get(openapi::document));
    let keys = if config.tenants.is_empty() { None } else { Some(ApiKeys::configured(&config.tenants)?) };
    router = router.merge(executions::api::router(executions::api::ApiState {
        worker: api_worker,
        keys,
        callbacks,
        workers,
        ready,
        caller,
    }));
    if let Some(admin) = admin::router(pool, topics, &config.admin.token) {
        router = router.merge(admin);
    }
    Running::with_listener(tasks, listener, router, config.http.clone(), shutdown)
}
