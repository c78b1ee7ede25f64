//! Webhooks: the terminal result of a command submitted with a `callback_url`
//! is POSTed there, signed per the Standard Webhooks specification, at least
//! once.
//!
//! ```text
//! store::record ──tx{event, delivery}──▶ webhook_deliveries ──NOTIFY──▶ worker (every instance)
//!                                             ▲        │ claim: tenants in turns, each within its share,
//!            POST /v1/deliveries/{id}/redrive─┘        ▼        FOR UPDATE SKIP LOCKED + lease
//!                                  SSRF check ─▶ sign ─▶ POST callback_url ─▶ webhook_attempts
//! ```
//!
//! - [`store`]: the deliveries table (the durable queue, shared by every
//!   instance), creating deliveries, and the views and redrive of the API.
//! - [`claims`]: which due deliveries a worker takes next: tenants in turns,
//!   none beyond its share, past held breakers, in order per key.
//! - [`share`]: each tenant's share of an instance's workers (G8).
//! - [`attempts`]: recording an attempt's outcome, with its breaker and
//!   endpoint effects.
//! - [`worker`]: claims due deliveries, makes one attempt each, schedules the
//!   retry or ends the delivery.
//! - [`breakers`]: a circuit breaker per tenant and destination (scheme,
//!   host, port), in the database so every instance shares it: a tenant's
//!   deliveries to a failing destination wait without spending attempts, one
//!   probe tests it, and no other tenant's deliveries are held.
//! - [`endpoints`]: a `410 Gone` disables the endpoint (callback URL) for its
//!   tenant, published to ingest through the outbox.
//! - [`api`]: `GET /v1/jobs/{job_id}/deliveries`, `GET /v1/deliveries/{id}`,
//!   `POST /v1/deliveries/{id}/redrive`, `GET /v1/webhook-endpoints` and
//!   `POST /v1/webhook-endpoints/{id}/enable`, per tenant.
//!
//! Signing, the retry schedule and the SSRF rules are in `onceflow-webhook`,
//! shared with ingest (which checks `callback_url` at submission).

pub mod api;
pub mod attempts;
pub mod breakers;
pub mod claims;
pub mod endpoints;
pub mod share;
pub mod store;
pub mod worker;
