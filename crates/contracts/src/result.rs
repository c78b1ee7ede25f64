//! The result event: what the processor publishes to `onceflow.results` about a job.

use crate::{Result, schema};

/// Where a job stands. Only moves forward: `accepted` → `processing` → one
/// terminal state (`succeeded`, `failed`, `dead_lettered` or `cancelled`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobStatus {
    Accepted,
    Processing,
    Succeeded,
    Failed,
    DeadLettered,
    /// Its tenant cancelled it before it ended (result schema v3).
    Cancelled,
}

impl JobStatus {
    /// The name used in JSON, SQL and event types.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Accepted => "accepted",
            Self::Processing => "processing",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::DeadLettered => "dead_lettered",
            Self::Cancelled => "cancelled",
        }
    }

    /// Parse the name produced by [`Self::as_str`].
    pub fn parse(name: &str) -> Option<Self> {
        [Self::Accepted, Self::Processing, Self::Succeeded, Self::Failed, Self::DeadLettered, Self::Cancelled]
            .into_iter()
            .find(|status| status.as_str() == name)
    }

    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed | Self::DeadLettered | Self::Cancelled)
    }

    /// Rank for forward-only updates: a status may replace one of lower rank.
    pub fn rank(self) -> u8 {
        match self {
            Self::Accepted => 0,
            Self::Processing => 1,
            Self::Succeeded | Self::Failed | Self::DeadLettered | Self::Cancelled => 2,
        }
    }

    /// The event type on the results topic and in SSE, e.g. `job.succeeded`.
    pub fn event_type(self) -> String {
        format!("job.{}", self.as_str())
    }
}

/// Why a job failed or was dead-lettered.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct JobError {
    /// Stable machine-readable code, e.g. `insufficient_funds`.
    pub code: String,
    pub message: String,
}

/// One event about a job (the Avro record `io.onceflow.v1.ResultEvent`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ResultEvent {
    pub event_id: String,
    pub job_id: String,
    pub tenant: String,
    pub correlation_id: String,
    pub command_type: String,
    pub status: JobStatus,
    pub progress_percent: Option<i32>,
    pub result_json: Option<String>,
    pub error: Option<JobError>,
    pub callback_url: Option<String>,
    /// Milliseconds since the Unix epoch.
    pub occurred_at: i64,
}

impl ResultEvent {
    /// Single-object encode with the current result schema.
    pub fn encode(&self) -> Result<Vec<u8>> {
        schema::encode(&schema::RESULT, self)
    }

    /// Decode an event written with any released result schema; `schema_id`,
    /// the `schema-id` header, is read only for a value of the older bare
    /// format (see [`schema::decode`]).
    pub fn decode(schema_id: &str, bytes: &[u8]) -> Result<Self> {
        schema::decode(schema_id, &schema::RESULT.schema, bytes)
    }

    /// The JSON shape clients see in SSE `data:`, webhooks and job status:
    /// the result parsed back into JSON rather than left as a string.
    pub fn to_client_json(&self) -> serde_json::Value {
        let result = self.result_json.as_deref().and_then(|json| serde_json::from_str::<serde_json::Value>(json).ok());
        serde_json::json!({
            "event_id": self.event_id,
            "type": self.status.event_type(),
            "job_id": self.job_id,
            "correlation_id": self.correlation_id,
            "command_type": self.command_type,
            "status": self.status,
            "progress_percent": self.progress_percent,
            "result": result,
            "error": self.error,
            "occurred_at": self.occurred_at,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> ResultEvent {
        ResultEvent {
            event_id: "0190b3c4-1111-7000-8000-000000000002".to_owned(),
            job_id: "0190b3c4-0000-7000-8000-000000000001".to_owned(),
            tenant: "acme".to_owned(),
            correlation_id: "c1".to_owned(),
            command_type: "ledger.transfer".to_owned(),
            status: JobStatus::Failed,
            progress_percent: Some(40),
            result_json: Some("{}".to_owned()),
            error: Some(JobError { code: "insufficient_funds".to_owned(), message: "no".to_owned() }),
            callback_url: Some("https://example.com/hook".to_owned()),
            occurred_at: 1_700_000_000_000,
        }
    }

    #[test]
    fn round_trips_through_avro_with_every_optional_field() {
        let event = sample();
        let bytes = event.encode().unwrap();
        assert_eq!(ResultEvent::decode(&schema::RESULT.id, &bytes).unwrap(), event);
    }

    /// Version 3 added `cancelled`: a reader of version 2 reads it as
    /// `processing`, so an older consumer waits for a terminal status it
    /// knows instead of failing on the event.
    #[test]
    fn a_reader_of_version_2_reads_cancelled_as_processing() {
        let v2 = schema::RELEASES.iter().find(|r| r.family == "result" && r.version == 2).unwrap().parse();
        let mut event = sample();
        event.status = JobStatus::Cancelled;
        let bytes = event.encode().unwrap();
        // The single-object marker (2 bytes) and fingerprint (8), then the datum.
        let read: ResultEvent = schema::decode_datum(&schema::RESULT.schema, &v2.schema, &bytes[10..]).unwrap();
        assert_eq!(read.status, JobStatus::Processing);
        assert_eq!(ResultEvent::decode(&schema::RESULT.id, &bytes).unwrap().status, JobStatus::Cancelled);
    }

    /// A later version that adds a status: the current reader reads it as
    /// `processing` (the enum's default) instead of refusing the event.
    #[test]
    fn a_status_the_reader_does_not_know_is_read_as_processing() {
        let mut later: serde_json::Value = serde_json::from_str(schema::RESULT_AVSC).unwrap();
        let status = later["fields"].as_array_mut().unwrap().iter_mut().find(|f| f["name"] == "status").unwrap();
        status["type"]["symbols"].as_array_mut().unwrap().push("archived".into());
        let later = apache_avro::Schema::parse(&later).unwrap();

        let mut event = serde_json::to_value(sample()).unwrap();
        event["status"] = "archived".into();
        let value = apache_avro::to_value(&event).unwrap().resolve(&later).unwrap();
        let written = apache_avro::to_avro_datum(&later, value).unwrap();
        let read: ResultEvent = schema::decode_datum(&later, &schema::RESULT.schema, &written).unwrap();
        assert_eq!(read.status, JobStatus::Processing);
        assert_eq!(read.event_id, sample().event_id);
    }

    #[test]
    fn status_only_moves_forward() {
        assert!(JobStatus::Processing.rank() > JobStatus::Accepted.rank());
        assert!(JobStatus::Succeeded.rank() > JobStatus::Processing.rank());
        assert_eq!(JobStatus::parse("dead_lettered"), Some(JobStatus::DeadLettered));
        assert_eq!(JobStatus::DeadLettered.event_type(), "job.dead_lettered");
    }
}
