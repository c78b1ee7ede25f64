//! Ingest's background upkeep: the idempotency-key sweeper.

use std::time::Duration;

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

/// Delete expired idempotency records, `batch` rows per statement so a large
/// backlog of expired keys never becomes one long-locking `DELETE`.
pub async fn sweep_expired_keys(pool: PgPool, interval: Duration, batch: i64, shutdown: CancellationToken) {
    let batch_size = u64::try_from(batch).unwrap_or(0);
    onceflow_runtime::postgres::in_batches_periodically(
        "expired idempotency keys",
        batch_size,
        interval,
        shutdown,
        || sweep_once(&pool, batch),
    )
    .await;
}

/// One bounded batch of the sweep; returns how many records it deleted.
pub async fn sweep_once(pool: &PgPool, batch: i64) -> Result<u64, sqlx::Error> {
    let deleted = sqlx::query(
        "DELETE FROM idempotency_keys WHERE (tenant, idempotency_key) IN (
             SELECT tenant, idempotency_key FROM idempotency_keys
             WHERE expires_at < now() LIMIT $1 FOR UPDATE SKIP LOCKED)",
    )
    .bind(batch)
    .execute(pool)
    .await?;
    Ok(deleted.rows_affected())
}
