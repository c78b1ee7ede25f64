//! `onceflow results [--from-offset N | --from-time T] [--follow]`: the
//! results topic as any outside consumer reads it, decoded with the same
//! calls the notifier and ingest use (`envelope_of`, then
//! `ResultEvent::decode` with the schema the envelope names).
//!
//! The consumer joins no group and commits nothing: it assigns itself every
//! partition at the asked position, so reading needs no group join and
//! leaves no offsets on the broker. Without `--follow` it stops at the end of the
//! topic: once every partition has reached the high watermark it saw at the
//! start and nothing more arrived for a moment (a broker may report a
//! watermark short of a batch it just wrote, so the end is read "until
//! quiet", not only "to the watermark").

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use onceflow_contracts::{ResultEvent, topics::Topics};
use onceflow_runtime::kafka::{self, MAX_FETCH_BYTES, MAX_PARTITION_FETCH_BYTES};
use rdkafka::{
    ClientConfig, Message as _, Offset, TopicPartitionList,
    consumer::{BaseConsumer, Consumer as _},
    message::BorrowedMessage,
};

use crate::{Context, args::ResultsArgs, error::CliError, output};

const BROKER: &str = "the broker";
/// How long the topic must stay quiet past its watermarks to be at its end.
const QUIET: Duration = Duration::from_secs(1);
const POLL: Duration = Duration::from_millis(100);
/// The broker's longest wait before it answers a fetch with no data.
const FETCH_WAIT_MAX_MS: &str = "100";

pub async fn run(ctx: &Context, args: ResultsArgs) -> Result<(), CliError> {
    let reader = Reader {
        brokers: ctx.kafka_brokers.clone(),
        topic: Topics::with_prefix(&ctx.topic_prefix).results,
        timeout: ctx.api.timeout,
        json: ctx.json,
    };
    // librdkafka's calls block: the whole read runs on a thread of its own.
    tokio::task::spawn_blocking(move || reader.read(&args))
        .await
        .map_err(|e| CliError::Internal(format!("the topic reader stopped: {e}")))?
}

struct Reader {
    brokers: String,
    topic: String,
    timeout: Duration,
    json: bool,
}

impl Reader {
    fn read(&self, args: &ResultsArgs) -> Result<(), CliError> {
        let consumer = self.consumer()?;
        let partitions = self.partitions(&consumer)?;
        let start = self.start(&consumer, &partitions, args)?;
        // Where each partition ends now; it is reached when the next offset
        // to read is at or past it.
        let mut short_of_end: HashMap<i32, i64> = HashMap::new();
        for (&partition, &next) in &start {
            let (_, high) = consumer
                .fetch_watermarks(&self.topic, partition, self.timeout)
                .map_err(|e| unavailable(format!("cannot read where partition {partition} ends: {e}")))?;
            if next < high {
                short_of_end.insert(partition, high);
            }
        }
        let mut assignment = TopicPartitionList::new();
        for (&partition, &next) in &start {
            assignment
                .add_partition_offset(&self.topic, partition, Offset::Offset(next))
                .map_err(|e| CliError::Internal(format!("cannot assign partition {partition}: {e}")))?;
        }
        consumer.assign(&assignment).map_err(|e| unavailable(format!("cannot assign the partitions: {e}")))?;

        let mut last_progress = Instant::now();
        let mut undecodable = 0_u64;
        let mut last_error: Option<String> = None;
        loop {
            if !args.follow && short_of_end.is_empty() && last_progress.elapsed() >= QUIET {
                break;
            }
            if !args.follow && last_progress.elapsed() >= self.timeout {
                let reason = last_error.unwrap_or_else(|| "no records arrived".to_owned());
                return Err(unavailable(format!(
                    "could not read {} to its end within {}s ({reason}); partitions short of it: {short_of_end:?}",
                    self.topic,
                    self.timeout.as_secs_f64()
                )));
            }
            match consumer.poll(POLL) {
                None => {}
                Some(Err(error)) => {
                    // librdkafka reconnects by itself; say so once per kind of trouble.
                    let error = error.to_string();
                    if last_error.as_ref() != Some(&error) {
                        output::note(&format!("broker: {error} (still trying)"));
                    }
                    last_error = Some(error);
                }
                Some(Ok(message)) => {
                    last_progress = Instant::now();
                    last_error = None;
                    let (partition, offset) = (message.partition(), message.offset());
                    if short_of_end.get(&partition).is_some_and(|&high| offset + 1 >= high) {
                        short_of_end.remove(&partition);
                    }
                    // The time lookup only says where to start: a broker
                    // that answers it loosely (nisshi gives offset 0 when no
                    // record is that recent) must not show older records.
                    let stamped = message.timestamp().to_millis();
                    let before = args.from_time.zip(stamped).is_some_and(|(at, ts)| ts < at.timestamp_millis());
                    if !before && !self.print(&message)? {
                        undecodable += 1;
                    }
                }
            }
        }
        if undecodable > 0 {
            output::note(&format!("{undecodable} record(s) could not be decoded (see above)"));
        }
        Ok(())
    }

    fn consumer(&self) -> Result<BaseConsumer, CliError> {
        ClientConfig::new()
            .set("bootstrap.servers", &self.brokers)
            .set("client.id", "onceflow-cli")
            // librdkafka assigns partitions only to a consumer with a group
            // id; a fresh one, never joined (no subscribe) and never
            // committed to, leaves nothing on the broker.
            .set("group.id", format!("onceflow-cli-{}", uuid::Uuid::new_v4()))
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            // An offset no longer retained starts at the oldest kept.
            .set("auto.offset.reset", "earliest")
            .set("fetch.wait.max.ms", FETCH_WAIT_MAX_MS)
            .set("max.partition.fetch.bytes", MAX_PARTITION_FETCH_BYTES.to_string())
            .set("fetch.max.bytes", MAX_FETCH_BYTES.to_string())
            .create()
            .map_err(|e| CliError::Usage(format!("cannot set up a Kafka consumer for {}: {e}", self.brokers)))
    }

