//! onceflow-webhook: the parts of webhook delivery that do not depend on where
//! deliveries are stored, so that both the notifier (which sends webhooks) and
//! ingest (which validates `callback_url` when a command is submitted) use the
//! same rules.
//!
//! - [`signing`]: Standard Webhooks signatures (`webhook-id`,
//!   `webhook-timestamp`, `webhook-signature: v1,<base64 HMAC-SHA256>`) with
//!   `whsec_` secrets, several at once during a rotation.
//! - [`retry`]: which responses are retried and when: exponential backoff with
//!   jitter on a bounded schedule, `Retry-After` honoured, `410 Gone` final.
//! - [`breaker`]: the circuit breaker of one destination (scheme, host,
//!   port): which outcomes count against it, when it opens, how long it stays
//!   open, and the one probe that closes it again. A state machine only; the
//!   notifier stores it where all its instances share it.
//! - [`ssrf`]: server-side request forgery protection:
//!   [`check_callback_url`] refuses URLs whose host resolves to loopback,
//!   private, link-local, unique-local, CGNAT, multicast, unspecified,
//!   reserved or cloud-metadata addresses unless an [`Allowlist`] permits
//!   them; [`SsrfResolver`] applies the same rule to every connection an HTTP
//!   client makes, so DNS that changes after the check cannot slip through.

pub mod breaker;
pub mod retry;
pub mod signing;
pub mod ssrf;

pub use breaker::BreakerPolicy;
pub use retry::{RetryPolicy, Verdict};
pub use signing::{Secret, SecretError};
pub use ssrf::{
    AddressClass, Allowlist, AllowlistError, SsrfError, SsrfResolver, check_callback_url, check_url, parse_callback_url,
};
