//! The SQL of executions and key queues (migration `0007_executions.sql`).
//!
//! The one rule every function here keeps: a `key_queues` row exists exactly
//! while its key has an execution not yet ended, and its `head` is the oldest
//! such execution. Who may break it, and how it is kept:
//!
//! - a lane adds executions ([`enqueue`]): it inserts them and upserts their
//!   keys' rows (`ON CONFLICT DO UPDATE` locks an existing row), in one
//!   transaction;
//! - the dispatcher ends a head ([`advance`]): it locks the key's row first
//!   and only then, in a new statement (a new snapshot), looks for the next
//!   execution, so a lane's execution committed while it waited is seen.
//!
//! Either the lane's upsert waits for the dispatcher's commit (then finds the
//! row gone and inserts it with its own execution as head, or finds it
//! advanced), or the dispatcher's lock waits for the lane's commit (then sees
//! its execution). Both take several keys' rows in key order, so they do not
//! deadlock each other.

use std::{collections::HashSet, time::Duration};

use chrono::{DateTime, Utc};
use onceflow_contracts::Envelope;
use sqlx::{PgConnection, PgPool, Row as _, postgres::PgRow};
use uuid::Uuid;

/// A queue of commands that take effect one at a time, in order: a tenant's
/// ordering key, or a command of its own when its type has none.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct QueueKey {
    pub tenant: String,
    /// The ordering scope; empty for a command without an ordering key.
    pub scope: String,
    /// The ordering key's value; the job id for a command without one.
    pub value: String,
}

impl QueueKey {
    fn of_row(row: &PgRow) -> Result<Self, sqlx::Error> {
        Ok(Self { tenant: row.try_get("tenant")?, scope: row.try_get("scope")?, value: row.try_get("ordering_key")? })
    }
}

/// Columns of keys, for `unnest`.
fn columns<'a>(keys: impl Iterator<Item = &'a QueueKey>) -> (Vec<&'a str>, Vec<&'a str>, Vec<&'a str>) {
    let mut columns = (Vec::new(), Vec::new(), Vec::new());
    for key in keys {
        columns.0.push(key.tenant.as_str());
        columns.1.push(key.scope.as_str());
        columns.2.push(key.value.as_str());
    }
    columns
}

/// The keys of `keys` that have executions queued or running: a command of
/// such a key must queue behind them.
pub async fn busy(tx: &mut PgConnection, keys: &[&QueueKey]) -> Result<HashSet<QueueKey>, sqlx::Error> {
    if keys.is_empty() {
        return Ok(HashSet::new());
    }
    let (tenants, scopes, values) = columns(keys.iter().copied());
    let rows = sqlx::query(
        "SELECT q.tenant, q.scope, q.ordering_key FROM key_queues q
         JOIN unnest($1::text[], $2::text[], $3::text[]) AS k(tenant, scope, ordering_key)
           ON (q.tenant, q.scope, q.ordering_key) = (k.tenant, k.scope, k.ordering_key)",
    )
    .bind(&tenants)
    .bind(&scopes)
    .bind(&values)
    .fetch_all(&mut *tx)
    .await?;
    rows.iter().map(QueueKey::of_row).collect()
}

/// A command a lane hands over to be driven from the database.
#[derive(Debug)]
pub struct NewExecution<'a> {
    pub job_id: Uuid,
    pub key: &'a QueueKey,
    pub command_type: &'a str,
    pub envelope: &'a Envelope,
    pub result_key: &'a str,
    /// The command record's value, as it arrived.
    pub record: &'a [u8],
    /// Where the record was on the commands topic.
    pub partition: i32,
    pub offset: i64,
    /// Its type's start and job timeouts, counted from now.
    pub start_timeout: Option<Duration>,
    pub job_timeout: Option<Duration>,
}

fn envelope_json(envelope: &Envelope) -> serde_json::Value {
    serde_json::Value::Array(
        envelope.to_headers().into_iter().map(|(name, value)| serde_json::json!([name, value])).collect(),
    )
}

