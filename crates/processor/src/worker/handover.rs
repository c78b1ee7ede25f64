//! Handing commands over to executions (see [`crate::executions`]): a
//! command whose handler is not applied inline (a push handler, long work),
//! or whose key has executions queued, or whose inline effect met a row
//! locked by someone else, is recorded as an execution in the lane's
//! transaction, with its inbox row saying `deferred`; the lane goes on.

use onceflow_contracts::Envelope;
use rdkafka::{Message as _, message::OwnedMessage};
use sqlx::{PgConnection, Postgres, Transaction};

use super::{Outcome, Worker, apply::Parsed, inbox::claim_inbox};
use crate::executions::store::{self, NewExecution, Wait};

/// The inbox outcome of a command handed to an execution, until it ends.
pub(crate) const DEFERRED: &str = "deferred";

impl Worker {
    /// A transaction whose lock waits end after `inline_lock_timeout`: an
    /// inline effect that meets a row someone else holds is handed over
    /// instead of holding up its lane (set with BEGIN: one round trip).
    pub(crate) async fn begin_inline(&self) -> Result<Transaction<'static, Postgres>, sqlx::Error> {
        let millis = self.inline_lock_timeout.as_millis().max(1);
        self.pool.begin_with(format!("BEGIN; SET LOCAL lock_timeout = '{millis}ms'")).await
    }

    /// Record `commands` (claimed in `tx`) as executions at the end of their
    /// keys' queues, their inbox rows saying `deferred`.
    pub(super) async fn hand_over(
        &self,
        tx: &mut PgConnection,
        commands: &[(&OwnedMessage, &Envelope, &Parsed)],
    ) -> Result<(), sqlx::Error> {
        let executions: Vec<NewExecution<'_>> = commands
            .iter()
            .map(|(message, envelope, parsed)| {
                let declared = self.registry.declared(&parsed.job.command_type);
                NewExecution {
                    job_id: envelope.message_id,
                    key: &parsed.key,
                    command_type: &parsed.job.command_type,
                    envelope,
                    result_key: &parsed.job.result_key,
                    record: message.payload().unwrap_or_default(),
                    partition: message.partition(),
                    offset: message.offset(),
                    start_timeout: declared.and_then(|t| t.start_timeout),
                    job_timeout: declared.and_then(|t| t.job_timeout),
                }
            })
            .collect();
        store::enqueue(&mut *tx, &executions).await?;
        let ids: Vec<uuid::Uuid> = commands.iter().map(|(_, envelope, _)| envelope.message_id).collect();
        sqlx::query("UPDATE inbox SET outcome = $2 WHERE message_id = ANY($1)")
            .bind(&ids)
            .bind(DEFERRED)
            .execute(&mut *tx)
            .await?;
        Ok(())
    }

    /// Hand one command over in a transaction of its own, its key's head
    /// held back for the first outage wait when `wait` says why (a row lock
    /// it met inline).
    pub(super) async fn defer(
        &self,
        message: &OwnedMessage,
        envelope: &Envelope,
        parsed: &Parsed,
        wait: Option<Wait>,
    ) -> Result<Outcome, sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        if !claim_inbox(&mut tx, envelope.message_id, &parsed.job).await? {
            return Ok(Outcome::Duplicate);
        }
        self.hand_over(&mut tx, &[(message, envelope, parsed)]).await?;
        if let Some(wait) = wait {
            store::hold_head(&mut tx, &parsed.key, envelope.message_id, wait, self.retry.delay_after(0)).await?;
        }
        tx.commit().await?;
        Ok(Outcome::Deferred)
    }
}
