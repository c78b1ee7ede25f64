//! Fair share of a notifier instance's streams (G8): the per-tenant limits
//! of `[stream_limits]` (an [`onceflow_runtime::limits::PerTenant`]), checked
//! when a stream opens.
//!
//! - `max_streams`: streams a tenant has open on this instance, whatever
//!   its credential, so one tenant cannot take the instance's whole
//!   connection budget (`http.max_connections`);
//! - `max_streams_per_token`: streams one stream token has open on this
//!   instance (a leaked token opens a few, not hundreds);
//! - `max_replays`: a tenant's streams on this instance still catching up
//!   from the events table (a `Last-Event-ID`, or a job or correlation id
//!   replayed from the start), the reads that cost the database.
//!
//! Beyond one, the open is refused with `429`, `Retry-After` and a problem
//! naming the limit, and `onceflow_sse_refused_total{limit}` counts it
//! (labelled by limit only: metric labels hold no tenant data). What a
//! stream holds is a [`Slot`], given back when it is dropped; the counts
//! live in memory (per instance, as connections are) and hold entries only
//! for what is open, so they stay bounded by the open streams.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use axum::http::StatusCode;
use onceflow_runtime::{limits::PerTenant, problem::Problem};

/// One tenant's stream limits (see the module's docs and `[stream_limits]`
/// in the defaults).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StreamLimits {
    pub max_streams: usize,
    pub max_streams_per_token: usize,
    pub max_replays: usize,
}

impl StreamLimits {
    /// Refuse limits that would refuse every stream.
    pub fn validate(&self, tenant: &str) -> Result<(), String> {
        if self.max_streams == 0 || self.max_streams_per_token == 0 || self.max_replays == 0 {
            return Err(format!("stream_limits of {tenant}: every limit must be at least 1"));
        }
        Ok(())
    }
}

/// Refuse per-tenant limits that would refuse every stream of some tenant.
pub fn validate(limits: &PerTenant<StreamLimits>) -> Result<(), String> {
    limits.default_limits().validate("every tenant")?;
    limits.overridden().try_for_each(|(tenant, limits)| limits.validate(tenant))
}

/// What is counted, each under its own key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Kind {
    Streams,
    TokenStreams,
    Replays,
}

impl Kind {
    /// The setting, as the problem and the metric name it.
    fn setting(self) -> &'static str {
        match self {
            Self::Streams => "max_streams",
            Self::TokenStreams => "max_streams_per_token",
            Self::Replays => "max_replays",
        }
    }

    fn limit(self, limits: &StreamLimits) -> usize {
        match self {
            Self::Streams => limits.max_streams,
            Self::TokenStreams => limits.max_streams_per_token,
            Self::Replays => limits.max_replays,
        }
    }

    /// When to try again: a replay ends when it has caught up (soon), a
    /// stream when its client leaves.
    fn retry_after_secs(self) -> u64 {
        match self {
            Self::Replays => 1,
            Self::Streams | Self::TokenStreams => 5,
        }
    }

    fn what(self) -> &'static str {
        match self {
            Self::Streams => "streams open for this tenant",
            Self::TokenStreams => "streams open with this stream token",
            Self::Replays => "streams of this tenant catching up from stored events",
        }
    }
}

/// The counts of one instance, shared by every request.
#[derive(Clone, Debug)]
pub struct Admission {
    limits: Arc<PerTenant<StreamLimits>>,
    open: Arc<Mutex<HashMap<(Kind, String), usize>>>,
}

/// Who asks to open a stream, and what it needs.
pub struct Ask<'a> {
    pub tenant: &'a str,
    /// The stream token's identity (its signature), if it opens with one.
    pub token: Option<&'a str>,
    /// Whether it catches up from stored events first.
    pub replay: bool,
}

/// What an admitted stream holds: given back when dropped.
#[derive(Debug)]
pub struct Admitted {
    /// Held while the stream is open.
    pub streams: Vec<Slot>,
    /// Held while it catches up; the stream drops it once live.
    pub replay: Option<Slot>,
}

/// One counted unit, given back on drop.
#[derive(Debug)]
pub struct Slot {
    open: Arc<Mutex<HashMap<(Kind, String), usize>>>,
    key: (Kind, String),
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = self.open.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(count) = open.get_mut(&self.key) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.key);
            }
        }
    }
}

