//! End-to-end tests: the three services against the real PostgreSQL and the
//! real broker, reached over the network.

mod backlog;
mod backpressure;
mod batching;
mod breakers;
mod chaos;
mod config;
mod fair_share;
mod flow;
mod group_commit;
mod handlers;
mod hostile_ingest;
mod hostile_processor;
mod hostile_results;
mod http;
mod ingest;
mod keys;
mod lanes;
mod live_page;
mod long_work;
mod long_work_kill;
mod metrics;
mod notifier;
mod processor;
mod python_consumer;
mod python_handler;
mod python_webhooks;
mod redrive;
mod relay;
mod statement;
mod stream_limits;
mod stream_tokens;
mod tls;
mod tracing;
mod typescript_worker;
mod webhooks;
