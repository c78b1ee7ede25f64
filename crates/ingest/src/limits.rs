//! Per-tenant limits of `POST /v1/commands`, so that no tenant takes more
//! than its share of ingest or of the processor behind it (G8).
//!
//! Three limits, each answered `429` + `Retry-After` with a problem+json
//! body naming it, before the request's body is read (a refusal costs no
//! database work, so a flood of refused requests stays cheap):
//!
//! - **over its share** (`over-share`): while the processor's backlog would
//!   take longer than `shed.max_queue_delay_ms` to drain (see
//!   [`crate::backpressure`]), the tenants sending at least an equal share of
//!   the recent requests — the ones making the backlog — are refused; the
//!   others are still accepted. Only past `shed.everyone_after_ms` is every
//!   tenant refused (`503`, see `crate::commands`). A tenant alone on the
//!   system is its own share: it gets `429`.
//! - **rate** (`rate-limited`): `submit_limits.rate_per_sec` sustained, with
//!   bursts of `burst`, per tenant and instance (GCRA, the `governor` crate);
//!   0 sets no fixed rate.
//! - **in flight** (`too-many-in-flight`): `submit_limits.max_in_flight`
//!   requests of a tenant handled at once on this instance.
//!
//! A refusal is answered only after `submit_limits.refusal_hold_ms` (or its
//! `Retry-After`, when shorter): the request was handled at once and gave its
//! places back, but its connection carries no next request until then (see
//! `onceflow_runtime::hygiene::HoldAnswer`). A client that ignores
//! `Retry-After` and sends again the moment it is refused is slowed to one
//! request per hold per connection, so a flood's refusals stop costing ingest
//! the CPU every other tenant's requests need (11,000 refusals a second took
//! over half of one of 2 cores); a client that honours `Retry-After` waits no
//! longer than it would anyway, plus the hold. Held answers are bounded by
//! the connections (`http.max_connections`), one per connection.
//!
//! Every answer carries the IETF `RateLimit-Policy` and `RateLimit` fields
//! (draft-ietf-httpapi-ratelimit-headers) of the limits set for the tenant,
//! so a client can pace itself before it is refused.
//!
//! A `429` says nothing about the request's `Idempotency-Key`: the key stays
//! unclaimed (or keeps its record), and the same request after `Retry-After`
//! is judged as if it came first (or replays its record).

