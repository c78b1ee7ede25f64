//! Watchers that keep gauges current in the background: the database
//! pool's use and each consumer group's lag.

use std::{sync::Arc, time::Duration};

use tokio_util::sync::CancellationToken;

use super::{CONSUMER_LAG, DB_POOL_CONNECTIONS};
use crate::{config::KafkaConfig, kafka::LagProbe};

/// Keep [`DB_POOL_CONNECTIONS`] current for `pool`, every `interval`, until `shutdown`.
pub async fn watch_pool(pool: sqlx::PgPool, interval: Duration, shutdown: CancellationToken) {
    loop {
        let idle = pool.num_idle() as f64;
        let size = f64::from(pool.size());
        metrics::gauge!(DB_POOL_CONNECTIONS, "state" => "idle").set(idle);
        metrics::gauge!(DB_POOL_CONNECTIONS, "state" => "in_use").set((size - idle).max(0.0));
        metrics::gauge!(DB_POOL_CONNECTIONS, "state" => "max").set(f64::from(pool.options().get_max_connections()));
        if !crate::shutdown::pause(interval, &shutdown).await {
            return;
        }
    }
}

/// Keep [`CONSUMER_LAG`] current for `group` on each of `topics`, every
/// `interval`, until `shutdown` (measured from outside the group, see
/// [`LagProbe`]). A topic whose lag cannot be measured (the broker is down)
/// keeps its last figures and is logged at debug level.
pub async fn watch_consumer_lag(
    config: KafkaConfig,
    group: String,
    topics: Vec<String>,
    interval: Duration,
    shutdown: CancellationToken,
) {
    let probes: Vec<Arc<LagProbe>> = topics
        .iter()
        .filter_map(|topic| match LagProbe::new(&config, &group, topic) {
            Ok(probe) => Some(Arc::new(probe)),
            Err(error) => {
                tracing::warn!(%error, topic, "cannot measure the consumer lag");
                None
            }
        })
        .collect();
    loop {
        for probe in &probes {
            let measuring = probe.clone();
            match tokio::task::spawn_blocking(move || measuring.measure(Duration::from_secs(2))).await {
                Ok(Ok(lag)) => {
                    for partition in &lag.partitions {
                        metrics::gauge!(
                            CONSUMER_LAG,
                            "topic" => probe.topic().to_owned(),
                            "partition" => partition.partition.to_string(),
                            "group" => group.clone(),
                        )
                        .set(partition.lag as f64);
                    }
                }
                Ok(Err(error)) => tracing::debug!(%error, topic = probe.topic(), "cannot measure the consumer lag"),
                Err(error) => tracing::warn!(%error, "the lag measurement failed"),
            }
        }
        if !crate::shutdown::pause(interval, &shutdown).await {
            return;
        }
    }
}

/// Start the watchers every service runs: its pool's use and its consumer
/// group's lag on `topics`, refreshed every few seconds.
pub fn watch_service(
    tasks: &mut tokio::task::JoinSet<()>,
    pool: &sqlx::PgPool,
    kafka: &KafkaConfig,
    group: &str,
    topics: &[&str],
    shutdown: &CancellationToken,
) {
    tasks.spawn(watch_pool(pool.clone(), Duration::from_secs(5), shutdown.clone()));
    let topics = topics.iter().map(|&topic| topic.to_owned()).collect();
    tasks.spawn(watch_consumer_lag(kafka.clone(), group.to_owned(), topics, Duration::from_secs(5), shutdown.clone()));
}
