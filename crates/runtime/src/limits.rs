//! Per-tenant limits: one set of limits for every tenant, and what differs
//! for some of them, in one setting.
//!
//! ```toml
//! [limits]                 # every tenant's
//! rate_per_sec = 500
//! max_in_flight = 64
//!
//! [limits.tenants.acme]    # only what differs for acme
//! rate_per_sec = 2000
//! ```
//!
//! A tenant's table names only the limits that differ: the others are the
//! `[limits]` ones (as configured, not the built-in defaults). Every tenant's
//! limits are resolved once, when the configuration is read, so a request
//! only looks its tenant up; an override that names a limit the service does
//! not have is refused at start, like any unknown setting.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize, de::DeserializeOwned};
use serde_json::{Map, Value};

/// `L` for every tenant, with per-tenant overrides (see the module's docs).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(
    try_from = "Raw<L>",
    into = "Raw<L>",
    bound(serialize = "L: Serialize + Clone", deserialize = "L: Serialize + DeserializeOwned")
)]
pub struct PerTenant<L> {
    every: L,
    overrides: BTreeMap<String, Map<String, Value>>,
    resolved: HashMap<String, L>,
}

/// The setting as written: `L`'s fields, and a `tenants` table of overrides.
#[derive(Serialize, Deserialize)]
struct Raw<L> {
    #[serde(flatten)]
    every: L,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    tenants: BTreeMap<String, Map<String, Value>>,
}

impl<L> PerTenant<L> {
    /// The same limits for every tenant.
    pub fn every(limits: L) -> Self {
        Self { every: limits, overrides: BTreeMap::new(), resolved: HashMap::new() }
    }

    /// The limits of `tenant`.
    pub fn of(&self, tenant: &str) -> &L {
        self.resolved.get(tenant).unwrap_or(&self.every)
    }

    /// The limits of tenants without an override.
    pub fn default_limits(&self) -> &L {
        &self.every
    }

    /// Every tenant with an override, and its limits.
    pub fn overridden(&self) -> impl Iterator<Item = (&str, &L)> {
        self.resolved.iter().map(|(tenant, limits)| (tenant.as_str(), limits))
    }
}

impl<L: Serialize> PerTenant<L> {
    /// Give `tenant` limits of its own (all of them), as a
    /// `[….tenants.<tenant>]` table would.
    pub fn set(&mut self, tenant: &str, limits: L) {
        if let Ok(Value::Object(written)) = serde_json::to_value(&limits) {
            self.overrides.insert(tenant.to_owned(), written);
        }
        self.resolved.insert(tenant.to_owned(), limits);
    }
}

impl<L: Serialize + DeserializeOwned> TryFrom<Raw<L>> for PerTenant<L> {
    type Error = String;

    fn try_from(raw: Raw<L>) -> Result<Self, String> {
        let every = match serde_json::to_value(&raw.every) {
            Ok(Value::Object(every)) => every,
            Ok(_) => return Err("per-tenant limits must be a table".to_owned()),
            Err(error) => return Err(error.to_string()),
        };
        let mut resolved = HashMap::with_capacity(raw.tenants.len());
        for (tenant, changes) in &raw.tenants {
            if let Some(unknown) = changes.keys().find(|name| !every.contains_key(*name)) {
                return Err(format!(
                    "tenants.{tenant}.{unknown} is not a limit (the limits are: {})",
                    every.keys().map(String::as_str).collect::<Vec<_>>().join(", ")
                ));
            }
            let mut merged = every.clone();
            merged.extend(changes.clone());
            let limits =
                serde_json::from_value(Value::Object(merged)).map_err(|error| format!("tenants.{tenant}: {error}"))?;
            resolved.insert(tenant.clone(), limits);
        }
        Ok(Self { every: raw.every, overrides: raw.tenants, resolved })
    }
}

impl<L> From<PerTenant<L>> for Raw<L> {
    fn from(limits: PerTenant<L>) -> Self {
        Self { every: limits.every, tenants: limits.overrides }
    }
}

#[cfg(test)]
mod tests {
    use figment::{
        Figment,
        providers::{Format as _, Toml},
    };

    use super::*;

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    struct Limits {
        rate_per_sec: u32,
        max_in_flight: u32,
    }

    /// The limits of `toml`, or the error as text.
    fn load(toml: &str) -> Result<PerTenant<Limits>, String> {
        #[derive(Deserialize)]
        struct Config {
            limits: PerTenant<Limits>,
        }
        Figment::new()
            .merge(Toml::string(toml))
            .extract::<Config>()
            .map(|config| config.limits)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn a_tenant_gets_the_common_limits_with_its_own_changes() {
        let limits = load(
            "[limits]\nrate_per_sec = 500\nmax_in_flight = 64\n\
             [limits.tenants.acme]\nrate_per_sec = 2000\n",
        )
        .unwrap();
        assert_eq!(limits.of("acme"), &Limits { rate_per_sec: 2000, max_in_flight: 64 });
        assert_eq!(limits.of("globex"), &Limits { rate_per_sec: 500, max_in_flight: 64 });
        let written = serde_json::to_value(&limits).unwrap();
        assert_eq!(written["tenants"]["acme"]["rate_per_sec"], 2000);
        assert_eq!(written["max_in_flight"], 64);
    }

    #[test]
    fn an_override_of_a_limit_that_does_not_exist_or_of_the_wrong_kind_is_refused() {
        let error = load("[limits]\nrate_per_sec = 5\nmax_in_flight = 6\n[limits.tenants.acme]\nrate_per_src = 1\n")
            .unwrap_err();
        assert!(error.contains("tenants.acme.rate_per_src is not a limit"), "{error}");
        let error =
            load("[limits]\nrate_per_sec = 5\nmax_in_flight = 6\n[limits.tenants.acme]\nrate_per_sec = \"x\"\n")
                .unwrap_err();
        assert!(error.contains("tenants.acme"), "{error}");
    }
}
