//! A started service: the addresses its HTTP servers bound (port 0 in tests
//! picks a free one) and the background tasks that make it up.
//!
//! With `http.operator_listen` set, the service's router is served on two
//! addresses: the API address answers everything but the probes (`404`),
//! the operator address only the probes ([`crate::hygiene::PROBE_PATHS`]).

use std::net::SocketAddr;

use axum::{
    Router,
    extract::{Request, State},
    http::StatusCode,
    middleware::{self, Next},
    response::{IntoResponse as _, Response},
};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::{Result, hygiene::HttpLimits};

/// A running service. Its tasks stop when the shutdown token given at start is
/// cancelled; [`Running::wait`] returns once all of them have.
#[derive(Debug)]
pub struct Running {
    pub http_addr: SocketAddr,
    /// The operator's address (`http.operator_listen`), when set.
    pub operator_addr: Option<SocketAddr>,
    pub tasks: JoinSet<()>,
}

/// Which of a service's addresses a request came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Port {
    Api,
    Operator,
}

impl Running {
    /// Bind `listen` (port 0 picks a free port), serve `router` there under
    /// the service's `limits` until `shutdown` as one more of `tasks`, and
    /// return the running service.
    pub async fn with_http(
        tasks: JoinSet<()>,
        listen: &str,
        router: Router,
        limits: HttpLimits,
        shutdown: CancellationToken,
    ) -> Result<Self> {
        let listener = tokio::net::TcpListener::bind(listen).await?;
        Self::with_listener(tasks, listener, router, limits, shutdown)
    }

    /// As [`Self::with_http`], on a listener bound already (a service that
    /// needs its own address before it starts serving).
    pub fn with_listener(
        mut tasks: JoinSet<()>,
        listener: tokio::net::TcpListener,
        router: Router,
        limits: HttpLimits,
        shutdown: CancellationToken,
    ) -> Result<Self> {
        let http_addr = listener.local_addr()?;
        let mut operator_addr = None;
        let router = if limits.operator_listen.is_empty() {
            router
        } else {
            // Bound now, so a taken address stops the start, as the API's does.
            let operator = std::net::TcpListener::bind(&limits.operator_listen)?;
            operator.set_nonblocking(true)?;
            let operator = tokio::net::TcpListener::from_std(operator)?;
            operator_addr = Some(operator.local_addr()?);
            let probes = router.clone().layer(middleware::from_fn_with_state(Port::Operator, served_on));
            tasks.spawn(serve(operator, probes, limits.clone(), shutdown.clone()));
            router.layer(middleware::from_fn_with_state(Port::Api, served_on))
        };
        tasks.spawn(serve(listener, router, limits, shutdown));
        Ok(Self { http_addr, operator_addr, tasks })
    }

    /// Wait for every task to finish (after shutdown), logging any that panicked.
    pub async fn wait(mut self) {
        while let Some(outcome) = self.tasks.join_next().await {
            if let Err(error) = outcome {
                tracing::error!(%error, "service task failed");
            }
        }
    }
}

async fn serve(listener: tokio::net::TcpListener, router: Router, limits: HttpLimits, shutdown: CancellationToken) {
    if let Err(error) = crate::http::serve(listener, router, &limits, shutdown).await {
        tracing::error!(%error, "http server failed");
    }
}

/// `404` for a request on the wrong address: a probe on the API's, anything
/// else on the operator's.
async fn served_on(State(port): State<Port>, request: Request, next: Next) -> Response {
    let probe = crate::hygiene::PROBE_PATHS.contains(&request.uri().path());
    if probe == (port == Port::Operator) { next.run(request).await } else { StatusCode::NOT_FOUND.into_response() }
}

#[cfg(test)]
mod tests {
    use axum::{body::Body, routing::get};
    use tower::ServiceExt as _;

    use super::*;

    async fn status(router: &Router, port: Port, path: &str) -> StatusCode {
        let router = router.clone().layer(middleware::from_fn_with_state(port, served_on));
        router.oneshot(Request::get(path).body(Body::empty()).unwrap()).await.unwrap().status()
    }

    #[tokio::test]
    async fn probes_only_on_the_operator_address_and_the_api_only_on_its_own() {
        let router = Router::new()
            .route("/metrics", get(|| async { "metrics" }))
            .route("/livez", get(|| async { "ok" }))
            .route("/v1/commands", get(|| async { "api" }));
        assert_eq!(status(&router, Port::Api, "/v1/commands").await, StatusCode::OK);
        assert_eq!(status(&router, Port::Api, "/metrics").await, StatusCode::NOT_FOUND);
        assert_eq!(status(&router, Port::Api, "/livez").await, StatusCode::NOT_FOUND);
        assert_eq!(status(&router, Port::Operator, "/metrics").await, StatusCode::OK);
        assert_eq!(status(&router, Port::Operator, "/livez").await, StatusCode::OK);
        assert_eq!(status(&router, Port::Operator, "/v1/commands").await, StatusCode::NOT_FOUND);
    }
}