use std::{
    collections::HashMap,
    num::NonZeroU32,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use axum::http::{HeaderMap, HeaderValue};
use governor::{
    DefaultDirectRateLimiter, Quota,
    clock::{Clock as _, DefaultClock},
    middleware::StateInformationMiddleware,
};
use onceflow_runtime::limits::PerTenant;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::{backpressure::ProcessorPressure, config::ShedConfig, error::ApiError};

/// How often each tenant's share of the recent requests is measured: often,
/// so a flood is known as one within a tenth of a second.
const INTERVAL: Duration = Duration::from_millis(100);
/// The weight of the newest interval in a tenant's smoothed request rate
/// (the rate then follows about the last second).
const SMOOTHING: f64 = 0.1;

/// A tenant's limits on `POST /v1/commands` (`[submit_limits]`).
#[derive(Debug, Clone, PartialEq, serde::Deserialize, serde::Serialize)]
pub struct SubmitLimits {
    /// Commands per second, sustained, per instance; 0: no fixed rate.
    pub rate_per_sec: u32,
    /// Commands that may come at once above the rate; 0: one second's worth.
    pub burst: u32,
    /// Requests handled at once per instance; 0: no bound but the port's.
    pub max_in_flight: u32,
    /// A refusal is answered after this long, or its `Retry-After` if
    /// shorter; 0: at once.
    pub refusal_hold_ms: u32,
}

type RateLimiter = DefaultDirectRateLimiter<StateInformationMiddleware>;

/// One tenant's state on this instance.
struct TenantState {
    limits: SubmitLimits,
    rate: Option<RateLimiter>,
    in_flight: Option<Arc<Semaphore>>,
    /// Requests seen since start (refused ones included: a flood is a flood).
    seen: AtomicU64,
    /// Whether, at the last measurement, this tenant sent at least an equal
    /// share of the requests: shed first while the processor is behind.
    over_share: AtomicBool,
}

impl TenantState {
    fn new(limits: &SubmitLimits) -> Self {
        let rate = NonZeroU32::new(limits.rate_per_sec).map(|rate| {
            let burst = NonZeroU32::new(limits.burst).unwrap_or(rate);
            governor::RateLimiter::direct(Quota::per_second(rate).allow_burst(burst)).with_middleware()
        });
        let in_flight = (limits.max_in_flight > 0).then(|| Arc::new(Semaphore::new(limits.max_in_flight as usize)));
        Self { limits: limits.clone(), rate, in_flight, seen: AtomicU64::new(0), over_share: AtomicBool::new(false) }
    }
}

/// The limits of every configured tenant, shared by all requests.
pub struct TenantLimits {
    tenants: HashMap<String, TenantState>,
    pressure: Arc<ProcessorPressure>,
    shed: ShedConfig,
}

/// A request let in: holds its in-flight place until dropped, and says what
/// is left of the tenant's limits.
pub struct Admission {
    _in_flight: Option<OwnedSemaphorePermit>,
    fields: Option<RateLimitFields>,
}

/// `RateLimit-Policy` and `RateLimit` of one answer.
#[derive(Debug, Clone, PartialEq)]
pub struct RateLimitFields {
    pub policy: String,
    pub remaining: String,
}

impl Admission {
    /// Add the tenant's `RateLimit-Policy` and `RateLimit` fields to an answer.
    pub fn describe(&self, headers: &mut HeaderMap) {
        if let Some(fields) = &self.fields {
            fields.insert_into(headers);
        }
    }
}

impl RateLimitFields {
    /// Set both fields on an answer's `headers`.
    pub fn insert_into(&self, headers: &mut HeaderMap) {
        for (name, value) in [("ratelimit-policy", &self.policy), ("ratelimit", &self.remaining)] {
            if let Ok(value) = HeaderValue::from_str(value) {
                headers.insert(name, value);
            }
        }
    }
}

impl TenantLimits {
    /// The limits of each of `tenants` (every configured tenant name).
    pub fn new<'a>(
        limits: &PerTenant<SubmitLimits>,
        tenants: impl IntoIterator<Item = &'a str>,
        pressure: Arc<ProcessorPressure>,
        shed: ShedConfig,
    ) -> Self {
        let tenants =
            tenants.into_iter().map(|tenant| (tenant.to_owned(), TenantState::new(limits.of(tenant)))).collect();
        Self { tenants, pressure, shed }
    }

    /// Let a request of `tenant` in, or refuse it (`429`, or `503` when every
    /// tenant is refused).
    pub fn admit(&self, tenant: &str) -> Result<Admission, ApiError> {
        // Authenticated tenants are configured ones; an unknown one (never
        // reached) is not limited here rather than refused.
        let Some(state) = self.tenants.get(tenant) else { return Ok(Admission { _in_flight: None, fields: None }) };
        state.seen.fetch_add(1, Ordering::Relaxed);
        if state.over_share.load(Ordering::Relaxed)
            && let Some((lag, retry_after_secs)) = self.pressure.over_share_retry_after(&self.shed)
        {
            return Err(refused(
                "over_share",
                ApiError::OverShare {
                    reason: format!(
                        "{lag} commands are waiting for the processor and this tenant sends at least an equal share \
                         of them; retry later"
                    ),
                    retry_after_secs,
                },
            ));
        }
        let permit = match &state.in_flight {
            Some(places) => match places.clone().try_acquire_owned() {
                Ok(permit) => Some(permit),
                Err(_) => {
                    return Err(refused("in_flight", ApiError::TooManyInFlight { limit: state.limits.max_in_flight }));
                }
            },
            None => None,
        };
        let fields = match &state.rate {
            Some(rate) => match rate.check() {
                Ok(snapshot) => Some(state.fields(snapshot.remaining_burst_capacity())),
                Err(not_until) => {
                    let wait = not_until.wait_time_from(DefaultClock::default().now());
                    let retry_after_secs = wait.as_secs_f64().ceil().max(1.0) as u64;
                    return Err(refused(
                        "rate",
                        ApiError::RateLimited {
                            rate_per_sec: state.limits.rate_per_sec,
                            retry_after_secs,
                            fields: state.fields(0),
                        },
                    ));
                }
            },
            None => state.in_flight.as_ref().map(|_| state.fields(0)),
        };
        Ok(Admission { _in_flight: permit, fields })
    }

    /// How long `refusal` of `tenant` is held before it is answered: its
    /// `Retry-After`, at most the tenant's `refusal_hold_ms`.
    pub fn refusal_hold(&self, tenant: &str, refusal: &ApiError) -> Duration {
        let hold_ms = self.tenants.get(tenant).map_or(0, |state| state.limits.refusal_hold_ms);
        let retry_after_secs = refusal.retry_after_secs().unwrap_or(1);
        Duration::from_millis(u64::from(hold_ms).min(retry_after_secs.saturating_mul(1000)))
    }

    /// Measure every tenant's share of the recent requests each [`INTERVAL`]
    /// until `shutdown`.
    pub async fn watch(self: Arc<Self>, shutdown: CancellationToken) {
        let mut previous: HashMap<&str, u64> = HashMap::new();
        let mut rates: HashMap<&str, f64> = HashMap::new();
        let mut then = Instant::now();
        loop {
            if !onceflow_runtime::shutdown::pause(INTERVAL, &shutdown).await {
                return;
            }
            let seconds = then.elapsed().as_secs_f64().max(f64::EPSILON);
            then = Instant::now();
            for (tenant, state) in &self.tenants {
                let seen = state.seen.load(Ordering::Relaxed);
                let latest = seen.saturating_sub(previous.insert(tenant, seen).unwrap_or(seen)) as f64 / seconds;
                let rate = rates.entry(tenant).or_insert(0.0);
                *rate = SMOOTHING * latest + (1.0 - SMOOTHING) * *rate;
            }
            for (tenant, over) in over_share(&rates) {
                if let Some(state) = self.tenants.get(tenant) {
                    state.over_share.store(over, Ordering::Relaxed);
                }
            }
        }
    }
}

