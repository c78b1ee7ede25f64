//! The test harness: starts onceflow's services in-process against the real
//! PostgreSQL and the real Kafka-compatible broker, each test in its own
//! databases, topics and consumer groups so tests never see each other's state.
//!
//! Where to find the real parts (the README's test command starts the broker):
//! - `ONCEFLOW_TEST_KAFKA_BROKERS` (default `127.0.0.1:9092`)
//! - `ONCEFLOW_TEST_DATABASE_URL`, a server URL without database name
//!   (default `postgres://postgres@127.0.0.1:5432`)
//!
//! One module per role, everything re-exported here: `env` (a test's
//! isolated world and the services it starts in-process), `clients` and
//! `sse` (the services' HTTP APIs and event streams as a client uses them),
//! `topics` and `raw_produce` (the broker seen from outside the services),
//! `processes` and `broker` (service binaries and a broker run as real
//! processes), `results`, `webhook_receiver` and `push_handler` (what the
//! processor would publish, and the servers a test runs for the services to
//! call), `stack` (the whole stack with a canary tenant), `faults` (faults
//! injected into a processor's database), `traces` (an OTLP receiver).

use std::time::Duration;

mod broker;
mod clients;
mod env;
mod faults;
mod processes;
mod push_handler;
mod raw_produce;
mod results;
mod sse;
mod stack;
mod topics;
mod traces;
mod webhook_receiver;

pub use broker::OwnBroker;
pub use clients::{ApiResponse, DeliveriesClient, IngestClient};
pub use env::{Service, TestEnv, database_server, development_config};
pub use faults::{allow_postings, refuse_postings};
pub use processes::{ProcessStack, ServiceProcess, free_addr, python_example};
pub use push_handler::{PushHandler, PushReply, PushRequest};
pub use raw_produce::produce_by_hand;
pub use results::{result_envelope, result_event};
pub use sse::{SseClient, stream_token};
pub use stack::{CANARY_API_KEY, CANARY_TENANT, CANARY_TIMEOUT, Stack, canary_tenant_key};
pub use topics::{
    PositionedRecord, Record, TopicReader, committed_offsets, kafka_producer, published_event_ids, read_topic_to_end,
};
pub use traces::{OtlpReceiver, ReceivedSpan, span_tree};
pub use webhook_receiver::{ReceivedWebhook, Reply, WebhookReceiver};

/// The development API key every test tenant `dev` uses (from the defaults).
pub const DEV_API_KEY: &str = "dev-onceflow-key";
/// The API key of the development tenant `probe`, the synthetic probe's.
pub const PROBE_API_KEY: &str = "probe-onceflow-key";
/// How long a test waits for an outcome. Generous: a first consumer-group join
/// on the broker takes 20–45 s.
pub const OUTCOME_TIMEOUT: Duration = Duration::from_secs(120);

/// Poll `check` every 100 ms until it returns `Some`, or panic after `timeout`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
