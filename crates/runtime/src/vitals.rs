//! Tasks a service cannot do its work without (the processor's lanes, a
//! relay, a consumer loop), watched so that `/readyz` tells the truth when
//! one of them ends early.
//!
//! Such a task only ends on shutdown. If one returns or panics before that,
//! the process keeps answering HTTP but has stopped part of its work (a
//! panicked lane makes the processor's dispatcher stop consuming, say), so
//! [`Vitals::check`] reports it and the service is not ready until it is
//! restarted: nothing restarts a task in place, because a task that ended
//! unexpectedly left state nobody has checked.

use std::{
    future::Future,
    sync::{Arc, Mutex},
};

use tokio_util::sync::CancellationToken;

use crate::http::ReadinessCheck;

/// The vital tasks of one service, and which of them stopped early.
#[derive(Clone, Debug, Default)]
pub struct Vitals {
    stopped: Arc<Mutex<Vec<String>>>,
}

impl Vitals {
    /// `task`, watched as `name`: if it returns or panics while `shutdown` is
    /// not cancelled, the service is not ready from then on.
    pub fn watch<F>(
        &self,
        name: impl Into<String>,
        shutdown: &CancellationToken,
        task: F,
    ) -> impl Future<Output = F::Output> + Send + 'static
    where
        F: Future + Send + 'static,
    {
        let guard = Guard { name: name.into(), shutdown: shutdown.clone(), stopped: self.stopped.clone() };
        async move {
            // Dropped when the task ends, by returning or by unwinding.
            let _guard = guard;
            task.await
        }
    }

    /// The readiness check: `Err` naming every vital task that stopped early.
    pub fn check(&self) -> ReadinessCheck {
        let stopped = self.stopped.clone();
        Arc::new(move || {
            let stopped = lock(&stopped).clone();
            Box::pin(async move {
                if stopped.is_empty() { Ok(()) } else { Err(format!("stopped unexpectedly: {}", stopped.join(", "))) }
            })
        })
    }
}

/// Records its task as stopped when dropped before shutdown.
struct Guard {
    name: String,
    shutdown: CancellationToken,
    stopped: Arc<Mutex<Vec<String>>>,
}

impl Drop for Guard {
    fn drop(&mut self) {
        if self.shutdown.is_cancelled() {
            return;
        }
        let how = if std::thread::panicking() { "panicked" } else { "returned" };
        tracing::error!(task = %self.name, how, "a vital task stopped before shutdown; the service is not ready");
        lock(&self.stopped).push(format!("{} ({how})", self.name));
    }
}

/// The list survives a panic elsewhere: it is only ever pushed to.
fn lock(stopped: &Mutex<Vec<String>>) -> std::sync::MutexGuard<'_, Vec<String>> {
    stopped.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_task_that_panics_or_returns_before_shutdown_makes_the_service_unready() {
        let vitals = Vitals::default();
        let shutdown = CancellationToken::new();
        let check = vitals.check();
        assert_eq!(check().await, Ok(()));

        let panicked = tokio::spawn(vitals.watch("lane 1", &shutdown, async { panic!("a bug") }));
        assert!(panicked.await.is_err());
        vitals.watch("relay", &shutdown, async {}).await;
        assert_eq!(check().await, Err("stopped unexpectedly: lane 1 (panicked), relay (returned)".to_owned()));
    }

    #[tokio::test]
    async fn tasks_that_end_on_shutdown_are_not_reported() {
        let vitals = Vitals::default();
        let shutdown = CancellationToken::new();
        let waiting = tokio::spawn(vitals.watch("lane 0", &shutdown, {
            let shutdown = shutdown.clone();
            async move { shutdown.cancelled().await }
        }));
        shutdown.cancel();
        waiting.await.unwrap();
        assert_eq!(vitals.check()().await, Ok(()));
    }
}
