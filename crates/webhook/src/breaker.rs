//! The circuit breaker of one webhook destination (scheme, host and port):
//! the state machine only, pure and clock-free, so the notifier can keep its
//! state wherever every instance sees it (it keeps one per tenant and
//! destination in PostgreSQL, see `onceflow_notifier::webhooks::breakers`)
//! and tests can drive it through every transition.
//!
//! ```text
//!            consecutive failures ≥ failure_threshold, or
//!            failure share ≥ failure_rate over ≥ min_attempts in window_secs
//!   Closed ────────────────────────────────────────────────────────▶ Open (cool-down)
//!     ▲                                                               │ cool-down over:
//!     │ probe healthy                                                 ▼ one delivery is the probe
//!     └──────────────────────────────────────────────────────────── HalfOpen
//!                            probe unhealthy: Open again, cool-down × multiplier (≤ max)
//! ```
//!
//! While a breaker is not closed, deliveries to its destination are not
//! attempted (they wait without spending attempts); exactly one delivery is
//! sent as the probe once the cool-down is over.
//!
//! Well-kept breaker crates exist (`failsafe`, for one), but they wrap calls
//! in one process and keep their state in its memory; the notifier needs one
//! breaker per tenant and destination, shared by every worker of every instance and kept
//! across restarts, so the machine is this small type and its storage is a
//! table row.
//!
//! What counts against a destination ([`signal_of_status`]): no answer at all
//! (connection refused or reset, DNS failure, TLS failure, timeout), `5xx`
//! and `429`. Those say the receiving *service* is down, overloaded or
//! throttling us, so every delivery to it would fail alike and sending more
//! only adds load. Every other answer (`2xx`, `3xx`, `4xx` other than `429`,
//! `410` included) comes from a service that is up and judged *that one
//! request*: a `404` for one stale URL or a `400` for one body says nothing
//! about the other deliveries to the host, so it must not hold them back.

use std::time::Duration;

use chrono::{DateTime, Utc};

/// What one attempt says about its destination's health.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// The receiver answered and judged this request (`2xx`, `3xx`, `4xx` but `429`).
    Healthy,
    /// The receiver is down or overloaded: no answer, `5xx` or `429`.
    Unhealthy,
}

/// The health signal of an HTTP answer (a missing answer is always
/// [`Signal::Unhealthy`]).
pub fn signal_of_status(status: u16) -> Signal {
    match status {
        429 | 500..=599 => Signal::Unhealthy,
        _ => Signal::Healthy,
    }
}

/// The destination of `url`: `scheme://host:port`, the port spelled out even
/// when it is the scheme's default, so `https://a.example/x` and
/// `https://a.example:443/y` share a breaker. `None` for a URL without a host.
pub fn destination(url: &url::Url) -> Option<String> {
    let host = url.host_str()?;
    let port = url.port_or_known_default()?;
    Some(format!("{}://{host}:{port}", url.scheme()))
}

/// When breakers open and how long they stay open.
#[derive(Debug, Clone, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct BreakerPolicy {
    /// Off: every delivery follows its own retry schedule, as before breakers.
    pub enabled: bool,
    /// This many unhealthy attempts in a row open the breaker.
    pub failure_threshold: u32,
    /// Or this share (0-1] of unhealthy attempts in the current window...
    pub failure_rate: f64,
    /// ...once the window holds at least this many attempts.
    pub min_attempts: u32,
    /// The window's length (a tumbling window: counts restart after it).
    pub window_secs: u64,
    /// How long the breaker stays open the first time.
    pub cool_down_ms: u64,
    /// Each failed probe multiplies the cool-down by this...
    pub cool_down_multiplier: f64,
    /// ...up to this.
    pub max_cool_down_ms: u64,
}

impl Default for BreakerPolicy {
    /// Open after 5 failures in a row, or half of at least 20 attempts in a
    /// minute; stay open 30 s, then 1, 2, 4, 8 min and at most 10 min while
    /// probes keep failing.
    fn default() -> Self {
        Self {
            enabled: true,
            failure_threshold: 5,
            failure_rate: 0.5,
            min_attempts: 20,
            window_secs: 60,
            cool_down_ms: 30_000,
            cool_down_multiplier: 2.0,
            max_cool_down_ms: 600_000,
        }
    }
}

