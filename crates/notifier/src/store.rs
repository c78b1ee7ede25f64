//! The events table: every result event once, numbered by `seq`.

use std::sync::Arc;

use axum::response::sse::Event;
use onceflow_contracts::{ResultEvent, envelope::Envelope};
use onceflow_runtime::{
    kafka::{BatchError, RecordError},
    probe_records::{COMMAND_TYPE, ProbeRecords},
    telemetry,
};
use rdkafka::{Message as _, message::OwnedMessage};
use sqlx::{PgConnection, PgPool, Row as _, postgres::PgRow};
use tracing::Instrument as _;
use uuid::Uuid;

/// Serialises inserts so `seq` values commit in order ("onev").
const INSERT_LOCK: i64 = 0x6f6e_6576;

/// One stored event, as streams send it.
#[derive(Debug, Clone)]
pub struct StoredEvent {
    pub seq: i64,
    pub tenant: String,
    pub job_id: Uuid,
    pub correlation_id: String,
    pub event_type: String,
    pub terminal: bool,
    /// The event as an SSE frame (id, event type, the data as JSON), made
    /// once when it is read: every stream that sends it sends a copy, which
    /// costs a copy of its bytes instead of serialising it per subscriber.
    pub frame: Event,
    /// The W3C trace context of the step that stored it (see [`record`]).
    pub traceparent: Option<String>,
    pub tracestate: Option<String>,
}

impl StoredEvent {
    fn from_row(row: &PgRow) -> Result<Arc<Self>, sqlx::Error> {
        let seq: i64 = row.try_get("seq")?;
        let event_type: String = row.try_get("event_type")?;
        let data: serde_json::Value = row.try_get("data")?;
        Ok(Arc::new(Self {
            frame: Event::default().id(seq.to_string()).event(event_type.as_str()).data(data.to_string()),
            seq,
            tenant: row.try_get("tenant")?,
            job_id: row.try_get("job_id")?,
            correlation_id: row.try_get("correlation_id")?,
            event_type,
            terminal: row.try_get("terminal")?,
            traceparent: row.try_get("traceparent")?,
            tracestate: row.try_get("tracestate")?,
        }))
    }
}

/// Store the result event in `message`, unless it is a duplicate (same event
/// id). A terminal event with a `callback_url` also gets its webhook delivery,
/// in the same transaction: the delivery exists exactly when the event does,
/// and a redelivered event creates no second one. A callback URL the notifier
/// can never call (control characters, not http/https, too long) does not
/// hold the event back: its delivery is created already `failed`, saying why.
///
/// A record that is not a result event (no envelope, undecodable bytes, a
/// malformed job id) or that the database refuses (e.g. `\u0000` in the
/// result's JSON) is a [`RecordError`] of kind data: the consumer parks it.
///
/// The work is a CONSUMER span, a child of the event's publish; the event is
/// stored with that span's trace context, which its SSE sends continue.
pub async fn record(pool: &PgPool, message: OwnedMessage) -> Result<(), RecordError> {
    let (envelope, event, job_id) = decode(&message)?;
    let span = store_span(&message, &envelope, &event);
    let order_key = order_key(&message);
    async {
        let mut tx = pool.begin().await?;
        lock_inserts(&mut tx).await?;
        store(&mut tx, &envelope, &event, job_id, &order_key).await?;
        tx.commit().await?;
        Ok(())
    }
    .instrument(span)
    .await
}

/// [`record`] of every message, in order, in one transaction (one commit,
/// not one per event): all stored, or nothing and an error, on which the
/// consumer takes them one at a time through [`record`] (see
/// `onceflow_runtime::kafka::consume_parking_batched`).
pub async fn record_batch(pool: &PgPool, messages: Vec<OwnedMessage>) -> Result<(), BatchError> {
    let decoded = BatchError::decode_all(&messages, decode)?;
    let mut tx = pool.begin().await.map_err(BatchError::whole)?;
    lock_inserts(&mut tx).await.map_err(BatchError::whole)?;
    for (position, (message, (envelope, event, job_id))) in messages.iter().zip(&decoded).enumerate() {
        let span = store_span(message, envelope, event);
        store(&mut tx, envelope, event, *job_id, &order_key(message))
            .instrument(span)
            .await
            .map_err(BatchError::at(position))?;
    }
    tx.commit().await.map_err(BatchError::whole)?;
    Ok(())
}

