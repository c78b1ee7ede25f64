//! The relay: publishes committed outbox rows to Kafka, one active instance
//! per database.
//!
//! The active relay is the one holding a session-level advisory lock on a
//! dedicated connection (the lease). A lock dies with its session: if that
//! connection is cut (a terminated backend, a network partition, a database
//! restart), another relay takes the lock at its next try. So the leader
//! verifies the lease before every batch, on the lock connection itself (it
//! still answers, and `pg_locks` still shows this session granted the lock),
//! and stops leading at once when it does not: at most the batch in flight
//! when the lease was lost can also be published by the next leader, and
//! consumers dedup it by `message-id`.
//!
//! Each row published is an OpenTelemetry PRODUCER span (`send <topic>`, the
//! messaging conventions' attributes, the partition and offset once the
//! broker acknowledged it), a child of the trace context the row was written
//! with. The record's `traceparent` names that span, not the writer's, so
//! whoever consumes the record becomes the publish's child.

use std::time::Duration;

use futures::future::join_all;
use onceflow_contracts::envelope::{CORRELATION_ID, MESSAGE_ID, TRACEPARENT, TRACESTATE};
use onceflow_runtime::telemetry;
use rdkafka::{
    message::{Header, OwnedHeaders},
    producer::{FutureProducer, FutureRecord},
};
use sqlx::{PgPool, Row as _, pool::PoolConnection, postgres::PgListener};
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use crate::Result;

/// The channel the outbox trigger notifies.
const CHANNEL: &str = "onceflow_outbox";
/// Advisory-lock key that elects the active relay of a database ("oflw").
const LEADER_LOCK: i64 = 0x6f66_6c77;
/// How long a lease check may take before the lease counts as lost: a lock
/// connection that does not answer may already have lost its session.
const LEASE_CHECK_TIMEOUT: Duration = Duration::from_secs(5);

/// How the relay paces itself.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// Rows read, published and deleted per round; bounds memory and the size
    /// of one `DELETE`.
    pub batch_size: i64,
    /// Fallback poll when no notification arrives (a lost `NOTIFY`, a listener
    /// reconnect), and how often a standby relay retries the lock.
    pub poll_interval: Duration,
}

impl Default for RelayConfig {
    fn default() -> Self {
        Self { batch_size: 500, poll_interval: Duration::from_secs(1) }
    }
}

/// Publishes the outbox of one database.
#[derive(Clone)]
pub struct Relay {
    pool: PgPool,
    producer: FutureProducer,
    config: RelayConfig,
}

struct Row {
    id: i64,
    topic: String,
    key: Option<String>,
    payload: Vec<u8>,
    headers: Vec<(String, String)>,
    age: Duration,
}

impl Row {
    /// The value of header `name`, as the row was written.
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(key, _)| key == name).map(|(_, value)| value.as_str())
    }

    /// The PRODUCER span of this row's publish, a child of the context the
    /// row was written in; partition and offset are recorded on acknowledgement.
    fn producer_span(&self) -> tracing::Span {
        let span = tracing::info_span!(
            "publish",
            otel.kind = "producer",
            otel.name = %format!("send {}", self.topic),
            otel.status_code = tracing::field::Empty,
            otel.status_message = tracing::field::Empty,
            messaging.system = "kafka",
            "messaging.operation.type" = "send",
            messaging.operation.name = "send",
            messaging.destination.name = %self.topic,
            messaging.message.id = self.header(MESSAGE_ID),
            messaging.kafka.message.key = self.key.as_deref(),
            messaging.destination.partition.id = tracing::field::Empty,
            messaging.kafka.offset = tracing::field::Empty,
            correlation_id = self.header(CORRELATION_ID),
            outbox_id = self.id,
        );
        telemetry::set_parent_from(&span, self.header(TRACEPARENT), self.header(TRACESTATE));
        span
    }

    /// The headers to publish: the row's, with the trace context replaced by
    /// `span`'s (when it has one), so the record's consumers are its children.
    fn headers_naming(&self, span: &tracing::Span) -> Vec<(&str, String)> {
        let mut headers: Vec<(&str, String)> =
            self.headers.iter().map(|(key, value)| (key.as_str(), value.clone())).collect();
        let (Some(traceparent), tracestate) = telemetry::trace_context_of(span) else { return headers };
        headers.retain(|(key, _)| *key != TRACEPARENT && *key != TRACESTATE);
        headers.push((TRACEPARENT, traceparent));
        headers.extend(tracestate.map(|state| (TRACESTATE, state)));
        headers
    }
}

