//! End-to-end tests: the three services against the real PostgreSQL and the
//! real broker, reached over the network.

mod chaos;
mod flow;
mod ingest;
mod notifier;
mod processor;
mod relay;
mod statement;
mod webhooks;
