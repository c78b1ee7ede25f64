//! The inbox: one row per command message handled, whose primary key makes
//! a redelivered message a no-op, with the outcome it reached; and the
//! sweep of the synthetic probe's rows.

use onceflow_contracts::JobStatus;
use onceflow_runtime::probe_records::{COMMAND_TYPE, ProbeRecords};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::results::JobRef;

/// Insert the inbox row; `false` if the message was already handled.
///
/// The one exception: a message whose inbox outcome is `dead_lettered` and
/// that an operator redrove is claimed once more (see [`claim_redrive`]).
pub(super) async fn claim_inbox(
    tx: &mut sqlx::PgConnection,
    message_id: Uuid,
    job: &JobRef,
) -> Result<bool, sqlx::Error> {
    let inserted = sqlx::query(
        "INSERT INTO inbox (message_id, tenant, command_type, outcome) VALUES ($1, $2, $3, 'succeeded')
         ON CONFLICT (message_id) DO NOTHING",
    )
    .bind(message_id)
    .bind(&job.tenant)
    .bind(&job.command_type)
    .execute(&mut *tx)
    .await?;
    if inserted.rows_affected() == 1 {
        return Ok(true);
    }
    claim_redrive(tx, message_id).await
}

/// Claim a message that already has its inbox row: `true` only if its
/// outcome is `dead_lettered` and an operator redrove it (see
/// [`crate::admin`]). The pending redrive is consumed here, in the caller's
/// transaction, so it is used up exactly when the effect commits; a
/// concurrent second delivery blocks on the dead letter's row and then finds
/// nothing pending.
pub(super) async fn claim_redrive(tx: &mut sqlx::PgConnection, message_id: Uuid) -> Result<bool, sqlx::Error> {
    let redriven = sqlx::query(
        "UPDATE dead_letters d SET redrive_pending = false, reapplied_at = now()
         FROM inbox i
         WHERE d.message_id = $1 AND d.redrive_pending AND i.message_id = d.message_id AND i.outcome = 'dead_lettered'",
    )
    .bind(message_id)
    .execute(&mut *tx)
    .await?;
    if redriven.rows_affected() == 1 {
        tracing::info!("redriven dead letter: applying it once more");
        metrics::counter!("onceflow_commands_redriven_total").increment(1);
        return Ok(true);
    }
    Ok(false)
}

/// Whether the message already has its inbox row (committed) and no redrive
/// of it is pending.
pub(super) async fn already_handled(pool: &PgPool, message_id: Uuid) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM inbox WHERE message_id = $1)
            AND NOT EXISTS (SELECT 1 FROM dead_letters WHERE message_id = $1 AND redrive_pending)",
    )
    .bind(message_id)
    .fetch_one(pool)
    .await
}
pub(crate) async fn record_outcome(
    tx: &mut sqlx::PgConnection,
    message_id: Uuid,
    status: JobStatus,
) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE inbox SET outcome = $2 WHERE message_id = $1")
        .bind(message_id)
        .bind(status.as_str())
        .execute(tx)
        .await?;
    Ok(())
}

/// The outcome of each message of `ids`, in one statement: for rows whose
/// outcome is not the one they were inserted with (a refusal, a redriven
/// dead letter, an execution that ended).
pub(crate) async fn record_outcomes(
    tx: &mut sqlx::PgConnection,
    ids: &[Uuid],
    outcomes: &[&str],
) -> Result<(), sqlx::Error> {
    if ids.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "UPDATE inbox SET outcome = recorded.outcome
         FROM unnest($1::uuid[], $2::text[]) AS recorded(message_id, outcome)
         WHERE inbox.message_id = recorded.message_id",
    )
    .bind(ids)
    .bind(outcomes)
    .execute(tx)
    .await?;
    Ok(())
}

/// Delete the probe tenant's `onceflow.probe` inbox rows older than
/// `probe.retain_secs`, until `shutdown`. Only rows both of the probe's
/// tenant and of its command type (the safety rule of
/// `onceflow_runtime::probe_records`), found through the partial index
/// `inbox_probe_records` (migration 0009). Rows whose command still runs as
/// an execution (`deferred`) or was dead-lettered (its dead letter, which
/// an operator may redrive, joins its row) are kept. A probe command
/// redelivered after its row is gone would be applied again: it changes
/// nothing, and its second result is pruned in turn.
pub async fn prune_probe_rows(pool: PgPool, probe: ProbeRecords, shutdown: CancellationToken) {
    let delete = format!(
        "DELETE FROM inbox WHERE message_id IN (
             SELECT message_id FROM inbox
             WHERE command_type = '{COMMAND_TYPE}' AND tenant = $1
               AND processed_at < now() - make_interval(secs => $2)
               AND outcome IN ('succeeded', 'failed', 'cancelled')
             LIMIT $3 FOR UPDATE SKIP LOCKED)"
    );
    probe.prune_periodically(&pool, &delete, shutdown).await;
}
