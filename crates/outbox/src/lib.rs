//! The transactional outbox, shared by ingest and the processor.
//!
//! A service writes a message with [`enqueue`] inside the same PostgreSQL
//! transaction as the change that produced it, so the message exists if and
//! only if the change committed. The [`Relay`] then publishes committed rows to
//! Kafka and deletes them once the broker has acknowledged them:
//!
//! ```text
//! tx{change, enqueue} ──commit──▶ onceflow_outbox ──NOTIFY──▶ Relay ──idempotent producer──▶ Kafka
//!                                        ▲                      │
//!                                        └── DELETE acknowledged ┘
//! ```
//!
//! - Delivery is at least once: a relay that dies after publishing and before
//!   deleting publishes those rows again, with the same `message-id`, and
//!   consumers dedup on it.
//! - Order per key is kept whatever fails: one relay is active per database
//!   (a PostgreSQL advisory lock; others stand by), it reads rows in commit-id
//!   order, and it hands a key's next row to the producer only once the
//!   previous one is acknowledged, so a failed row holds back its key's later
//!   rows, not other keys' (see `relay`'s docs).
//! - A row the broker refuses for good is moved to `onceflow_outbox_parked`
//!   for an operator; an outage only makes the relay wait.
//! - The relay wakes on `LISTEN/NOTIFY` and polls only as a fallback for a
//!   lost notification.

mod relay;

pub use relay::{Relay, RelayConfig};

use onceflow_contracts::Envelope;
use sqlx::{PgConnection, migrate::Migrator};

/// The outbox table's migrations, applied beside each service's own.
pub fn migrator() -> Migrator {
    sqlx::migrate!("./migrations")
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    /// Rows left in the outbox for the next round: each failed, or waits
    /// behind a failed row of its key.
    #[error("{count} outbox messages were not acknowledged by the broker")]
    Undelivered { count: usize },
    /// The relay's lease (its advisory lock session) is gone or unverifiable:
    /// it stops leading at once, so two relays never publish side by side.
    #[error("outbox relay lease lost: {0}")]
    LeaseLost(String),
    /// Refused where the message is made: a row the broker would refuse
    /// forever must never reach the outbox, where it would block the relay.
    #[error("the message has {size} bytes; at most {limit} fit in one Kafka record")]
    TooLarge { size: usize, limit: usize },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A message waiting to be published.
#[derive(Debug, Clone)]
pub struct OutboxMessage {
    pub topic: String,
    /// The Kafka record key: records with one key land on one partition, in order.
    pub key: Option<String>,
    pub payload: Vec<u8>,
    pub envelope: Envelope,
    /// Headers after the envelope's (a dead letter's error and origin).
    pub headers: Vec<(String, String)>,
}

/// The most bytes (payload, key and header names and values) one outbox
/// message may have. The producers' `message.max.bytes`
/// ([`onceflow_runtime::kafka::MAX_RECORD_BYTES`], which the consumers can
/// fetch) counts the record's framing too; this leaves room for it.
pub const MAX_MESSAGE_BYTES: usize = 900_000;
const _: () = assert!(MAX_MESSAGE_BYTES + 64 * 1024 <= onceflow_runtime::kafka::MAX_RECORD_BYTES);

impl OutboxMessage {
    /// The bytes this message puts in a Kafka record, framing aside.
    pub fn size(&self) -> usize {
        let headers: usize =
            self.envelope.to_headers().iter().map(|(name, value)| name.len() + value.len()).sum::<usize>()
                + self.headers.iter().map(|(name, value)| name.len() + value.len()).sum::<usize>();
        self.payload.len() + self.key.as_ref().map_or(0, String::len) + headers
    }
}

/// Add `message` to the outbox inside the caller's transaction; a message
/// larger than [`MAX_MESSAGE_BYTES`] is refused with [`Error::TooLarge`] and
/// nothing is written.
pub async fn enqueue(tx: &mut PgConnection, message: &OutboxMessage) -> Result<()> {
    enqueue_all(tx, std::slice::from_ref(message)).await
}

/// Add `messages` to the outbox, in order, inside the caller's transaction,
/// in one statement; if any is larger than [`MAX_MESSAGE_BYTES`], none is
/// written and [`Error::TooLarge`] tells the first such size.
pub async fn enqueue_all(tx: &mut PgConnection, messages: &[OutboxMessage]) -> Result<()> {
    if let Some(size) = messages.iter().map(OutboxMessage::size).find(|size| *size > MAX_MESSAGE_BYTES) {
        return Err(Error::TooLarge { size, limit: MAX_MESSAGE_BYTES });
    }
    if messages.is_empty() {
        return Ok(());
    }
    let topics: Vec<&str> = messages.iter().map(|m| m.topic.as_str()).collect();
    let keys: Vec<Option<&str>> = messages.iter().map(|m| m.key.as_deref()).collect();
    let payloads: Vec<&[u8]> = messages.iter().map(|m| m.payload.as_slice()).collect();
    let headers: Vec<serde_json::Value> = messages
        .iter()
        .map(|m| {
            let envelope = m.envelope.to_headers().into_iter().map(|(name, value)| serde_json::json!([name, value]));
            let further = m.headers.iter().map(|(name, value)| serde_json::json!([name, value]));
            serde_json::Value::Array(envelope.chain(further).collect())
        })
        .collect();
    // Ordered by position, so the ids (and the relay's publishing order)
    // follow the order of `messages`.
    sqlx::query(
        "INSERT INTO onceflow_outbox (topic, message_key, payload, headers)
         SELECT topic, message_key, payload, headers
         FROM unnest($1::text[], $2::text[], $3::bytea[], $4::jsonb[]) WITH ORDINALITY
             AS batch(topic, message_key, payload, headers, position)
         ORDER BY position",
    )
    .bind(&topics)
    .bind(&keys)
    .bind(&payloads)
    .bind(&headers)
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// How many messages wait in the outbox (for load shedding and metrics).
pub async fn backlog(pool: &sqlx::PgPool) -> Result<i64> {
    Ok(sqlx::query_scalar("SELECT count(*) FROM onceflow_outbox").fetch_one(pool).await?)
}

/// Keep `backlog` (and the `onceflow_outbox_backlog` gauge) equal to the
/// number of unpublished outbox rows, refreshed every `interval` until
/// `shutdown`: requests read the number instead of counting rows.
pub async fn watch_backlog(
    pool: sqlx::PgPool,
    backlog: std::sync::Arc<std::sync::atomic::AtomicI64>,
    interval: std::time::Duration,
    shutdown: tokio_util::sync::CancellationToken,
) {
    loop {
        match self::backlog(&pool).await {
            Ok(rows) => {
                backlog.store(rows, std::sync::atomic::Ordering::Relaxed);
                metrics::gauge!("onceflow_outbox_backlog").set(rows as f64);
            }
            Err(error) => tracing::warn!(%error, "cannot read the outbox backlog"),
        }
        if !onceflow_runtime::shutdown::pause(interval, &shutdown).await {
            return;
        }
    }
}
