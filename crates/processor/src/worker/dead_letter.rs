//! Parking: a message that can never succeed goes to the dead-letter topic
//! and, when its job is known, gets its inbox row, its `dead_letters` row
//! (what an operator lists and redrives, see [`crate::admin`]) and a
//! `dead_lettered` result, kept losslessly whatever bytes it carries.

use std::{borrow::Cow, time::Duration};

use base64::Engine as _;
use onceflow_contracts::{Envelope, JobError, JobStatus};
use rdkafka::{
    Message as _,
    error::KafkaError,
    message::{Header, Headers as _, OwnedHeaders, OwnedMessage},
    producer::FutureRecord,
};
use tokio_util::sync::CancellationToken;

use super::{
    Handled, INVALID_DATA, Worker,
    apply::{database_data, kafka_data},
    inbox::{already_handled, claim_inbox, record_outcome},
    results::JobRef,
};

/// Headers the worker adds to a dead-lettered message.
pub const DLQ_ERROR_CODE: &str = "dlq-error-code";
pub const DLQ_ERROR_MESSAGE: &str = "dlq-error-message";
pub const DLQ_ORIGINAL_TOPIC: &str = "dlq-original-topic";
pub const DLQ_ORIGINAL_PARTITION: &str = "dlq-original-partition";
pub const DLQ_ORIGINAL_OFFSET: &str = "dlq-original-offset";

/// How long one send to the dead-letter topic may wait for the broker before
/// it counts as an outage and is tried again.
const DEAD_LETTER_SEND_TIMEOUT: Duration = Duration::from_secs(30);
/// Why a message goes to the dead-letter topic.
#[derive(Debug)]
pub(crate) struct Poison {
    pub(crate) code: &'static str,
    /// The whole reason, for the logs, the dead-letter headers and the
    /// `dead_letters` table (operators' eyes only).
    pub(crate) detail: String,
    /// What the job's error tells the client, when the detail may carry text
    /// the client must not see (a database's error message).
    public: Option<String>,
}

impl Poison {
    pub(crate) fn new(code: &'static str, detail: impl Into<String>) -> Self {
        Self { code, detail: detail.into(), public: None }
    }

    /// Data the database refused (a PostgreSQL class 22 or 23 error).
    pub(crate) fn invalid_data(error: &sqlx::Error) -> Self {
        let sqlstate = match error {
            sqlx::Error::Database(database) => database.code().map(|code| format!(" (SQLSTATE {code})")),
            _ => None,
        };
        Self {
            code: INVALID_DATA,
            detail: error.to_string(),
            public: Some(format!("the database refused the command's data{}", sqlstate.unwrap_or_default())),
        }
    }

    pub(crate) fn job_error(&self) -> JobError {
        JobError {
            code: self.code.to_owned(),
            message: clean(self.public.as_ref().unwrap_or(&self.detail)).into_owned(),
        }
    }
}
/// `text` without NUL, which no PostgreSQL text or JSON value can hold: each
/// becomes U+FFFD. Used where a dead letter's text goes into a column; the
/// record's exact bytes are kept beside it (key, headers, payload).
pub(crate) fn clean(text: &str) -> Cow<'_, str> {
    if text.contains('\0') { Cow::Owned(text.replace('\0', "\u{FFFD}")) } else { Cow::Borrowed(text) }
}

