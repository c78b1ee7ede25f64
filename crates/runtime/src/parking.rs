//! Parked records: what a consumer could never apply, kept in the service's
//! own database for an operator to inspect and redrive (guarantee G8).
//!
//! ```text
//! topic ──▶ kafka::consume_parking ──handle──▶ Ok: next record
//!                     │            Outage: wait (failure::Backoff), same record again
//!                     └─ Data ──▶ parked_records (topic, partition, offset, key, headers, payload, error)
//!                                     │ GET  /admin/parked
//!                                     └ POST /admin/parked/{id}/redrive ──handle──▶ Ok: row deleted
//! ```
//!
//! The table comes from [`migrator`], applied beside each service's own
//! migrations. A [`Parking`] is one consumer's view of it (`consumer` names
//! the handler that parked a record, so a redrive runs the same handler).
//! [`router`] serves the admin endpoints behind a bearer token; a service
//! mounts it on its HTTP router when `admin.token` is set.
//!
//! A redrive runs the handler on the stored record exactly as it came off the
//! topic (same key, headers, payload, position). If it now succeeds, the row
//! is deleted; if it still fails with a data error, the row stays with the new
//! error and its redrive count; on an outage nothing changes (`503`). The row
//! is locked while its redrive runs, so two redrives of one record never run
//! at once.

use std::{future::Future, pin::Pin, sync::Arc, time::Duration};

use axum::{
    Json, Router,
    extract::{Path, Query, State},
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use rdkafka::{
    Message as _, Timestamp,
    message::{Header, OwnedHeaders, OwnedMessage},
};
use sqlx::{PgPool, Row as _, migrate::Migrator, postgres::PgRow, types::chrono};

use crate::{
    admin,
    failure::Failure,
    kafka::{self, RecordError},
    openapi::ProblemDocument,
    problem::Problem,
};

/// The `parked_records` table's migrations (versions from 2000001).
pub fn migrator() -> Migrator {
    sqlx::migrate!("./migrations/parking")
}

/// One consumer's parked records.
#[derive(Debug, Clone)]
pub struct Parking {
    pool: PgPool,
    consumer: &'static str,
}

/// A parked record as stored.
#[derive(Debug, Clone)]
pub struct ParkedRecord {
    pub id: i64,
    pub consumer: String,
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub headers: Vec<(String, Option<Vec<u8>>)>,
    pub payload: Option<Vec<u8>>,
    pub error: String,
    pub parked_at: chrono::DateTime<chrono::Utc>,
    pub redrive_count: i32,
    pub last_redrive_at: Option<chrono::DateTime<chrono::Utc>>,
}

/// What a redrive came to.
#[derive(Debug)]
pub enum Redrive {
    /// The handler applied the record; its row is gone.
    Applied,
    /// The handler refused it again; the row keeps this error.
    StillFailing(String),
    /// A dependency is down: nothing changed, try again later.
    Unavailable(String),
    /// No such parked record of this consumer, or its redrive is under way.
    NotFound,
}

const COLUMNS: &str = "id, consumer, topic, kafka_partition, kafka_offset, record_key, header_names, header_values,
    payload, error, parked_at, redrive_count, last_redrive_at";

impl Parking {
    /// `consumer` names the handler, e.g. `notifier.results`.
    pub fn new(pool: PgPool, consumer: &'static str) -> Self {
        Self { pool, consumer }
    }

    pub fn consumer(&self) -> &'static str {
        self.consumer
    }

    /// Park `message` with `error`; returns the parked row's id. Parking the
    /// same record again (a redelivery) updates its error and keeps one row.
    pub async fn park(&self, message: &OwnedMessage, error: &str) -> Result<i64, sqlx::Error> {
        // Names rdkafka cannot read (not UTF-8) are left out; the error says so.
        let (headers, error) = match kafka::header_pairs(message) {
            Ok(headers) => (headers, error.to_owned()),
            Err(unreadable) => (Vec::new(), format!("{error} ({unreadable}; headers not kept)")),
        };
        // A name keeps its NUL as `\u0000`: the text column cannot hold it.
        let (names, values): (Vec<String>, Vec<Option<Vec<u8>>>) =
            headers.into_iter().map(|(name, value)| (printable(&name), value)).unzip();
        sqlx::query_scalar(
            "INSERT INTO parked_records
                (consumer, topic, kafka_partition, kafka_offset, record_key, header_names, header_values, payload, error)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
             ON CONFLICT (consumer, topic, kafka_partition, kafka_offset) DO UPDATE SET error = EXCLUDED.error
             RETURNING id",
        )
        .bind(self.consumer)
        .bind(message.topic())
        .bind(message.partition())
        .bind(message.offset())
        .bind(message.key())
        .bind(&names)
        .bind(&values)
        .bind(message.payload())
        .bind(printable(&error))
        .fetch_one(&self.pool)
        .await
    }

    /// Up to `limit` parked records of this consumer, newest first.
    pub async fn list(&self, limit: i64) -> Result<Vec<ParkedRecord>, sqlx::Error> {
        let rows =
            sqlx::query(&format!("SELECT {COLUMNS} FROM parked_records WHERE consumer = $1 ORDER BY id DESC LIMIT $2"))
                .bind(self.consumer)
                .bind(limit)
                .fetch_all(&self.pool)
                .await?;
        rows.iter().map(ParkedRecord::from_row).collect()
    }

    /// Run `handle` on parked record `id` again; delete it if it now succeeds.
    pub async fn redrive<Fut>(&self, id: i64, handle: impl FnOnce(OwnedMessage) -> Fut) -> Result<Redrive, sqlx::Error>
    where
        Fut: Future<Output = Result<(), RecordError>>,
    {
        let mut tx = self.pool.begin().await?;
        // SKIP LOCKED: a record whose redrive is already running is not here.
        let row = sqlx::query(&format!(
            "SELECT {COLUMNS} FROM parked_records WHERE id = $1 AND consumer = $2 FOR UPDATE SKIP LOCKED"
        ))
        .bind(id)
        .bind(self.consumer)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else { return Ok(Redrive::NotFound) };
        let record = ParkedRecord::from_row(&row)?;
        match handle(record.to_message()).await {
            Ok(()) => {
                sqlx::query("DELETE FROM parked_records WHERE id = $1").bind(id).execute(&mut *tx).await?;
                tx.commit().await?;
                metrics::counter!("onceflow_parked_records_redriven_total", "consumer" => self.consumer).increment(1);
                Ok(Redrive::Applied)
            }
            Err(error) if error.failure == Failure::Data => {
                sqlx::query(
                    "UPDATE parked_records SET error = $2, redrive_count = redrive_count + 1, last_redrive_at = now()
                     WHERE id = $1",
                )
                .bind(id)
                .bind(printable(&error.reason))
                .execute(&mut *tx)
                .await?;
                tx.commit().await?;
                Ok(Redrive::StillFailing(error.reason))
            }
            Err(error) => Ok(Redrive::Unavailable(error.reason)),
        }
    }
}

