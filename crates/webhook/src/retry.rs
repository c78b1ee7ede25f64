//! When a webhook delivery is retried, and when it gives up.
//!
//! Per the Standard Webhooks specification: any `2xx` acknowledges the
//! delivery; `410 Gone` says the receiver wants no more and ends it at once;
//! every other answer (`3xx` — redirects are not followed —, `429`, `5xx`, the
//! remaining `4xx`) and every transport failure (timeout, refused connection,
//! TLS error) is retried. Delays grow exponentially from `initial_backoff_ms`
//! by `backoff_multiplier`, capped at `max_backoff_ms`, with ± `jitter`
//! randomisation so receivers that failed together are not all retried in the
//! same instant; a `Retry-After` longer than the computed delay wins (still
//! capped). After `max_attempts` attempts the delivery is failed for good (it
//! can still be redriven by hand).

use std::time::Duration;

/// How a response ends an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// `2xx`: the receiver has it.
    Delivered,
    /// `410 Gone`: the receiver wants no more deliveries; do not retry.
    Gone,
    /// Anything else: try again later, if the schedule allows.
    Retry,
}

/// The verdict of an HTTP status code.
pub fn classify_status(status: u16) -> Verdict {
    match status {
        200..=299 => Verdict::Delivered,
        410 => Verdict::Gone,
        _ => Verdict::Retry,
    }
}

/// A `Retry-After` given in seconds (the HTTP-date form is ignored: webhook
/// receivers that throttle send seconds, and a date needs a trusted clock).
pub fn parse_retry_after(value: &str) -> Option<Duration> {
    value.trim().parse::<u64>().ok().map(Duration::from_secs)
}

/// The bounded retry schedule of one delivery.
#[derive(Debug, Clone, PartialEq, serde::Deserialize, serde::Serialize)]
pub struct RetryPolicy {
    /// Attempts in all, the first included; then the delivery fails.
    pub max_attempts: u32,
    /// Delay before the second attempt.
    pub initial_backoff_ms: u64,
    /// Each further delay is the previous one times this.
    pub backoff_multiplier: f64,
    /// No delay is longer than this, whatever `Retry-After` asks.
    pub max_backoff_ms: u64,
    /// Relative randomisation of each delay: 0.2 spreads it over ±20 %.
    pub jitter: f64,
}

impl Default for RetryPolicy {
    /// 10 attempts over about 27 hours: 5 s, 20 s, 80 s, 5 min, 21 min, 85 min,
    /// 5.7 h, 10 h, 10 h (± 20 %), close to the specification's example.
    fn default() -> Self {
        Self {
            max_attempts: 10,
            initial_backoff_ms: 5_000,
            backoff_multiplier: 4.0,
            max_backoff_ms: 36_000_000,
            jitter: 0.2,
        }
    }
}

impl RetryPolicy {
    /// Refuse settings that would retry forever, never, or backwards.
    pub fn validate(&self) -> Result<(), String> {
        if self.max_attempts == 0 {
            return Err("webhooks.retry.max_attempts must be at least 1".to_owned());
        }
        if self.backoff_multiplier.is_nan() || self.backoff_multiplier < 1.0 {
            return Err("webhooks.retry.backoff_multiplier must be at least 1".to_owned());
        }
        if self.jitter.is_nan() || !(0.0..1.0).contains(&self.jitter) {
            return Err("webhooks.retry.jitter must be in [0, 1)".to_owned());
        }
        if self.initial_backoff_ms > self.max_backoff_ms {
            return Err("webhooks.retry.initial_backoff_ms must not exceed max_backoff_ms".to_owned());
        }
        Ok(())
    }

    /// The delay before the next attempt once `attempts_made` (≥ 1) have
    /// failed, or `None` when the schedule is used up.
    pub fn next_delay(&self, attempts_made: u32, retry_after: Option<Duration>) -> Option<Duration> {
        self.next_delay_with(attempts_made, retry_after, rand::random_range(-1.0..=1.0))
    }

    /// [`Self::next_delay`] with the random draw given: `unit` in [-1, 1]
    /// scales the jitter (-1 shortest, 1 longest).
    pub fn next_delay_with(&self, attempts_made: u32, retry_after: Option<Duration>, unit: f64) -> Option<Duration> {
        if attempts_made >= self.max_attempts {
            return None;
        }
        let nominal = self.nominal_delay(attempts_made.max(1));
        let jittered = nominal.mul_f64((1.0 + self.jitter * unit.clamp(-1.0, 1.0)).max(0.0));
        let max = Duration::from_millis(self.max_backoff_ms);
        Some(jittered.max(retry_after.unwrap_or_default()).min(max))
    }

