//! Taking work: executions as the dispatcher runs them, their heads claimed
//! for an attempt (a push call, a pull worker's task) or locked for a
//! built-in run.

use std::time::Duration;

use onceflow_contracts::Envelope;
use sqlx::{PgConnection, PgPool, Row as _, postgres::PgRow};
use uuid::Uuid;

use super::QueueKey;

/// An execution as the dispatcher runs it.
#[derive(Debug, Clone)]
pub struct Execution {
    pub job_id: Uuid,
    pub key: QueueKey,
    pub command_type: String,
    /// Attempts spent before this one, and outages met.
    pub attempts: i32,
    pub outages: i32,
    /// The running attempt's fence (none for a built-in run, whose key's
    /// row stays locked until its transaction ends).
    pub attempt_id: Option<Uuid>,
    pub envelope: Envelope,
    pub result_key: String,
    pub record: Vec<u8>,
    pub partition: i32,
    pub offset: i64,
}

pub(in crate::executions) const EXECUTION_COLUMNS: &str = "e.job_id, e.tenant, e.scope, e.ordering_key, e.command_type, e.attempts, e.outages, \
     e.attempt_id, e.envelope, e.result_key, e.record, e.origin_partition, e.origin_offset";

impl Execution {
    pub(in crate::executions) fn of_row(row: &PgRow) -> Result<Self, sqlx::Error> {
        let headers: Vec<(String, String)> =
            serde_json::from_value(row.try_get("envelope")?).map_err(|e| sqlx::Error::Decode(Box::new(e)))?;
        let envelope =
            Envelope::from_headers(headers.iter().map(|(name, value)| (name.as_str(), Some(value.as_bytes()))))
                .map_err(|e| sqlx::Error::Decode(Box::new(e)))?;
        Ok(Self {
            job_id: row.try_get("job_id")?,
            key: QueueKey::of_row(row)?,
            command_type: row.try_get("command_type")?,
            attempts: row.try_get("attempts")?,
            outages: row.try_get("outages")?,
            attempt_id: row.try_get("attempt_id")?,
            envelope,
            result_key: row.try_get("result_key")?,
            record: row.try_get("record")?,
            partition: row.try_get("origin_partition")?,
            offset: row.try_get("origin_offset")?,
        })
    }
}

/// Who runs an attempt, and for how long.
#[derive(Debug, Clone, Copy)]
pub struct Attempt<'a> {
    /// `call`: the dispatcher calls a push handler; `worker`: a pull worker
    /// holds it.
    pub holder: &'a str,
    /// The pull worker's name.
    pub worker: Option<&'a str>,
    /// The type's attempt timeout: the attempt's hard end.
    pub timeout: Duration,
    /// A worker's lease (the heartbeat timeout): the deadline until its
    /// first heartbeat; `None` for a call, whose deadline is its end.
    pub lease: Option<Duration>,
}

/// Start an attempt of the heads of up to `limit` keys of `command_type` that
/// are ready: each key's row is taken (`ready_at` NULL: running) and its head
/// made `running` with a fresh attempt id, its holder and its deadlines, all
/// committed before the calls go out (or the tasks are handed out). Keys
/// another instance holds are skipped.
pub async fn claim(
    pool: &PgPool,
    command_type: &str,
    limit: i64,
    attempt: Attempt<'_>,
) -> Result<Vec<Execution>, sqlx::Error> {
    let rows = sqlx::query(&format!(
        "WITH ready AS (
             SELECT tenant, scope, ordering_key FROM key_queues
             WHERE command_type = $1 AND ready_at <= now()
             ORDER BY ready_at LIMIT $2 FOR UPDATE SKIP LOCKED),
         taken AS (
             UPDATE key_queues q SET ready_at = NULL, waiting = NULL FROM ready
             WHERE (q.tenant, q.scope, q.ordering_key) = (ready.tenant, ready.scope, ready.ordering_key)
             RETURNING q.head)
         UPDATE executions e SET state = 'running', attempt_id = gen_random_uuid(), holder = $4, worker = $5,
             attempt_deadline = now() + make_interval(secs => $3),
             deadline = now() + make_interval(secs => least($3, coalesce($6, $3))), heartbeat_at = NULL,
             started_at = coalesce(e.started_at, now())
         FROM taken WHERE e.job_id = taken.head AND e.state = 'queued'
         RETURNING {EXECUTION_COLUMNS}"
    ))
    .bind(command_type)
    .bind(limit)
    .bind(attempt.timeout.as_secs_f64())
    .bind(attempt.holder)
    .bind(attempt.worker)
    .bind(attempt.lease.map(|lease| lease.as_secs_f64()))
    .fetch_all(pool)
    .await?;
    rows.iter().map(Execution::of_row).collect()
}

/// Keys whose head is of one of `command_types` and ready, oldest first:
/// candidates for a built-in run, which takes each key with [`lock_ready`].
pub async fn ready_keys(pool: &PgPool, command_types: &[String], limit: i64) -> Result<Vec<QueueKey>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT tenant, scope, ordering_key FROM key_queues
         WHERE command_type = ANY($1) AND ready_at <= now() ORDER BY ready_at LIMIT $2",
    )
    .bind(command_types)
    .bind(limit)
    .fetch_all(pool)
    .await?;
    rows.iter().map(QueueKey::of_row).collect()
}

/// Take `key` for a built-in run in the caller's transaction, if its head is
/// still ready and no one else holds it; its row stays locked until the run
/// commits or rolls back, so a crash leaves nothing to recover.
pub async fn lock_ready(tx: &mut PgConnection, key: &QueueKey) -> Result<bool, sqlx::Error> {
    let locked = sqlx::query(
        "SELECT 1 FROM key_queues WHERE (tenant, scope, ordering_key) = ($1, $2, $3) AND ready_at <= now()
         FOR UPDATE SKIP LOCKED",
    )
    .bind(&key.tenant)
    .bind(&key.scope)
    .bind(&key.value)
    .fetch_optional(&mut *tx)
    .await?;
    Ok(locked.is_some())
}

/// The first `limit` queued executions of `key`, in order.
pub async fn queued(tx: &mut PgConnection, key: &QueueKey, limit: i64) -> Result<Vec<Execution>, sqlx::Error> {
    let rows = sqlx::query(&format!(
        "SELECT {EXECUTION_COLUMNS} FROM executions e
         WHERE (e.tenant, e.scope, e.ordering_key) = ($1, $2, $3) AND e.state = 'queued'
         ORDER BY e.seq LIMIT $4"
    ))
    .bind(&key.tenant)
    .bind(&key.scope)
    .bind(&key.value)
    .bind(limit)
    .fetch_all(&mut *tx)
    .await?;
    rows.iter().map(Execution::of_row).collect()
}
