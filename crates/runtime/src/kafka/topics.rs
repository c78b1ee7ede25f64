//! Topic creation: the topics a service uses are created at start unless
//! they exist, retried in the background while the broker is down.

use std::time::Duration;

use rdkafka::{
    admin::{AdminClient, AdminOptions, NewTopic, TopicReplication},
    client::DefaultClientContext,
    types::RDKafkaErrorCode,
};
use tokio_util::sync::CancellationToken;

use super::client_config;
use crate::{Error, Result, config::KafkaConfig, failure::Backoff};

/// Create `topics` with the configured partition count unless they exist.
pub async fn ensure_topics(config: &KafkaConfig, topics: &[&str]) -> Result<()> {
    create_topics(config, topics, &[]).await
}

/// [`ensure_topics`] for topics that hold state rather than events: the
/// broker keeps the latest record of each key (`cleanup.policy=compact`),
/// so a new consumer reading from the start gets every key's current value.
pub async fn ensure_compacted_topics(config: &KafkaConfig, topics: &[&str]) -> Result<()> {
    create_topics(config, topics, &[("cleanup.policy", "compact")]).await
}

async fn create_topics(config: &KafkaConfig, topics: &[&str], settings: &[(&str, &str)]) -> Result<()> {
    if topics.is_empty() {
        return Ok(());
    }
    let admin: AdminClient<DefaultClientContext> = client_config(config)?.create()?;
    let new_topics: Vec<NewTopic<'_>> = topics
        .iter()
        .map(|name| {
            settings.iter().fold(
                NewTopic::new(name, config.partitions, TopicReplication::Fixed(config.replication_factor)),
                |topic, (k, v)| topic.set(k, v),
            )
        })
        .collect();
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    for outcome in admin.create_topics(&new_topics, &options).await? {
        match outcome {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => {
                return Err(Error::Config(format!("cannot create topic {topic}: {code}")));
            }
        }
    }
    Ok(())
}

/// [`ensure_topics`] of `topics` and [`ensure_compacted_topics`] of
/// `compacted` until both succeed (or `shutdown`), so a service starts and
/// accepts work while the broker is still down.
pub async fn ensure_topics_eventually(
    config: KafkaConfig,
    topics: Vec<String>,
    compacted: Vec<String>,
    shutdown: CancellationToken,
) {
    let names: Vec<&str> = topics.iter().map(String::as_str).collect();
    let compacted: Vec<&str> = compacted.iter().map(String::as_str).collect();
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
    loop {
        let created = match ensure_topics(&config, &names).await {
            Ok(()) => ensure_compacted_topics(&config, &compacted).await,
            Err(error) => Err(error),
        };
        match created {
            Ok(()) => return,
            Err(error) => tracing::warn!(%error, "cannot create topics yet; retrying"),
        }
        if !backoff.wait(&shutdown).await {
            return;
        }
    }
}
