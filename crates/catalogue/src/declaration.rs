//! The file that declares command types, as an operator writes it (TOML):
//!
//! ```toml
//! [types."demo.greet"]
//! description = "Say hello."                 # shown in ingest's OpenAPI document
//! schema = "demo.greet.schema.json"          # the payload's JSON Schema: a file beside
//!                                            # this one, or an inline table
//! ordering_key = "/name"                     # JSON pointer into the payload (optional)
//! ordering_scope = "demo"                    # types sharing a scope share key queues
//! handler = { push = "https://greeter.internal/onceflow" }   # who serves it
//! attempt_timeout_ms = 30000                 # one attempt, call or callbacks included
//! heartbeat_timeout_ms = 30000               # between heartbeats of a running attempt
//! start_timeout_ms = 600000                  # from the 202 to the first start (optional)
//! job_timeout_ms = 3600000                   # from the 202 to the end (optional)
//! concurrency = 32                           # calls in flight per processor instance
//! retry = { max_attempts = 5, initial_backoff_ms = 1000 }   # attempts a failure spends
//! ```
//!
//! Everything here is checked when a service starts ([`crate::CommandTypes::load`]):
//! a declaration that cannot work stops the service with its name, instead of
//! refusing or dead-lettering commands later.

use std::collections::BTreeMap;

pub use onceflow_webhook::RetryPolicy;

/// A whole declarations file.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Declarations {
    /// Command types by name.
    #[serde(default)]
    pub types: BTreeMap<String, Declaration>,
}

/// One command type as declared.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Declaration {
    /// What the type does, for the API document.
    #[serde(default)]
    pub description: Option<String>,
    /// The payload's JSON Schema.
    pub schema: SchemaSource,
    /// A JSON pointer (RFC 6901) to the payload's ordering key: commands of
    /// a tenant with the same key (in the same scope) take effect in the
    /// order their `202`s were given, one at a time. Without one, each
    /// command stands alone.
    #[serde(default)]
    pub ordering_key: Option<String>,
    /// Types that name the same scope order their commands together (the
    /// ledger's types, all keyed by account); the type's own name otherwise.
    #[serde(default)]
    pub ordering_scope: Option<String>,
    /// Who applies the command.
    pub handler: HandlerDeclaration,
    /// Built-in handlers only: apply a command in the very transaction that
    /// records it while its key has nothing queued (the fast path, on by
    /// default); `false` for long work, which then runs on its own and
    /// holds up nothing but its key.
    #[serde(default)]
    pub inline: Option<bool>,
    /// The longest one attempt may take, from its start to its end: a push
    /// call not answered by then, or an accepted (`202`) or pulled attempt
    /// not completed by then, spends the attempt.
    #[serde(default = "default_attempt_timeout_ms")]
    pub attempt_timeout_ms: u64,
    /// The longest a running asynchronous attempt (a push handler's `202`, a
    /// pull worker's lease) may go without a heartbeat: then its handler or
    /// worker is taken for dead and the attempt spent. At least 5 s.
    #[serde(default = "default_heartbeat_timeout_ms")]
    pub heartbeat_timeout_ms: u64,
    /// The longest a command may wait to start (behind its key, for a
    /// handler, a worker or a retry's backoff) from its `202`: then it ends
    /// `failed` (`timed_out`). None by default.
    #[serde(default)]
    pub start_timeout_ms: Option<u64>,
    /// The longest a command may take from its `202` to its end, attempts
    /// and waits included: then it ends `failed` (`timed_out`). None by
    /// default.
    #[serde(default)]
    pub job_timeout_ms: Option<u64>,
    /// The most calls of this type's handler in flight at once, per
    /// processor instance; more commands wait (`waiting_for` says so).
    #[serde(default = "default_concurrency")]
    pub concurrency: u32,
    /// Attempts a handler's own failures may spend (`5xx`, a timeout), and
    /// the waits between them; outages (`429`, `503`, no connection) spend
    /// none. The fields of [`RetryPolicy`]; those left out keep
    /// [`default_retry`]'s.
    #[serde(default)]
    pub retry: serde_json::Map<String, serde_json::Value>,
}

fn default_attempt_timeout_ms() -> u64 {
    30_000
}

fn default_heartbeat_timeout_ms() -> u64 {
    30_000
}

fn default_concurrency() -> u32 {
    32
}

/// 5 attempts; waits of 1, 2, 4 and 8 s (± 20 %) between them.
pub fn default_retry() -> RetryPolicy {
    RetryPolicy {
        max_attempts: 5,
        initial_backoff_ms: 1_000,
        backoff_multiplier: 2.0,
        max_backoff_ms: 60_000,
        jitter: 0.2,
    }
}

/// Where a payload schema comes from.
#[derive(Debug, serde::Deserialize)]
#[serde(untagged)]
pub enum SchemaSource {
    /// A JSON file, relative to the declarations file.
    File(String),
    /// The schema itself, written as a TOML table.
    Inline(serde_json::Map<String, serde_json::Value>),
}

/// Who applies a command type: `{ builtin = "name" }`, `{ push = "url" }`
/// or `"pull"`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum HandlerDeclaration {
    /// A handler compiled into the processor, by name (the ledger's), run in
    /// the processor's own transaction.
    Builtin(String),
    /// An HTTP endpoint the processor POSTs each command to, signed per
    /// Standard Webhooks (see the README's "Your own command type").
    Push(String),
    /// Workers without a public address fetch its commands
    /// (`POST /v1/workers/poll` of the processor) and hold each with a lease.
    Pull,
}
