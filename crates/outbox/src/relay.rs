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
//! consumers dedup it by `message-id`. (The old leader may go on handing over
//! that batch's rows for a while, key by key as below; each leader publishes
//! a key's rows in order, so the first copy of each record is still in
//! order, whatever the interleaving.)
//!
//! # Per-key order whatever fails
//!
//! A key's rows must reach the topic in outbox-id order (G9). The idempotent
//! producer keeps a partition's records in order across its own retries, but
//! not across a record it gives up on: a record that times out
//! (`message.timeout.ms`) or that the broker refuses can be followed by a later
//! record of the same partition that is acknowledged (librdkafka documents
//! these gaps), and republishing the failed row afterwards cannot put it back
//! in front. Only a relay that never hands the producer a key's next row while
//! an earlier row of that key is unacknowledged is safe from that; but that
//! costs a round trip to the broker per row of a key, and a key with many
//! rows waiting (one busy account) would then drain at one row per round
//! trip: measured on the local stack's broker, 16 keys drained at ~150 rows/s
//! where pipelining drains thousands.
//!
//! So the relay has two modes. While the broker acknowledges everything (the
//! ordinary case), a round hands the whole batch to the producer at once, in
//! id order, and the idempotent producer keeps it in order. Once a round meets
//! a failure (an outage begins), the relay turns careful: each round splits
//! its batch into one chain per (topic, key), in id order, the chains run
//! side by side, and each hands over its key's next row only when the previous
//! one is acknowledged; a row that fails stops its chain, and it and its key's
//! later rows stay in the outbox for a later round. The relay stays careful
//! until a round goes through without a failure. The gaps the issue names
//! happen after a long outage (records timing out while others are
//! delivered, the broker coming and going); those rounds are careful. The one
//! round that meets the first failure was pipelined: a later row of a key
//! acknowledged there after an earlier one failed would be out of order. The
//! records of a round time out together (an outage fails them all), so this
//! needs a broker that refuses one request of a partition and accepts the
//! next within one round; the relay detects it (`onceflow_outbox_order_breaks_total`
//! and an error naming the key) rather than let it pass unseen.
//!
//! Other levers were weighed and left. librdkafka's
//! `enable.gapless.guarantee` does not cover timed-out records and turns a gap
//! into a fatal error of the whole producer, which the processor shares. A
//! producer that never times records out (`message.timeout.ms` 0) would still
//! leave refused records as gaps, and would make a round wait without bound,
//! with neither the lease nor shutdown checked meanwhile. So the producer
//! keeps its finite timeout: during an outage every round fails after it, the
//! relay keeps the rows and tries again (it waits for the broker, and
//! dead-letters nothing), and the lease is verified before each round.
//!
//! Errors are of two kinds (G8). An outage, a timeout or a topic-wide
//! refusal (permissions, an unknown topic) is retried, as above, however
//! long it lasts. A record the broker or librdkafka refuses for what the row
//! holds (an invalid record, one too large for the topic) would be refused
//! forever and would hold up its key's later rows for good (and, once they
//! filled a batch, everyone's): such a row ends at once, moved with its error
//! to `onceflow_outbox_parked` for an operator (`onceflow_outbox_parked_total`
//! counts them), and its chain goes on with the key's next row. That row
//! never reached the topic, so what follows it is still in order; an
//! operator who puts it back into the outbox has it published after them.
//!
//! Each row published is an OpenTelemetry PRODUCER span (`send <topic>`, the
//! messaging conventions' attributes, the partition and offset once the
//! broker acknowledged it), a child of the trace context the row was written
//! with. The record's `traceparent` names that span, not the writer's, so
//! whoever consumes the record becomes the publish's child.

