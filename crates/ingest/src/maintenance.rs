//! Ingest's background upkeep: the idempotency-key sweeper, and the sweep
//! of the synthetic probe's jobs (see `onceflow_runtime::probe_records`).

use std::{num::NonZeroU32, time::Duration};

use onceflow_runtime::probe_records::{COMMAND_TYPE, ProbeRecords};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

/// Delete expired idempotency records, `batch` rows per statement so a large
/// backlog of expired keys never becomes one long-locking `DELETE`.
/// (`NonZeroU32`: a batch of 0 would delete nothing and never end a round.)
pub async fn sweep_expired_keys(pool: PgPool, interval: Duration, batch: NonZeroU32, shutdown: CancellationToken) {
    let batch = batch.get();
    onceflow_runtime::postgres::in_batches_periodically(
        "expired idempotency keys",
        u64::from(batch),
        interval,
        shutdown,
        || sweep_once(&pool, i64::from(batch)),
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

/// Delete the probe tenant's `onceflow.probe` jobs older than
/// `probe.retain_secs`, until `shutdown`. One statement deletes a batch of
/// jobs and their idempotency keys, so no key is left whose replay would
/// point at a job that is gone; its row count is the jobs'. Only jobs both
/// of the probe's tenant and of its command type (the safety rule of
/// `onceflow_runtime::probe_records`); `jobs_by_tenant` finds them.
pub async fn prune_probe_jobs(pool: PgPool, probe: ProbeRecords, shutdown: CancellationToken) {
    let delete = format!(
        "WITH doomed AS (
             SELECT job_id FROM jobs
             WHERE tenant = $1 AND command_type = '{COMMAND_TYPE}' AND created_at < now() - make_interval(secs => $2)
             ORDER BY created_at LIMIT $3 FOR UPDATE SKIP LOCKED),
         keys AS (
             DELETE FROM idempotency_keys k USING doomed
             WHERE k.tenant = $1 AND k.job_id = doomed.job_id)
         DELETE FROM jobs USING doomed WHERE jobs.job_id = doomed.job_id"
    );
    probe.prune_periodically(&pool, &delete, shutdown).await;
}
