//! Self-contained signed tokens, checked without storage: `v1.<claims>.<mac>`,
//! where `<claims>` is base64url JSON (with an `exp`, Unix seconds) and
//! `<mac>` is base64url HMAC-SHA256 of `v1.<claims>` under a secret. Every
//! instance sharing the secret accepts the others' tokens; with none
//! configured each process makes its own, so its tokens die with it.
//!
//! The notifier's stream tokens and the processor's callback tokens are of
//! this kind; each says what its claims grant.

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use hmac::{Hmac, Mac as _};
use rand::RngCore as _;
use sha2::Sha256;

const VERSION: &str = "v1";

/// The shortest configured secret accepted: HMAC-SHA256's own output size.
pub const MIN_SECRET_BYTES: usize = 32;

/// Claims that stop being valid at a time.
pub trait Expiring {
    /// Expiry, Unix seconds.
    fn expires_at(&self) -> i64;
}

/// Why a token was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("the token is malformed")]
    Malformed,
    #[error("the token's signature does not match (issued under another secret, or altered)")]
    BadSignature,
    #[error("the token expired")]
    Expired,
}

/// Issues and checks tokens with one secret.
#[derive(Clone)]
pub struct SignedTokens {
    /// Shared by every clone (each request and open stream holds one).
    key: std::sync::Arc<[u8]>,
}

impl std::fmt::Debug for SignedTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SignedTokens { key: <redacted> }")
    }
}

impl SignedTokens {
    /// Tokens under the configured `secret` (the setting `setting`), or,
    /// when it is empty, under a random secret of this process (`false`
    /// then: tokens do not outlive it).
    pub fn from_config(secret: &str, setting: &str) -> Result<(Self, bool), String> {
        if secret.is_empty() {
            let mut key = vec![0; MIN_SECRET_BYTES];
            rand::rng().fill_bytes(&mut key);
            return Ok((Self { key: key.into() }, false));
        }
        if secret.len() < MIN_SECRET_BYTES {
            return Err(format!("{setting} must be at least {MIN_SECRET_BYTES} bytes (or empty)"));
        }
        Ok((Self { key: secret.as_bytes().into() }, true))
    }

    /// A token granting `claims`.
    pub fn issue<C: serde::Serialize>(&self, claims: &C) -> String {
        let body = URL_SAFE_NO_PAD.encode(serde_json::to_vec(claims).unwrap_or_default());
        let signed = format!("{VERSION}.{body}");
        let tag = URL_SAFE_NO_PAD.encode(self.mac(&signed).finalize().into_bytes());
        format!("{signed}.{tag}")
    }

    /// The claims of `token` if this secret made it and it has not expired
    /// at `now` (Unix seconds).
    pub fn verify<C: serde::de::DeserializeOwned + Expiring>(&self, token: &str, now: i64) -> Result<C, TokenError> {
        let (signed, tag) = token.rsplit_once('.').ok_or(TokenError::Malformed)?;
        let (version, body) = signed.split_once('.').ok_or(TokenError::Malformed)?;
        if version != VERSION {
            return Err(TokenError::Malformed);
        }
        let tag = URL_SAFE_NO_PAD.decode(tag).map_err(|_| TokenError::Malformed)?;
        // Constant-time comparison (hmac's verify uses `subtle`).
        self.mac(signed).verify_slice(&tag).map_err(|_| TokenError::BadSignature)?;
        let claims: C = URL_SAFE_NO_PAD
            .decode(body)
            .ok()
            .and_then(|json| serde_json::from_slice(&json).ok())
            .ok_or(TokenError::Malformed)?;
        if claims.expires_at() <= now {
            return Err(TokenError::Expired);
        }
        Ok(claims)
    }

    fn mac(&self, signed: &str) -> Hmac<Sha256> {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.key).expect("HMAC takes keys of any length");
        mac.update(signed.as_bytes());
        mac
    }
}
