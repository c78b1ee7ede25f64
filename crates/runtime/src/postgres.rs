//! PostgreSQL set-up: a bounded pool, and the database created on first use so
//! a fresh machine (or a fresh test) needs no manual step.

use std::time::Duration;

use sqlx::{
    PgPool,
    migrate::{MigrateDatabase as _, Migrator},
    postgres::PgPoolOptions,
};

use crate::{Result, config::DatabaseConfig};

/// Create the database if it does not exist yet, then apply `migrators` in order.
///
/// Several migrators may share one database (a service's own and the outbox's):
/// each ignores the versions the others applied, and their version ranges are
/// kept disjoint.
pub async fn prepare(config: &DatabaseConfig, migrators: impl IntoIterator<Item = Migrator>) -> Result<PgPool> {
    if !sqlx::Postgres::database_exists(&config.url).await? {
        // Two services starting at once may race to create it; losing is fine.
        if let Err(error) = sqlx::Postgres::create_database(&config.url).await
            && !sqlx::Postgres::database_exists(&config.url).await?
        {
            return Err(error.into());
        }
    }
    let pool = connect(config).await?;
    for mut migrator in migrators {
        migrator.set_ignore_missing(true);
        migrator.run(&pool).await?;
    }
    Ok(pool)
}

/// A pool bounded by `max_connections`; callers beyond it wait at most
/// `acquire_timeout_ms` and then get an error they can shed load on.
pub async fn connect(config: &DatabaseConfig) -> Result<PgPool> {
    Ok(PgPoolOptions::new()
        .max_connections(config.max_connections)
        .acquire_timeout(Duration::from_millis(config.acquire_timeout_ms))
        .connect(&config.url)
        .await?)
}

/// Run `batch` until it handles fewer than `batch_size` rows, then wait
/// `interval`, and again, until `shutdown`: the shape of every clean-up job
/// (expired keys, old events), which deletes in bounded batches so no single
/// statement locks a large backlog. Errors are logged and retried next round.
pub async fn in_batches_periodically<F, Fut>(
    what: &'static str,
    batch_size: u64,
    interval: std::time::Duration,
    shutdown: tokio_util::sync::CancellationToken,
    mut batch: F,
) where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<u64, sqlx::Error>>,
{
    loop {
        let mut total = 0;
        loop {
            match batch().await {
                Ok(done) => {
                    total += done;
                    if done < batch_size {
                        break;
                    }
                }
                Err(error) => {
                    tracing::warn!(%error, what, "clean-up batch failed");
                    break;
                }
            }
        }
        if total > 0 {
            tracing::info!(total, what, "clean-up done");
        }
        if !crate::shutdown::pause(interval, &shutdown).await {
            return;
        }
    }
}
