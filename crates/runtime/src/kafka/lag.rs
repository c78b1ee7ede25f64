//! Consumer group lag: how far a group is behind on a topic, read from
//! outside the group.

use std::time::Duration;

use rdkafka::consumer::Consumer as _;

use super::{client_config, clients::pass_through};
use crate::{Result, config::KafkaConfig};

/// How far a consumer group is behind on one partition of a topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartitionLag {
    pub partition: i32,
    /// Records the group has not committed yet.
    pub lag: i64,
    /// The group's committed offset (the partition's first offset while it
    /// never committed).
    pub committed: i64,
}

/// How far a consumer group is behind on a topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupLag {
    pub partitions: Vec<PartitionLag>,
}

impl GroupLag {
    /// Records on the topic that the group has not committed yet.
    pub fn lag(&self) -> i64 {
        self.partitions.iter().map(|p| p.lag).sum()
    }

    /// Records the group has committed, counted from each partition's start:
    /// its increase over time is the group's drain rate.
    pub fn committed(&self) -> i64 {
        self.partitions.iter().map(|p| p.committed).sum()
    }
}

/// Reads a consumer group's progress on a topic: a consumer that carries
/// the group's id but never subscribes, so it reads the group's committed
/// offsets (as `kafka-consumer-groups --describe` does) without joining the
/// group or taking part in its rebalances, and never commits.
pub struct LagProbe {
    consumer: rdkafka::consumer::BaseConsumer,
    topic: String,
}

impl LagProbe {
    pub fn new(config: &KafkaConfig, group_id: &str, topic: &str) -> Result<Self> {
        let mut client = client_config(config)?;
        client.set("group.id", group_id).set("enable.auto.commit", "false");
        pass_through(&mut client, &config.consumer, "consumer")?;
        Ok(Self { consumer: client.create()?, topic: topic.to_owned() })
    }

    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// The group's lag now. Blocking (several broker round trips, each at
    /// most `timeout`): call it from `spawn_blocking`.
    pub fn measure(&self, timeout: Duration) -> Result<GroupLag> {
        use rdkafka::{Offset, TopicPartitionList};
        let metadata = self.consumer.fetch_metadata(Some(&self.topic), timeout)?;
        let ids: Vec<i32> = metadata
            .topics()
            .iter()
            .filter(|topic| topic.name() == self.topic)
            .flat_map(|topic| topic.partitions().iter().map(|partition| partition.id()))
            .collect();
        let mut wanted = TopicPartitionList::new();
        for id in &ids {
            wanted.add_partition(&self.topic, *id);
        }
        let committed = self.consumer.committed_offsets(wanted, timeout)?;
        let mut partitions = Vec::with_capacity(ids.len());
        for partition in ids {
            let (low, high) = self.consumer.fetch_watermarks(&self.topic, partition, timeout)?;
            let position = match committed.find_partition(&self.topic, partition).map(|p| p.offset()) {
                Some(Offset::Offset(offset)) => offset.clamp(low, high),
                _ => low,
            };
            partitions.push(PartitionLag { partition, lag: high - position, committed: position });
        }
        Ok(GroupLag { partitions })
    }
}
