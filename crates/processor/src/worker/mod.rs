//! The command worker: consumes `onceflow.commands` and applies each command
//! exactly once.
//!
//! For every message, one PostgreSQL transaction holds the inbox row (keyed by
//! the message id), the handler's effect and the result's outbox row. The
//! message's offset is stored only after that transaction commits, so a crash
//! anywhere means redelivery, and redelivery of an applied message finds its
//! inbox row and does nothing. Effects are therefore exactly once even though
//! Kafka delivers at least once.
//!
//! Every message ends in one of three ways, is handed over, or waits
//! (guarantee G8):
//!
//! - **applied**: the effect and a `succeeded` result;
//! - **refused**: a `failed` result with a code and nothing of the effect
//!   (a business refusal such as `insufficient_funds` or
//!   `amount_out_of_range`, or `result_too_large` when the result would not
//!   fit in one Kafka record);
//! - **dead-lettered** (parked for an operator): a message that can never
//!   succeed as it is (no valid envelope, undecodable body, unknown type,
//!   payload that does not fit its type, or data the database refuses,
//!   PostgreSQL classes 22 and 23) goes to the dead-letter topic at once and,
//!   when its job is known, ends with a `dead_lettered` result whose error is
//!   a code and a message without database text (the full error is in the
//!   logs, the dead-letter headers and the `dead_letters` table);
//! - **handed over** to an execution ([`handover`], [`crate::executions`]):
//!   a command of a push handler or of long built-in work, one whose key has
//!   work queued, or one whose inline effect met a row someone else holds
//!   for longer than `executions.inline_lock_timeout_ms`; recorded with its
//!   inbox row (outcome `deferred`), its offset stored, its end to come from
//!   the dispatcher;
//! - **waits**: an outage (lost connection, pool timeout, serialization
//!   failure, deadlock, server shutdown, broker unreachable), as sorted by
//!   [`onceflow_runtime::failure::Failure`], is waited out with [`onceflow_runtime::failure::Backoff`]
//!   and tried again, with no bound on the number of tries. An outage never
//!   dead-letters anything, and only the lane it hit waits.
//!
//! The dead-letter path follows the same rule: the record is kept
//! losslessly (its key as bytes, header values that are not UTF-8 text
//! base64-encoded, text cleaned of NUL where a text column needs it), so no
//! byte of it can make parking fail; a record the broker refuses on the
//! dead-letter topic as data (too large) is kept in the table only, with the
//! reason; only an outage makes it wait. A dead letter with an envelope is
//! kept in the `dead_letters` table, from which an operator redrives it
//! ([`crate::admin`]); a redriven message is applied once more, and only
//! once, because the pending redrive is consumed in the effect's transaction.
//!
//! A panic while handling one message (rdkafka panics on reading a header
//! whose name is not UTF-8) ends that message, dead-lettered without its
//! headers, never its lane.
//!
//! Assigned partitions are spread over `lanes` tasks (partition % lanes), each
//! recording its partitions' messages in order: a key's commands stay in
//! order (one key, one partition). A lane never waits for work: slow work
//! and a key that cannot proceed are handed over, so only an outage makes a
//! lane wait. Under load a lane applies the messages it has waiting as one
//! batch, in one transaction ([`batch`]); anything out of the ordinary sends
//! the batch back through the one-message path described here.
//!
//! A message's offset is stored only once the message reached one of those
//! ends. A message abandoned half-way (shutdown while it waits out an outage)
//! keeps its offset unstored, so the next owner of its partition gets it again.
//!
//! The parts: [`apply`] (the one-message path and its outage waits),
//! [`batch`] (a lane's waiting messages in one transaction), [`handover`]
//! (commands recorded as executions), [`dead_letter`] (parking),
//! [`results`] (result events and their Kafka key), [`inbox`] (claims and
//! outcomes of the inbox, and the synthetic probe's rows pruned), [`lanes`]
//! (spreading messages over the lanes; a full lane pauses its own
//! partitions, never the others').