/// Record `executions`, in order, at the end of their keys' queues, in the
/// caller's transaction (the one that writes their inbox rows). A redriven
/// dead letter's execution starts over at the end of its queue.
pub async fn enqueue(tx: &mut PgConnection, executions: &[NewExecution<'_>]) -> Result<(), sqlx::Error> {
    if executions.is_empty() {
        return Ok(());
    }
    let ids: Vec<Uuid> = executions.iter().map(|e| e.job_id).collect();
    let (tenants, scopes, values) = columns(executions.iter().map(|e| e.key));
    let types: Vec<&str> = executions.iter().map(|e| e.command_type).collect();
    let envelopes: Vec<serde_json::Value> = executions.iter().map(|e| envelope_json(e.envelope)).collect();
    let result_keys: Vec<&str> = executions.iter().map(|e| e.result_key).collect();
    let records: Vec<&[u8]> = executions.iter().map(|e| e.record).collect();
    let partitions: Vec<i32> = executions.iter().map(|e| e.partition).collect();
    let offsets: Vec<i64> = executions.iter().map(|e| e.offset).collect();
    let seconds = |timeout: Option<Duration>| timeout.map(|t| t.as_secs_f64());
    let start_timeouts: Vec<Option<f64>> = executions.iter().map(|e| seconds(e.start_timeout)).collect();
    let job_timeouts: Vec<Option<f64>> = executions.iter().map(|e| seconds(e.job_timeout)).collect();
    // Ordered by position, so `seq` follows the lane's order.
    sqlx::query(
        "INSERT INTO executions (job_id, tenant, scope, ordering_key, command_type, envelope, result_key, record,
                                 origin_partition, origin_offset, start_by, end_by)
         SELECT job_id, tenant, scope, ordering_key, command_type, envelope, result_key, record, origin_partition,
                origin_offset, now() + make_interval(secs => start_timeout), now() + make_interval(secs => job_timeout)
         FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[], $6::jsonb[], $7::text[],
                     $8::bytea[], $9::int[], $10::bigint[], $11::float8[], $12::float8[])
         WITH ORDINALITY AS e(job_id, tenant, scope, ordering_key, command_type, envelope, result_key, record,
                              origin_partition, origin_offset, start_timeout, job_timeout, position)
         ORDER BY position
         ON CONFLICT (job_id) DO UPDATE SET
             seq = nextval(pg_get_serial_sequence('executions', 'seq')), state = 'queued', attempts = 0,
             outages = 0, attempt_id = NULL, deadline = NULL, last_error = NULL, started_at = NULL,
             ended_at = NULL, created_at = now(), holder = NULL, worker = NULL, attempt_deadline = NULL,
             heartbeat_at = NULL, progress_percent = NULL, result = NULL, start_by = excluded.start_by,
             end_by = excluded.end_by
         WHERE executions.state = 'dead_lettered'",
    )
    .bind(&ids)
    .bind(&tenants)
    .bind(&scopes)
    .bind(&values)
    .bind(&types)
    .bind(&envelopes)
    .bind(&result_keys)
    .bind(&records)
    .bind(&partitions)
    .bind(&offsets)
    .bind(&start_timeouts)
    .bind(&job_timeouts)
    .execute(&mut *tx)
    .await?;

    // The first new execution of each key is its head if the key has no
    // queue yet; an existing queue's row is only locked (see the module's docs).
    let mut firsts: Vec<&NewExecution<'_>> = Vec::new();
    for execution in executions {
        if !firsts.iter().any(|first| first.key == execution.key) {
            firsts.push(execution);
        }
    }
    firsts.sort_by(|a, b| a.key.cmp(b.key));
    let (tenants, scopes, values) = columns(firsts.iter().map(|e| e.key));
    let heads: Vec<Uuid> = firsts.iter().map(|e| e.job_id).collect();
    let types: Vec<&str> = firsts.iter().map(|e| e.command_type).collect();
    sqlx::query(
        "INSERT INTO key_queues (tenant, scope, ordering_key, head, command_type, ready_at)
         SELECT tenant, scope, ordering_key, head, command_type, now()
         FROM unnest($1::text[], $2::text[], $3::text[], $4::uuid[], $5::text[])
             AS k(tenant, scope, ordering_key, head, command_type)
         ORDER BY tenant, scope, ordering_key
         ON CONFLICT (tenant, scope, ordering_key) DO UPDATE SET head = key_queues.head",
    )
    .bind(&tenants)
    .bind(&scopes)
    .bind(&values)
    .bind(&heads)
    .bind(&types)
    .execute(&mut *tx)
    .await?;
    Ok(())
}

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

pub(super) const EXECUTION_COLUMNS: &str = "e.job_id, e.tenant, e.scope, e.ordering_key, e.command_type, e.attempts, e.outages, \
     e.attempt_id, e.envelope, e.result_key, e.record, e.origin_partition, e.origin_offset";