use std::{
    collections::{HashMap, hash_map::Entry},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use futures::future::join_all;
use onceflow_contracts::envelope::{CORRELATION_ID, MESSAGE_ID, TRACEPARENT, TRACESTATE};
use onceflow_runtime::telemetry;
use rdkafka::{
    error::{KafkaError, RDKafkaErrorCode},
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
    /// Whether the last round met a failure: rounds are then published key
    /// by key (see the module's docs).
    careful: Arc<AtomicBool>,
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
        Self { pool, producer, config, careful: Arc::default() }
    }

    /// Run until `shutdown`: stand by until this instance holds the lock, then
    /// publish whenever rows are committed. Errors are logged and retried
    /// after a pause; the relay never gives up while the service runs.
    pub async fn run(self, shutdown: CancellationToken) {
        // At 0 from the start: a counter whose series appeared only at its
        // first break would show Prometheus no increase, and its alert
        // (`OnceflowOutboxOrderBroken`) would miss that break.
        metrics::counter!("onceflow_outbox_order_breaks_total").increment(0);
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

    /// Publish up to one batch, one chain per key (see the module docs);
    /// returns how many rows it read. Only called right after
    /// [`verify_lease`].
    async fn publish_batch(&self) -> Result<usize> {
        let rows = self.read_batch().await?;
        if rows.is_empty() {
            return Ok(0);
        }
        let careful = self.careful.load(Ordering::Relaxed);
        // Pipelined: every row a chain of its own, all handed over at once
        // (`join_all` polls them in id order, so the producer gets them so).
        let chains = if careful { chains(&rows) } else { rows.iter().map(|row| vec![row]).collect() };
        let outcomes = join_all(chains.into_iter().map(|chain| self.publish_chain(chain))).await;
        if !careful {
            count_order_breaks(&rows, &outcomes);
        }
        let mut published = Vec::with_capacity(rows.len());
        let (mut parked, mut errors, mut kept) = (Vec::new(), Vec::new(), 0);
        for outcome in outcomes {
            published.extend(outcome.published);
            for (id, error) in outcome.parked {
                parked.push(id);
                errors.push(error);
            }
            kept += outcome.kept;
        }
        sqlx::query("DELETE FROM onceflow_outbox WHERE id = ANY($1)").bind(&published).execute(&self.pool).await?;
        metrics::counter!("onceflow_outbox_published_total").increment(published.len() as u64);
        if !parked.is_empty() {
            self.park(&parked, &errors).await?;
        }
        self.careful.store(kept > 0, Ordering::Relaxed);
        if kept > 0 {
            return Err(crate::Error::Undelivered { count: kept });
        }
        tracing::debug!(count = published.len(), parked = parked.len(), "outbox batch published");
        Ok(rows.len())
    }

    /// Publish `chain`, one key's rows in id order, each only once the
    /// previous one is acknowledged (or parked); stops at the first row that
    /// may still succeed later, keeping it and the rest.
    async fn publish_chain(&self, chain: Vec<&Row>) -> ChainOutcome {
        let mut outcome = ChainOutcome { published: Vec::new(), parked: Vec::new(), kept: 0 };
        for (done, row) in chain.iter().enumerate() {
            let span = row.producer_span();
            let headers = row.headers_naming(&span).into_iter().fold(OwnedHeaders::new(), |headers, (key, value)| {
                headers.insert(Header { key, value: Some(value.as_bytes()) })
            });
            let mut record = FutureRecord::to(&row.topic).payload(&row.payload).headers(headers);
            if let Some(key) = &row.key {
                record = record.key(key);
            }
            // Waits (up to the timeout) while librdkafka's bounded queue is full.
            let delivery = self.producer.send(record, Duration::from_secs(30)).instrument(span.clone()).await;
            // The publish span ends with this iteration, at the
            // acknowledgement, before the row's deletion (the relay's work).
            let _in_span = span.enter();
            match delivery {
                Ok(delivery) => {
                    span.record("messaging.destination.partition.id", delivery.partition.to_string());
                    span.record("messaging.kafka.offset", delivery.offset);
                    outcome.published.push(row.id);
                    metrics::histogram!("onceflow_outbox_commit_to_publish_seconds").record(row.age.as_secs_f64());
                }
                Err((error, _)) => {
                    span.record("otel.status_code", "ERROR");
                    span.record("otel.status_message", error.to_string());
                    if refused_for_good(&error) {
                        tracing::error!(
                            %error,
                            id = row.id,
                            topic = %row.topic,
                            "the broker refuses this outbox row for good; parked for an operator"
                        );
                        outcome.parked.push((row.id, error.to_string()));
                        continue;
                    }
                    tracing::warn!(
                        %error,
                        id = row.id,
                        topic = %row.topic,
                        held_back = chain.len() - done - 1,
                        "publish failed; it and its key's later rows will be retried"
                    );
                    outcome.kept = chain.len() - done;
                    break;
                }
            }
        }
        outcome
    }

    /// Move the rows `ids` (refused with `errors`) to `onceflow_outbox_parked`.
    async fn park(&self, ids: &[i64], errors: &[String]) -> Result<()> {
        sqlx::query(
            "WITH parked AS (DELETE FROM onceflow_outbox WHERE id = ANY($1) RETURNING *)
             INSERT INTO onceflow_outbox_parked (id, topic, message_key, payload, headers, created_at, error)
             SELECT parked.id, topic, message_key, payload, headers, created_at, refusal.error
             FROM parked JOIN unnest($1::bigint[], $2::text[]) AS refusal(id, error) USING (id)",
        )
        .bind(ids)
        .bind(errors)
        .execute(&self.pool)
        .await?;
        metrics::counter!("onceflow_outbox_parked_total").increment(ids.len() as u64);
        Ok(())
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

/// What became of one chain's rows.
struct ChainOutcome {
    published: Vec<i64>,
    /// Refused for good, with the error: moved to `onceflow_outbox_parked`.
    parked: Vec<(i64, String)>,
    /// Rows left in the outbox for a later round: the one that failed and
    /// its key's rows after it.
    kept: usize,
}

/// `rows` (in id order) split into one chain per (topic, key), each in id
/// order, the chains in the order of their first rows; a row without a key
/// is a chain of its own.
fn chains(rows: &[Row]) -> Vec<Vec<&Row>> {
    let mut chains: Vec<Vec<&Row>> = Vec::new();
    let mut by_key: HashMap<(&str, &str), usize> = HashMap::new();
    for row in rows {
        let Some(key) = &row.key else {
            chains.push(vec![row]);
            continue;
        };
        match by_key.entry((row.topic.as_str(), key.as_str())) {
            Entry::Occupied(chain) => chains[*chain.get()].push(row),
            Entry::Vacant(slot) => {
                slot.insert(chains.len());
                chains.push(vec![row]);
            }
        }
    }
    chains
}

/// In a pipelined round: every key with a row acknowledged after an earlier
/// row of it failed, counted and logged (see the module's docs).
fn count_order_breaks(rows: &[Row], outcomes: &[ChainOutcome]) {
    // Pipelined chains are single rows, in the order of `rows`.
    let mut first_failed: HashMap<(&str, &str), i64> = HashMap::new();
    for (row, outcome) in rows.iter().zip(outcomes) {
        let Some(key) = &row.key else { continue };
        let key = (row.topic.as_str(), key.as_str());
        if outcome.kept > 0 {
            first_failed.entry(key).or_insert(row.id);
        } else if let Some(failed) = first_failed.get(&key) {
            metrics::counter!("onceflow_outbox_order_breaks_total").increment(1);
            tracing::error!(
                topic = key.0,
                key = key.1,
                failed_id = failed,
                published_id = row.id,
                "the broker acknowledged a row after refusing an earlier row of its key: the key is out of order \
                 on the topic"
            );
        }
    }
}

/// Whether `error` refuses the record for what the row holds, so that
/// publishing it again can never succeed. Anything else may pass another
/// time: the broker unreachable, slow, or refusing the whole topic for now,
/// and refusals of what the producer makes afresh for each attempt (a
/// checksum, a timestamp from a skewed clock).
fn refused_for_good(error: &KafkaError) -> bool {
    matches!(
        error.rdkafka_error_code(),
        Some(RDKafkaErrorCode::BadMessage | RDKafkaErrorCode::MessageSizeTooLarge | RDKafkaErrorCode::InvalidRecord)
    )
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
