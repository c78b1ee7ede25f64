//! Executions: commands the processor drives from PostgreSQL, one at a time
//! per ordering key, instead of applying them in the transaction that
//! records them.
//!
//! A lane ([`crate::worker`]) applies a built-in command inline while its
//! key has nothing queued; every other command it records as an execution,
//! in the transaction of its inbox row, and stores its offset: a lane never
//! waits for work. Handed over are commands of push handlers, of built-in
//! long work (`inline = false`), of keys with work queued, and inline
//! effects that met a row someone else holds for longer than
//! `executions.inline_lock_timeout_ms`. The [`Dispatcher`] then runs the
//! head of each key's queue ([`store`] keeps the queues):
//!
//! - a built-in head ([`builtin`]) runs with the key's queued built-in
//!   executions after it in one transaction that holds the key's row, so a
//!   crash leaves nothing to recover; a row lock it meets holds back its key
//!   alone (`waiting_for: locked`);
//! - a push head ([`push`]) is claimed (`running`, with a fresh attempt id
//!   and a deadline) in a committed transaction, then POSTed to its handler;
//!   the answer ends it, or puts it back to wait ([`endings`]).
//!
//! **Exactly once.** Every call of a job carries the same `Idempotency-Key`
//! (its job id): calls are at least once (a processor that dies mid-call, an
//! attempt whose deadline passed, is called again), and the handler makes
//! them safe with the key. What is exactly once is the recording: an
//! execution ends in one transaction with its result's outbox row, its inbox
//! outcome and the move of its key's queue, and only if it is still the
//! attempt that ends it (the attempt id fences a late answer of an attempt
//! given up), so the first valid outcome wins and every later one changes
//! nothing. A built-in execution's effect commits in that same transaction.
//!
//! **Order.** A key's executions run in `seq` order: the order the lanes
//! recorded them, which is their partition's order (one key, one partition),
//! which is the order ingest gave their `202`s. A command that meets its key
//! busy queues behind; the head alone may run, and the next becomes head
//! only when it ends. A lane's inline command never overtakes an execution:
//! it goes inline only when its key has none queued, and a key stays busy
//! until its queue is empty. Results carry their command's Kafka key, so
//! they keep this order on the results topic.
//!
//! **No key waits for another.** A head that cannot go on (a slow or
//! unreachable handler, a row locked by someone else, a retry's backoff)
//! holds its own key only: the dispatcher takes ready heads of every other
//! key, within each type's `concurrency`.
//!
//! **Outages are not failures** (G8): an unreachable handler, `429` and
//! `503` wait with backoff (honouring `Retry-After`) and a circuit breaker
//! per handler, and spend no attempt; a `5xx` or a timeout spends one, and
//! the policy's last dead-letters the job (redrive works as for any dead
//! letter); a `4xx` problem ends it `failed` at once.

pub mod api;
mod builtin;
pub mod callbacks;
pub mod cancel;
mod dispatcher;
mod endings;
mod gauges;
mod leases;
pub mod pull;
pub mod push;
pub mod store;
mod timeouts;

pub use dispatcher::Dispatcher;