impl BreakerPolicy {
    /// Refuse settings that would never open, never close, or shrink.
    pub fn validate(&self) -> Result<(), String> {
        if self.failure_threshold == 0 {
            return Err("webhooks.breaker.failure_threshold must be at least 1".to_owned());
        }
        if self.failure_rate.is_nan() || !(self.failure_rate > 0.0 && self.failure_rate <= 1.0) {
            return Err("webhooks.breaker.failure_rate must be in (0, 1]".to_owned());
        }
        if self.min_attempts == 0 || self.window_secs == 0 {
            return Err("webhooks.breaker.min_attempts and window_secs must be at least 1".to_owned());
        }
        if self.cool_down_ms == 0 || self.cool_down_ms > self.max_cool_down_ms {
            return Err("webhooks.breaker.cool_down_ms must be positive and at most max_cool_down_ms".to_owned());
        }
        if self.cool_down_multiplier.is_nan() || self.cool_down_multiplier < 1.0 {
            return Err("webhooks.breaker.cool_down_multiplier must be at least 1".to_owned());
        }
        Ok(())
    }

    /// The cool-down after `openings` earlier openings without a close.
    pub fn cool_down(&self, openings: u32) -> Duration {
        let exponent = i32::try_from(openings).unwrap_or(i32::MAX);
        let millis = self.cool_down_ms as f64 * self.cool_down_multiplier.powi(exponent);
        // `min` before converting: a large exponent gives infinity.
        Duration::from_millis(millis.min(self.max_cool_down_ms as f64) as u64)
    }
}

/// Where a breaker stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum State {
    /// Deliveries go out.
    Closed,
    /// Deliveries wait until `open_until`; then one of them is the probe.
    Open,
    /// The probe is out; the others wait for its outcome.
    HalfOpen,
}

impl State {
    /// The name used in SQL, JSON, logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::Open => "open",
            Self::HalfOpen => "half_open",
        }
    }

    /// Parse [`Self::as_str`]; anything else reads as closed.
    pub fn parse(name: &str) -> Self {
        match name {
            "open" => Self::Open,
            "half_open" => Self::HalfOpen,
            _ => Self::Closed,
        }
    }
}

/// A change of state, to log and count.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transition {
    pub from: State,
    pub to: State,
    /// Why, for the log line.
    pub reason: String,
}

/// One destination's breaker as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct Breaker {
    pub state: State,
    /// Unhealthy attempts in a row (while closed).
    pub consecutive_failures: u32,
    /// Where the current counting window began.
    pub window_start: DateTime<Utc>,
    pub window_attempts: u32,
    pub window_failures: u32,
    /// Openings since the breaker last closed: grows the cool-down.
    pub openings: u32,
    /// While open: when the probe may go.
    pub open_until: Option<DateTime<Utc>>,
}

impl Breaker {
    /// A closed breaker with nothing counted.
    pub fn closed(now: DateTime<Utc>) -> Self {
        Self {
            state: State::Closed,
            consecutive_failures: 0,
            window_start: now,
            window_attempts: 0,
            window_failures: 0,
            openings: 0,
            open_until: None,
        }
    }

    /// Record the outcome of one attempt made at `now`. `probe` says whether
    /// it was this breaker's half-open probe. Returns the transition, if any.
    ///
    /// While the breaker is open or half-open, only the probe's outcome
    /// counts: other attempts finishing then were sent before it opened, and
    /// one of them succeeding late says less than the probe will.
    pub fn record(
        &mut self,
        policy: &BreakerPolicy,
        signal: Signal,
        probe: bool,
        now: DateTime<Utc>,
    ) -> Option<Transition> {
        match self.state {
            State::Closed => self.record_closed(policy, signal, now),
            State::Open | State::HalfOpen if probe => Some(match signal {
                Signal::Healthy => {
                    let from = self.state;
                    *self = Self::closed(now);
                    Transition { from, to: State::Closed, reason: "the probe was answered".to_owned() }
                }
                Signal::Unhealthy => self.open(policy, now, "the probe failed"),
            }),
            State::Open | State::HalfOpen => None,
        }
    }

    fn record_closed(&mut self, policy: &BreakerPolicy, signal: Signal, now: DateTime<Utc>) -> Option<Transition> {
        let window = chrono::Duration::seconds(i64::try_from(policy.window_secs).unwrap_or(i64::MAX / 1000));
        if now.signed_duration_since(self.window_start) >= window {
            self.window_start = now;
            self.window_attempts = 0;
            self.window_failures = 0;
        }
        self.window_attempts = self.window_attempts.saturating_add(1);
        match signal {
            Signal::Healthy => self.consecutive_failures = 0,
            Signal::Unhealthy => {
                self.consecutive_failures = self.consecutive_failures.saturating_add(1);
                self.window_failures = self.window_failures.saturating_add(1);
            }
        }
        if signal == Signal::Healthy {
            return None;
        }
        let share = f64::from(self.window_failures) / f64::from(self.window_attempts);
        if self.consecutive_failures >= policy.failure_threshold {
            let reason = format!("{} failed attempts in a row", self.consecutive_failures);
            Some(self.open(policy, now, &reason))
        } else if self.window_attempts >= policy.min_attempts && share >= policy.failure_rate {
            let reason = format!(
                "{} of {} attempts failed in the last {} s",
                self.window_failures, self.window_attempts, policy.window_secs
            );
            Some(self.open(policy, now, &reason))
        } else {
            None
        }
    }