impl TenantState {
    /// The fields of this tenant's limits, `remaining` of its rate's burst left.
    fn fields(&self, remaining: u32) -> RateLimitFields {
        let mut policy = Vec::new();
        let mut left = Vec::new();
        let limits = &self.limits;
        if self.rate.is_some() {
            let burst = if limits.burst == 0 { limits.rate_per_sec } else { limits.burst };
            policy.push(format!("\"rate\";q={burst};w={}", burst.div_ceil(limits.rate_per_sec.max(1))));
            // Until the burst is whole again, at the sustained rate.
            let reset = (burst - remaining.min(burst)).div_ceil(limits.rate_per_sec.max(1));
            left.push(format!("\"rate\";r={remaining};t={reset}"));
        }
        if let Some(places) = &self.in_flight {
            policy.push(format!("\"in-flight\";q={};qu=\"concurrent-requests\"", limits.max_in_flight));
            left.push(format!("\"in-flight\";r={}", places.available_permits()));
        }
        RateLimitFields { policy: policy.join(", "), remaining: left.join(", ") }
    }
}

/// Count a refusal by the limit that made it (no tenant in the labels).
fn refused(limit: &'static str, error: ApiError) -> ApiError {
    metrics::counter!("onceflow_ingest_tenant_refusals_total", "limit" => limit).increment(1);
    error
}

