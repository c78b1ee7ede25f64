//! Batches: the commands a lane has waiting, applied in one transaction.
//!
//! Applying each command in a transaction of its own costs a commit, and so
//! a WAL flush, per command; and every deposit of a currency holds the one
//! `world:<CUR>` row locked until its commit, so commands of a currency
//! queue up behind each other's flushes. A batch pays for one commit:
//!
//! ```text
//! BEGIN (lock waits end after executions.inline_lock_timeout_ms)
//!   inbox rows of every message (one statement; the ones already there are duplicates)
//!   which claimed commands' keys have executions queued (one statement)
//!   the commands not applied here, as executions behind their keys (see
//!   super::handover: a push handler's, long work, a key with work queued)
//!   per claimed command: its effect (on a savepoint only if its handler may
//!   refuse after writing: SAVEPOINT, effect, RELEASE or ROLLBACK TO it);
//!   per run of consecutive claimed commands of a type with a bulk handler
//!   (deposits): their effects in one call
//!   every result in the outbox (one statement)
//!   the outcome of every command whose inbox row does not already say it:
//!   `failed` for a refusal, and the outcome of a redriven dead letter, whose
//!   row said `dead_lettered` (one statement)
//! COMMIT, then every offset is stored
//! ```
//!
//! Order is kept: the batch applies its messages in the order the lane
//! received them, so a key's commands stay in order; a command whose key has
//! an execution queued (before this batch, or handed over earlier in it)
//! queues behind it instead of overtaking it.
//!
//! The batch takes only the ordinary case: every message has a readable
//! envelope and command, and each one ends applied, refused (a business
//! refusal) or as a duplicate. Anything else rolls the whole batch back, and
//! its messages go one at a time through the one-message path, which knows
//! every end of guarantee G8: a message to dead-letter, a data error the
//! database raises, a result too large for one record, a row someone else
//! holds (the one-message path hands that command over), an outage (a lost
//! connection, a deadlock between two lanes' batches) or a panic. The batch
//! adds no retry loop of its own: an outage met here is waited out by the
//! one-message path; a message that can never succeed is dead-lettered by it.
//! A rolled-back batch changed nothing but the progress events a long
//! command may have committed on the way (advisory and at least once, see
//! [`crate::handlers::Progress`]).

use std::collections::HashSet;

use futures::FutureExt as _;
use onceflow_contracts::{Envelope, JobError, JobStatus};
use onceflow_outbox::OutboxMessage;
use onceflow_runtime::{failure::Failure, kafka};
use rdkafka::message::OwnedMessage;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;
use uuid::Uuid;

use super::{
    Handled, Outcome, Worker,
    apply::{Parsed, is_lock_timeout},
    command_span,
    inbox::{claim_redrive, record_outcomes},
};
use crate::executions::store::{self, QueueKey};
use crate::handlers::{BulkHandler, CommandContext, HandlerError, Refusals, Registered};

/// Why a batch was rolled back (a metric label and a log line), and which
/// of its messages caused it when one did.
#[derive(Debug)]
pub(crate) struct Fallback {
    pub(crate) reason: &'static str,
    /// The position of the message that cannot go in a batch; `None` when
    /// the batch as a whole met an outage (a lost connection, a deadlock) or
    /// a row locked by someone else.
    pub(crate) culprit: Option<usize>,
}

impl Fallback {
    fn at(culprit: usize, reason: &'static str) -> Self {
        Self { reason, culprit: Some(culprit) }
    }

    fn noting(self, error: &dyn std::fmt::Display) -> Self {
        tracing::debug!(%error, reason = self.reason, "batch rolled back");
        self
    }
}

impl Fallback {
    /// A database error of a handler, sorted as the one-message path sorts
    /// it: data the database refuses is charged to `culprit` (`None`: to no
    /// command, when a bulk run's statement failed as a whole, so the
    /// one-message path finds which), anything else is an outage.
    fn of_database(error: sqlx::Error, culprit: Option<usize>) -> Self {
        match Failure::of_database(&error) {
            Failure::Data => Self { reason: "invalid_data", culprit }.noting(&error),
            Failure::Outage => Self::from(error),
        }
    }
}