impl Execution {
    pub(super) fn of_row(row: &PgRow) -> Result<Self, sqlx::Error> {
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

/// How an execution ended.
#[derive(Debug, Clone)]
pub struct Ending {
    pub job_id: Uuid,
    /// The attempt that ended it; `None` for a built-in run (which holds its
    /// key's row).
    pub attempt_id: Option<Uuid>,
    /// `succeeded`, `failed` or `dead_lettered`.
    pub state: &'static str,
    /// Attempts spent, this one included when it failed.
    pub attempts: i32,
    pub error: Option<serde_json::Value>,
    /// The result's JSON text, kept to answer a repeated completion.
    pub result: Option<String>,
}

/// End executions in the caller's transaction: each only if it is still the
/// attempt that ends it (a late answer of an attempt given up ends nothing);
/// returns the ones that ended, whose results the caller then records.
pub async fn end(tx: &mut PgConnection, endings: &[Ending]) -> Result<HashSet<Uuid>, sqlx::Error> {
    if endings.is_empty() {
        return Ok(HashSet::new());
    }
    let ids: Vec<Uuid> = endings.iter().map(|e| e.job_id).collect();
    let attempts: Vec<Option<Uuid>> = endings.iter().map(|e| e.attempt_id).collect();
    let states: Vec<&str> = endings.iter().map(|e| e.state).collect();
    let spent: Vec<i32> = endings.iter().map(|e| e.attempts).collect();
    let errors: Vec<Option<serde_json::Value>> = endings.iter().map(|e| e.error.clone()).collect();
    let results: Vec<Option<&str>> = endings.iter().map(|e| e.result.as_deref()).collect();
    let ended: Vec<Uuid> = sqlx::query_scalar(
        "UPDATE executions e SET state = x.state, attempts = x.attempts, last_error = coalesce(x.error, e.last_error),
             result = x.result, attempt_id = NULL, deadline = NULL, ended_at = now(),
             started_at = coalesce(e.started_at, now())
         FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::int[], $5::jsonb[], $6::text[])
             AS x(job_id, attempt_id, state, attempts, error, result)
         WHERE e.job_id = x.job_id AND e.attempt_id IS NOT DISTINCT FROM x.attempt_id
           AND e.state = CASE WHEN x.attempt_id IS NULL THEN 'queued' ELSE 'running' END
         RETURNING e.job_id",
    )
    .bind(&ids)
    .bind(&attempts)
    .bind(&states)
    .bind(&spent)
    .bind(&errors)
    .bind(&results)
    .fetch_all(&mut *tx)
    .await?;
    Ok(ended.into_iter().collect())
}

/// Move each of `keys` on after an execution of it ended, in the caller's
/// transaction: its next queued execution becomes its head, ready now (a
/// head that did not change keeps its state: another execution of the key
/// ended, by a timeout), or its row goes when none is left. Every
/// dispatcher and waiting pull worker is woken at commit.
pub async fn advance(tx: &mut PgConnection, keys: &[&QueueKey]) -> Result<(), sqlx::Error> {
    if keys.is_empty() {
        return Ok(());
    }
    let mut keys = keys.to_vec();
    keys.sort();
    keys.dedup();
    let (tenants, scopes, values) = columns(keys.iter().copied());
    // Lock first, then read in statements of their own: each sees whatever
    // a lane committed while this waited for the locks.
    sqlx::query(
        "SELECT 1 FROM key_queues q
         JOIN unnest($1::text[], $2::text[], $3::text[]) WITH ORDINALITY AS k(tenant, scope, ordering_key, position)
           ON (q.tenant, q.scope, q.ordering_key) = (k.tenant, k.scope, k.ordering_key)
         ORDER BY k.position FOR UPDATE OF q",
    )
    .bind(&tenants)
    .bind(&scopes)
    .bind(&values)
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "WITH k AS (SELECT * FROM unnest($1::text[], $2::text[], $3::text[]) AS k(tenant, scope, ordering_key)),
         next AS (
             SELECT DISTINCT ON (e.tenant, e.scope, e.ordering_key) e.tenant, e.scope, e.ordering_key, e.job_id,
                    e.command_type
             FROM executions e JOIN k USING (tenant, scope, ordering_key)
             WHERE e.state IN ('queued', 'running')
             ORDER BY e.tenant, e.scope, e.ordering_key, e.seq),
         moved AS (
             UPDATE key_queues q SET head = next.job_id, command_type = next.command_type,
                 ready_at = CASE WHEN q.head = next.job_id THEN q.ready_at ELSE now() END,
                 waiting = CASE WHEN q.head = next.job_id THEN q.waiting END
             FROM next WHERE (q.tenant, q.scope, q.ordering_key) = (next.tenant, next.scope, next.ordering_key)
             RETURNING q.tenant, q.scope, q.ordering_key)
         DELETE FROM key_queues q USING k
         WHERE (q.tenant, q.scope, q.ordering_key) = (k.tenant, k.scope, k.ordering_key)
           AND NOT EXISTS (SELECT 1 FROM moved
                           WHERE (moved.tenant, moved.scope, moved.ordering_key) = (k.tenant, k.scope, k.ordering_key))",
    )
    .bind(&tenants)
    .bind(&scopes)
    .bind(&values)
    .execute(&mut *tx)
    .await?;
    notify(tx).await
}