/// `envelope` with every text fit for a text column (see [`clean`]).
fn cleaned_envelope(envelope: &Envelope) -> Envelope {
    let owned = |text: &str| clean(text).into_owned();
    Envelope {
        message_id: envelope.message_id,
        correlation_id: owned(&envelope.correlation_id),
        causation_id: envelope.causation_id.as_deref().map(owned),
        tenant: owned(&envelope.tenant),
        message_type: owned(&envelope.message_type),
        schema_id: owned(&envelope.schema_id),
        traceparent: envelope.traceparent.as_deref().map(owned),
        tracestate: envelope.tracestate.as_deref().map(owned),
    }
}
impl Worker {
    /// Park the message: the original record, with its headers and the
    /// error, on the dead-letter topic; then, when its job is known, its
    /// inbox row, its `dead_letters` row and a `dead_lettered` result, in one
    /// transaction. Each step waits out outages (storing the offset before
    /// the message is parked would lose the command) and gives up only on
    /// shutdown, leaving the offset unstored; no data error makes it loop.
    pub(super) async fn dead_letter(
        &self,
        message: &OwnedMessage,
        job: Option<(&Envelope, &JobRef)>,
        poison: &Poison,
        shutdown: &CancellationToken,
    ) -> Handled {
        tracing::warn!(code = poison.code, reason = %poison.detail, "dead-lettering command");
        // A redelivery of a message already handled (dead-lettered, or even
        // applied) adds nothing: no second dead letter, no second result. Only
        // a crash between the send below and the inbox commit can duplicate
        // the dead letter (with the same `message-id`).
        // A redriven message that fails again is dead-lettered again.
        if let Some((envelope, _)) = job {
            let check = || already_handled(&self.pool, envelope.message_id);
            match self.through_outages("dead_letter", shutdown, database_data, check).await {
                None => return Handled::Abandoned,
                Some(Ok(true)) => {
                    metrics::counter!("onceflow_commands_duplicate_total").increment(1);
                    tracing::info!("duplicate delivery; already handled");
                    return Handled::Done;
                }
                Some(Ok(false)) => {}
                // Only a message id is bound: not reachable, and not a reason to stop.
                Some(Err(error)) => tracing::warn!(%error, "cannot tell whether the message was handled"),
            }
        }

        let send = || self.send_to_dead_letter_topic(message, poison, true);
        let topic_error = match self.through_outages("dead_letter", shutdown, kafka_data, send).await {
            None => return Handled::Abandoned,
            Some(Ok(())) => None,
            Some(Err(error)) => {
                // The broker will never take it (too large once the error
                // headers are added): the table keeps it, with why.
                tracing::error!(%error, "the dead-letter topic refused the record; it is kept in the table only");
                metrics::counter!("onceflow_dead_letters_off_topic_total").increment(1);
                Some(error.to_string())
            }
        };

        if let Some((envelope, job)) = job {
            let (envelope, job) = (cleaned_envelope(envelope), job.cleaned());
            let park = || self.park(message, &envelope, &job, poison, topic_error.as_deref());
            match self.through_outages("dead_letter", shutdown, database_data, park).await {
                None => return Handled::Abandoned,
                Some(Ok(true)) => {}
                Some(Ok(false)) => {
                    metrics::counter!("onceflow_commands_duplicate_total").increment(1);
                    tracing::info!("duplicate delivery; already handled");
                    return Handled::Done;
                }
                Some(Err(error)) => {
                    // Every text is cleaned and every byte kept as bytes, so
                    // this is not expected; looping on it would halt the lane.
                    tracing::error!(%error, on_topic = topic_error.is_none(), "cannot record the dead letter");
                    metrics::counter!("onceflow_dead_letters_unrecorded_total").increment(1);
                }
            }
        }
        metrics::counter!("onceflow_commands_dead_lettered_total", "code" => poison.code).increment(1);
        Handled::Done
    }

    /// The original record, its headers (unless `with_headers` is false) and
    /// the error's, on the dead-letter topic.
    pub(super) async fn send_to_dead_letter_topic(
        &self,
        message: &OwnedMessage,
        poison: &Poison,
        with_headers: bool,
    ) -> Result<(), KafkaError> {
        let mut headers = OwnedHeaders::new();
        if with_headers && let Some(original) = message.headers() {
            for header in original.iter() {
                headers = headers.insert(Header { key: header.key, value: header.value });
            }
        }
        let partition = message.partition().to_string();
        let offset = message.offset().to_string();
        for (key, value) in [
            (DLQ_ERROR_CODE, poison.code),
            (DLQ_ERROR_MESSAGE, poison.detail.as_str()),
            (DLQ_ORIGINAL_TOPIC, message.topic()),
            (DLQ_ORIGINAL_PARTITION, partition.as_str()),
            (DLQ_ORIGINAL_OFFSET, offset.as_str()),
        ] {
            headers = headers.insert(Header { key, value: Some(value.as_bytes()) });
        }
        let mut record = FutureRecord::to(&self.topics.dead_letter).headers(headers);
        if let Some(payload) = message.payload() {
            record = record.payload(payload);
        }
        if let Some(key) = message.key() {
            record = record.key(key);
        }
        self.producer.send(record, DEAD_LETTER_SEND_TIMEOUT).await.map(|_| ()).map_err(|(error, _)| error)
    }

    /// The dead letter's inbox row, `dead_letters` row and `dead_lettered`
    /// result, in one transaction; `envelope` and `job` cleaned for text
    /// columns. A result that would not fit in one record is left out (only a
    /// record no ingest made can carry such texts): the dead letter is kept
    /// and listed all the same. `false`: the message was handled already.
    async fn park(
        &self,
        message: &OwnedMessage,
        envelope: &Envelope,
        job: &JobRef,
        poison: &Poison,
        topic_error: Option<&str>,
    ) -> Result<bool, sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        if !claim_inbox(&mut tx, envelope.message_id, job).await? {
            return Ok(false);
        }
        record_outcome(&mut tx, envelope.message_id, JobStatus::DeadLettered).await?;
        record_dead_letter(&mut tx, message, envelope, job, poison, topic_error).await?;
        let event = self.result_event(envelope, job, JobStatus::DeadLettered, None, Some(poison.job_error()));
        match self.result_message(envelope, job, &event) {
            Ok(result) => match onceflow_outbox::enqueue(&mut tx, &result).await {
                Ok(()) => {}
                Err(onceflow_outbox::Error::Database(error)) => return Err(error),
                Err(error) => tracing::error!(%error, "the dead_lettered result is left out"),
            },
            Err(poison) => tracing::error!(reason = %poison.detail, "the dead_lettered result is left out"),
        }
        tx.commit().await?;
        Ok(true)
    }
}

