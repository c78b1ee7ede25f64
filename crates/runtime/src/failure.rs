//! Which failures end a record and which make a consumer wait (guarantee G8).
//!
//! Every consumer of a record (the processor's apply and dead-letter paths,
//! the notifier's result store and webhook enqueue, ingest's projection)
//! sorts each error it meets into one of two kinds:
//!
//! - [`Failure::Data`]: the record itself is the problem and every retry
//!   would fail the same way (PostgreSQL classes 22 "data exception" and 23
//!   "integrity constraint violation", a value that cannot be encoded, a
//!   message too large for the broker, undecodable bytes). The record ends at
//!   once: applied as far as it can be, refused, or parked for an operator.
//!   Waiting on it would stall every record behind it.
//! - [`Failure::Outage`]: something the record needs is down or busy (lost
//!   connection, pool timeout, serialization failure `40001`, deadlock
//!   `40P01`, server shutdown `57P01`, lock timeout, broker unreachable). The
//!   consumer waits with [`Backoff`] and tries again, with no count bound,
//!   and never dead-letters: an outage must not destroy work.
//!
//! What is neither clearly data nor clearly infrastructure (a syntax error,
//! an internal server error) counts as an outage: it is a fault of the
//! service or its database, not of one record, and dead-lettering every
//! record until someone notices would destroy work; waiting keeps it.

use std::time::Duration;

use backon::{BackoffBuilder as _, ExponentialBuilder};
use rdkafka::{error::KafkaError, types::RDKafkaErrorCode};
use tokio_util::sync::CancellationToken;

/// What kind of failure an error is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The record can never succeed as it is: end it now.
    Data,
    /// A dependency is down or busy: wait and retry, without bound.
    Outage,
}

impl Failure {
    /// The kind of a database error.
    pub fn of_database(error: &sqlx::Error) -> Self {
        match error {
            sqlx::Error::Database(database) => database.code().map_or(Self::Outage, |code| Self::of_sqlstate(&code)),
            // A value that cannot be bound or read back is the record's.
            sqlx::Error::Encode(_) | sqlx::Error::Decode(_) | sqlx::Error::ColumnDecode { .. } => Self::Data,
            // Connection, TLS, protocol and pool trouble, and everything else.
            _ => Self::Outage,
        }
    }

    /// The kind of a PostgreSQL SQLSTATE.
    pub fn of_sqlstate(code: &str) -> Self {
        match code.get(..2) {
            // 22: data exception (bad encoding, NUL in text, out of range,
            // invalid JSON...), 23: integrity constraint violation, 54:
            // program limit exceeded (54000: an index row too large, e.g. a
            // 4 KB correlation id; 54001: a statement too complex). All are
            // properties of the values written; a retry writes the same values.
            Some("22" | "23" | "54") => Self::Data,
            // 08 connection, 40 rollback (serialization, deadlock), 53
            // resources, 55 lock not available, 57 operator intervention, and
            // anything unexpected: the service or its database, not the record.
            _ => Self::Outage,
        }
    }

    /// The kind of a Kafka client error.
    pub fn of_kafka(error: &KafkaError) -> Self {
        match error.rdkafka_error_code() {
            Some(
                RDKafkaErrorCode::MessageSizeTooLarge
                | RDKafkaErrorCode::InvalidMessageSize
                | RDKafkaErrorCode::InvalidMessage
                | RDKafkaErrorCode::InvalidRecord
                | RDKafkaErrorCode::BadMessage
                | RDKafkaErrorCode::InvalidArgument,
            ) => Self::Data,
            _ => Self::Outage,
        }
    }

    pub fn is_data(self) -> bool {
        self == Self::Data
    }
}

/// The waits between retries of an outage: exponential from `initial` up to
/// `max`, with jitter so instances that failed together do not retry in
/// lockstep, and no limit on the number of retries.
#[derive(Debug)]
pub struct Backoff {
    delays: backon::ExponentialBackoff,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Self {
        let delays = ExponentialBuilder::default()
            .with_min_delay(initial)
            .with_max_delay(max)
            .with_jitter()
            .without_max_times()
            .build();
        Self { delays }
    }

    /// The next delay.
    pub fn next_delay(&mut self) -> Duration {
        // Without a bound on the number of times, the iterator never ends.
        self.delays.next().unwrap_or(Duration::from_secs(1))
    }

    /// Sleep the next delay; `false` if `shutdown` came first.
    pub async fn wait(&mut self, shutdown: &CancellationToken) -> bool {
        let delay = self.next_delay();
        tokio::select! {
            () = shutdown.cancelled() => false,
            () = tokio::time::sleep(delay) => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_exceptions_constraint_violations_and_program_limits_end_the_record() {
        for code in ["22021", "22003", "22P02", "22P05", "23505", "23503", "23514", "54000", "54001"] {
            assert_eq!(Failure::of_sqlstate(code), Failure::Data, "{code}");
        }
    }

    #[test]
    fn outages_and_faults_of_the_service_make_it_wait() {
        for code in ["40001", "40P01", "57P01", "57P03", "08006", "53300", "55P03", "42601", "XX000"] {
            assert_eq!(Failure::of_sqlstate(code), Failure::Outage, "{code}");
        }
        assert_eq!(Failure::of_database(&sqlx::Error::PoolTimedOut), Failure::Outage);
        let io = sqlx::Error::Io(std::io::Error::from(std::io::ErrorKind::ConnectionReset));
        assert_eq!(Failure::of_database(&io), Failure::Outage);
    }

    #[test]
    fn oversized_messages_are_data_and_an_unreachable_broker_an_outage() {
        let too_large = KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge);
        assert_eq!(Failure::of_kafka(&too_large), Failure::Data);
        let timed_out = KafkaError::MessageProduction(RDKafkaErrorCode::MessageTimedOut);
        assert_eq!(Failure::of_kafka(&timed_out), Failure::Outage);
        let transport = KafkaError::MessageProduction(RDKafkaErrorCode::BrokerTransportFailure);
        assert_eq!(Failure::of_kafka(&transport), Failure::Outage);
    }

    #[test]
    fn backoff_grows_to_its_cap_and_never_ends() {
        let mut backoff = Backoff::new(Duration::from_millis(10), Duration::from_millis(200));
        let delays: Vec<Duration> = (0..50).map(|_| backoff.next_delay()).collect();
        // Jitter adds up to one more delay on top of the capped one.
        assert!(delays.iter().all(|d| *d <= Duration::from_millis(400)), "{delays:?}");
        assert!(delays[40..].iter().all(|d| *d >= Duration::from_millis(200)), "{delays:?}");
    }
}
