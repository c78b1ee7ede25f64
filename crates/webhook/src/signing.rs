//! Standard Webhooks signatures (<https://www.standardwebhooks.com>, the
//! symmetric `v1` scheme).
//!
//! A delivery carries three headers: `webhook-id` (the same on every retry of
//! one delivery, so receivers can dedup), `webhook-timestamp` (seconds since
//! the Unix epoch, new on every attempt, so receivers can refuse replays) and
//! `webhook-signature`: `v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">`.
//! During a secret rotation the body is signed with every active secret and
//! the signatures are sent space-separated; a receiver accepts the request when
//! any one of them verifies with the secret it knows.
//!
//! Secrets are written `whsec_<base64 of 24 to 64 random bytes>`, the format
//! the specification prescribes.

use base64::{Engine as _, engine::general_purpose::STANDARD};
use hmac::{Hmac, Mac as _};
use sha2::Sha256;

/// The header with the delivery's stable id.
pub const HEADER_ID: &str = "webhook-id";
/// The header with the attempt's Unix time in seconds.
pub const HEADER_TIMESTAMP: &str = "webhook-timestamp";
/// The header with the space-separated `v1,<base64>` signatures.
pub const HEADER_SIGNATURE: &str = "webhook-signature";

/// What every serialised secret starts with.
pub const SECRET_PREFIX: &str = "whsec_";
/// The specification's bounds of a secret's length, in bytes.
pub const SECRET_BYTES: std::ops::RangeInclusive<usize> = 24..=64;
const VERSION: &str = "v1";

/// Why a configured secret was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecretError {
    #[error("a webhook secret must start with `whsec_`")]
    MissingPrefix,
    #[error("a webhook secret must be base64 after `whsec_`")]
    NotBase64,
    #[error("a webhook secret must hold 24 to 64 bytes, this one holds {0}")]
    BadLength(usize),
}

/// One HMAC signing secret. Its `Debug` and `Serialize` forms never show the
/// key, so printing a configuration cannot leak it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret {
    key: Vec<u8>,
}

impl Secret {
    /// Parse `whsec_<base64>`.
    pub fn parse(text: &str) -> Result<Self, SecretError> {
        let encoded = text.trim().strip_prefix(SECRET_PREFIX).ok_or(SecretError::MissingPrefix)?;
        let key = STANDARD.decode(encoded).map_err(|_| SecretError::NotBase64)?;
        Self::from_bytes(key)
    }

    /// A secret from raw key bytes (24 to 64 of them).
    pub fn from_bytes(key: Vec<u8>) -> Result<Self, SecretError> {
        if SECRET_BYTES.contains(&key.len()) { Ok(Self { key }) } else { Err(SecretError::BadLength(key.len())) }
    }

    /// A new random 32-byte secret, for provisioning a tenant.
    pub fn generate() -> Self {
        let key: [u8; 32] = rand::random();
        Self { key: key.to_vec() }
    }

    /// The `whsec_…` form, to hand to the tenant who verifies with it.
    pub fn reveal(&self) -> String {
        format!("{SECRET_PREFIX}{}", STANDARD.encode(&self.key))
    }

    /// `v1,<base64 HMAC-SHA256 of "{msg_id}.{timestamp}.{body}">` with this secret.
    pub fn signature(&self, msg_id: &str, timestamp: i64, body: &[u8]) -> String {
        // HMAC accepts keys of any length, so this cannot fail.
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.key).expect("HMAC takes any key length");
        mac.update(msg_id.as_bytes());
        mac.update(b".");
        mac.update(timestamp.to_string().as_bytes());
        mac.update(b".");
        mac.update(body);
        format!("{VERSION},{}", STANDARD.encode(mac.finalize().into_bytes()))
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Secret({SECRET_PREFIX}…, {} bytes)", self.key.len())
    }
}

impl std::str::FromStr for Secret {
    type Err = SecretError;
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Self::parse(text)
    }
}

impl<'de> serde::Deserialize<'de> for Secret {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        Self::parse(&text).map_err(serde::de::Error::custom)
    }
}

impl serde::Serialize for Secret {
    /// Redacted: `onceflow-* config` prints the effective configuration.
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&format!("{SECRET_PREFIX}<redacted>"))
    }
}

/// The `webhook-signature` header value: one `v1,…` signature per secret,
/// space-separated, in the order given (put the newest secret first).
pub fn sign(secrets: &[Secret], msg_id: &str, timestamp: i64, body: &[u8]) -> String {
    secrets.iter().map(|secret| secret.signature(msg_id, timestamp, body)).collect::<Vec<_>>().join(" ")
}

/// Whether any `v1` signature in `header` is valid for `secret`, compared in
/// constant time. Timestamp tolerance is the receiver's policy and is not
/// checked here.
pub fn verify(secret: &Secret, msg_id: &str, timestamp: i64, body: &[u8], header: &str) -> bool {
    let expected = secret.signature(msg_id, timestamp, body);
    header.split(' ').filter(|candidate| candidate.starts_with("v1,")).any(|candidate| {
        candidate.len() == expected.len()
            && candidate.bytes().zip(expected.bytes()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The specification's reference vector (the libraries' shared test).
    #[test]
    fn signs_the_reference_vector_of_the_specification() {
        let secret = Secret::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let signature = secret.signature("msg_p5jXN8AQM9LWM0D4loKWxJek", 1_614_265_330, br#"{"test": 2432232314}"#);
        assert_eq!(signature, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }

    #[test]
    fn signs_with_every_secret_during_a_rotation() {
        let (new, old) = (Secret::generate(), Secret::generate());
        let header = sign(&[new.clone(), old.clone()], "id-1", 1_700_000_000, b"{}");
        let parts: Vec<&str> = header.split(' ').collect();
        assert_eq!(parts.len(), 2);
        assert!(parts.iter().all(|p| p.starts_with("v1,")));
        assert!(verify(&new, "id-1", 1_700_000_000, b"{}", &header));
        assert!(verify(&old, "id-1", 1_700_000_000, b"{}", &header));
        assert!(!verify(&Secret::generate(), "id-1", 1_700_000_000, b"{}", &header), "an unrelated secret");
        assert!(!verify(&new, "id-2", 1_700_000_000, b"{}", &header), "another id");
        assert!(!verify(&new, "id-1", 1_700_000_001, b"{}", &header), "another timestamp");
        assert!(!verify(&new, "id-1", 1_700_000_000, b"{ }", &header), "another body");
    }

    #[test]
    fn refuses_malformed_secrets() {
        assert_eq!(Secret::parse("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"), Err(SecretError::MissingPrefix));
        assert_eq!(Secret::parse("whsec_not base64!"), Err(SecretError::NotBase64));
        assert_eq!(Secret::parse("whsec_c2hvcnQ="), Err(SecretError::BadLength(5)));
        assert_eq!(Secret::from_bytes(vec![0; 65]), Err(SecretError::BadLength(65)));
        assert!(Secret::from_bytes(vec![0; 64]).is_ok());
    }

    #[test]
    fn never_shows_the_key() {
        let secret = Secret::generate();
        let shown = format!("{secret:?} {}", serde_json::to_string(&secret).unwrap());
        assert!(!shown.contains(&secret.reveal()[SECRET_PREFIX.len()..]), "{shown}");
        assert_eq!(Secret::parse(&secret.reveal()).unwrap(), secret);
    }
}