mod apply;
mod batch;
mod dead_letter;
mod handover;
mod inbox;
mod lanes;
mod results;

pub use inbox::prune_probe_rows;

use std::{sync::Arc, time::Duration};

use onceflow_contracts::{Envelope, JobStatus, topics::Topics};
use onceflow_runtime::{kafka, vitals::Vitals};
use rdkafka::{Message as _, consumer::Consumer as _, message::OwnedMessage, producer::FutureProducer};
use sqlx::PgPool;
use tokio::{sync::mpsc, task::JoinSet};
use tokio_util::sync::CancellationToken;

pub(crate) use apply::Parsed;
pub(crate) use batch::Claimed;
pub use dead_letter::{
    DLQ_ERROR_CODE, DLQ_ERROR_MESSAGE, DLQ_ORIGINAL_OFFSET, DLQ_ORIGINAL_PARTITION, DLQ_ORIGINAL_TOPIC,
};
pub(crate) use dead_letter::{Poison, clean, record_dead_letter};
pub(crate) use inbox::record_outcomes;
pub(crate) use results::JobRef;

use crate::{config::RetryConfig, handlers::Registry};

/// The job error code of a command whose data the database refused.
pub const INVALID_DATA: &str = "invalid_data";
/// The job error code of a command whose result does not fit in one Kafka record.
pub const RESULT_TOO_LARGE: &str = "result_too_large";
/// Everything the worker needs.
#[derive(Clone)]
pub struct Worker {
    pub pool: PgPool,
    pub producer: FutureProducer,
    pub registry: Registry,
    pub topics: Topics,
    /// The waits of a message whose database or broker is down.
    pub retry: RetryConfig,
    /// How many partitions-in-order lanes run in parallel.
    pub lanes: usize,
    /// The most commands a lane applies in one transaction.
    pub max_batch: usize,
    /// How long an inline effect waits for a row someone else holds before
    /// its command is handed to an execution instead.
    pub inline_lock_timeout: Duration,
    /// Where a lane that stops before shutdown is reported (`/readyz`).
    pub vitals: Vitals,
}
/// Messages queued per lane before its partitions are paused.
const LANE_CAPACITY: usize = 64;
/// How often a lane whose partitions are paused is looked at for room.
const ROOM_CHECK: Duration = Duration::from_millis(20);
/// What became of one message.
pub(super) enum Outcome {
    Applied(JobStatus),
    /// Recorded as an execution, to be driven from the database.
    Deferred,
    Duplicate,
}

impl Outcome {
    /// Its metrics and log line, inside the command's span; `took` is the
    /// time from the processor taking the command to its end's commit.
    pub(super) fn report(&self, command_type: &'static str, took: Duration) {
        match self {
            Self::Applied(status) => {
                metrics::counter!("onceflow_commands_processed_total", "status" => status.as_str()).increment(1);
                record_duration(command_type, status.as_str(), took);
                tracing::info!(status = status.as_str(), "command applied");
            }
            Self::Deferred => {
                metrics::counter!("onceflow_commands_deferred_total", "type" => command_type).increment(1);
                record_duration(command_type, "deferred", took);
                tracing::info!("command queued for its handler");
            }
            Self::Duplicate => {
                metrics::counter!("onceflow_commands_duplicate_total").increment(1);
                record_duration(command_type, "duplicate", took);
                tracing::info!("duplicate delivery; already applied");
            }
        }
    }
}