impl Admission {
    pub fn new(limits: PerTenant<StreamLimits>) -> Self {
        Self { limits: Arc::new(limits), open: Arc::default() }
    }

    /// Slots for `ask`, all of them or none: a problem naming the first
    /// limit reached.
    pub fn admit(&self, ask: &Ask<'_>) -> Result<Admitted, Problem> {
        let limits = self.limits.of(ask.tenant);
        let mut wanted = vec![(Kind::Streams, ask.tenant.to_owned())];
        if let Some(token) = ask.token {
            wanted.push((Kind::TokenStreams, token.to_owned()));
        }
        if ask.replay {
            wanted.push((Kind::Replays, ask.tenant.to_owned()));
        }
        let mut open = self.open.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(&(full, _)) = wanted.iter().find(|key| open.get(*key).copied().unwrap_or(0) >= key.0.limit(limits))
        {
            metrics::counter!("onceflow_sse_refused_total", "limit" => full.setting()).increment(1);
            return Err(refusal(full, full.limit(limits)));
        }
        let mut slots: Vec<Slot> = wanted
            .into_iter()
            .map(|key| {
                *open.entry(key.clone()).or_insert(0) += 1;
                Slot { open: self.open.clone(), key }
            })
            .collect();
        let replay = slots.iter().position(|slot| slot.key.0 == Kind::Replays).map(|at| slots.remove(at));
        Ok(Admitted { streams: slots, replay })
    }
}

fn refusal(kind: Kind, limit: usize) -> Problem {
    Problem::new(
        StatusCode::TOO_MANY_REQUESTS,
        "stream-limit",
        "Stream limit reached",
        format!(
            "{limit} {} is the limit (stream_limits.{}) on this instance; close one or retry later",
            kind.what(),
            kind.setting()
        ),
    )
    .with("limit", kind.setting().into())
    .retry_after(kind.retry_after_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admission() -> Admission {
        Admission::new(PerTenant::every(StreamLimits { max_streams: 3, max_streams_per_token: 2, max_replays: 1 }))
    }

    fn ask<'a>(tenant: &'a str, token: Option<&'a str>, replay: bool) -> Ask<'a> {
        Ask { tenant, token, replay }
    }

    fn limit_of(problem: &Problem) -> &str {
        problem.extensions["limit"].as_str().unwrap()
    }

    #[test]
    fn each_limit_refuses_beyond_it_and_frees_on_drop() {
        let admission = admission();
        let first = admission.admit(&ask("acme", Some("t1"), false)).unwrap();
        let second = admission.admit(&ask("acme", Some("t1"), false)).unwrap();
        let refused = admission.admit(&ask("acme", Some("t1"), false)).unwrap_err();
        assert_eq!((refused.status, limit_of(&refused)), (StatusCode::TOO_MANY_REQUESTS, "max_streams_per_token"));
        assert_eq!(refused.retry_after_secs, Some(5));

        let replaying = admission.admit(&ask("acme", None, true)).unwrap();
        let refused = admission.admit(&ask("acme", Some("t2"), false)).unwrap_err();
        assert_eq!(limit_of(&refused), "max_streams", "three open: the tenant's limit");
        // Another tenant is not affected.
        let other = admission.admit(&ask("globex", None, true)).unwrap();

        drop(first);
        let refused = admission.admit(&ask("acme", None, true)).unwrap_err();
        assert_eq!((limit_of(&refused), refused.retry_after_secs), ("max_replays", Some(1)));
        let Admitted { streams, replay } = replaying;
        drop(replay);
        let again = admission.admit(&ask("acme", None, true)).unwrap();
        drop((second, streams, again, other));
        assert!(admission.open.lock().unwrap().is_empty(), "nothing counted once all closed");
    }

    #[test]
    fn a_refusal_takes_no_slot() {
        let admission = admission();
        let held = admission.admit(&ask("acme", None, true)).unwrap();
        for _ in 0..5 {
            admission.admit(&ask("acme", Some("t"), true)).unwrap_err();
        }
        assert_eq!(admission.open.lock().unwrap().get(&(Kind::TokenStreams, "t".to_owned())), None);
        drop(held);
    }
}
