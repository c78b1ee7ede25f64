//! A started service: the address its HTTP server bound (port 0 in tests picks
//! a free one) and the background tasks that make it up.

use std::net::SocketAddr;

use tokio::task::JoinSet;

/// A running service. Its tasks stop when the shutdown token given at start is
/// cancelled; [`Running::wait`] returns once all of them have.
#[derive(Debug)]
pub struct Running {
    pub http_addr: SocketAddr,
    pub tasks: JoinSet<()>,
}

impl Running {
    /// Wait for every task to finish (after shutdown), logging any that panicked.
    pub async fn wait(mut self) {
        while let Some(outcome) = self.tasks.join_next().await {
            if let Err(error) = outcome {
                tracing::error!(%error, "service task failed");
            }
        }
    }
}