impl From<sqlx::Error> for Fallback {
    fn from(error: sqlx::Error) -> Self {
        let reason = if is_lock_timeout(&error) { "locked" } else { "database_error" };
        Self { reason, culprit: None }.noting(&error)
    }
}

/// One command of a batch that got past the door.
#[derive(Clone, Copy)]
pub(crate) struct Claimed<'a> {
    /// Its position in the batch.
    pub(crate) position: usize,
    pub(crate) envelope: &'a Envelope,
    pub(crate) parsed: &'a Parsed,
}

/// What the inbox said of one command of a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Claim {
    /// Its inbox row was inserted now, with the outcome `succeeded`.
    New,
    /// Its row said `dead_lettered` and an operator redrove it.
    Redriven,
    /// Already handled: a duplicate.
    Duplicate,
}

impl Worker {
    /// Handle `batch` to its end, in order; returns how many of its messages,
    /// from the first, reached their end (fewer than all only on shutdown).
    ///
    /// When one message cannot go in a batch (it is to be dead-lettered, the
    /// database refuses its data, its result is too large), the messages
    /// before it are applied as a batch of their own, it goes alone through
    /// the one-message path, and the messages after it are batched again; an
    /// outage sends the rest of the batch through the one-message path,
    /// which waits it out.
    pub(super) async fn handle_batch(&self, batch: &[OwnedMessage], shutdown: &CancellationToken) -> usize {
        let mut done = 0;
        while done < batch.len() {
            let rest = &batch[done..];
            if rest.len() == 1 || shutdown.is_cancelled() {
                return done + self.one_at_a_time(rest, shutdown).await;
            }
            let fallback = match self.apply_batch_guarded(rest).await {
                Ok(()) => return batch.len(),
                Err(fallback) => fallback,
            };
            metrics::counter!("onceflow_command_batch_fallbacks_total", "reason" => fallback.reason).increment(1);
            tracing::info!(reason = fallback.reason, size = rest.len(), "batch rolled back");
            let Some(culprit) = fallback.culprit else {
                return done + self.one_at_a_time(rest, shutdown).await;
            };
            // The commands before the culprit met nothing wrong.
            let before = &rest[..culprit];
            let applied = if before.len() > 1 && self.apply_batch_guarded(before).await.is_ok() {
                before.len()
            } else {
                self.one_at_a_time(before, shutdown).await
            };
            done += applied;
            if applied < before.len() {
                return done;
            }
            let alone = self.one_at_a_time(&rest[culprit..=culprit], shutdown).await;
            done += alone;
            if alone == 0 {
                return done;
            }
        }
        done
    }

    /// `messages` through the one-message path, in order; how many reached
    /// their end (fewer than all only on shutdown).
    async fn one_at_a_time(&self, messages: &[OwnedMessage], shutdown: &CancellationToken) -> usize {
        for (done, message) in messages.iter().enumerate() {
            if shutdown.is_cancelled() || self.handle_guarded(message.clone(), shutdown).await == Handled::Abandoned {
                return done;
            }
        }
        messages.len()
    }

    /// [`Self::apply_batch`], a panic in it turned into a fallback to the
    /// one-message path (which contains a panic to its message): the
    /// batch's transaction is dropped, so rolled back, and the lane goes on.
    async fn apply_batch_guarded(&self, batch: &[OwnedMessage]) -> Result<(), Fallback> {
        match std::panic::AssertUnwindSafe(self.apply_batch(batch)).catch_unwind().await {
            Ok(applied) => applied,
            Err(_) => {
                tracing::error!(size = batch.len(), "a batch panicked; its messages go one at a time");
                Err(Fallback { culprit: None, reason: "panic" })
            }
        }
    }