/// Wake every dispatcher and waiting pull worker at commit (notifications
/// of one transaction are merged).
pub async fn notify(tx: &mut PgConnection) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT pg_notify($1, '')").bind(CHANNEL).execute(tx).await?;
    Ok(())
}

/// The channel of work that became ready (migration 0007's trigger, and
/// [`notify`]).
pub const CHANNEL: &str = "onceflow_executions";

/// Why a head waits before its next attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wait {
    /// Its handler failed (an attempt spent); the policy's backoff.
    Retry,
    /// Its handler is unreachable or shedding load (no attempt spent).
    HandlerUnavailable,
    /// A row it needs is locked by someone else.
    Locked,
    /// A pull worker handed it back (ready at once).
    Released,
}

impl Wait {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Retry => "retry",
            Self::HandlerUnavailable => "handler_unavailable",
            Self::Locked => "locked",
            Self::Released => "released",
        }
    }
}

/// Put a running attempt's execution back at the head of its queue, to
/// start again after `delay`, in a transaction of its own (see
/// [`super::leases::requeue`]).
pub async fn retry_later(
    pool: &PgPool,
    execution: &Execution,
    counted: super::leases::Counted,
    wait: Wait,
    delay: Duration,
    error: &serde_json::Value,
) -> Result<(), sqlx::Error> {
    let mut tx = pool.begin().await?;
    super::leases::requeue(&mut tx, execution, counted, wait, delay, Some(error)).await?;
    tx.commit().await
}

/// Let `key`'s head start again only after `delay`, saying why.
pub async fn hold(tx: &mut PgConnection, key: &QueueKey, wait: Wait, delay: Duration) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE key_queues SET ready_at = now() + make_interval(secs => $4), waiting = $5
         WHERE (tenant, scope, ordering_key) = ($1, $2, $3)",
    )
    .bind(&key.tenant)
    .bind(&key.scope)
    .bind(&key.value)
    .bind(delay.as_secs_f64())
    .bind(wait.as_str())
    .execute(tx)
    .await?;
    Ok(())
}

/// Let `key`'s head start again only after `delay`, if `head` is its head
/// (a command handed over with nothing ahead of it, or a built-in run that
/// met a lock), counting an outage of it.
pub async fn hold_head(
    tx: &mut PgConnection,
    key: &QueueKey,
    head: Uuid,
    wait: Wait,
    delay: Duration,
) -> Result<(), sqlx::Error> {
    let held = sqlx::query(
        "UPDATE key_queues SET ready_at = now() + make_interval(secs => $5), waiting = $6
         WHERE (tenant, scope, ordering_key) = ($1, $2, $3) AND head = $4",
    )
    .bind(&key.tenant)
    .bind(&key.scope)
    .bind(&key.value)
    .bind(head)
    .bind(delay.as_secs_f64())
    .bind(wait.as_str())
    .execute(&mut *tx)
    .await?;
    if held.rows_affected() == 1 {
        sqlx::query("UPDATE executions SET outages = outages + 1 WHERE job_id = $1")
            .bind(head)
            .execute(&mut *tx)
            .await?;
    }
    Ok(())
}

/// Hold every waiting key whose head is of one of `command_types` until
/// `until`: their handler's breaker opened.
pub async fn hold_types(pool: &PgPool, command_types: &[&str], until: DateTime<Utc>) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE key_queues SET ready_at = greatest(ready_at, $2), waiting = 'breaker'
         WHERE command_type = ANY($1) AND ready_at IS NOT NULL",
    )
    .bind(command_types)
    .bind(until)
    .execute(pool)
    .await?;
    Ok(())
}

/// How long until the next head becomes ready, if any waits.
pub async fn next_ready_in(pool: &PgPool) -> Result<Option<Duration>, sqlx::Error> {
    let seconds: Option<f64> = sqlx::query_scalar(
        "SELECT extract(epoch FROM min(ready_at) - now())::float8 FROM key_queues WHERE ready_at IS NOT NULL",
    )
    .fetch_one(pool)
    .await?;
    Ok(seconds.map(|s| Duration::from_secs_f64(s.max(0.0))))
}

