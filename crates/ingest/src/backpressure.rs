//! Backpressure that follows the processor's capacity.
//!
//! A `202` promises that the command will be applied; accepting commands
//! faster than the processor applies them only grows the queue in front of
//! it, and with it the time every accepted command waits. So ingest watches
//! the processor's consumer group on the commands topic ([`LagProbe`]):
//! once a second, its lag (commands published, not yet applied) and its
//! drain rate (commands applied per second, smoothed). When the lag would
//! take longer than `shed.max_queue_delay_ms` to drain at that rate, and is
//! above `shed.min_lag` (so a burst on an idle system, whose drain rate is
//! not known yet, is not refused), new commands of the tenants sending more
//! than their share get `429` (see [`crate::limits`]), and past
//! `shed.everyone_after_ms` every tenant's get `503`, each with a
//! `Retry-After` of the time the excess takes to drain: the queue, and so
//! the latency of accepted work, stays bounded at about the configured delay
//! whatever the load.
//!
//! Between two measurements the processor goes on draining, and the lag the
//! rule reads is predicted: the last measured lag, plus what this instance
//! accepted since, minus what the processor drains at its measured rate in
//! the time since. Without the prediction a tenant over its share was let in
//! all at once right after each measurement (the second's drain in a burst of
//! a tenth of a second, which every other tenant's requests then waited
//! behind) and refused for the rest of the second; with it, the tenant is let
//! in evenly, at about the drain rate.
//!
//! When the lag cannot be measured (the broker is down), nothing is shed for
//! it: commands wait in the outbox, bounded by `shed.max_outbox_backlog`.