impl ParkedRecord {
    fn from_row(row: &PgRow) -> Result<Self, sqlx::Error> {
        let names: Vec<String> = row.try_get("header_names")?;
        let values: Vec<Option<Vec<u8>>> = row.try_get("header_values")?;
        Ok(Self {
            id: row.try_get("id")?,
            consumer: row.try_get("consumer")?,
            topic: row.try_get("topic")?,
            partition: row.try_get("kafka_partition")?,
            offset: row.try_get("kafka_offset")?,
            key: row.try_get("record_key")?,
            headers: names.into_iter().zip(values).collect(),
            payload: row.try_get("payload")?,
            error: row.try_get("error")?,
            parked_at: row.try_get("parked_at")?,
            redrive_count: row.try_get("redrive_count")?,
            last_redrive_at: row.try_get("last_redrive_at")?,
        })
    }

    /// The record as it came off the topic.
    pub fn to_message(&self) -> OwnedMessage {
        let headers = self.headers.iter().fold(OwnedHeaders::new(), |headers, (key, value)| {
            headers.insert(Header { key: key.as_str(), value: value.as_deref() })
        });
        OwnedMessage::new(
            self.payload.clone(),
            self.key.clone(),
            self.topic.clone(),
            Timestamp::NotAvailable,
            self.partition,
            self.offset,
            Some(headers),
        )
    }

