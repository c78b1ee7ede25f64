//! HTTP plumbing every service shares: serving a router with the hygiene of
//! [`crate::hygiene`] until shutdown, the probes, and the Prometheus endpoint.
//!
//! Probes are cheap: `/readyz` answers from a report that a background task
//! refreshes every [`READINESS_INTERVAL`], so a probe never opens a
//! connection, and the broker is asked through one long-lived Kafka client.
//! A [`Dependency`] is either required (down ⇒ `503`, not ready) or optional
//! (down ⇒ still `200`, the report says `degraded`): ingest keeps accepting
//! while Kafka is down, because its outbox holds what it accepts.

use std::{
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::{Arc, OnceLock},
    time::Duration,
};

use axum::{
    Router,
    body::Body,
    extract::{Request, State},
    http::StatusCode,
    response::IntoResponse,
    routing::get,
};
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    service::TowerToHyperService,
};
use metrics_exporter_prometheus::PrometheusHandle;
use rdkafka::{admin::AdminClient, client::DefaultClientContext};
use tokio::{
    net::TcpListener,
    sync::{Semaphore, watch},
};
use tokio_util::sync::CancellationToken;
use tower::ServiceExt as _;

use crate::Result;
pub use crate::hygiene::HttpLimits;

/// A readiness check: `Ok` when the dependency answers, else what is wrong
/// (shown on the public `/readyz`, so never a raw database or broker error).
pub type ReadinessCheck =
    Arc<dyn Fn() -> Pin<Box<dyn Future<Output = std::result::Result<(), String>> + Send>> + Send + Sync>;

/// How often the readiness report is refreshed.
pub const READINESS_INTERVAL: Duration = Duration::from_secs(2);
/// How long one check may take before it counts as failed.
const CHECK_TIMEOUT: Duration = Duration::from_secs(3);

/// A dependency `/readyz` reports on.
#[derive(Clone)]
pub struct Dependency {
    pub name: &'static str,
    pub check: ReadinessCheck,
    /// Whether the service is not ready without it (else merely degraded).
    pub required: bool,
}

impl Dependency {
    pub fn required(name: &'static str, check: ReadinessCheck) -> Self {
        Self { name, check, required: true }
    }

    pub fn optional(name: &'static str, check: ReadinessCheck) -> Self {
        Self { name, check, required: false }
    }
}

/// The process-wide Prometheus recorder (installed once, shared by every
/// service in the process).
pub fn metrics_handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = crate::instruments::recorder();
            let handle = recorder.handle();
            // Fails only if another recorder was installed first, in which case
            // this handle still renders its own (empty) registry.
            let _ = metrics::set_global_recorder(recorder);
            crate::instruments::describe();
            handle
        })
        .clone()
}

