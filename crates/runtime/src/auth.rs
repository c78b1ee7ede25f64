//! API keys → tenants, shared by every service with an HTTP API. Keys are
//! configured as SHA-256 digests, so neither the configuration nor a log line
//! ever holds a usable key.

use std::{collections::HashMap, sync::Arc};

use axum::http::{HeaderMap, header};
use sha2::{Digest as _, Sha256};

/// One configured API key.
#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
pub struct TenantKey {
    pub tenant: String,
    /// Lower-case hex SHA-256 of the key: `printf '%s' "$KEY" | sha256sum`.
    pub api_key_sha256: String,
}

/// The tenant a request acts for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tenant(pub String);

/// Looks API keys up by digest. Cheap to clone: every request and open
/// stream shares the one map.
#[derive(Debug, Clone, Default)]
pub struct ApiKeys {
    by_digest: Arc<HashMap<String, String>>,
}

impl ApiKeys {
    /// The keys of a service's `tenants` setting, refused when there is none
    /// (no tenant is built in: a service without one could serve nobody) or
    /// a digest is not 64 hex digits.
    pub fn configured(keys: &[TenantKey]) -> crate::Result<Self> {
        if keys.is_empty() {
            return Err(crate::Error::Config(
                "no tenants are configured, so no request could be served: add one to the config file \
                 ([[tenants]] tenant = \"acme\", api_key_sha256 = \"<printf '%s' \"$KEY\" | sha256sum>\") of \
                 ingest and of the notifier (README: Adding a tenant); for local development use \
                 --config config/development/<service>.toml"
                    .to_owned(),
            ));
        }
        if let Some(bad) = keys.iter().find(|k| k.api_key_sha256.len() != 64 || hex::decode(&k.api_key_sha256).is_err())
        {
            return Err(crate::Error::Config(format!(
                "tenants: the api_key_sha256 of tenant {:?} is not a SHA-256 digest (64 hex digits)",
                bad.tenant
            )));
        }
        let mut owners = HashMap::with_capacity(keys.len());
        for key in keys {
            if let Some(first) = owners.insert(key.api_key_sha256.to_ascii_lowercase(), &key.tenant) {
                // One key, two entries: the last would silently win, and a
                // key meant for one tenant would act for another.
                return Err(crate::Error::Config(format!(
                    "tenants: tenants {first:?} and {:?} have the same api_key_sha256; each API key must be \
                     configured once",
                    key.tenant
                )));
            }
        }
        Ok(Self::new(keys))
    }

    pub fn new(keys: &[TenantKey]) -> Self {
        Self {
            by_digest: Arc::new(
                keys.iter().map(|k| (k.api_key_sha256.to_ascii_lowercase(), k.tenant.clone())).collect(),
            ),
        }
    }

    /// The tenant of the `Authorization: Bearer <key>` header, if the key is known.
    pub fn authenticate(&self, headers: &HeaderMap) -> Option<Tenant> {
        let key = headers
            .get(header::AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.strip_prefix("Bearer "))?;
        self.tenant_of(key.trim())
    }

    /// The tenant owning `key`, if any.
    pub fn tenant_of(&self, key: &str) -> Option<Tenant> {
        let digest = hex::encode(Sha256::digest(key.as_bytes()));
        self.by_digest.get(&digest).cloned().map(Tenant)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_tenant_of_a_known_key_only() {
        let keys = ApiKeys::new(&[TenantKey {
            tenant: "dev".to_owned(),
            api_key_sha256: "074c2219380b418dfc50cabcb6c6ab84ba8ec229709d90fdd6932426b3423478".to_owned(),
        }]);
        assert_eq!(keys.tenant_of("dev-onceflow-key"), Some(Tenant("dev".to_owned())));
        assert_eq!(keys.tenant_of("dev-onceflow-key "), None);
        let mut headers = HeaderMap::new();
        assert_eq!(keys.authenticate(&headers), None);
        headers.insert(header::AUTHORIZATION, "Bearer dev-onceflow-key".parse().unwrap());
        assert_eq!(keys.authenticate(&headers), Some(Tenant("dev".to_owned())));
    }

    #[test]
    fn no_tenant_or_a_malformed_digest_is_refused() {
        let error = ApiKeys::configured(&[]).unwrap_err().to_string();
        assert!(error.contains("no tenants are configured") && error.contains("config/development"), "{error}");
        let short = TenantKey { tenant: "acme".to_owned(), api_key_sha256: "abc".to_owned() };
        assert!(ApiKeys::configured(&[short]).unwrap_err().to_string().contains("\"acme\""));
        let fine = TenantKey { tenant: "acme".to_owned(), api_key_sha256: "0".repeat(64) };
        assert!(ApiKeys::configured(std::slice::from_ref(&fine)).is_ok());
        let again = TenantKey { tenant: "globex".to_owned(), api_key_sha256: "0".repeat(64) };
        let error = ApiKeys::configured(&[fine, again]).unwrap_err().to_string();
        assert!(error.contains("\"acme\" and \"globex\" have the same api_key_sha256"), "{error}");
    }
}
