//! Spreading consumed messages over the lanes without letting one lane hold
//! up the others.
//!
//! Each partition has one lane (partition % lanes), so a partition's
//! messages, and with them each key's, stay in order. A lane's queue is
//! bounded ([`super::LANE_CAPACITY`]). When it is full (the lane's commands
//! are slow, or it waits out an outage), the consumer loop does not wait for
//! it: it keeps the message, and every later one of that lane, in the lane's
//! overflow, in order, and pauses the lane's partitions in the consumer, so
//! librdkafka fetches nothing more of them; the other lanes' partitions go on.
//! Once the lane has room the overflow moves into its queue and its
//! partitions are resumed, from the first message not yet taken.
//!
//! The overflow is bounded by what the consumer had already fetched for
//! those partitions when they were paused (librdkafka's prefetch, itself
//! bounded by `max.partition.fetch.bytes` per partition); a message kept in
//! it has no stored offset, so a processor that stops with it there leaves it
//! to be delivered again.

use std::collections::VecDeque;

use onceflow_runtime::kafka;
use rdkafka::{Message as _, TopicPartitionList, consumer::Consumer as _, message::OwnedMessage};
use tokio::sync::mpsc::{self, error::TrySendError};

/// Every lane's queue and overflow.
pub(super) struct Lanes {
    queues: Vec<mpsc::Sender<OwnedMessage>>,
    overflow: Vec<VecDeque<OwnedMessage>>,
}

/// A lane stopped (it abandoned a message on shutdown): consumption ends.
#[derive(Debug)]
pub(super) struct LaneStopped;

impl Lanes {
    pub(super) fn new(queues: Vec<mpsc::Sender<OwnedMessage>>) -> Self {
        let overflow = queues.iter().map(|_| VecDeque::new()).collect();
        Self { queues, overflow }
    }

    fn lane_of(&self, message: &OwnedMessage) -> usize {
        usize::try_from(message.partition()).unwrap_or(0) % self.queues.len()
    }

    /// Whether a lane waits for room (the loop then looks again soon).
    pub(super) fn any_waiting(&self) -> bool {
        self.overflow.iter().any(|kept| !kept.is_empty())
    }

    /// Give `message` to its lane; if the lane is full, or has messages kept
    /// already, keep it after them and pause its partition(s).
    pub(super) fn dispatch(&mut self, consumer: &kafka::Consumer, message: OwnedMessage) -> Result<(), LaneStopped> {
        let lane = self.lane_of(&message);
        if !self.overflow[lane].is_empty() {
            // A partition assigned since the lane was paused is paused too.
            pause(consumer, &one_partition(&message));
            self.overflow[lane].push_back(message);
            return Ok(());
        }
        match self.queues[lane].try_send(message) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(message)) => {
                tracing::debug!(lane, partition = message.partition(), "lane full; pausing its partitions");
                metrics::counter!("onceflow_lane_pauses_total").increment(1);
                self.overflow[lane].push_back(message);
                pause(consumer, &self.partitions_of(consumer, lane));
                Ok(())
            }
            Err(TrySendError::Closed(_)) => Err(LaneStopped),
        }
    }

    /// Move kept messages into lanes that have room, in order; resume the
    /// partitions of a lane whose overflow emptied.
    pub(super) fn drain(&mut self, consumer: &kafka::Consumer) -> Result<(), LaneStopped> {
        for lane in 0..self.queues.len() {
            if self.overflow[lane].is_empty() {
                continue;
            }
            while let Some(message) = self.overflow[lane].pop_front() {
                match self.queues[lane].try_send(message) {
                    Ok(()) => {}
                    Err(TrySendError::Full(message)) => {
                        self.overflow[lane].push_front(message);
                        break;
                    }
                    Err(TrySendError::Closed(_)) => return Err(LaneStopped),
                }
            }
            if self.overflow[lane].is_empty() {
                tracing::debug!(lane, "lane has room again; resuming its partitions");
                if let Err(error) = consumer.resume(&self.partitions_of(consumer, lane)) {
                    tracing::debug!(%error, lane, "cannot resume the lane's partitions (a rebalance?)");
                }
            }
        }
        Ok(())
    }

    /// The partitions assigned to this consumer that `lane` serves.
    fn partitions_of(&self, consumer: &kafka::Consumer, lane: usize) -> TopicPartitionList {
        let mut list = TopicPartitionList::new();
        if let Ok(assignment) = consumer.assignment() {
            for element in assignment.elements() {
                if usize::try_from(element.partition()).unwrap_or(0) % self.queues.len() == lane {
                    list.add_partition(element.topic(), element.partition());
                }
            }
        }
        list
    }
}

fn one_partition(message: &OwnedMessage) -> TopicPartitionList {
    let mut list = TopicPartitionList::new();
    list.add_partition(message.topic(), message.partition());
    list
}

fn pause(consumer: &kafka::Consumer, partitions: &TopicPartitionList) {
    if let Err(error) = consumer.pause(partitions) {
        // A partition revoked meanwhile: its messages go to its new owner.
        tracing::debug!(%error, "cannot pause a lane's partitions");
    }
}