/// `/livez`, `/readyz` (every check required) and `/metrics`.
pub fn probes(checks: Vec<(&'static str, ReadinessCheck)>) -> Router {
    probes_of(checks.into_iter().map(|(name, check)| Dependency::required(name, check)).collect())
}

/// `/livez`, `/readyz` over `dependencies` and `/metrics`. Must be called
/// inside a Tokio runtime: it starts the task that keeps the readiness report
/// current, which ends once the returned router (every clone) is dropped.
pub fn probes_of(dependencies: Vec<Dependency>) -> Router {
    let metrics = metrics_handle();
    let (report, reader) = watch::channel(None);
    tokio::spawn(refresh_readiness(dependencies, report));
    Router::new()
        .route("/livez", get(|| async { "ok" }))
        .route("/readyz", get(readyz).with_state(reader))
        .route("/metrics", get(move || std::future::ready(metrics.render())))
}

/// One round of checks: the status code and the JSON body `/readyz` answers.
type Report = (StatusCode, serde_json::Value);

async fn refresh_readiness(dependencies: Vec<Dependency>, report: watch::Sender<Option<Report>>) {
    loop {
        let mut checks = serde_json::Map::new();
        let (mut ready, mut degraded) = (true, false);
        for dependency in &dependencies {
            let outcome = tokio::time::timeout(CHECK_TIMEOUT, (dependency.check)())
                .await
                .unwrap_or_else(|_| Err(format!("no answer within {CHECK_TIMEOUT:?}")));
            let entry = match outcome {
                Ok(()) => serde_json::json!({"status": "ok"}),
                Err(detail) if dependency.required => {
                    ready = false;
                    serde_json::json!({"status": "down", "detail": detail})
                }
                Err(detail) => {
                    degraded = true;
                    serde_json::json!({"status": "degraded", "detail": detail})
                }
            };
            checks.insert(dependency.name.to_owned(), entry);
        }
        let (status, summary) = match (ready, degraded) {
            (false, _) => (StatusCode::SERVICE_UNAVAILABLE, "not_ready"),
            (true, true) => (StatusCode::OK, "degraded"),
            (true, false) => (StatusCode::OK, "ready"),
        };
        let body = serde_json::json!({"status": summary, "checks": checks});
        if report.send(Some((status, body))).is_err() {
            return; // no router left to answer probes
        }
        tokio::select! {
            () = report.closed() => return,
            () = tokio::time::sleep(READINESS_INTERVAL) => {}
        }
    }
}

async fn readyz(State(report): State<watch::Receiver<Option<Report>>>) -> impl IntoResponse {
    let current = report.borrow().clone();
    let (status, body) = current
        .unwrap_or_else(|| (StatusCode::SERVICE_UNAVAILABLE, serde_json::json!({"status": "starting", "checks": {}})));
    (status, axum::Json(body))
}

/// Serve `router` on `listener` under `limits` (see [`crate::hygiene`]) until
/// `shutdown` is cancelled, then let in-flight requests finish.
///
/// HTTP/1.1 only, through hyper's own connection builder rather than
/// `axum::serve`, because only that exposes the header-read timeout.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: &HttpLimits,
    shutdown: CancellationToken,
) -> Result<()> {
    let local: Option<SocketAddr> = listener.local_addr().ok();
    tracing::info!(address = ?local, ?limits, "listening");
    let app = crate::hygiene::apply(router, limits);
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder.timer(TokioTimer::new()).header_read_timeout(limits.header_read_timeout());
    let connections = Arc::new(Semaphore::new(limits.max_connections));
    // Each connection task holds a receiver; all dropped = all finished.
    let (finished, connection_open) = watch::channel(());
    loop {
        // Take a connection slot before accepting: when all are taken, new
        // connections wait in the kernel's backlog.
        let permit = tokio::select! {
            () = shutdown.cancelled() => break,
            permit = connections.clone().acquire_owned() => permit.expect("the semaphore is never closed"),
        };
        let stream = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(error) => {
                    // E.g. out of file descriptors: wait rather than spin.
                    tracing::warn!(%error, "cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let service = TowerToHyperService::new(
            app.clone().map_request(|request: Request<hyper::body::Incoming>| request.map(Body::new)),
        );
        // Boxed once, so the task holds a pointer to it, not the connection
        // moved in and pinned again (two copies for the life of every
        // connection, which for an SSE subscriber is long).
        let mut connection = Box::pin(builder.serve_connection(TokioIo::new(stream), service));
        let shutdown = shutdown.clone();
        let open = connection_open.clone();
        tokio::spawn(async move {
            let outcome = tokio::select! {
                outcome = connection.as_mut() => outcome,
                () = shutdown.cancelled() => {
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            };
            if let Err(error) = outcome {
                tracing::debug!(%error, "connection ended with an error");
            }
            drop((permit, open));
        });
    }
    drop(connection_open);
    drop(listener);
    finished.closed().await;
    Ok(())
}

/// The readiness checks of a service that consumes, all required: the
/// database pool, the broker, its consumer's group membership and its vital
/// tasks.
#[allow(clippy::needless_pass_by_value, reason = "the processor and the notifier hand over their own copy")]
pub fn standard_checks(
    pool: sqlx::PgPool,
    kafka: crate::config::KafkaConfig,
    consumer: &crate::kafka::Consumer,
    vitals: &crate::vitals::Vitals,
) -> Vec<(&'static str, ReadinessCheck)> {
    vec![
        ("database", database_check(pool)),
        ("broker", broker_check(&kafka)),
        ("consumer", consumer_check(consumer)),
        ("tasks", vitals.check()),
    ]
}

/// The database answers `SELECT 1` (through the service's own pool).
pub fn database_check(pool: sqlx::PgPool) -> ReadinessCheck {
    Arc::new(move || {
        let pool = pool.clone();
        Box::pin(async move {
            sqlx::query("SELECT 1").execute(&pool).await.map(drop).map_err(|error| {
                tracing::warn!(%error, "readiness: the database does not answer");
                "the database does not answer".to_owned()
            })
        })
    })
}

/// The broker answers a metadata request, asked through one Kafka client made
/// here and kept for the life of the check.
pub fn broker_check(kafka: &crate::config::KafkaConfig) -> ReadinessCheck {
    let brokers = kafka.brokers.clone();
    let client: Option<Arc<AdminClient<DefaultClientContext>>> =
        match crate::kafka::client_config(kafka).and_then(|client| Ok(client.create()?)) {
            Ok(client) => Some(Arc::new(client)),
            Err(error) => {
                tracing::error!(%error, "cannot create the readiness Kafka client");
                None
            }
        };
    Arc::new(move || {
        let client = client.clone();
        let unreachable = format!("broker {brokers} unreachable");
        Box::pin(async move {
            let client = client.ok_or_else(|| unreachable.clone())?;
            let answered = tokio::task::spawn_blocking(move || {
                client.inner().fetch_metadata(None, Duration::from_secs(2)).is_ok()
            })
            .await
            .unwrap_or(false);
            if answered { Ok(()) } else { Err(unreachable) }
        })
    })
}

/// The consumer holds an assignment from its group, or has been outside it
/// for no longer than [`crate::kafka::MEMBERSHIP_GRACE`] (see
/// [`crate::kafka::Membership`]).
pub fn consumer_check(consumer: &crate::kafka::Consumer) -> ReadinessCheck {
    let membership = rdkafka::consumer::Consumer::context(consumer).clone();
    Arc::new(move || {
        let outcome = membership.check(std::time::Instant::now(), crate::kafka::MEMBERSHIP_GRACE);
        Box::pin(std::future::ready(outcome))
    })
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;

    /// With every connection slot taken, a new connection is not served until
    /// one closes; then it is.
    #[tokio::test]
    async fn connections_beyond_the_bound_wait_for_a_free_slot() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let limits = HttpLimits { max_connections: 1, ..HttpLimits::default() };
        let shutdown = CancellationToken::new();
        let shutdown_server = shutdown.clone();
        let router = Router::new().route("/livez", get(|| async { "ok" }));
        let server = tokio::spawn(async move { serve(listener, router, &limits, shutdown_server).await });

        let holder = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut waiting = tokio::net::TcpStream::connect(addr).await.unwrap();
        waiting.write_all(b"GET /livez HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").await.unwrap();
        let mut answer = Vec::new();
        let early = tokio::time::timeout(Duration::from_millis(300), waiting.read_to_end(&mut answer)).await;
        assert!(early.is_err(), "answered while the only slot was taken: {}", String::from_utf8_lossy(&answer));

        drop(holder);
        tokio::time::timeout(Duration::from_secs(10), waiting.read_to_end(&mut answer)).await.unwrap().unwrap();
        assert!(String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 200"), "{}", String::from_utf8_lossy(&answer));
        shutdown.cancel();
        server.await.unwrap().unwrap();
    }
}
