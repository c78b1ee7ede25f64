//! A started service: the address its HTTP server bound (port 0 in tests picks
//! a free one) and the background tasks that make it up.

use std::net::SocketAddr;

use axum::Router;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::{Result, hygiene::HttpLimits};

/// A running service. Its tasks stop when the shutdown token given at start is
/// cancelled; [`Running::wait`] returns once all of them have.
#[derive(Debug)]
pub struct Running {
    pub http_addr: SocketAddr,
    pub tasks: JoinSet<()>,
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
        tasks.spawn(async move {
            if let Err(error) = crate::http::serve(listener, router, &limits, shutdown).await {
                tracing::error!(%error, "http server failed");
            }
        });
        Ok(Self { http_addr, tasks })
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