use std::{
    sync::{
        Arc,
        atomic::{AtomicI64, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use onceflow_runtime::kafka::{GroupLag, LagProbe};
use tokio_util::sync::CancellationToken;

use crate::config::ShedConfig;

/// How often the lag is measured.
const INTERVAL: Duration = Duration::from_secs(1);
/// How long one measurement may wait for the broker per request.
const TIMEOUT: Duration = Duration::from_secs(2);
/// The weight of the newest sample in the smoothed drain rate.
const SMOOTHING: f64 = 0.3;
/// How much of the processor's lately reached rate is kept after a second
/// (it halves in about half a minute).
const CAPACITY_FADE: f64 = 0.98;
/// How far past the last measurement the lag is predicted: a measurement that
/// is late (a slow broker) does not let the prediction drain the whole lag.
const MAX_PREDICTION: Duration = Duration::from_secs(2);
/// The most a `Retry-After` asks a client to wait, in seconds.
const MAX_RETRY_AFTER_SECS: u64 = 60;

/// The processor's last measured lag and drain rate, read by every request.
#[derive(Debug)]
pub struct ProcessorPressure {
    /// Commands not yet applied; negative while unknown.
    lag: AtomicI64,
    /// Commands applied per second, smoothed, as `f64` bits.
    drain_per_sec: AtomicU64,
    /// The most the processor drained lately (the highest rate, fading by
    /// [`CAPACITY_FADE`] a second), as `f64` bits: what it can do, which a
    /// stall of a few seconds does not change.
    capacity_per_sec: AtomicU64,
    /// Commands this instance accepted since the lag was measured: the lag
    /// is measured once a second, and a flood arriving on an idle system
    /// would otherwise be accepted whole for that second.
    accepted_since: AtomicI64,
    /// When the lag was last measured, in microseconds since `epoch`.
    measured_at: AtomicU64,
    epoch: Instant,
}

impl Default for ProcessorPressure {
    fn default() -> Self {
        Self {
            lag: AtomicI64::new(-1),
            drain_per_sec: AtomicU64::new(0f64.to_bits()),
            capacity_per_sec: AtomicU64::new(0f64.to_bits()),
            accepted_since: AtomicI64::new(0),
            measured_at: AtomicU64::new(0),
            epoch: Instant::now(),
        }
    }
}

impl ProcessorPressure {
    /// `Some((lag, seconds to wait))` when the tenants over their share (see
    /// [`crate::limits`]) are to be refused: the backlog would take longer
    /// than `shed.max_queue_delay_ms` to drain at the current rate.
    pub fn over_share_retry_after(&self, shed: &ShedConfig) -> Option<(i64, u64)> {
        self.retry_after(shed, &self.drain_per_sec, shed.max_queue_delay_ms)
    }

    /// `Some((lag, seconds to wait))` when every tenant is to be refused: the
    /// backlog would take longer than `shed.everyone_after_ms` to drain even
    /// at the rate the processor reached lately (a stall of a few seconds,
    /// when nothing drains, does not refuse every tenant at once).
    pub fn everyone_retry_after(&self, shed: &ShedConfig) -> Option<(i64, u64)> {
        self.retry_after(shed, &self.capacity_per_sec, shed.everyone_after_ms)
    }

    fn retry_after(&self, shed: &ShedConfig, rate: &AtomicU64, max_delay_ms: u64) -> Option<(i64, u64)> {
        let lag = self.predicted_lag(Instant::now())?;
        let drain = f64::from_bits(rate.load(Ordering::Relaxed));
        retry_after(lag, drain, shed, max_delay_ms).map(|seconds| (lag, seconds))
    }

    /// The lag at `now` (see the module's docs), `None` while unknown.
    fn predicted_lag(&self, now: Instant) -> Option<i64> {
        let lag = self.lag.load(Ordering::Relaxed);
        if lag < 0 {
            return None;
        }
        let accepted = self.accepted_since.load(Ordering::Relaxed);
        let measured_at = self.epoch + Duration::from_micros(self.measured_at.load(Ordering::Relaxed));
        let since = now.saturating_duration_since(measured_at).min(MAX_PREDICTION);
        let drain = f64::from_bits(self.drain_per_sec.load(Ordering::Relaxed));
        let drained = (drain * since.as_secs_f64()) as i64;
        Some((lag + accepted - drained).max(0))
    }

    /// One more command accepted here, until the next measurement counts it.
    pub fn note_accepted(&self) {
        self.accepted_since.fetch_add(1, Ordering::Relaxed);
    }

    fn record(&self, lag: i64, drain_per_sec: f64, capacity_per_sec: f64, at: Instant) {
        let since_epoch = u64::try_from(at.saturating_duration_since(self.epoch).as_micros()).unwrap_or(u64::MAX);
        self.measured_at.store(since_epoch, Ordering::Relaxed);
        self.accepted_since.store(0, Ordering::Relaxed);
        self.lag.store(lag, Ordering::Relaxed);
        self.drain_per_sec.store(drain_per_sec.to_bits(), Ordering::Relaxed);
        self.capacity_per_sec.store(capacity_per_sec.to_bits(), Ordering::Relaxed);
        metrics::gauge!("onceflow_processor_lag_messages").set(lag as f64);
        metrics::gauge!("onceflow_processor_drain_per_second").set(drain_per_sec);
    }

    fn forget(&self) {
        self.lag.store(-1, Ordering::Relaxed);
    }
}

/// The rule: refuse when `lag` would take longer than `max_delay_ms` to
/// drain at `drain_per_sec` and is above `min_lag`, scaled like the delay
/// (`min_lag` for `max_queue_delay_ms`, twice that for twice the delay: so
/// while nothing drains, a longer delay still allows a larger backlog); wait
/// for the excess to drain (at least 1 s, at most [`MAX_RETRY_AFTER_SECS`];
/// the configured `retry_after_secs` while nothing drains).
fn retry_after(lag: i64, drain_per_sec: f64, shed: &ShedConfig, max_delay_ms: u64) -> Option<u64> {
    let min_lag = shed.min_lag as f64 * max_delay_ms as f64 / shed.max_queue_delay_ms.max(1) as f64;
    if lag as f64 <= min_lag {
        return None;
    }
    let drainable = drain_per_sec * max_delay_ms as f64 / 1000.0;
    let excess = lag as f64 - drainable;
    if excess <= 0.0 {
        return None;
    }
    let seconds = if drain_per_sec > 0.0 { (excess / drain_per_sec).ceil() as u64 } else { shed.retry_after_secs };
    Some(seconds.clamp(1, MAX_RETRY_AFTER_SECS))
}

/// Measure the processor group's lag every [`INTERVAL`] into `pressure` until
/// `shutdown`.
pub async fn watch(probe: LagProbe, pressure: Arc<ProcessorPressure>, shutdown: CancellationToken) {
    let probe = Arc::new(probe);
    let mut previous: Option<(Instant, GroupLag)> = None;
    let mut drain_per_sec = 0.0;
    let mut capacity_per_sec: f64 = 0.0;
    loop {
        let measuring = probe.clone();
        match tokio::task::spawn_blocking(move || measuring.measure(TIMEOUT)).await {
            Ok(Ok(now)) => {
                let at = Instant::now();
                let mut latest = 0.0;
                if let Some((then, before)) = previous {
                    let seconds = at.duration_since(then).as_secs_f64();
                    // Committed offsets only grow; a drop means the topic was recreated.
                    let drained = (now.committed() - before.committed()).max(0) as f64;
                    if seconds > 0.0 {
                        latest = drained / seconds;
                        drain_per_sec = SMOOTHING * latest + (1.0 - SMOOTHING) * drain_per_sec;
                    }
                }
                // The smoothed rate lags a processor that just started to work
                // through a burst after idling; the last second's rate shows
                // what it does now, so the higher of the two is used.
                let drain = latest.max(drain_per_sec);
                capacity_per_sec = drain.max(capacity_per_sec * CAPACITY_FADE);
                pressure.record(now.lag(), drain, capacity_per_sec, at);
                previous = Some((at, now));
            }
            Ok(Err(error)) => {
                tracing::debug!(%error, "cannot measure the processor's lag");
                pressure.forget();
                previous = None;
            }
            Err(error) => tracing::warn!(%error, "the lag measurement failed"),
        }
        if !onceflow_runtime::shutdown::pause(INTERVAL, &shutdown).await {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shed() -> ShedConfig {
        ShedConfig::for_tests()
    }

    #[test]
    fn a_lag_that_drains_within_the_delay_is_accepted() {
        // 5,000 behind at 1,000/s: 5 s, within 10 s.
        assert_eq!(retry_after(5_000, 1_000.0, &shed(), 10_000), None);
        // Unknown or small lags never shed.
        assert_eq!(retry_after(-1, 0.0, &shed(), 10_000), None);
        assert_eq!(retry_after(1_000, 0.0, &shed(), 10_000), None);
    }

    #[test]
    fn a_lag_past_the_delay_waits_for_the_excess_to_drain() {
        // 25,000 behind at 1,000/s: 15 s past the 10 s bound.
        assert_eq!(retry_after(25_000, 1_000.0, &shed(), 10_000), Some(15));
        // Barely past: at least a second.
        assert_eq!(retry_after(10_001, 1_000.0, &shed(), 10_000), Some(1));
        // Far past: at most a minute.
        assert_eq!(retry_after(1_000_000, 100.0, &shed(), 10_000), Some(MAX_RETRY_AFTER_SECS));
    }

    #[test]
    fn nothing_draining_sheds_past_the_minimum_with_the_configured_wait() {
        assert_eq!(retry_after(1_001, 0.0, &shed(), 10_000), Some(2));
    }

    #[test]
    fn the_lag_drains_between_measurements_and_counts_what_was_accepted() {
        let pressure = ProcessorPressure::default();
        assert_eq!(pressure.predicted_lag(Instant::now()), None, "unknown before the first measurement");
        let measured = Instant::now();
        pressure.record(12_000, 1_000.0, 1_000.0, measured);
        assert_eq!(pressure.predicted_lag(measured), Some(12_000));
        // A quarter of a second later, 250 drained; 100 accepted meanwhile.
        for _ in 0..100 {
            pressure.note_accepted();
        }
        assert_eq!(pressure.predicted_lag(measured + Duration::from_millis(250)), Some(11_850));
        // A late measurement predicts no further than MAX_PREDICTION, and never below zero.
        assert_eq!(pressure.predicted_lag(measured + Duration::from_secs(60)), Some(10_100));
        pressure.record(1_000, 1_000.0, 1_000.0, measured);
        assert_eq!(pressure.predicted_lag(measured + Duration::from_secs(60)), Some(0));
    }

    #[test]
    fn a_tenant_over_its_share_is_let_in_at_the_drain_rate_not_in_bursts() {
        // 10 s of drain behind (the bound), 2,000/s: refused at the
        // measurement, then let in about 2 a millisecond.
        let shed = shed();
        let pressure = ProcessorPressure::default();
        let measured = Instant::now();
        pressure.record(20_001, 2_000.0, 2_000.0, measured);
        let rate = &pressure.drain_per_sec;
        let admitted_by = |millis: u64| {
            let mut admitted = 0;
            let now = measured + Duration::from_millis(millis);
            while pressure.predicted_lag(now).and_then(|lag| retry_after(lag, 2_000.0, &shed, 10_000)).is_none() {
                pressure.note_accepted();
                admitted += 1;
            }
            admitted
        };
        assert!(pressure.retry_after(&shed, rate, shed.max_queue_delay_ms).is_some());
        let mut total = 0;
        for millis in [1, 100, 200, 500] {
            total += admitted_by(millis);
            assert_eq!(total, millis * 2, "let in by {millis} ms");
        }
    }

    #[test]
    fn a_longer_delay_allows_a_proportionally_larger_backlog() {
        // Every tenant's bound, twice the delay: twice the minimum while
        // nothing drains, twice the drainable backlog otherwise.
        assert_eq!(retry_after(1_001, 0.0, &shed(), 20_000), None);
        assert_eq!(retry_after(2_001, 0.0, &shed(), 20_000), Some(2));
        assert_eq!(retry_after(15_000, 1_000.0, &shed(), 20_000), None);
        assert_eq!(retry_after(25_000, 1_000.0, &shed(), 20_000), Some(5));
    }
}