/// The CONSUMER span of storing one result, a child of the event's publish.
fn store_span(message: &OwnedMessage, envelope: &Envelope, event: &ResultEvent) -> tracing::Span {
    onceflow_runtime::consumer_span!(
        "store_result",
        message,
        envelope,
        job_id = %event.job_id,
        event_id = %event.event_id,
        event_type = %envelope.message_type,
    )
}

/// Taken by every transaction that inserts events, so `seq` values commit in
/// the order they were drawn and the hub, reading past the last `seq` it
/// saw, never skips one that commits late.
async fn lock_inserts(tx: &mut PgConnection) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT pg_advisory_xact_lock($1)").bind(INSERT_LOCK).execute(&mut *tx).await?;
    Ok(())
}

/// The ordering key a result carries: its record's Kafka key (the key of
/// the command it is about), for the order of its webhooks; `None` for a
/// record without a text key.
fn order_key(message: &OwnedMessage) -> Option<String> {
    let key = std::str::from_utf8(message.key()?).ok()?;
    (!key.is_empty() && !key.contains('\0') && key.len() <= 1024).then(|| key.to_owned())
}

/// Insert `event` (and its webhook delivery, in the order of `order_key`)
/// in the caller's transaction, which holds [`lock_inserts`]; stored with
/// the current span's trace context.
async fn store(
    tx: &mut PgConnection,
    envelope: &Envelope,
    event: &ResultEvent,
    job_id: Uuid,
    order_key: &Option<String>,
) -> Result<(), RecordError> {
    let (traceparent, tracestate) = telemetry::current_trace_context();
    let seq: Option<i64> = sqlx::query_scalar(
        "INSERT INTO events (event_id, tenant, job_id, correlation_id, event_type, terminal, data, traceparent, tracestate)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) ON CONFLICT (event_id) DO NOTHING RETURNING seq",
    )
    .bind(&event.event_id)
    .bind(&event.tenant)
    .bind(job_id)
    .bind(&event.correlation_id)
    .bind(event.status.event_type())
    .bind(event.status.is_terminal())
    .bind(event.to_client_json())
    .bind(traceparent)
    .bind(tracestate)
    .fetch_optional(&mut *tx)
    .await?;
    let duplicate = seq.is_none();
    let callback_url = event.callback_url.as_deref().filter(|url| !url.is_empty());
    let delivery = match (callback_url, seq) {
        (Some(url), Some(seq)) if event.status.is_terminal() => {
            let order = crate::webhooks::store::Order { key: order_key.as_deref(), seq };
            Some(crate::webhooks::store::enqueue(&mut *tx, event, job_id, url, envelope, order).await?)
        }
        _ => None,
    };
    tracing::debug!(
        correlation_id = %event.correlation_id,
        event_id = %event.event_id,
        duplicate,
        webhook_delivery = ?delivery,
        "result event recorded"
    );
    Ok(())
}

/// The envelope, the event and its job id in `message`; a record that is
/// not a result event is a data error.
fn decode(message: &OwnedMessage) -> Result<(Envelope, ResultEvent, Uuid), RecordError> {
    let envelope = onceflow_runtime::kafka::envelope_of(message)
        .map_err(|error| RecordError::data(format!("result without a valid envelope: {error}")))?;
    let event = ResultEvent::decode(&envelope.schema_id, message.payload().unwrap_or_default())
        .map_err(|error| RecordError::data(format!("undecodable result: {error}")))?;
    let job_id = Uuid::parse_str(&event.job_id)
        .map_err(|_| RecordError::data(format!("result event with a malformed job id `{}`", event.job_id)))?;
    Ok((envelope, event, job_id))
}

/// Which events a stream wants.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub tenant: String,
    pub job_id: Option<Uuid>,
    pub correlation_id: Option<String>,
}

impl Filter {
    pub fn matches(&self, event: &StoredEvent) -> bool {
        event.tenant == self.tenant
            && self.job_id.is_none_or(|id| id == event.job_id)
            && self.correlation_id.as_ref().is_none_or(|id| *id == event.correlation_id)
    }
}