impl Relay {
    pub fn new(pool: PgPool, producer: FutureProducer, config: RelayConfig) -> Self {
        Self { pool, producer, config }
    }

    /// Run until `shutdown`: stand by until this instance holds the lock, then
    /// publish whenever rows are committed. Errors are logged and retried
    /// after a pause; the relay never gives up while the service runs.
    pub async fn run(self, shutdown: CancellationToken) {
        while !shutdown.is_cancelled() {
            if let Err(error) = self.lead(&shutdown).await {
                tracing::warn!(%error, "outbox relay interrupted; retrying");
            }
            tokio::select! {
                () = shutdown.cancelled() => {}
                () = tokio::time::sleep(self.config.poll_interval) => {}
            }
        }
    }

    /// One term as the active relay: returns when the lock is not ours, the
    /// lock connection is lost, or on shutdown.
    async fn lead(&self, shutdown: &CancellationToken) -> Result<()> {
        let mut lock = self.pool.acquire().await?;
        let is_leader: bool =
            sqlx::query_scalar("SELECT pg_try_advisory_lock($1)").bind(LEADER_LOCK).fetch_one(&mut *lock).await?;
        if !is_leader {
            return Ok(());
        }
        tracing::info!("this outbox relay is now active");
        let result = self.publish_while_leading(&mut lock, shutdown).await;
        // Release explicitly: the connection goes back to the pool, and a
        // session lock would otherwise outlive this term.
        let _ = sqlx::query("SELECT pg_advisory_unlock($1)").bind(LEADER_LOCK).execute(&mut *lock).await;
        result
    }

    async fn publish_while_leading(
        &self,
        lock: &mut PoolConnection<sqlx::Postgres>,
        shutdown: &CancellationToken,
    ) -> Result<()> {
        let mut listener = PgListener::connect_with(&self.pool).await?;
        listener.listen(CHANNEL).await?;
        loop {
            // Drain everything committed so far, batch by batch, each only
            // while the lease holds.
            loop {
                verify_lease(lock).await?;
                if self.publish_batch().await? < self.config.batch_size as usize {
                    break;
                }
            }
            tokio::select! {
                () = shutdown.cancelled() => return Ok(()),
                notification = listener.recv() => { notification?; }
                // Idle: verify the lease on the fallback poll too.
                () = tokio::time::sleep(self.config.poll_interval) => {}
            }
        }
    }

