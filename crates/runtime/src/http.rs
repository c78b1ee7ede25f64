//! HTTP plumbing every service shares: the probes, the Prometheus endpoint,
//! and serving a router until shutdown.

use std::{
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::{Arc, OnceLock},
};

use axum::{Router, extract::State, http::StatusCode, response::IntoResponse, routing::get};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::Result;

/// A readiness check: `Ok` when the dependency answers, else what is wrong.
pub type ReadinessCheck =
    Arc<dyn Fn() -> Pin<Box<dyn Future<Output = std::result::Result<(), String>> + Send>> + Send + Sync>;

/// The process-wide Prometheus recorder (installed once, shared by every
/// service in the process).
pub fn metrics_handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new().build_recorder();
            let handle = recorder.handle();
            // Fails only if another recorder was installed first, in which case
            // this handle still renders its own (empty) registry.
            let _ = metrics::set_global_recorder(recorder);
            handle
        })
        .clone()
}

/// `/livez`, `/readyz` (running every check) and `/metrics`.
pub fn probes(checks: Vec<(&'static str, ReadinessCheck)>) -> Router {
    let metrics = metrics_handle();
    Router::new()
        .route("/livez", get(|| async { "ok" }))
        .route("/readyz", get(readyz).with_state(Arc::new(checks)))
        .route("/metrics", get(move || std::future::ready(metrics.render())))
}

async fn readyz(State(checks): State<Arc<Vec<(&'static str, ReadinessCheck)>>>) -> impl IntoResponse {
    let mut report = serde_json::Map::new();
    let mut ready = true;
    for (name, check) in checks.iter() {
        let outcome = check().await;
        ready &= outcome.is_ok();
        report.insert((*name).to_owned(), serde_json::Value::String(outcome.err().unwrap_or_else(|| "ok".to_owned())));
    }
    let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, axum::Json(serde_json::Value::Object(report)))
}

/// Serve `router` on `listener` until `shutdown` is cancelled, then let
/// in-flight requests finish.
pub async fn serve(listener: TcpListener, router: Router, shutdown: CancellationToken) -> Result<()> {
    let local: Option<SocketAddr> = listener.local_addr().ok();
    tracing::info!(address = ?local, "listening");
    axum::serve(listener, router).with_graceful_shutdown(async move { shutdown.cancelled().await }).await?;
    Ok(())
}

/// The standard readiness checks: the database pool and the broker.
pub fn standard_checks(pool: sqlx::PgPool, kafka: crate::config::KafkaConfig) -> Vec<(&'static str, ReadinessCheck)> {
    let database: ReadinessCheck = Arc::new(move || {
        let pool = pool.clone();
        Box::pin(async move { sqlx::query("SELECT 1").execute(&pool).await.map(drop).map_err(|e| e.to_string()) })
    });
    let broker: ReadinessCheck = Arc::new(move || {
        let kafka = kafka.clone();
        Box::pin(async move {
            if crate::kafka::broker_reachable(&kafka, std::time::Duration::from_secs(2)).await {
                Ok(())
            } else {
                Err(format!("broker {} unreachable", kafka.brokers))
            }
        })
    });
    vec![("database", database), ("broker", broker)]
}
