//! Result events published on a test's results topic as the processor would,
//! for tests of what reads them (the notifier, ingest's projection).

use std::time::Duration;

use crate::{TestEnv, kafka_producer};

impl TestEnv {
    /// Publish `event` on this test's results topic exactly as the processor
    /// does: Avro body, envelope headers (`message-id` = `event_id`), keyed by
    /// job id. Publishing the same event twice is a redelivery.
    pub async fn publish_result(&self, event: &onceflow_contracts::ResultEvent) {
        use rdkafka::producer::FutureRecord;
        let envelope = result_envelope(event);
        let payload = event.encode().expect("encodable result");
        let topic = self.kafka.topics().results;
        let producer = kafka_producer(&self.kafka);
        let record: FutureRecord<'_, str, [u8]> = FutureRecord::to(&topic)
            .key(event.job_id.as_str())
            .payload(payload.as_slice())
            .headers(onceflow_runtime::kafka::headers(&envelope));
        producer.send(record, Duration::from_secs(30)).await.map_err(|(error, _)| error).expect("result published");
    }
}

/// The envelope the processor puts on `event` (`message-id` = `event_id`,
/// caused by the job's command).
pub fn result_envelope(event: &onceflow_contracts::ResultEvent) -> onceflow_contracts::Envelope {
    onceflow_contracts::Envelope {
        message_id: uuid::Uuid::parse_str(&event.event_id).expect("event ids are UUIDs"),
        correlation_id: event.correlation_id.clone(),
        causation_id: Some(event.job_id.clone()),
        tenant: event.tenant.clone(),
        message_type: event.status.event_type(),
        schema_id: onceflow_contracts::schema::RESULT.id.clone(),
        traceparent: None,
        tracestate: None,
    }
}

/// A terminal result event of a new job of tenant `dev`, as the processor
/// would publish it, with `callback_url`.
pub fn result_event(
    status: onceflow_contracts::JobStatus,
    callback_url: Option<&str>,
) -> onceflow_contracts::ResultEvent {
    let job_id = uuid::Uuid::now_v7().to_string();
    onceflow_contracts::ResultEvent {
        event_id: uuid::Uuid::now_v7().to_string(),
        job_id: job_id.clone(),
        tenant: "dev".to_owned(),
        correlation_id: format!("corr-{job_id}"),
        command_type: "ledger.deposit".to_owned(),
        status,
        progress_percent: None,
        result_json: Some(r#"{"balance": 42}"#.to_owned()),
        error: None,
        callback_url: callback_url.map(str::to_owned),
        occurred_at: 1_700_000_000_000,
    }
}