/// Which tenants sent at least an equal share of the recent requests: at
/// least the total rate divided among the tenants that sent any. A tenant
/// alone is its own share; none is over it when nobody sends.
fn over_share<'a>(rates: &HashMap<&'a str, f64>) -> Vec<(&'a str, bool)> {
    // Rates below one request a minute are idle tenants, not senders.
    let active: Vec<f64> = rates.values().copied().filter(|rate| *rate >= 1.0 / 60.0).collect();
    let total: f64 = active.iter().sum();
    let fair = if active.is_empty() { f64::INFINITY } else { total / active.len() as f64 };
    // A hair below the equal share, so two tenants sending alike are both over it.
    rates.iter().map(|(tenant, rate)| (*tenant, *rate >= 1.0 / 60.0 && *rate >= fair * 0.999)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(rate_per_sec: u32, burst: u32, max_in_flight: u32) -> PerTenant<SubmitLimits> {
        PerTenant::every(SubmitLimits { rate_per_sec, burst, max_in_flight, refusal_hold_ms: 1_000 })
    }

    fn shed() -> ShedConfig {
        ShedConfig::for_tests()
    }

    fn tenant_limits(limits: &PerTenant<SubmitLimits>) -> TenantLimits {
        TenantLimits::new(limits, ["acme", "globex"], Arc::new(ProcessorPressure::default()), shed())
    }

    #[test]
    fn the_heaviest_senders_are_over_their_share_and_the_light_ones_not() {
        let rates = HashMap::from([("flood", 5_000.0), ("light", 20.0), ("idle", 0.0)]);
        let over: HashMap<&str, bool> = over_share(&rates).into_iter().collect();
        assert_eq!(over, HashMap::from([("flood", true), ("light", false), ("idle", false)]));
        let alike = HashMap::from([("a", 100.0), ("b", 100.0)]);
        assert!(over_share(&alike).iter().all(|(_, over)| *over), "equal senders are both at their share");
        let alone = HashMap::from([("a", 3.0)]);
        assert_eq!(over_share(&alone), vec![("a", true)], "alone is its own share");
        assert!(over_share(&HashMap::from([("a", 0.0)])).iter().all(|(_, over)| !over));
    }

    #[test]
    fn a_rate_refuses_past_its_burst_and_says_what_is_left() {
        let limits = tenant_limits(&limits(10, 3, 0));
        for left in [2, 1, 0] {
            let admission = limits.admit("acme").expect("within the burst");
            let mut headers = HeaderMap::new();
            admission.describe(&mut headers);
            assert_eq!(headers["ratelimit-policy"], "\"rate\";q=3;w=1");
            assert_eq!(headers["ratelimit"], format!("\"rate\";r={left};t=1"));
        }
        match limits.admit("acme") {
            Err(ApiError::RateLimited { rate_per_sec: 10, retry_after_secs: 1, fields }) => {
                assert_eq!(
                    (fields.policy.as_str(), fields.remaining.as_str()),
                    ("\"rate\";q=3;w=1", "\"rate\";r=0;t=1")
                );
            }
            other => panic!("expected a rate refusal, got {:?}", other.err()),
        }
        assert!(limits.admit("globex").is_ok(), "another tenant has its own rate");
    }

    #[test]
    fn places_in_flight_are_given_back_when_a_request_ends() {
        let limits = tenant_limits(&limits(0, 0, 2));
        let first = limits.admit("acme").unwrap();
        let _second = limits.admit("acme").unwrap();
        assert!(matches!(limits.admit("acme"), Err(ApiError::TooManyInFlight { limit: 2 })));
        drop(first);
        let third = limits.admit("acme").expect("a place was given back");
        let mut headers = HeaderMap::new();
        third.describe(&mut headers);
        assert_eq!(headers["ratelimit-policy"], "\"in-flight\";q=2;qu=\"concurrent-requests\"");
    }

    #[test]
    fn a_refusal_is_held_for_its_retry_after_at_most_the_tenants_hold() {
        let mut limits = limits(0, 0, 0);
        limits.set("globex", SubmitLimits { rate_per_sec: 0, burst: 0, max_in_flight: 0, refusal_hold_ms: 0 });
        let limits = tenant_limits(&limits);
        let over_share = |retry_after_secs| ApiError::OverShare { reason: String::new(), retry_after_secs };
        assert_eq!(limits.refusal_hold("acme", &over_share(30)), Duration::from_secs(1));
        assert_eq!(limits.refusal_hold("acme", &ApiError::TooManyInFlight { limit: 32 }), Duration::from_secs(1));
        assert_eq!(limits.refusal_hold("globex", &over_share(30)), Duration::ZERO, "its hold is 0: at once");
        assert_eq!(limits.refusal_hold("unknown", &over_share(30)), Duration::ZERO);
    }

    #[test]
    fn no_limit_set_adds_no_fields() {
        let admission = tenant_limits(&limits(0, 0, 0)).admit("acme").unwrap();
        let mut headers = HeaderMap::new();
        admission.describe(&mut headers);
        assert!(headers.is_empty());
    }
}