/// An execution as a client may see it: where it stands and why it waits.
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
pub struct ExecutionView {
    pub job_id: Uuid,
    #[serde(rename = "type")]
    pub command_type: String,
    /// `queued`, `running`, `succeeded`, `failed` or `dead_lettered`.
    pub state: String,
    /// Attempts its handler's failures spent.
    pub attempts: i32,
    /// Calls that met its handler unavailable (no attempt spent).
    pub outages: i32,
    /// The last failure, `{"code", "message"}`.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub last_error: Option<serde_json::Value>,
    /// Why it has not ended yet: `{"reason": "job_ahead", "job_id"}` (the job
    /// before it on its key), `{"reason": "handler", "deadline"}` (its call
    /// is out), `{"reason": "handler" | "worker", "lease_expires_at",
    /// "last_heartbeat_at"}` (a handler that answered `202`, or a pull
    /// worker, holds it; a worker's name too), `{"reason": "retry" |
    /// "handler_unavailable" | "breaker" | "locked" | "released", "until"}`,
    /// `{"reason": "capacity"}` (ready: for a free slot of its type's
    /// concurrency, or a pull worker's poll).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub waiting_for: Option<serde_json::Value>,
    /// What the last heartbeat reported.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub progress_percent: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub progress_details: Option<serde_json::Value>,
}

/// The execution of `tenant`'s job `job_id`, if the job has one.
pub async fn view(pool: &PgPool, tenant: &str, job_id: Uuid) -> Result<Option<ExecutionView>, sqlx::Error> {
    let Some(row) = sqlx::query(
        "SELECT e.job_id, e.command_type, e.state, e.attempts, e.outages, e.last_error, e.deadline, e.holder,
                e.worker, e.progress_percent, e.progress_details, e.heartbeat_at,
                q.head, q.ready_at, q.waiting, q.ready_at <= now() AS ready
         FROM executions e
         LEFT JOIN key_queues q USING (tenant, scope, ordering_key)
         WHERE e.job_id = $1 AND e.tenant = $2",
    )
    .bind(job_id)
    .bind(tenant)
    .fetch_optional(pool)
    .await?
    else {
        return Ok(None);
    };
    let state: String = row.try_get("state")?;
    let head: Option<Uuid> = row.try_get("head")?;
    let ready_at: Option<DateTime<Utc>> = row.try_get("ready_at")?;
    let waiting: Option<String> = row.try_get("waiting")?;
    let deadline: Option<DateTime<Utc>> = row.try_get("deadline")?;
    let holder: Option<String> = row.try_get("holder")?;
    let waiting_for = match state.as_str() {
        // A call waits for its answer until its deadline; an accepted call
        // or a worker's task for a heartbeat or an end until its lease ends.
        "running" => Some(match holder.as_deref() {
            Some("worker") => serde_json::json!({
                "reason": "worker",
                "worker": row.try_get::<Option<String>, _>("worker")?,
                "lease_expires_at": deadline,
                "last_heartbeat_at": row.try_get::<Option<DateTime<Utc>>, _>("heartbeat_at")?,
            }),
            Some("handler") => serde_json::json!({
                "reason": "handler",
                "lease_expires_at": deadline,
                "last_heartbeat_at": row.try_get::<Option<DateTime<Utc>>, _>("heartbeat_at")?,
            }),
            _ => serde_json::json!({"reason": "handler", "deadline": deadline}),
        }),
        // A head held back says why until it starts again (also while it is
        // being tried again); a ready head that was never held waits for a
        // slot of its type's concurrency.
        "queued" => Some(match (head, waiting) {
            (Some(head), _) if head != job_id => serde_json::json!({"reason": "job_ahead", "job_id": head}),
            (_, Some(waiting)) => serde_json::json!({"reason": waiting, "until": ready_at}),
            _ if row.try_get::<Option<bool>, _>("ready")? == Some(true) => serde_json::json!({"reason": "capacity"}),
            _ => serde_json::json!({"reason": "retry", "until": ready_at}),
        }),
        _ => None,
    };
    Ok(Some(ExecutionView {
        progress_percent: row.try_get("progress_percent")?,
        progress_details: row.try_get("progress_details")?,
        job_id: row.try_get("job_id")?,
        command_type: row.try_get("command_type")?,
        state,
        attempts: row.try_get("attempts")?,
        outages: row.try_get("outages")?,
        last_error: row.try_get("last_error")?,
        waiting_for,
    }))
}
