//! Each tenant's share of the delivery workers (G8: no tenant takes more
//! than its share of any worker).
//!
//! Without it the workers took due deliveries first come, first served: a
//! tenant with a backlog and a receiver that answers after 14 s filled every
//! worker, and every other tenant's webhooks waited behind it. Now each
//! instance lets a tenant hold at most `webhooks.per_tenant.max_in_flight`
//! of its `webhooks.workers` at once (4 of 16 by default; per tenant with
//! `[webhooks.per_tenant.tenants.<tenant>]`), and the claim (see
//! [`super::claims`]) takes the tenants' earliest due deliveries in turns, so
//! a slow tenant fills its own share while the others' deliveries keep
//! flowing through the rest.
//!
//! [`InFlight`] is this instance's count of attempts per tenant; a [`Slot`]
//! is held by each attempt and gives its place back when dropped (also if
//! the attempt panics). The counts hold only tenants with an attempt in
//! flight, so at most `webhooks.workers` entries.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, PoisonError},
};

use onceflow_runtime::limits::PerTenant;

/// A tenant's share of one instance's delivery workers.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
pub struct TenantShare {
    /// Attempts of the tenant in flight at once, per instance.
    pub max_in_flight: usize,
}

/// Refuse a share no delivery could ever go through.
pub fn validate(shares: &PerTenant<TenantShare>) -> Result<(), String> {
    if shares.default_limits().max_in_flight == 0 {
        return Err("webhooks.per_tenant.max_in_flight must be at least 1".to_owned());
    }
    match shares.overridden().find(|(_, share)| share.max_in_flight == 0) {
        Some((tenant, _)) => Err(format!("webhooks.per_tenant.tenants.{tenant}.max_in_flight must be at least 1")),
        None => Ok(()),
    }
}

/// What each tenant may still claim, as the claim queries take it: the
/// tenants named here get their own room, every other tenant `default`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rooms {
    pub tenants: Vec<String>,
    pub rooms: Vec<i32>,
    pub default: i32,
}

impl Rooms {
    /// The tenants that may claim nothing now.
    pub fn full(&self) -> Vec<String> {
        self.tenants.iter().zip(&self.rooms).filter(|(_, room)| **room <= 0).map(|(t, _)| t.clone()).collect()
    }
}

/// This instance's attempts in flight, per tenant; cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct InFlight {
    counts: Arc<Mutex<HashMap<String, usize>>>,
}

impl InFlight {
    /// Count one more attempt of `tenant` until the slot is dropped.
    pub fn take(&self, tenant: &str) -> Slot {
        *self.lock().entry(tenant.to_owned()).or_default() += 1;
        Slot { in_flight: self.clone(), tenant: tenant.to_owned() }
    }

    /// What every tenant may claim now under `shares`: tenants in flight or
    /// with a share of their own are named, the others get the default.
    pub fn rooms(&self, shares: &PerTenant<TenantShare>) -> Rooms {
        let counts = self.lock();
        let room = |tenant: &str| {
            let share = shares.of(tenant).max_in_flight;
            let used = counts.get(tenant).copied().unwrap_or(0);
            i32::try_from(share.saturating_sub(used)).unwrap_or(i32::MAX)
        };
        let mut tenants: Vec<String> = counts.keys().cloned().collect();
        tenants.extend(shares.overridden().map(|(t, _)| t.to_owned()).filter(|t| !counts.contains_key(t)));
        let rooms = tenants.iter().map(|t| room(t)).collect();
        let default = i32::try_from(shares.default_limits().max_in_flight).unwrap_or(i32::MAX);
        Rooms { tenants, rooms, default }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, usize>> {
        // The map stays consistent whatever panicked while holding it.
        self.counts.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// One attempt's place in its tenant's share.
#[derive(Debug)]
pub struct Slot {
    in_flight: InFlight,
    tenant: String,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut counts = self.in_flight.lock();
        if let Some(count) = counts.get_mut(&self.tenant) {
            *count -= 1;
            if *count == 0 {
                counts.remove(&self.tenant);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shares(default: usize, overrides: &[(&str, usize)]) -> PerTenant<TenantShare> {
        let mut shares = PerTenant::every(TenantShare { max_in_flight: default });
        for (tenant, max_in_flight) in overrides {
            shares.set(tenant, TenantShare { max_in_flight: *max_in_flight });
        }
        shares
    }

    #[test]
    fn a_tenant_s_room_shrinks_with_its_attempts_and_comes_back_when_they_end() {
        let shares = shares(2, &[("big", 3)]);
        let in_flight = InFlight::default();
        let none = in_flight.rooms(&shares);
        assert_eq!((none.tenants, none.rooms, none.default), (vec!["big".to_owned()], vec![3], 2));
        let first = in_flight.take("slow");
        let second = in_flight.take("slow");
        let big = in_flight.take("big");
        let mut rooms = in_flight.rooms(&shares);
        let mut named: Vec<_> = rooms.tenants.iter().cloned().zip(rooms.rooms.iter().copied()).collect();
        named.sort();
        assert_eq!(named, [("big".to_owned(), 2), ("slow".to_owned(), 0)]);
        assert_eq!(rooms.full(), ["slow"]);
        drop((first, big));
        rooms = in_flight.rooms(&shares);
        assert!(rooms.full().is_empty());
        drop(second);
        assert_eq!(in_flight.rooms(&shares).tenants, ["big"], "tenants without attempts are forgotten");
    }

    #[test]
    fn a_tenant_s_share_is_set_as_the_settings_write_it() {
        let written = serde_json::json!({"max_in_flight": 4, "tenants": {"acme": {"max_in_flight": 8}}});
        let shares: PerTenant<TenantShare> = serde_json::from_value(written).unwrap();
        assert_eq!((shares.of("acme").max_in_flight, shares.of("globex").max_in_flight), (8, 4));
        let misspelt = serde_json::json!({"max_in_flight": 4, "tenants": {"acme": {"max_inflight": 8}}});
        assert!(serde_json::from_value::<PerTenant<TenantShare>>(misspelt).is_err());
    }

    #[test]
    fn a_share_of_zero_is_refused() {
        assert!(validate(&shares(4, &[("acme", 8)])).is_ok());
        assert!(validate(&shares(0, &[])).unwrap_err().contains("per_tenant.max_in_flight"));
        assert!(validate(&shares(4, &[("acme", 0)])).unwrap_err().contains("tenants.acme"));
    }
}
