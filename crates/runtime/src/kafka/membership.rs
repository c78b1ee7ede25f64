//! Consumer group membership: whether a consumer holds an assignment, kept
//! current by the rebalance callbacks, for readiness.

use std::{
    sync::Mutex,
    time::{Duration, Instant},
};

use rdkafka::{
    client::ClientContext,
    consumer::{BaseConsumer, Consumer as _, ConsumerContext, Rebalance},
};

/// How long a consumer may be outside its group (joining after start, or
/// after a revocation or a group error) before it counts as having lost its
/// assignment: far longer than a rebalance takes, so only a consumer that
/// stays out (the group coordinator unreachable, the consumer removed for
/// not polling) is reported.
pub const MEMBERSHIP_GRACE: Duration = Duration::from_secs(30);

/// Whether a consumer holds an assignment, kept current by the rebalance
/// callbacks, for readiness (`/readyz`'s consumer checks).
///
/// An assignment of no partitions (more members than partitions) is a
/// membership like any other: that consumer is a standby, not broken.
#[derive(Debug)]
pub struct Membership {
    /// `Some(since)` while outside the group, `None` while a member.
    outside_since: Mutex<Option<Instant>>,
}

impl Membership {
    /// A consumer that has not joined its group yet, as of `now`.
    pub(super) fn new(now: Instant) -> Self {
        Self { outside_since: Mutex::new(Some(now)) }
    }

    fn set(&self, outside: bool, now: Instant) {
        let mut since = self.outside_since.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        *since = match (outside, *since) {
            (false, _) => None,
            (true, Some(earlier)) => Some(earlier),
            (true, None) => Some(now),
        };
    }

    /// `Err` when the consumer has been outside its group for longer than
    /// `grace` as of `now`.
    pub fn check(&self, now: Instant, grace: Duration) -> std::result::Result<(), String> {
        let since = *self.outside_since.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        match since.map(|since| now.saturating_duration_since(since)) {
            Some(outside) if outside > grace => {
                Err(format!("no partition assignment from its group for {}s", outside.as_secs()))
            }
            _ => Ok(()),
        }
    }
}

impl ClientContext for Membership {}

impl ConsumerContext for Membership {
    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let outside = match rebalance {
            Rebalance::Assign(_) => false,
            // Under the cooperative protocol a revocation may leave partitions assigned.
            Rebalance::Revoke(_) => consumer.assignment().map_or(true, |assigned| assigned.count() == 0),
            Rebalance::Error(error) => {
                tracing::warn!(%error, "consumer group rebalance failed");
                true
            }
        };
        self.set(outside, Instant::now());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Outside the group for longer than the grace (never joined, or revoked
    /// and not assigned again) is reported; a rebalance's short gap is not,
    /// and a membership of no partitions counts as one.
    #[test]
    fn membership_reports_a_consumer_outside_its_group_for_longer_than_the_grace() {
        let grace = Duration::from_secs(30);
        let start = Instant::now();
        let membership = Membership::new(start);
        assert!(membership.check(start + Duration::from_secs(29), grace).is_ok(), "joining");
        let error = membership.check(start + Duration::from_secs(31), grace).unwrap_err();
        assert!(error.contains("31s"), "{error}");

        membership.set(false, start + Duration::from_secs(32));
        assert!(membership.check(start + Duration::from_secs(100), grace).is_ok(), "a member");

        // Revoked, then revoked again (or an error): the gap runs from the first.
        membership.set(true, start + Duration::from_secs(100));
        membership.set(true, start + Duration::from_secs(120));
        assert!(membership.check(start + Duration::from_secs(129), grace).is_ok(), "a rebalance");
        assert!(membership.check(start + Duration::from_secs(131), grace).is_err(), "stayed out");
        membership.set(false, start + Duration::from_secs(140));
        assert!(membership.check(start + Duration::from_secs(400), grace).is_ok(), "assigned again");
    }
}