    /// The delay before attempt `attempts_made + 1` without jitter.
    fn nominal_delay(&self, attempts_made: u32) -> Duration {
        let exponent = i32::try_from(attempts_made - 1).unwrap_or(i32::MAX);
        let millis = self.initial_backoff_ms as f64 * self.backoff_multiplier.powi(exponent);
        // `min` before converting: a large exponent gives infinity.
        Duration::from_millis(millis.min(self.max_backoff_ms as f64) as u64)
    }

    /// The delays of the whole schedule without jitter, for documentation
    /// and logs.
    pub fn schedule(&self) -> Vec<Duration> {
        (1..self.max_attempts).map(|made| self.nominal_delay(made)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_answers_as_the_specification_says() {
        assert_eq!(classify_status(200), Verdict::Delivered);
        assert_eq!(classify_status(204), Verdict::Delivered);
        assert_eq!(classify_status(410), Verdict::Gone);
        for retried in [301, 302, 307, 400, 401, 404, 408, 429, 500, 502, 503, 504] {
            assert_eq!(classify_status(retried), Verdict::Retry, "{retried}");
        }
    }

    #[test]
    fn the_default_schedule_is_exponential_bounded_and_about_a_day_long() {
        let policy = RetryPolicy::default();
        policy.validate().unwrap();
        let secs: Vec<u64> = policy.schedule().iter().map(Duration::as_secs).collect();
        assert_eq!(secs, [5, 20, 80, 320, 1280, 5120, 20480, 36000, 36000]);
        let total: u64 = secs.iter().sum();
        assert!((24 * 3600..30 * 3600).contains(&total), "{total} s");
        assert_eq!(policy.next_delay(10, None), None, "ten attempts, then failed");
    }

    #[test]
    fn jitter_stays_within_its_bounds_and_the_cap() {
        let policy = RetryPolicy {
            max_attempts: 5,
            initial_backoff_ms: 1000,
            backoff_multiplier: 2.0,
            max_backoff_ms: 3000,
            jitter: 0.25,
        };
        assert_eq!(policy.next_delay_with(1, None, -1.0), Some(Duration::from_millis(750)));
        assert_eq!(policy.next_delay_with(1, None, 1.0), Some(Duration::from_millis(1250)));
        assert_eq!(policy.next_delay_with(2, None, 0.0), Some(Duration::from_millis(2000)));
        assert_eq!(policy.next_delay_with(3, None, 1.0), Some(Duration::from_millis(3000)), "capped");
        for _ in 0..1000 {
            let delay = policy.next_delay(2, None).unwrap();
            assert!((1500..=2500).contains(&delay.as_millis()), "{delay:?}");
        }
        assert_eq!(policy.next_delay(5, None), None);
    }

    #[test]
    fn retry_after_lengthens_a_delay_but_never_past_the_cap() {
        let policy = RetryPolicy {
            max_attempts: 5,
            initial_backoff_ms: 100,
            backoff_multiplier: 2.0,
            max_backoff_ms: 5000,
            jitter: 0.0,
        };
        assert_eq!(policy.next_delay(1, Some(Duration::from_secs(2))), Some(Duration::from_secs(2)));
        assert_eq!(policy.next_delay(1, Some(Duration::from_secs(60))), Some(Duration::from_secs(5)));
        assert_eq!(policy.next_delay(1, Some(Duration::ZERO)), Some(Duration::from_millis(100)));
        assert_eq!(parse_retry_after(" 3 "), Some(Duration::from_secs(3)));
        assert_eq!(parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"), None);
    }

    #[test]
    fn refuses_unbounded_or_inverted_settings() {
        let base = RetryPolicy::default();
        assert!(RetryPolicy { max_attempts: 0, ..base }.validate().is_err());
        assert!(RetryPolicy { backoff_multiplier: 0.5, ..base }.validate().is_err());
        assert!(RetryPolicy { jitter: 1.0, ..base }.validate().is_err());
        assert!(RetryPolicy { initial_backoff_ms: 10, max_backoff_ms: 1, ..base }.validate().is_err());
    }
}
