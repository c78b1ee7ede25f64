//! Kafka set-up shared by the services: producers, consumers, topic creation,
//! envelope headers on records, and [`consume_parking`] (or its batched
//! form [`consume_parking_batched`]), the one loop every consumer of a topic
//! runs its records through.
//!
//! Producers are idempotent (`enable.idempotence`), so a retry inside
//! librdkafka neither duplicates nor reorders a partition's records.
//! Consumers never let librdkafka store offsets on their own
//! (`enable.auto.offset.store=false`): a service stores an offset only after
//! the message's effect is durable, and the background commit then sends it.
//!
//! Sizes are set together ([`MAX_RECORD_BYTES`]): producers refuse a request
//! above it, and consumers fetch at least that much per partition and per
//! request, so any record a service can produce its consumers can fetch. The
//! outbox refuses messages that could not fit (`onceflow_outbox::MAX_MESSAGE_BYTES`,
//! below this with room for framing), and the Avro decoder's allocation cap
//! (`onceflow_contracts::schema::MAX_DECODE_ALLOCATION`, 4 MiB) is above it, so
//! no record that fits is refused by the decoder for its size.
//!
//! The pieces, each in a module of its own and re-exported here:
//! - `clients`: the settings every client starts from, the producer and the
//!   consumer, and the pass-through properties;
//! - `membership`: whether a consumer holds an assignment ([`Membership`]);
//! - `topics`: topic creation at start ([`ensure_topics_eventually`]);
//! - `envelope`: the envelope as record headers;
//! - `consume`: the consume loop that ends, parks or waits on each record;
//! - `lag`: a consumer group's lag, read from outside the group ([`LagProbe`]).

mod clients;
mod consume;
mod envelope;
mod lag;
mod membership;
mod topics;

pub use clients::{
    Consumer, FETCH_WAIT_MAX_MS, LINGER_MS, MAX_FETCH_BYTES, MAX_PARTITION_FETCH_BYTES, MAX_RECORD_BYTES,
    client_config, consumer, producer,
};
pub use consume::{BatchError, RecordError, consume_parking, consume_parking_batched, next_message};
pub use envelope::{envelope_of, header_pairs, headers};
pub use lag::{GroupLag, LagProbe, PartitionLag};
pub use membership::{MEMBERSHIP_GRACE, Membership};
pub use topics::{ensure_compacted_topics, ensure_topics, ensure_topics_eventually};
