//! The consume loop every consumer of a topic runs its records through, one
//! at a time ([`consume_parking`]) or in batches
//! ([`consume_parking_batched`]): each record is applied, parked, or waited
//! on, and its offset stored only once it has ended.

use std::time::Duration;

use rdkafka::{Message, consumer::Consumer as _, message::OwnedMessage};
use tokio_util::sync::CancellationToken;

use super::Consumer;
use crate::{
    failure::{Backoff, Failure},
    parking::Parking,
};

/// The next message of `consumer`, or `None` once `shutdown` is cancelled.
///
/// Consumer errors (the broker unreachable, a rebalance in progress) are
/// logged and waited out with a backoff that grows to 5 s, so a broker outage
/// is not a busy loop of errors.
pub async fn next_message(consumer: &Consumer, shutdown: &CancellationToken) -> Option<OwnedMessage> {
    let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(5));
    loop {
        let received = tokio::select! {
            () = shutdown.cancelled() => return None,
            received = consumer.recv() => received,
        };
        match received {
            Ok(message) => return Some(message.detach()),
            Err(error) => {
                tracing::warn!(%error, "consumer error; waiting before the next poll");
                if !backoff.wait(shutdown).await {
                    return None;
                }
            }
        }
    }
}

/// Why a consumer's handler could not apply a record, and what kind of
/// failure that is: [`Failure::Data`] ends the record (parked, or refused),
/// [`Failure::Outage`] makes the consumer wait and try the same record again.
#[derive(Debug, thiserror::Error)]
#[error("{reason}")]
pub struct RecordError {
    pub failure: Failure,
    pub reason: String,
}

impl RecordError {
    /// The record itself is unusable (undecodable, invalid, refused by the database).
    pub fn data(reason: impl Into<String>) -> Self {
        Self { failure: Failure::Data, reason: reason.into() }
    }
}

impl From<sqlx::Error> for RecordError {
    fn from(error: sqlx::Error) -> Self {
        Self { failure: Failure::of_database(&error), reason: error.to_string() }
    }
}

/// Feed every message of `consumer` to `handle`, one at a time, until
/// `shutdown`, storing each message's offset once it has ended; a record that
/// can never be applied is parked in `parking` for an operator (see
/// [`crate::parking`]) and consumption moves on.
///
/// The rule every consumer of a record follows (guarantee G8):
/// - `Ok`: applied (or deliberately ignored by `handle`); next.
/// - [`Failure::Data`]: the record is parked (topic, partition, offset, key,
///   headers, payload and the error), logged and counted
///   (`onceflow_records_parked_total`); next. An undecodable record is
///   `handle`'s data error like any other.
/// - [`Failure::Outage`]: wait with [`Backoff`] and try the same record again,
///   with no count bound; nothing is parked, so an outage destroys no work.
pub async fn consume_parking<F, Fut>(
    consumer: &Consumer,
    shutdown: &CancellationToken,
    parking: &Parking,
    mut handle: F,
) where
    F: FnMut(OwnedMessage) -> Fut,
    Fut: std::future::Future<Output = std::result::Result<(), RecordError>>,
{
    while let Some(message) = next_message(consumer, shutdown).await {
        if !end_one(&message, shutdown, parking, &mut handle).await {
            return;
        }
        store_offset(consumer, &message);
    }
}

/// Why a batch was not applied: the error, and the position of the message
/// it came from.
#[derive(Debug)]
pub struct BatchError {
    pub position: usize,
    pub error: RecordError,
}

impl BatchError {
    /// An error of the message at `position`.
    pub fn at(position: usize) -> impl Fn(RecordError) -> Self {
        move |error| Self { position, error }
    }

    /// An error of the batch's transaction itself (begin, lock, commit),
    /// charged to its first message: that one is tried alone, which sorts
    /// an outage from a record of its own that cannot be applied.
    pub fn whole(error: sqlx::Error) -> Self {
        Self { position: 0, error: error.into() }
    }

    /// Every message of a batch decoded, or the error of the first that is not.
    pub fn decode_all<T>(
        messages: &[OwnedMessage],
        decode: impl Fn(&OwnedMessage) -> std::result::Result<T, RecordError>,
    ) -> std::result::Result<Vec<T>, Self> {
        messages.iter().enumerate().map(|(position, message)| decode(message).map_err(Self::at(position))).collect()
    }
}