    /// The record as the admin API shows it: bytes that are UTF-8 as text,
    /// others as hex (`*_hex`), so nothing is lost or mangled.
    pub fn to_json(&self) -> serde_json::Value {
        let headers: Vec<serde_json::Value> = self
            .headers
            .iter()
            .map(|(name, value)| {
                let mut header = bytes_json("value", value.as_deref());
                header.insert("name".to_owned(), name.clone().into());
                header.into()
            })
            .collect();
        let mut record = serde_json::Map::new();
        record.insert("id".to_owned(), self.id.into());
        record.insert("consumer".to_owned(), self.consumer.clone().into());
        record.insert("topic".to_owned(), self.topic.clone().into());
        record.insert("partition".to_owned(), self.partition.into());
        record.insert("offset".to_owned(), self.offset.into());
        record.extend(bytes_json("key", self.key.as_deref()));
        record.insert("headers".to_owned(), headers.into());
        record.insert("payload_size".to_owned(), self.payload.as_ref().map_or(0, Vec::len).into());
        record.insert("payload_hex".to_owned(), self.payload.as_deref().map(hex::encode).into());
        record.insert("error".to_owned(), self.error.clone().into());
        record.insert("parked_at".to_owned(), self.parked_at.to_rfc3339().into());
        record.insert("redrive_count".to_owned(), self.redrive_count.into());
        record.insert("last_redrive_at".to_owned(), self.last_redrive_at.map(|at| at.to_rfc3339()).into());
        record.into()
    }
}

/// `{name: text}` for UTF-8 bytes, `{name_hex: hex}` for others, `{name: null}` for none.
fn bytes_json(name: &str, bytes: Option<&[u8]>) -> serde_json::Map<String, serde_json::Value> {
    let mut map = serde_json::Map::new();
    match bytes.map(std::str::from_utf8) {
        None => {
            map.insert(name.to_owned(), serde_json::Value::Null);
        }
        Some(Ok(text)) => {
            map.insert(name.to_owned(), text.into());
        }
        Some(Err(_)) => {
            map.insert(format!("{name}_hex"), bytes.map(hex::encode).into());
        }
    }
    map
}

/// `text` without NUL, which PostgreSQL's `text` cannot hold (an error message
/// may quote the very bytes that made the record fail).
fn printable(text: &str) -> String {
    text.replace('\0', "\\u0000")
}

/// Runs a consumer's handler on a redriven record.
pub type Handler =
    Arc<dyn Fn(OwnedMessage) -> Pin<Box<dyn Future<Output = Result<(), RecordError>> + Send>> + Send + Sync>;

#[derive(Clone)]
struct AdminState {
    parking: Parking,
    handler: Handler,
    /// The admin token requests must carry.
    token: Arc<str>,
}

/// The OpenAPI paths of the parked-records endpoints, for a service to merge
/// into its document.
#[derive(utoipa::OpenApi)]
#[openapi(paths(list, redrive))]
pub struct ParkingApi;

/// `GET /admin/parked?limit=N` (newest first, default 100, at most 1000) and
/// `POST /admin/parked/{id}/redrive`, behind `Authorization: Bearer <token>`;
/// `None` (no endpoints at all) when `token` is empty.
///
/// Redrive answers `200 {"id", "status": "applied"}` when the handler applied
/// the record (its row is gone), `422` when it refused it again (the row keeps
/// the new error), `503` + `Retry-After` when a dependency is down, `404` for
/// an id that is not parked (or whose redrive is under way).
pub fn router(parking: Parking, token: &str, handler: Handler) -> Option<Router> {
    if token.is_empty() {
        return None;
    }
    let state = AdminState { parking, handler, token: token.into() };
    Some(
        Router::new()
            .route("/admin/parked", get(list))
            .route("/admin/parked/{id}/redrive", post(redrive))
            .with_state(state),
    )
}

fn authorized(state: &AdminState, headers: &HeaderMap) -> bool {
    admin::bearer_matches(headers, &state.token)
}

fn unavailable(error: impl std::fmt::Display) -> Response {
    tracing::warn!(%error, "parked-records request failed");
    Problem::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", "Service unavailable", "the database is unavailable")
        .retry_after(1)
        .into_response()
}

