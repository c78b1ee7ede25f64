//! End-to-end tests: the three services against the real PostgreSQL and the
//! real broker, reached over the network.

mod flow;
mod hostile_processor;
mod ingest;
mod notifier;
mod processor;
mod relay;
mod statement;
mod webhooks;