/// Keep the dead-lettered record, as it arrived, for listing and redrive (a
/// message dead-lettered again after a redrive gets its row refreshed). Its
/// bytes are kept losslessly: the key as bytes, each header value as text when
/// it is UTF-8 without NUL and base64 otherwise; `envelope` and `job` are
/// already cleaned for text columns, and so is the error's text here.
pub(crate) async fn record_dead_letter(
    tx: &mut sqlx::PgConnection,
    message: &OwnedMessage,
    envelope: &Envelope,
    job: &JobRef,
    poison: &Poison,
    topic_error: Option<&str>,
) -> Result<(), sqlx::Error> {
    let headers: Vec<serde_json::Value> = message
        .headers()
        .map(|headers| headers.iter().map(|header| stored_header(header.key, header.value)).collect())
        .unwrap_or_default();
    sqlx::query(
        "INSERT INTO dead_letters (message_id, tenant, command_type, job_id, original_topic, original_partition,
                                   original_offset, message_key, headers, payload, error_code, error_message,
                                   topic_error)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)
         ON CONFLICT (message_id) DO UPDATE SET
             original_topic = EXCLUDED.original_topic, original_partition = EXCLUDED.original_partition,
             original_offset = EXCLUDED.original_offset, error_code = EXCLUDED.error_code,
             error_message = EXCLUDED.error_message, topic_error = EXCLUDED.topic_error,
             dead_lettered_at = now(), reapplied_at = NULL",
    )
    .bind(envelope.message_id)
    .bind(&job.tenant)
    .bind(&job.command_type)
    .bind(&job.job_id)
    .bind(clean(message.topic()))
    .bind(message.partition())
    .bind(message.offset())
    .bind(message.key())
    .bind(serde_json::Value::Array(headers))
    .bind(message.payload().unwrap_or_default())
    .bind(poison.code)
    .bind(clean(&poison.detail))
    .bind(topic_error.map(clean))
    .execute(tx)
    .await?;
    Ok(())
}

/// One header as the `dead_letters` table keeps it: `{"name", "value"}` for a
/// value that is UTF-8 text without NUL, `{"name", "base64"}` for any other
/// bytes, `{"name"}` for a header without a value (see migration 0003).
fn stored_header(name: &str, value: Option<&[u8]>) -> serde_json::Value {
    let name = clean(name);
    match value {
        None => serde_json::json!({"name": name}),
        Some(bytes) => match std::str::from_utf8(bytes) {
            Ok(text) if !text.contains('\0') => serde_json::json!({"name": name, "value": text}),
            _ => serde_json::json!({"name": name, "base64": base64::engine::general_purpose::STANDARD.encode(bytes)}),
        },
    }
}
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_values_are_kept_as_text_or_as_base64_bytes() {
        assert_eq!(stored_header("tenant-id", Some(b"dev")), serde_json::json!({"name": "tenant-id", "value": "dev"}));
        assert_eq!(stored_header("x-nul", Some(b"a\0b")), serde_json::json!({"name": "x-nul", "base64": "YQBi"}));
        assert_eq!(stored_header("x-bin", Some(b"\xff\xfe")), serde_json::json!({"name": "x-bin", "base64": "//4="}));
        assert_eq!(stored_header("x-none", None), serde_json::json!({"name": "x-none"}));
    }

    #[test]
    fn only_nul_is_replaced_for_a_text_column() {
        assert!(matches!(clean("dev"), Cow::Borrowed("dev")));
        assert_eq!(clean("de\0v\0"), "de\u{FFFD}v\u{FFFD}");
    }

    #[test]
    fn a_data_error_tells_the_client_its_sqlstate_but_no_database_text() {
        let error = sqlx::Error::Encode("invalid byte sequence for encoding \"UTF8\": 0x00".into());
        let poison = Poison::invalid_data(&error);
        let job_error = poison.job_error();
        assert_eq!(job_error.code, INVALID_DATA);
        assert!(!job_error.message.contains("0x00"), "{}", job_error.message);
        assert!(poison.detail.contains("0x00"), "the operator still sees it: {}", poison.detail);
    }
}