    /// The batch in one transaction, or nothing at all.
    async fn apply_batch(&self, batch: &[OwnedMessage]) -> Result<(), Fallback> {
        let started = std::time::Instant::now();
        let commands = batch
            .iter()
            .enumerate()
            .map(|(position, message)| {
                let envelope = kafka::envelope_of(message).map_err(|_| Fallback::at(position, "unreadable_message"))?;
                let parsed =
                    self.parse(message, &envelope).map_err(|_| Fallback::at(position, "unreadable_message"))?;
                Ok((envelope, parsed))
            })
            .collect::<Result<Vec<_>, Fallback>>()?;

        let mut tx = self.begin_inline().await?;
        let claimed = claim_inbox_batch(&mut tx, &commands).await?;
        // One span per command, from its effect to its report after the
        // batch's commit.
        let spans: Vec<tracing::Span> =
            batch.iter().zip(&commands).map(|(message, (envelope, _))| command_span(message, envelope)).collect();
        let to_apply: Vec<Claimed<'_>> = commands
            .iter()
            .zip(&claimed)
            .enumerate()
            .filter(|(_, (_, claim))| **claim != Claim::Duplicate)
            .map(|(position, ((envelope, parsed), _))| Claimed { position, envelope, parsed })
            .collect();
        // Applied here: commands of a built-in handler applied inline whose
        // key has nothing queued, neither before this batch nor earlier in
        // it. Every other one is handed to an execution, behind its key's.
        let inline = |command: &Claimed<'_>| self.registry.runs_inline(&command.parsed.job.command_type);
        let candidates: Vec<&QueueKey> = to_apply.iter().filter(|c| inline(c)).map(|c| &c.parsed.key).collect();
        let busy = store::busy(&mut tx, &candidates).await?;
        let mut queued: HashSet<&QueueKey> = HashSet::new();
        let (applied, handed): (Vec<Claimed<'_>>, Vec<Claimed<'_>>) = to_apply.iter().partition(|command| {
            let key = &command.parsed.key;
            let free = inline(command) && !busy.contains(key) && !queued.contains(key);
            if !free {
                queued.insert(key);
            }
            free
        });
        // Handed over first: the key queues' rows are then taken before any
        // row an effect locks, in the order a built-in run of the dispatcher
        // takes them (its key's row, then its effect's), so the two never
        // wait for each other in a circle.
        let handed_over: Vec<(&OwnedMessage, &Envelope, &Parsed)> =
            handed.iter().map(|command| (&batch[command.position], command.envelope, command.parsed)).collect();
        self.hand_over(&mut tx, &handed_over).await?;
        // What each claimed command ended as, by position.
        let mut ends: Vec<Option<(JobStatus, OutboxMessage)>> = vec![None; commands.len()];
        self.effects(&mut tx, &applied, &spans, &mut ends).await?;
        let mut deferred = vec![false; commands.len()];
        for command in &handed {
            deferred[command.position] = true;
        }
        let mut results = Vec::with_capacity(to_apply.len());
        // The inbox rows whose outcome is not the `succeeded` a new row got:
        // refusals, and redriven dead letters (their row says `dead_lettered`,
        // which would let an operator redrive them, and apply them, again).
        let mut rewritten_ids = Vec::new();
        let mut rewritten_outcomes = Vec::new();
        let mut outcomes = Vec::with_capacity(commands.len());
        for (position, ((((envelope, _), end), span), claim)) in
            commands.iter().zip(ends).zip(spans).zip(&claimed).enumerate()
        {
            match end {
                None if deferred[position] => outcomes.push((envelope, Outcome::Deferred, span)),
                None => outcomes.push((envelope, Outcome::Duplicate, span)),
                Some((status, result)) => {
                    if status == JobStatus::Failed || *claim == Claim::Redriven {
                        rewritten_ids.push(envelope.message_id);
                        rewritten_outcomes.push(status.as_str());
                    }
                    results.push(result);
                    outcomes.push((envelope, Outcome::Applied(status), span));
                }
            }
        }
        onceflow_outbox::enqueue_all(&mut tx, &results).await.map_err(|error| match error {
            onceflow_outbox::Error::Database(error) => Fallback::from(error),
            // Each result's size was checked in `conclude`.
            other => Fallback { reason: "outbox", culprit: None }.noting(&other),
        })?;
        record_outcomes(&mut tx, &rewritten_ids, &rewritten_outcomes).await?;
        tx.commit().await?;

        metrics::histogram!("onceflow_command_batch_size").record(commands.len() as f64);
        let took = started.elapsed();
        for (envelope, outcome, span) in outcomes {
            let _span = span.entered();
            outcome.report(self.registry.label(&envelope.message_type), took);
        }
        Ok(())
    }