/// `onceflow_command_duration_seconds`: by command type (a registered one, or
/// `unknown`) and outcome.
pub(super) fn record_duration(command_type: &'static str, outcome: &'static str, took: Duration) {
    metrics::histogram!("onceflow_command_duration_seconds", "type" => command_type, "outcome" => outcome)
        .record(took.as_secs_f64());
}
/// Whether a message reached its end, so its offset may be stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub(super) enum Handled {
    /// Applied, refused, recognised as a duplicate, or dead-lettered.
    Done,
    /// Shutdown came first: the message must be delivered again.
    Abandoned,
}
impl Worker {
    /// Consume until `shutdown`, then return (offsets stored so far are
    /// committed when the consumer is dropped).
    pub async fn run(self, consumer: kafka::Consumer, shutdown: CancellationToken) {
        let consumer = Arc::new(consumer);
        let lanes = self.lanes.max(1);
        let mut queues = Vec::with_capacity(lanes);
        let mut running = JoinSet::new();
        for lane in 0..lanes {
            // Bounded: a full lane's partitions are paused (see `lanes`).
            let (queue, receiver) = mpsc::channel::<OwnedMessage>(LANE_CAPACITY);
            queues.push(queue);
            let task = self.clone().lane(receiver, consumer.clone(), shutdown.clone());
            running.spawn(self.vitals.watch(format!("lane {lane}"), &shutdown, task));
        }
        // One lane per partition keeps each partition (and so each key) in
        // order; a full lane pauses its partitions instead of holding up the
        // others (see `lanes`).
        let mut spread = lanes::Lanes::new(queues);
        loop {
            if spread.drain(&consumer).is_err() {
                break;
            }
            let next = if spread.any_waiting() {
                tokio::select! {
                    next = kafka::next_message(&consumer, &shutdown) => next,
                    () = tokio::time::sleep(ROOM_CHECK) => continue,
                }
            } else {
                kafka::next_message(&consumer, &shutdown).await
            };
            let Some(message) = next else { break };
            if spread.dispatch(&consumer, message).is_err() {
                // A lane stopped (it abandoned a message on shutdown).
                break;
            }
        }
        drop(spread);
        while running.join_next().await.is_some() {}
        // Send the offsets stored since the last automatic commit.
        if let Err(error) = consumer.commit_consumer_state(rdkafka::consumer::CommitMode::Sync) {
            tracing::debug!(%error, "final offset commit");
        }
    }

    /// One lane: its messages in order, each offset stored once the message
    /// reached its end. The messages waiting in the queue when the lane is
    /// free are taken together, up to `max_batch`, and applied as one batch
    /// (see [`batch`]); a lane never waits to fill a batch, so a lone command
    /// costs no latency. A message of a partition this instance lost in a
    /// rebalance may still be handled here; its new owner gets it too, and
    /// the inbox makes the second handling a no-op.
    async fn lane(
        self,
        mut queue: mpsc::Receiver<OwnedMessage>,
        consumer: Arc<kafka::Consumer>,
        shutdown: CancellationToken,
    ) {
        let max_batch = self.max_batch.max(1);
        let mut batch = Vec::with_capacity(max_batch);
        while let Some(message) = queue.recv().await {
            batch.push(message);
            while batch.len() < max_batch {
                match queue.try_recv() {
                    Ok(message) => batch.push(message),
                    Err(_) => break,
                }
            }
            let done = self.handle_batch(&batch, &shutdown).await;
            for message in &batch[..done] {
                if let Err(error) = consumer.store_offset(message.topic(), message.partition(), message.offset()) {
                    tracing::warn!(%error, "cannot store offset; the message may be redelivered");
                }
            }
            if let Some(message) = batch.get(done) {
                // Storing this offset would skip a command that has not taken
                // effect; left unstored, the partition's next owner gets it.
                tracing::info!(
                    partition = message.partition(),
                    offset = message.offset(),
                    "shutdown before the message was handled; it will be redelivered"
                );
                return;
            }
            batch.clear();
        }
    }
}

/// The span of one command's handling: a CONSUMER span, a child of the
/// publish of `message`, whose envelope is `envelope`.
pub(super) fn command_span(message: &OwnedMessage, envelope: &Envelope) -> tracing::Span {
    onceflow_runtime::consumer_span!(
        "process_command",
        message,
        envelope,
        message_id = %envelope.message_id,
        tenant = %envelope.tenant,
        command_type = %envelope.message_type,
    )
}