    fn open(&mut self, policy: &BreakerPolicy, now: DateTime<Utc>, reason: &str) -> Transition {
        let from = self.state;
        let cool_down = policy.cool_down(self.openings);
        self.state = State::Open;
        self.open_until = Some(now + chrono::Duration::from_std(cool_down).unwrap_or(chrono::Duration::MAX));
        self.openings = self.openings.saturating_add(1);
        self.consecutive_failures = 0;
        self.window_start = now;
        self.window_attempts = 0;
        self.window_failures = 0;
        Transition { from, to: State::Open, reason: format!("{reason}; probing again in {} ms", cool_down.as_millis()) }
    }

    /// The probe ended without a verdict on the destination (it was never
    /// sent, or cut off by shutdown): open again, ready for the next probe
    /// at once, without growing the cool-down.
    pub fn release_probe(&mut self, now: DateTime<Utc>) {
        if self.state == State::HalfOpen {
            self.state = State::Open;
            self.open_until = Some(now);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(seconds: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_700_000_000 + seconds, 0).unwrap()
    }

    fn policy() -> BreakerPolicy {
        BreakerPolicy {
            enabled: true,
            failure_threshold: 3,
            failure_rate: 0.5,
            min_attempts: 10,
            window_secs: 60,
            cool_down_ms: 1_000,
            cool_down_multiplier: 2.0,
            max_cool_down_ms: 5_000,
        }
    }

    /// The probe is claimed elsewhere (a table row); here it only moves the state.
    fn start_probe(breaker: &mut Breaker) {
        assert_eq!(breaker.state, State::Open);
        breaker.state = State::HalfOpen;
    }

    #[test]
    fn which_answers_count_against_a_destination() {
        for status in [429, 500, 502, 503, 504, 599] {
            assert_eq!(signal_of_status(status), Signal::Unhealthy, "{status}");
        }
        for status in [200, 204, 301, 400, 401, 403, 404, 409, 410, 413, 422] {
            assert_eq!(signal_of_status(status), Signal::Healthy, "{status}");
        }
    }

    #[test]
    fn destinations_are_scheme_host_and_port_with_default_ports_spelled_out() {
        let of = |url: &str| destination(&url::Url::parse(url).unwrap());
        assert_eq!(of("https://Hooks.Example.com/a?b=c"), Some("https://hooks.example.com:443".to_owned()));
        assert_eq!(of("https://hooks.example.com:443/other"), of("https://hooks.example.com/a"));
        assert_eq!(of("http://127.0.0.1:8099/hook"), Some("http://127.0.0.1:8099".to_owned()));
        assert_eq!(of("http://[::1]/hook"), Some("http://[::1]:80".to_owned()));
        assert_ne!(of("http://hooks.example.com/"), of("https://hooks.example.com/"));
        assert_eq!(of("data:text/plain,x"), None);
    }

    #[test]
    fn consecutive_failures_open_and_a_success_resets_the_run() {
        let policy = policy();
        let mut breaker = Breaker::closed(at(0));
        assert_eq!(breaker.record(&policy, Signal::Unhealthy, false, at(1)), None);
        assert_eq!(breaker.record(&policy, Signal::Unhealthy, false, at(2)), None);
        assert_eq!(breaker.record(&policy, Signal::Healthy, false, at(3)), None, "a 2xx or a 404 resets the run");
        assert_eq!(breaker.record(&policy, Signal::Unhealthy, false, at(4)), None);
        assert_eq!(breaker.record(&policy, Signal::Unhealthy, false, at(5)), None);
        let opened = breaker.record(&policy, Signal::Unhealthy, false, at(6)).expect("opens");
        assert_eq!((opened.from, opened.to), (State::Closed, State::Open));
        assert!(opened.reason.starts_with("3 failed attempts in a row"), "{}", opened.reason);
        assert_eq!(breaker.open_until, Some(at(7)), "open for cool_down_ms");
    }

    #[test]
    fn a_failure_rate_over_the_window_opens_without_a_run() {
        let policy = policy();
        let mut breaker = Breaker::closed(at(0));
        // Alternating: never 3 in a row, but half of 10 attempts fail.
        for n in 0..9 {
            let signal = if n % 2 == 1 { Signal::Unhealthy } else { Signal::Healthy };
            assert_eq!(breaker.record(&policy, signal, false, at(n)), None, "attempt {n}");
        }
        let opened = breaker.record(&policy, Signal::Unhealthy, false, at(9)).expect("5 of 10 failed");
        assert!(opened.reason.starts_with("5 of 10 attempts failed"), "{}", opened.reason);
    }

    #[test]
    fn the_window_forgets_old_attempts() {
        let policy = policy();
        let mut breaker = Breaker::closed(at(0));
        for n in 0..8 {
            let signal = if n % 2 == 0 { Signal::Unhealthy } else { Signal::Healthy };
            breaker.record(&policy, signal, false, at(n));
        }
        // A minute later the window starts again: two more attempts are two of
        // a new window, far below min_attempts.
        assert_eq!(breaker.record(&policy, Signal::Unhealthy, false, at(70)), None);
        assert_eq!(breaker.record(&policy, Signal::Healthy, false, at(71)), None);
        assert_eq!((breaker.window_attempts, breaker.window_failures), (2, 1));
    }

    #[test]
    fn a_probe_closes_or_reopens_with_a_growing_bounded_cool_down() {
        let policy = policy();
        let mut breaker = Breaker::closed(at(0));
        for n in 0..3 {
            breaker.record(&policy, Signal::Unhealthy, false, at(n));
        }
        assert_eq!(breaker.state, State::Open);
        let mut expected_cool_downs = vec![];
        let mut now = 10;
        for _ in 0..5 {
            start_probe(&mut breaker);
            let reopened = breaker.record(&policy, Signal::Unhealthy, true, at(now)).expect("the probe failed");
            assert_eq!((reopened.from, reopened.to), (State::HalfOpen, State::Open));
            expected_cool_downs.push((breaker.open_until.unwrap() - at(now)).num_seconds());
            now += 100;
        }
        assert_eq!(expected_cool_downs, [2, 4, 5, 5, 5], "doubling from 1 s, at most 5 s");
        start_probe(&mut breaker);
        let closed = breaker.record(&policy, Signal::Healthy, true, at(now)).expect("the probe was answered");
        assert_eq!((closed.from, closed.to), (State::HalfOpen, State::Closed));
        assert_eq!(breaker, Breaker::closed(at(now)), "closing forgets everything, the cool-down too");
        for n in 1..=3 {
            breaker.record(&policy, Signal::Unhealthy, false, at(now + n));
        }
        assert_eq!(breaker.open_until, Some(at(now + 3 + 1)), "the first cool-down again");
    }

    #[test]
    fn only_the_probe_counts_while_open() {
        let policy = policy();
        let mut breaker = Breaker::closed(at(0));
        for n in 0..3 {
            breaker.record(&policy, Signal::Unhealthy, false, at(n));
        }
        let open = breaker.clone();
        assert_eq!(breaker.record(&policy, Signal::Healthy, false, at(3)), None, "sent before it opened");
        assert_eq!(breaker.record(&policy, Signal::Unhealthy, false, at(3)), None);
        start_probe(&mut breaker);
        assert_eq!(breaker.record(&policy, Signal::Unhealthy, false, at(4)), None, "not the probe");
        assert_eq!(breaker.state, State::HalfOpen);
        breaker.release_probe(at(5));
        assert_eq!((breaker.state, breaker.open_until), (State::Open, Some(at(5))), "ready for another probe");
        assert_eq!(breaker.openings, open.openings, "a probe without a verdict does not grow the cool-down");
    }

    #[test]
    fn refuses_settings_that_never_open_or_never_close() {
        let base = BreakerPolicy::default();
        base.validate().unwrap();
        assert!(BreakerPolicy { failure_threshold: 0, ..base }.validate().is_err());
        assert!(BreakerPolicy { failure_rate: 0.0, ..base }.validate().is_err());
        assert!(BreakerPolicy { failure_rate: 1.5, ..base }.validate().is_err());
        assert!(BreakerPolicy { min_attempts: 0, ..base }.validate().is_err());
        assert!(BreakerPolicy { cool_down_ms: 0, ..base }.validate().is_err());
        assert!(BreakerPolicy { cool_down_ms: 10, max_cool_down_ms: 1, ..base }.validate().is_err());
        assert!(BreakerPolicy { cool_down_multiplier: 0.5, ..base }.validate().is_err());
        let seconds: Vec<u64> = (0..7).map(|n| base.cool_down(n).as_secs()).collect();
        assert_eq!(seconds, [30, 60, 120, 240, 480, 600, 600]);
        assert_eq!(base.cool_down(u32::MAX), Duration::from_secs(600));
    }
}
