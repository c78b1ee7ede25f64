//! The push handlers' circuit breakers, as this instance sees them: what a
//! handler's breaker lets through now, and the signals that open and close
//! it (an opened breaker holds the keys of every type its handler serves).

use chrono::{DateTime, Utc};
use onceflow_webhook::{
    BreakerPolicy,
    breaker::{Breaker, Signal, State},
};

use super::{Dispatcher, PushSlot};
use crate::executions::store;

/// The breaker of a handler, as this instance sees it.
pub(super) struct HandlerHealth {
    breaker: Breaker,
    /// While half-open: the one probe is out.
    pub(super) probing: bool,
}

/// What a handler's breaker lets through now.
pub(super) enum Admission {
    /// Calls go out.
    Open(usize),
    /// One call, the probe.
    Probe,
    /// None until the cool-down ends.
    Blocked,
}

impl Dispatcher {
    /// What `slot`'s handler breaker lets through now.
    pub(super) fn admission(&self, slot: &PushSlot) -> Admission {
        let free = slot.permits.available_permits();
        let Ok(mut health) = self.health.lock() else { return Admission::Open(free) };
        let Some(handler) = health.get_mut(&slot.destination) else { return Admission::Open(free) };
        match handler.breaker.state {
            State::Closed => Admission::Open(free),
            State::Open if handler.breaker.open_until.is_some_and(|until| until <= Utc::now()) && free > 0 => {
                handler.breaker.state = State::HalfOpen;
                handler.probing = true;
                Admission::Probe
            }
            State::Open | State::HalfOpen => Admission::Blocked,
        }
    }

    /// Count `signal` against `slot`'s handler; when its breaker opens, hold
    /// the keys of every type it serves until the cool-down ends.
    pub(super) async fn judge(&self, slot: &PushSlot, signal: Signal, probe: bool) {
        let policy: &BreakerPolicy = &self.config.push.breaker;
        if !policy.enabled {
            return;
        }
        let opened: Option<DateTime<Utc>> = {
            let Ok(mut health) = self.health.lock() else { return };
            let now = Utc::now();
            let handler = health
                .entry(slot.destination.clone())
                .or_insert_with(|| HandlerHealth { breaker: Breaker::closed(now), probing: false });
            let probe = probe && handler.probing;
            if probe {
                handler.probing = false;
            }
            let transition = handler.breaker.record(policy, signal, probe, now);
            if let Some(transition) = &transition {
                tracing::warn!(destination = %slot.destination, from = transition.from.as_str(),
                    to = transition.to.as_str(), reason = %transition.reason, "push handler breaker");
                metrics::counter!("onceflow_handler_breaker_transitions_total", "to" => transition.to.as_str())
                    .increment(1);
            }
            transition.filter(|t| t.to == State::Open).and(handler.breaker.open_until)
        };
        if let Some(until) = opened {
            let types: Vec<&str> = self
                .push
                .iter()
                .filter(|other| other.destination == slot.destination)
                .map(|other| other.name)
                .collect();
            if let Err(error) = store::hold_types(&self.worker.pool, &types, until).await {
                tracing::warn!(%error, "cannot mark the handler's keys as waiting for its breaker");
            }
        }
    }
}