/// The records this consumer parked, newest first.
#[utoipa::path(
    get,
    path = "/admin/parked",
    tag = "admin",
    security(("admin_token" = [])),
    params(admin::ListQuery),
    responses(
        (status = 200, description = "`{\"parked\": [...]}`: each record's id, consumer, topic, partition, offset, key, headers, payload (text when UTF-8, else `*_hex`), error and redrive count", body = Object),
        (status = 401, description = "No or wrong admin token", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 503, description = "The database is unavailable; retry after Retry-After", body = ProblemDocument, content_type = "application/problem+json"),
    )
)]
async fn list(State(state): State<AdminState>, headers: HeaderMap, Query(query): Query<admin::ListQuery>) -> Response {
    if !authorized(&state, &headers) {
        return admin::unauthorized();
    }
    match state.parking.list(query.limit()).await {
        Ok(records) => {
            let records: Vec<serde_json::Value> = records.iter().map(ParkedRecord::to_json).collect();
            Json(serde_json::json!({"parked": records})).into_response()
        }
        Err(error) => unavailable(error),
    }
}

/// Run the consumer's handler on a parked record again; the row is deleted
/// when it applies.
#[utoipa::path(
    post,
    path = "/admin/parked/{id}/redrive",
    tag = "admin",
    security(("admin_token" = [])),
    params(("id" = i64, Path, description = "The parked record's id")),
    responses(
        (status = 200, description = "`{\"id\", \"status\": \"applied\"}`: applied, no longer parked", body = Object),
        (status = 401, description = "No or wrong admin token", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 404, description = "No such parked record (or its redrive is under way)", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 422, description = "It still fails; it stays parked with the new error", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 503, description = "A dependency is down; retry after Retry-After", body = ProblemDocument, content_type = "application/problem+json"),
    )
)]
async fn redrive(State(state): State<AdminState>, headers: HeaderMap, Path(id): Path<String>) -> Response {
    if !authorized(&state, &headers) {
        return admin::unauthorized();
    }
    let not_found = |id: &str| {
        Problem::new(StatusCode::NOT_FOUND, "not-parked", "Not parked", format!("no parked record {id}"))
            .into_response()
    };
    let Ok(number) = id.parse::<i64>() else { return not_found(&id) };
    let handler = state.handler.clone();
    // Bounded: an outage inside the handler must not hold the row lock and
    // the request open indefinitely.
    let outcome =
        tokio::time::timeout(Duration::from_secs(30), state.parking.redrive(number, |message| handler(message))).await;
    match outcome {
        Err(_) => unavailable("redrive timed out"),
        Ok(Err(error)) => unavailable(error),
        Ok(Ok(Redrive::Applied)) => {
            tracing::info!(
                parked_id = number,
                consumer = state.parking.consumer(),
                "parked record redriven and applied"
            );
            Json(serde_json::json!({"id": number, "status": "applied"})).into_response()
        }
        Ok(Ok(Redrive::StillFailing(reason))) => Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "still-failing",
            "Record still cannot be applied",
            format!("parked record {number} still fails and stays parked: {reason}"),
        )
        .into_response(),
        Ok(Ok(Redrive::Unavailable(reason))) => unavailable(reason),
        Ok(Ok(Redrive::NotFound)) => not_found(&id),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_are_shown_as_text_when_utf8_and_as_hex_otherwise() {
        assert_eq!(serde_json::Value::from(bytes_json("key", Some(b"job-1"))), serde_json::json!({"key": "job-1"}));
        assert_eq!(
            serde_json::Value::from(bytes_json("key", Some(&[0xff, 0x00]))),
            serde_json::json!({"key_hex": "ff00"})
        );
        assert_eq!(serde_json::Value::from(bytes_json("key", None)), serde_json::json!({"key": null}));
    }

    #[test]
    fn a_parked_record_is_given_back_as_it_came_off_the_topic() {
        let record = ParkedRecord {
            id: 1,
            consumer: "c".to_owned(),
            topic: "t".to_owned(),
            partition: 3,
            offset: 41,
            key: Some(vec![0xff]),
            headers: vec![("a".to_owned(), Some(vec![0, 1])), ("b".to_owned(), None)],
            payload: Some(vec![9]),
            error: "e".to_owned(),
            parked_at: chrono::Utc::now(),
            redrive_count: 0,
            last_redrive_at: None,
        };
        let message = record.to_message();
        assert_eq!((message.topic(), message.partition(), message.offset()), ("t", 3, 41));
        assert_eq!((message.key(), message.payload()), (Some(&[0xff][..]), Some(&[9][..])));
        assert_eq!(kafka::header_pairs(&message).unwrap(), record.headers);
        assert_eq!(printable("a\0b"), "a\\u0000b");
    }
}
