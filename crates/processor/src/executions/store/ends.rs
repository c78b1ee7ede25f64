//! Ending executions, fenced by their attempt, and moving their keys'
//! queues on to the next head.

use std::collections::HashSet;

use sqlx::PgConnection;
use uuid::Uuid;

use super::{QueueKey, columns, notify};

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