/// [`consume_parking`] in batches, for a consumer whose records cost a
/// commit each: the messages ready when the consumer is free (up to
/// `max_batch`; it never waits to fill a batch, so a lone record costs no
/// latency) go to `handle_batch` together, which applies all of them in one
/// transaction or none. A batch that fails on a data error of one message is
/// split there: the messages before it are batched again, it goes alone
/// through `handle`, which ends it by the rule of [`consume_parking`]
/// (parked), and the rest are batched again; any other failure (an outage)
/// sends the rest one at a time through `handle`, which waits it out. A
/// batch changes how fast records end, never how.
pub async fn consume_parking_batched<B, BFut, F, Fut>(
    consumer: &Consumer,
    shutdown: &CancellationToken,
    parking: &Parking,
    max_batch: usize,
    mut handle_batch: B,
    mut handle: F,
) where
    B: FnMut(Vec<OwnedMessage>) -> BFut,
    BFut: std::future::Future<Output = std::result::Result<(), BatchError>>,
    F: FnMut(OwnedMessage) -> Fut,
    Fut: std::future::Future<Output = std::result::Result<(), RecordError>>,
{
    let max_batch = max_batch.max(1);
    while let Some(first) = next_message(consumer, shutdown).await {
        let mut batch = vec![first];
        while batch.len() < max_batch {
            // Only what librdkafka already holds: polled once, never awaited.
            match futures::FutureExt::now_or_never(consumer.recv()) {
                Some(Ok(message)) => batch.push(message.detach()),
                Some(Err(error)) => {
                    tracing::warn!(%error, "consumer error while taking a batch");
                    break;
                }
                None => break,
            }
        }
        let mut rest = batch.as_slice();
        while !rest.is_empty() {
            let alone = if rest.len() == 1 {
                rest.len()
            } else {
                match handle_batch(rest.to_vec()).await {
                    Ok(()) => {
                        rest.iter().for_each(|message| store_offset(consumer, message));
                        break;
                    }
                    Err(BatchError { position, error }) => {
                        tracing::info!(error = %error.reason, size = rest.len(), position, "batch not applied");
                        metrics::counter!("onceflow_record_batch_fallbacks_total", "consumer" => parking.consumer())
                            .increment(1);
                        if !error.failure.is_data() || position >= rest.len() {
                            rest.len()
                        } else {
                            // The messages before the culprit met nothing wrong.
                            let before = &rest[..position];
                            if before.len() > 1 && handle_batch(before.to_vec()).await.is_ok() {
                                before.iter().for_each(|message| store_offset(consumer, message));
                                rest = &rest[position..];
                                1
                            } else {
                                position + 1
                            }
                        }
                    }
                }
            };
            for message in &rest[..alone] {
                if !end_one(message, shutdown, parking, &mut handle).await {
                    return;
                }
                store_offset(consumer, message);
            }
            rest = &rest[alone..];
        }
    }
}

/// Bring `message` to its end with `handle` (applied, or parked), waiting out
/// outages; `false` if `shutdown` came first (its offset must not be stored).
async fn end_one<F, Fut>(
    message: &OwnedMessage,
    shutdown: &CancellationToken,
    parking: &Parking,
    handle: &mut F,
) -> bool
where
    F: FnMut(OwnedMessage) -> Fut,
    Fut: std::future::Future<Output = std::result::Result<(), RecordError>>,
{
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    loop {
        let error = match handle(message.clone()).await {
            Ok(()) => return true,
            Err(error) => error,
        };
        if error.failure.is_data() {
            return end_record(message, &error, parking, shutdown).await;
        }
        tracing::warn!(
            error = %error.reason,
            topic = message.topic(),
            partition = message.partition(),
            offset = message.offset(),
            "cannot handle the record while a dependency is down; waiting"
        );
        if !backoff.wait(shutdown).await {
            return false;
        }
    }
}

fn store_offset(consumer: &Consumer, message: &OwnedMessage) {
    if let Err(error) = consumer.store_offset(message.topic(), message.partition(), message.offset()) {
        tracing::warn!(%error, "cannot store offset; the message may be redelivered");
    }
}

/// End a record that can never be applied: park it. `false` if `shutdown`
/// came while parking waited on an outage.
async fn end_record(
    message: &OwnedMessage,
    error: &RecordError,
    parking: &Parking,
    shutdown: &CancellationToken,
) -> bool {
    let (topic, partition, offset) = (message.topic(), message.partition(), message.offset());
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    loop {
        match parking.park(message, &error.reason).await {
            Ok(id) => {
                tracing::error!(
                    error = %error.reason,
                    topic,
                    partition,
                    offset,
                    parked_id = id,
                    consumer = parking.consumer(),
                    "record can never be applied; parked for an operator"
                );
                metrics::counter!("onceflow_records_parked_total", "consumer" => parking.consumer()).increment(1);
                return true;
            }
            // Parking writes only bytes and sanitised text: a data error here
            // is unexpected, and must not stall the topic either.
            Err(park_error) if Failure::of_database(&park_error).is_data() => {
                tracing::error!(error = %error.reason, %park_error, topic, partition, offset, "record cannot be parked; refused");
                metrics::counter!("onceflow_records_refused_total", "topic" => topic.to_owned()).increment(1);
                return true;
            }
            Err(park_error) => {
                tracing::warn!(%park_error, topic, partition, offset, "cannot park the record yet; waiting");
                if !backoff.wait(shutdown).await {
                    return false;
                }
            }
        }
    }
}