    /// The effects of `commands`, in order, in `tx`: each command's end (its
    /// status and result) in `ends`, by its position. Runs of consecutive
    /// commands of one type with a bulk handler go to it at once; every
    /// other command goes alone.
    pub(crate) async fn effects(
        &self,
        tx: &mut sqlx::PgConnection,
        commands: &[Claimed<'_>],
        spans: &[tracing::Span],
        ends: &mut [Option<(JobStatus, OutboxMessage)>],
    ) -> Result<(), Fallback> {
        let bulk_of = |command: &Claimed<'_>| self.registry.get(&command.parsed.job.command_type).and_then(|r| r.bulk);
        for run in
            commands.chunk_by(|a, b| a.parsed.job.command_type == b.parsed.job.command_type && bulk_of(a).is_some())
        {
            match (run, bulk_of(&run[0])) {
                ([_, _, ..], Some(bulk)) => {
                    let outcomes = self.apply_bulk(&mut *tx, bulk, run).await?;
                    for (command, outcome) in run.iter().zip(outcomes) {
                        let _span = spans[command.position].enter();
                        ends[command.position] = Some(self.conclude(command, outcome)?);
                    }
                }
                _ => {
                    for command in run {
                        let end = self.apply_one(&mut *tx, command).instrument(spans[command.position].clone()).await?;
                        ends[command.position] = Some(end);
                    }
                }
            }
        }
        Ok(())
    }

    /// One claimed command's effect, and its result: applied (`succeeded`) or
    /// refused (`failed`, nothing of the effect kept: on a savepoint that the
    /// refusal rolls back, unless the handler refuses only before writing).
    async fn apply_one(
        &self,
        tx: &mut sqlx::PgConnection,
        command: &Claimed<'_>,
    ) -> Result<(JobStatus, OutboxMessage), Fallback> {
        let Registered { handler, refusals, .. } = self
            .registry
            .get(&command.parsed.job.command_type)
            .ok_or_else(|| Fallback::at(command.position, "unknown_command_type"))?;
        let context = self.context_of(command);
        let outcome = match refusals {
            Refusals::BeforeWriting => handler(&mut *tx, &context).await,
            Refusals::AfterWriting => {
                let mut effect = sqlx::Connection::begin(&mut *tx).await?;
                let outcome = handler(&mut effect, &context).await;
                if outcome.is_ok() {
                    effect.commit().await?;
                } else {
                    effect.rollback().await?;
                }
                outcome
            }
        };
        self.conclude(command, outcome)
    }

    /// A run of claimed commands of one type through its bulk handler: one
    /// outcome per command, in order. An error of the whole run is charged
    /// to no command: the batch's messages then go one at a time, where the
    /// one that caused it, if any, is found.
    async fn apply_bulk(
        &self,
        tx: &mut sqlx::PgConnection,
        bulk: BulkHandler,
        run: &[Claimed<'_>],
    ) -> Result<Vec<Result<serde_json::Value, HandlerError>>, Fallback> {
        let contexts: Vec<CommandContext> = run.iter().map(|command| self.context_of(command)).collect();
        let outcomes = bulk(&mut *tx, &contexts).await.map_err(|error| match error {
            HandlerError::Database(error) => Fallback::of_database(error, None),
            other => Fallback { reason: "bulk_handler", culprit: None }.noting(&other),
        })?;
        if outcomes.len() != run.len() {
            let answered = format!("{} outcomes for {} commands", outcomes.len(), run.len());
            return Err(Fallback { reason: "bulk_handler", culprit: None }.noting(&answered));
        }
        Ok(outcomes)
    }

    /// What a handler gets for a claimed command.
    fn context_of(&self, command: &Claimed<'_>) -> CommandContext {
        let mut context = command.parsed.context.clone();
        context.progress = self.progress_sink(command.envelope, &command.parsed.job);
        context
    }

    /// A handler's outcome for a claimed command as the command's end: its
    /// status and the result to publish, or why the batch cannot keep it.
    fn conclude(
        &self,
        command: &Claimed<'_>,
        outcome: Result<serde_json::Value, HandlerError>,
    ) -> Result<(JobStatus, OutboxMessage), Fallback> {
        let Claimed { position, envelope, parsed } = *command;
        let (status, result, error) = match outcome {
            Ok(result) => (JobStatus::Succeeded, Some(result.to_string()), None),
            Err(HandlerError::Refused { code, message }) => {
                (JobStatus::Failed, None, Some(JobError { code: code.to_owned(), message }))
            }
            Err(HandlerError::Poison(_)) => return Err(Fallback::at(position, "invalid_payload")),
            Err(HandlerError::Database(error)) => return Err(Fallback::of_database(error, Some(position))),
        };
        let event = self.result_event(envelope, &parsed.job, status, result, error);
        let message = self
            .result_message(envelope, &parsed.job, &event)
            .map_err(|_| Fallback::at(position, "unencodable_result"))?;
        if message.size() > onceflow_outbox::MAX_MESSAGE_BYTES {
            return Err(Fallback::at(position, "result_too_large"));
        }
        Ok((status, message))
    }
}

/// The inbox rows of every command of the batch in one statement; for each
/// command, whether it is claimed, and how.
/// A message whose row was already there is claimed only if an operator
/// redrove it ([`claim_redrive`]); a message twice in one batch is claimed
/// once.
async fn claim_inbox_batch(
    tx: &mut sqlx::PgConnection,
    commands: &[(Envelope, Parsed)],
) -> Result<Vec<Claim>, sqlx::Error> {
    let ids: Vec<Uuid> = commands.iter().map(|(envelope, _)| envelope.message_id).collect();
    let tenants: Vec<&str> = commands.iter().map(|(_, parsed)| parsed.job.tenant.as_str()).collect();
    let types: Vec<&str> = commands.iter().map(|(_, parsed)| parsed.job.command_type.as_str()).collect();
    let mut inserted: HashSet<Uuid> = sqlx::query_scalar(
        "INSERT INTO inbox (message_id, tenant, command_type, outcome)
         SELECT id, tenant, command_type, 'succeeded' FROM unnest($1::uuid[], $2::text[], $3::text[])
             AS batch(id, tenant, command_type)
         ON CONFLICT (message_id) DO NOTHING
         RETURNING message_id",
    )
    .bind(&ids)
    .bind(&tenants)
    .bind(&types)
    .fetch_all(&mut *tx)
    .await?
    .into_iter()
    .collect();
    let mut claimed = Vec::with_capacity(ids.len());
    let mut seen = HashSet::with_capacity(ids.len());
    for id in ids {
        let first = seen.insert(id);
        claimed.push(if inserted.remove(&id) {
            Claim::New
        } else if first && claim_redrive(tx, id).await? {
            Claim::Redriven
        } else {
            Claim::Duplicate
        });
    }
    Ok(claimed)
}