    /// The topic's partitions; a topic the broker does not have is bad input.
    fn partitions(&self, consumer: &BaseConsumer) -> Result<Vec<i32>, CliError> {
        let metadata = consumer
            .fetch_metadata(Some(&self.topic), self.timeout)
            .map_err(|e| unavailable(format!("cannot reach {}: {e}", self.brokers)))?;
        let topic = metadata.topics().iter().find(|topic| topic.name() == self.topic);
        let partitions: Vec<i32> = topic.map(|t| t.partitions().iter().map(|p| p.id()).collect()).unwrap_or_default();
        if partitions.is_empty() || topic.is_some_and(|t| t.error().is_some()) {
            return Err(CliError::Rejected {
                service: BROKER,
                status: 404,
                kind: Some("unknown-topic".to_owned()),
                detail: format!("no topic {} (is --topic-prefix right?)", self.topic),
            });
        }
        Ok(partitions)
    }

    /// The first offset to read in each partition.
    fn start(
        &self,
        consumer: &BaseConsumer,
        partitions: &[i32],
        args: &ResultsArgs,
    ) -> Result<HashMap<i32, i64>, CliError> {
        let mut start = HashMap::new();
        if let Some(at) = args.from_time {
            let mut wanted = TopicPartitionList::new();
            for &partition in partitions {
                wanted
                    .add_partition_offset(&self.topic, partition, Offset::Offset(at.timestamp_millis()))
                    .map_err(|e| CliError::Internal(format!("partition {partition}: {e}")))?;
            }
            let found = consumer
                .offsets_for_times(wanted, self.timeout)
                .map_err(|e| unavailable(format!("cannot look up offsets by time: {e}")))?;
            for element in found.elements() {
                let next = match element.offset() {
                    Offset::Offset(offset) => offset,
                    // Nothing written since: start at the end.
                    _ => self.watermarks(consumer, element.partition())?.1,
                };
                start.insert(element.partition(), next);
            }
        } else {
            for &partition in partitions {
                let (low, high) = self.watermarks(consumer, partition)?;
                let next = args.from_offset.map_or(low, |offset| i64::try_from(offset).unwrap_or(i64::MAX));
                start.insert(partition, next.max(low).min(high));
            }
        }
        Ok(start)
    }

    fn watermarks(&self, consumer: &BaseConsumer, partition: i32) -> Result<(i64, i64), CliError> {
        consumer
            .fetch_watermarks(&self.topic, partition, self.timeout)
            .map_err(|e| unavailable(format!("cannot read the offsets of partition {partition}: {e}")))
    }

    /// Print one record; `false` if it could not be decoded (said on stderr).
    fn print(&self, message: &BorrowedMessage<'_>) -> Result<bool, CliError> {
        let (partition, offset) = (message.partition(), message.offset());
        let event = kafka::envelope_of(message).map_err(|e| format!("no valid envelope: {e}")).and_then(|envelope| {
            ResultEvent::decode(&envelope.schema_id, message.payload().unwrap_or_default())
                .map_err(|e| format!("undecodable result: {e}"))
        });
        let event = match event {
            Ok(event) => event,
            Err(reason) => {
                output::note(&format!("partition {partition} offset {offset}: {reason}"));
                return Ok(false);
            }
        };
        if self.json {
            let record = serde_json::json!({
                "partition": partition,
                "offset": offset,
                "timestamp": message.timestamp().to_millis(),
                "key": message.key().map(String::from_utf8_lossy),
                "event": event,
            });
            output::json(&record)?;
        } else {
            output::line(&human(partition, offset, &event))?;
        }
        Ok(true)
    }
}

fn unavailable(reason: String) -> CliError {
    CliError::Unavailable { service: BROKER, reason }
}

/// One result as a line: position, time, type, job, tenant and what it says.
fn human(partition: i32, offset: i64, event: &ResultEvent) -> String {
    let mut line = format!(
        "{partition}:{offset}  {}  {:<17} job {}  tenant {}  {}",
        output::millis_rfc3339(event.occurred_at),
        event.status.event_type(),
        event.job_id,
        event.tenant,
        event.command_type
    );
    if let Some(percent) = event.progress_percent {
        line.push_str(&format!("  {percent}%"));
    }
    if let Some(result) = &event.result_json {
        line.push_str(&format!("  result {result}"));
    }
    if let Some(error) = &event.error {
        line.push_str(&format!("  error {}: {}", error.code, error.message));
    }
    line
}

#[cfg(test)]
mod tests {
    use onceflow_contracts::{JobError, JobStatus};

    use super::*;

    #[test]
    fn a_result_reads_as_one_line() {
        let event = ResultEvent {
            event_id: "e1".to_owned(),
            job_id: "j1".to_owned(),
            tenant: "dev".to_owned(),
            correlation_id: "c1".to_owned(),
            command_type: "ledger.transfer".to_owned(),
            status: JobStatus::Failed,
            progress_percent: None,
            result_json: None,
            error: Some(JobError { code: "insufficient_funds".to_owned(), message: "no".to_owned() }),
            callback_url: None,
            occurred_at: 1_700_000_000_000,
        };
        assert_eq!(
            human(1, 7, &event),
            "1:7  2023-11-14T22:13:20.000Z  job.failed        job j1  tenant dev  ledger.transfer  error insufficient_funds: no"
        );
    }
}