    /// Publish up to one batch; returns how many rows were published.
    /// Only called right after [`verify_lease`].
    async fn publish_batch(&self) -> Result<usize> {
        let rows = self.read_batch().await?;
        if rows.is_empty() {
            return Ok(0);
        }
        // Hand every record to the producer first, then wait for the
        // acknowledgements: the broker sees the batch pipelined, in order.
        let spans: Vec<tracing::Span> = rows.iter().map(Row::producer_span).collect();
        let deliveries = rows.iter().zip(&spans).map(|(row, span)| {
            let headers = row.headers_naming(span).into_iter().fold(OwnedHeaders::new(), |headers, (key, value)| {
                headers.insert(Header { key, value: Some(value.as_bytes()) })
            });
            let mut record = FutureRecord::to(&row.topic).payload(&row.payload).headers(headers);
            if let Some(key) = &row.key {
                record = record.key(key);
            }
            // Waits (up to the timeout) while librdkafka's bounded queue is full.
            self.producer.send(record, Duration::from_secs(30)).instrument(span.clone())
        });
        let outcomes = join_all(deliveries).await;
        let mut published = Vec::with_capacity(rows.len());
        for ((row, span), outcome) in rows.iter().zip(&spans).zip(outcomes) {
            let _in_span = span.enter();
            match outcome {
                Ok(delivery) => {
                    span.record("messaging.destination.partition.id", delivery.partition.to_string());
                    span.record("messaging.kafka.offset", delivery.offset);
                    published.push(row.id);
                    metrics::histogram!("onceflow_outbox_commit_to_publish_seconds").record(row.age.as_secs_f64());
                }
                // The idempotent producer fails every later record of the same
                // partition too, so keeping this row keeps the key's order.
                Err((error, _)) => {
                    span.record("otel.status_code", "ERROR");
                    span.record("otel.status_message", error.to_string());
                    tracing::warn!(%error, id = row.id, topic = %row.topic, "publish failed; will retry");
                }
            }
        }
        // The publish spans end here, at the acknowledgement, before the rows'
        // deletion (which is the relay's, not the publish's).
        drop(spans);
        sqlx::query("DELETE FROM onceflow_outbox WHERE id = ANY($1)").bind(&published).execute(&self.pool).await?;
        metrics::counter!("onceflow_outbox_published_total").increment(published.len() as u64);
        if published.len() < rows.len() {
            return Err(crate::Error::Undelivered { count: rows.len() - published.len() });
        }
        tracing::debug!(count = published.len(), "outbox batch published");
        Ok(published.len())
    }

    async fn read_batch(&self) -> Result<Vec<Row>> {
        let rows = sqlx::query(
            "SELECT id, topic, message_key, payload, headers,
                    extract(epoch FROM clock_timestamp() - created_at)::float8 AS age
             FROM onceflow_outbox ORDER BY id LIMIT $1",
        )
        .bind(self.config.batch_size)
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(|row| {
                let headers: serde_json::Value = row.try_get("headers")?;
                let age: f64 = row.try_get("age")?;
                Ok(Row {
                    id: row.try_get("id")?,
                    topic: row.try_get("topic")?,
                    key: row.try_get("message_key")?,
                    payload: row.try_get("payload")?,
                    headers: serde_json::from_value(headers).unwrap_or_default(),
                    age: Duration::from_secs_f64(age.max(0.0)),
                })
            })
            .collect()
    }
}

/// Whether `lock`, the leader's lock connection, still holds the lease: it
/// answers within [`LEASE_CHECK_TIMEOUT`] and `pg_locks` shows its session
/// granted the advisory lock. `Err` (leading must stop) otherwise.
async fn verify_lease(lock: &mut PoolConnection<sqlx::Postgres>) -> Result<()> {
    // A bigint advisory key is held as classid (high 32 bits), objid (low 32
    // bits), objsubid 1.
    let check = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM pg_locks
                         WHERE locktype = 'advisory' AND pid = pg_backend_pid() AND granted
                           AND classid = ($1 >> 32)::oid AND objid = ($1 & 4294967295)::oid AND objsubid = 1)",
    )
    .bind(LEADER_LOCK)
    .fetch_one(&mut **lock);
    match tokio::time::timeout(LEASE_CHECK_TIMEOUT, check).await {
        Ok(Ok(true)) => Ok(()),
        Ok(Ok(false)) => {
            Err(crate::Error::LeaseLost("the lock connection no longer holds the advisory lock".to_owned()))
        }
        Ok(Err(error)) => Err(crate::Error::LeaseLost(format!("the lock connection failed: {error}"))),
        Err(_) => {
            Err(crate::Error::LeaseLost(format!("the lock connection did not answer within {LEASE_CHECK_TIMEOUT:?}")))
        }
    }
}