/// Up to `limit` events matching `filter` with `seq > after`, in order.
pub async fn events_after(
    pool: &PgPool,
    filter: &Filter,
    after: i64,
    limit: i64,
) -> Result<Vec<Arc<StoredEvent>>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT seq, tenant, job_id, correlation_id, event_type, terminal, data, traceparent, tracestate FROM events
         WHERE seq > $1 AND tenant = $2
           AND ($3::uuid IS NULL OR job_id = $3)
           AND ($4::text IS NULL OR correlation_id = $4)
         ORDER BY seq LIMIT $5",
    )
    .bind(after)
    .bind(&filter.tenant)
    .bind(filter.job_id)
    .bind(&filter.correlation_id)
    .bind(limit)
    .fetch_all(pool)
    .await?;
    rows.iter().map(StoredEvent::from_row).collect()
}

/// Every tenant's events with `seq > after` (the hub's feed).
pub async fn all_after(pool: &PgPool, after: i64, limit: i64) -> Result<Vec<Arc<StoredEvent>>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT seq, tenant, job_id, correlation_id, event_type, terminal, data, traceparent, tracestate FROM events
         WHERE seq > $1 ORDER BY seq LIMIT $2",
    )
    .bind(after)
    .bind(limit)
    .fetch_all(pool)
    .await?;
    rows.iter().map(StoredEvent::from_row).collect()
}

/// The highest `seq` stored so far (0 when empty).
pub async fn latest_seq(pool: &PgPool) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("SELECT coalesce(max(seq), 0) FROM events").fetch_one(pool).await
}

/// Delete up to `batch` events older than `retention` and move the retention
/// mark past them, in one transaction; returns how many were deleted.
pub async fn prune_once(pool: &PgPool, retention: std::time::Duration, batch: i64) -> Result<u64, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let (deleted, pruned_through): (i64, Option<i64>) = sqlx::query_as(
        "WITH gone AS (
             DELETE FROM events WHERE seq IN (
                 SELECT seq FROM events WHERE created_at < now() - make_interval(secs => $1)
                 ORDER BY seq LIMIT $2)
             RETURNING seq)
         SELECT count(*), max(seq) FROM gone",
    )
    .bind(retention.as_secs_f64())
    .bind(batch)
    .fetch_one(&mut *tx)
    .await?;
    if let Some(pruned_through) = pruned_through {
        sqlx::query("UPDATE events_retention SET pruned_through = greatest(pruned_through, $1)")
            .bind(pruned_through)
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    Ok(u64::try_from(deleted).unwrap_or(0))
}

/// Prune expired events until `shutdown`: bounded batches, so pruning a large
/// backlog never holds one long transaction.
pub async fn prune_expired(
    pool: PgPool,
    retention: std::time::Duration,
    interval: std::time::Duration,
    batch: std::num::NonZeroU32,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let batch = batch.get();
    onceflow_runtime::postgres::in_batches_periodically("expired events", u64::from(batch), interval, shutdown, || {
        prune_once(&pool, retention, i64::from(batch))
    })
    .await;
}

/// Delete the probe tenant's `onceflow.probe` events older than
/// `probe.retain_secs`, until `shutdown`. Only events both of the probe's
/// tenant and of its command type (the safety rule of
/// `onceflow_runtime::probe_records`; every stored event's data carries its
/// `command_type`), found through `events_by_tenant`. The retention mark
/// `pruned_through` stays where it is: it is every tenant's, and other
/// tenants' streams lost nothing. So a stream of the probe's tenant resuming
/// from before a pruned probe event gets no `stream.gap` notice for it.
pub async fn prune_probe_events(pool: PgPool, probe: ProbeRecords, shutdown: tokio_util::sync::CancellationToken) {
    let delete = format!(
        "DELETE FROM events WHERE seq IN (
             SELECT seq FROM events
             WHERE tenant = $1 AND data->>'command_type' = '{COMMAND_TYPE}'
               AND created_at < now() - make_interval(secs => $2)
             ORDER BY seq LIMIT $3 FOR UPDATE SKIP LOCKED)"
    );
    probe.prune_periodically(&pool, &delete, shutdown).await;
}

/// Events with `seq` up to this may have been pruned.
pub async fn pruned_through(pool: &PgPool) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("SELECT pruned_through FROM events_retention").fetch_one(pool).await
}
