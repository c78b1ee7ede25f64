//! Graceful shutdown: SIGTERM or ctrl-c cancels a token that every task of a
//! service watches, so in-flight work finishes and offsets are committed
//! before the process exits.

use tokio_util::sync::CancellationToken;

/// A token cancelled on the first SIGTERM or ctrl-c.
pub fn on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let cancel = token.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutdown signal received; finishing in-flight work");
        cancel.cancel();
    });
    token
}

async fn wait_for_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = terminate => {}
    }
}

/// Wait `interval` between two rounds of a periodic task: `true` once it has
/// passed, `false` as soon as `shutdown` is cancelled (the task then ends).
pub async fn pause(interval: std::time::Duration, shutdown: &CancellationToken) -> bool {
    tokio::select! {
        () = shutdown.cancelled() => false,
        () = tokio::time::sleep(interval) => true,
    }
}
