//! What a lane hands over: the keys that already have work queued, and the
//! executions it records at the end of their keys' queues.

use std::{collections::HashSet, time::Duration};

use onceflow_contracts::Envelope;
use sqlx::PgConnection;
use uuid::Uuid;

use super::{QueueKey, columns};

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
