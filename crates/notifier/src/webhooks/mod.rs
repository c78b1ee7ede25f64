//! Webhooks: the terminal result of a command submitted with a `callback_url`
//! is POSTed there, signed per the Standard Webhooks specification, at least
//! once.
//!
//! ```text
//! store::record ──tx{event, delivery}──▶ webhook_deliveries ──NOTIFY──▶ worker (every instance)
//!                                             ▲        │ claim: FOR UPDATE SKIP LOCKED + lease
//!            POST /v1/deliveries/{id}/redrive─┘        ▼
//!                                  SSRF check ─▶ sign ─▶ POST callback_url ─▶ webhook_attempts
//! ```
//!
//! - [`store`]: the deliveries table (the durable queue, shared by every
//!   instance) and the attempts log.
//! - [`worker`]: claims due deliveries, makes one attempt each, schedules the
//!   retry or ends the delivery.
//! - [`breakers`]: a circuit breaker per destination (scheme, host, port),
//!   in the database so every instance shares it: deliveries to a failing
//!   destination wait without spending attempts, one probe tests it.
//! - [`endpoints`]: a `410 Gone` disables the endpoint (callback URL) for its
//!   tenant, published to ingest through the outbox.
//! - [`api`]: `GET /v1/jobs/{job_id}/deliveries`, `GET /v1/deliveries/{id}`,
//!   `POST /v1/deliveries/{id}/redrive`, `GET /v1/webhook-endpoints` and
//!   `POST /v1/webhook-endpoints/{id}/enable`, per tenant.
//!
//! Signing, the retry schedule and the SSRF rules are in `onceflow-webhook`,
//! shared with ingest (which checks `callback_url` at submission).

pub mod api;
pub mod breakers;
pub mod endpoints;
pub mod store;
pub mod worker;
