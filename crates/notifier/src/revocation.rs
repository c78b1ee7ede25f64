//! Revocation of stream tokens. A stream token is self-contained (checked
//! without storage), so it cannot be deleted; instead each tenant has a
//! token epoch in PostgreSQL (`stream_token_epochs`, 0 until the first
//! revocation), every token carries the epoch it was issued in, and
//! `POST /v1/stream-tokens/revoke` moves the tenant's epoch on: every token
//! issued before is refused at open (`401`), and the streams open with them
//! are closed on every instance, which hear of the new epoch through
//! `NOTIFY onceflow_stream_token_epochs` ([`Epochs::run`]).
//!
//! Opening checks the epoch in the database (the truth, whatever this
//! instance heard), having first subscribed to the instance's copy, so a
//! revocation committed after the check still reaches the stream.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{
    Json,
    extract::State,
    http::{HeaderMap, StatusCode},
    response::IntoResponse,
};
use onceflow_runtime::{openapi::ProblemDocument, problem::Problem};
use sqlx::{PgPool, postgres::PgListener};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::AppState;

const CHANNEL: &str = "onceflow_stream_token_epochs";
/// How long to wait before listening again after the connection failed.
const RELISTEN_PAUSE: Duration = Duration::from_secs(1);

/// This instance's copy of every tenant's token epoch, kept current by
/// [`Epochs::run`]; streams watch their tenant's.
#[derive(Clone, Debug, Default)]
pub struct Epochs {
    /// An entry per tenant that opened a stream or was ever revoked: bounded
    /// by the tenants, not by the streams.
    tenants: Arc<Mutex<HashMap<String, watch::Sender<i64>>>>,
}

impl Epochs {
    /// Follow `tenant`'s epoch as this instance hears of it.
    pub fn watch(&self, tenant: &str) -> watch::Receiver<i64> {
        let mut tenants = self.tenants.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        tenants.entry(tenant.to_owned()).or_insert_with(|| watch::channel(0).0).subscribe()
    }

    /// `tenant` is at `epoch` at least (epochs only move on).
    pub fn observe(&self, tenant: &str, epoch: i64) {
        let mut tenants = self.tenants.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        tenants.entry(tenant.to_owned()).or_insert_with(|| watch::channel(0).0).send_if_modified(|known| {
            let newer = epoch > *known;
            if newer {
                *known = epoch;
            }
            newer
        });
    }

    /// Follow every revocation until `shutdown`: listen, then read every
    /// epoch (what was revoked while not listening), then apply each
    /// notification; on a lost connection, again. All of it on one
    /// connection of its own to `database_url`: a pool's listener would hold
    /// one of the pool's connections for good.
    pub async fn run(self, database_url: String, shutdown: CancellationToken) {
        loop {
            match self.follow(&database_url, &shutdown).await {
                Ok(()) => return,
                Err(error) => tracing::warn!(%error, "lost the stream token revocations; listening again"),
            }
            if !onceflow_runtime::shutdown::pause(RELISTEN_PAUSE, &shutdown).await {
                return;
            }
        }
    }

    /// One connection's worth of [`Epochs::run`]: `Ok` at shutdown.
    async fn follow(&self, database_url: &str, shutdown: &CancellationToken) -> anyhow::Result<()> {
        let mut listener = PgListener::connect(database_url).await?;
        listener.listen(CHANNEL).await?;
        let all: Vec<(String, i64)> =
            sqlx::query_as("SELECT tenant, epoch FROM stream_token_epochs").fetch_all(&mut listener).await?;
        for (tenant, epoch) in all {
            self.observe(&tenant, epoch);
        }
        loop {
            let notification = tokio::select! {
                () = shutdown.cancelled() => return Ok(()),
                notification = listener.try_recv() => notification?,
            };
            // `None`: the connection was lost, and what was sent meanwhile with it.
            let notification = notification.ok_or_else(|| anyhow::anyhow!("the connection was lost"))?;
            match notification.payload().split_once(':').and_then(|(epoch, tenant)| Some((epoch.parse().ok()?, tenant)))
            {
                Some((epoch, tenant)) => self.observe(tenant, epoch),
                None => tracing::warn!(payload = notification.payload(), "malformed stream token revocation"),
            }
        }
    }
}

/// `tenant`'s token epoch in the database (0 before any revocation).
pub async fn current(pool: &PgPool, tenant: &str) -> Result<i64, sqlx::Error> {
    let epoch: Option<i64> = sqlx::query_scalar("SELECT epoch FROM stream_token_epochs WHERE tenant = $1")
        .bind(tenant)
        .fetch_optional(pool)
        .await?;
    Ok(epoch.unwrap_or(0))
}

/// The database could not be asked: the client tries again.
pub fn unavailable(error: &sqlx::Error) -> Problem {
    tracing::warn!(%error, "cannot read the stream token epochs");
    Problem::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "unavailable",
        "Service unavailable",
        "the stream tokens' state cannot be read right now; retry",
    )
    .retry_after(1)
}

/// The answer of a revocation.
#[derive(Debug, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct Revoked {
    pub tenant: String,
    /// The tenant's new token epoch: tokens issued from now on carry it.
    pub epoch: i64,
    /// Every stream token of the tenant issued before this is refused.
    pub revoked_at: chrono::DateTime<chrono::Utc>,
}

/// Revoke every stream token of the caller's tenant issued so far: they are
/// refused from now on, and the streams open with them are closed (with a
/// `stream.closed` event) on every instance. Streams opened with the API key
/// are not affected. Tokens issued afterwards work.
#[utoipa::path(
    post,
    path = "/v1/stream-tokens/revoke",
    tag = "streams",
    security(("api_key" = [])),
    responses(
        (status = 200, description = "Revoked", body = Revoked),
        (status = 401, description = "No or unknown API key in the Authorization header", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 503, description = "The database is unreachable; retry", body = ProblemDocument, content_type = "application/problem+json"),
    )
)]
pub async fn revoke(State(state): State<AppState>, headers: HeaderMap) -> Result<impl IntoResponse, Problem> {
    let tenant = state.api_keys.authenticate(&headers).ok_or_else(Problem::unauthorized)?.0;
    let (epoch, revoked_at): (i64, chrono::DateTime<chrono::Utc>) = sqlx::query_as(
        "INSERT INTO stream_token_epochs (tenant, epoch) VALUES ($1, 1)
         ON CONFLICT (tenant) DO UPDATE SET epoch = stream_token_epochs.epoch + 1, revoked_at = now()
         RETURNING epoch, revoked_at",
    )
    .bind(&tenant)
    .fetch_one(&state.stream_pool)
    .await
    .map_err(|error| unavailable(&error))?;
    // This instance's streams close at once; the others' at the notification.
    state.epochs.observe(&tenant, epoch);
    tracing::info!(%tenant, epoch, "stream tokens revoked");
    Ok(Json(Revoked { tenant, epoch, revoked_at }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_watcher_sees_only_newer_epochs() {
        let epochs = Epochs::default();
        let mut watcher = epochs.watch("acme");
        epochs.observe("acme", 2);
        assert_eq!(*watcher.wait_for(|epoch| *epoch >= 2).await.unwrap(), 2);
        epochs.observe("acme", 1);
        assert!(!watcher.has_changed().unwrap(), "an older epoch changes nothing");
        epochs.observe("globex", 5);
        assert_eq!(*epochs.watch("acme").borrow(), 2);
    }
}
