//! The handler registry: which handler serves each command type. Command
//! types are declared in configuration (`onceflow_catalogue`); a type served
//! in the processor's own process names one of the [`Builtins`] compiled into
//! it (the ledger's), and [`Registry::resolve`] checks at start that each
//! name exists.
//!
//! A handler runs inside the processor's transaction, so whatever it writes
//! commits together with the inbox row and the result's outbox row, or not at
//! all. A refusal must leave nothing of the effect behind: a handler that may
//! refuse after writing runs on a savepoint that its refusal rolls back; one
//! registered as deciding every refusal before its first write
//! ([`Refusals::BeforeWriting`]) runs in a batch without one, two round trips
//! fewer per command. Such a handler may also come with a [`BulkHandler`]:
//! a batch then hands it every run of consecutive commands of its type at
//! once, so that a hot path costs one round trip per run, not per command.
//!
//! A long-running handler may report progress with [`Progress::report`]: each
//! report is a `processing` result event committed to the outbox in its own
//! short transaction, so it is published before the handler's result. Progress
//! is advisory and at least once (a retried or redelivered command reports it
//! again; consumers dedup by event id and only move a job forward); the
//! terminal result stays exactly once.

pub mod ledger;
pub mod probe;

use std::{collections::HashMap, future::Future, pin::Pin, sync::Arc};

use onceflow_catalogue::{CommandType, CommandTypes, Handler as Declared};
use sqlx::PgConnection;
use uuid::Uuid;

/// What a handler is given.
#[derive(Debug, Clone)]
pub struct CommandContext {
    pub job_id: Uuid,
    pub tenant: String,
    pub command_type: String,
    pub payload: serde_json::Value,
    /// Where a long-running handler reports its progress.
    pub progress: Progress,
}

/// Publishes a job's progress (a `processing` result event with a percent)
/// durably, outside the handler's transaction.
pub type ProgressFn = dyn Fn(i32) -> Pin<Box<dyn Future<Output = Result<(), HandlerError>> + Send>> + Send + Sync;

/// A handler's way to report progress; reports nothing unless the worker gave it a sink.
#[derive(Clone, Default)]
pub struct Progress {
    sink: Option<Arc<ProgressFn>>,
}

impl std::fmt::Debug for Progress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Progress").field("enabled", &self.sink.is_some()).finish()
    }
}

impl Progress {
    pub fn new(sink: Arc<ProgressFn>) -> Self {
        Self { sink: Some(sink) }
    }

    /// Commit a `processing` event with `percent` (0-100) to the outbox now.
    pub async fn report(&self, percent: i32) -> Result<(), HandlerError> {
        match &self.sink {
            Some(sink) => sink(percent.clamp(0, 100)).await,
            None => Ok(()),
        }
    }
}

/// How a handler can fail; the processor's reaction depends on which.
#[derive(Debug, thiserror::Error)]
pub enum HandlerError {
    /// A business refusal (unknown account, insufficient funds, a balance
    /// that would leave the 64-bit range): the job ends `failed` with this
    /// code and nothing of the effect stays. Never retried.
    #[error("{code}: {message}")]
    Refused { code: &'static str, message: String },
    /// The command can never succeed as written (payload does not fit its
    /// type, a result that cannot be encoded): dead-lettered at once.
    #[error("poison: {0}")]
    Poison(String),
    /// A database error, sorted where it is handled by
    /// [`onceflow_runtime::failure::Failure::of_database`]: a data error
    /// dead-letters the command at once, an outage makes its lane wait and
    /// try again, without bound.
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
}

impl HandlerError {
    pub fn refused(code: &'static str, message: impl Into<String>) -> Self {
        Self::Refused { code, message: message.into() }
    }
}

/// A handler's answer: the result JSON of a successful command.
pub type HandlerFuture<'a> = Pin<Box<dyn Future<Output = Result<serde_json::Value, HandlerError>> + Send + 'a>>;

/// A command handler.
pub type Handler = for<'a> fn(&'a mut PgConnection, &'a CommandContext) -> HandlerFuture<'a>;

/// What a bulk handler answers: for each command given, in order, what the
/// handler would have answered for it alone (its result, a refusal, or
/// poison); an error of the whole (the database failed) as `Err`.
pub type BulkOutcomes = Result<Vec<Result<serde_json::Value, HandlerError>>, HandlerError>;

/// A bulk handler's answer.
pub type BulkFuture<'a> = Pin<Box<dyn Future<Output = BulkOutcomes> + Send + 'a>>;

/// A handler of many commands of one type at once: it must leave exactly what
/// its [`Handler`] would applied to each command in turn in one transaction,
/// decide each refusal before that command's writes, and answer one outcome
/// per command, in order.
pub type BulkHandler = for<'a> fn(&'a mut PgConnection, &'a [CommandContext]) -> BulkFuture<'a>;

/// When a handler may refuse, which decides whether a batch must give it a
/// savepoint of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusals {
    /// Every refusal is decided before the handler's first write (and a write
    /// that fails is a database error, which rolls the whole batch back):
    /// a refusal leaves nothing to undo, so no savepoint is needed.
    BeforeWriting,
    /// A refusal may come after a write: the handler runs on a savepoint that
    /// a refusal rolls back.
    AfterWriting,
}

/// A registered handler, when it may refuse, and its bulk form if it has one.
#[derive(Debug, Clone, Copy)]
pub struct Registered {
    pub handler: Handler,
    pub refusals: Refusals,
    /// Set only with [`Refusals::BeforeWriting`]: a bulk run has no savepoints.
    pub bulk: Option<BulkHandler>,
}

/// The handlers compiled into the processor, by the name a command type's
/// declaration gives as `handler = { builtin = "..." }`.
#[derive(Debug, Clone, Default)]
pub struct Builtins {
    handlers: HashMap<&'static str, Registered>,
}

impl Builtins {
    /// Every handler that ships with onceflow (the ledger's, the probe's).
    pub fn shipped() -> Self {
        let mut builtins = Self::default();
        ledger::register(&mut builtins);
        probe::register(&mut builtins);
        builtins
    }

    /// Serve the types that name `name` with `handler`; `refusals` says when
    /// it may refuse ([`Refusals::AfterWriting`] is always safe).
    pub fn register(&mut self, name: &'static str, handler: Handler, refusals: Refusals) {
        self.handlers.insert(name, Registered { handler, refusals, bulk: None });
    }

    /// Serve the types that name `name` with `handler`, and runs of their
    /// commands in a batch with `bulk`; both decide every refusal before
    /// writing.
    pub fn register_bulk(&mut self, name: &'static str, handler: Handler, bulk: BulkHandler) {
        self.handlers.insert(name, Registered { handler, refusals: Refusals::BeforeWriting, bulk: Some(bulk) });
    }
}

/// How the processor serves one declared command type.
#[derive(Debug, Clone)]
pub enum ServedBy {
    /// A built-in handler, in the processor's own transaction.
    Builtin(Registered),
    /// An HTTP endpoint, called by the dispatcher (see `crate::executions`).
    Push(url::Url),
    /// Pull workers take its commands (`crate::executions::pull`).
    Pull,
}

/// Every declared command type and what serves it.
#[derive(Debug, Clone)]
pub struct Registry {
    types: CommandTypes,
    served: HashMap<&'static str, ServedBy>,
}

impl Registry {
    /// Each type of `types` with what its declaration names: a built-in
    /// handler of `builtins` (a name none has is an error, and the processor
    /// does not start), a push endpoint, or pull workers.
    pub fn resolve(types: &CommandTypes, builtins: &Builtins) -> Result<Self, String> {
        let mut served = HashMap::new();
        for command_type in types.iter() {
            let by = match &command_type.handler {
                Declared::Builtin(name) => {
                    ServedBy::Builtin(builtins.handlers.get(name.as_str()).copied().ok_or_else(|| {
                        format!(
                            "command type `{}` names the built-in handler `{name}`, which does not exist",
                            command_type.name
                        )
                    })?)
                }
                Declared::Push(url) => ServedBy::Push(url.clone()),
                Declared::Pull => ServedBy::Pull,
            };
            // Leaked once at start, for the life of the process: the names
            // are metric labels, which take `&'static str` without a copy per
            // command; there are as many as declared types.
            let name: &'static str = Box::leak(command_type.name.clone().into_boxed_str());
            served.insert(name, by);
        }
        Ok(Self { types: types.clone(), served })
    }

    /// The registry of the built-in types with the handlers that ship.
    pub fn builtin() -> Self {
        Self::resolve(&CommandTypes::builtin(), &Builtins::shipped())
            .unwrap_or_else(|error| unreachable!("the ledger's declarations name its handlers: {error}"))
    }

    /// The built-in handler of `command_type`, if a built-in serves it.
    pub fn get(&self, command_type: &str) -> Option<Registered> {
        match self.served.get(command_type)? {
            ServedBy::Builtin(registered) => Some(*registered),
            ServedBy::Push(_) | ServedBy::Pull => None,
        }
    }

    /// What serves `command_type`, if it is declared.
    pub fn served_by(&self, command_type: &str) -> Option<&ServedBy> {
        self.served.get(command_type)
    }

    /// The declaration of `command_type`.
    pub fn declared(&self, command_type: &str) -> Option<&CommandType> {
        self.types.get(command_type)
    }

    /// Every declared type.
    pub fn command_types(&self) -> &CommandTypes {
        &self.types
    }

    /// Whether a command of `command_type` is applied in the transaction
    /// that records it while its key is free: a built-in handler, unless its
    /// declaration says `inline = false`.
    pub fn runs_inline(&self, command_type: &str) -> bool {
        self.get(command_type).is_some() && self.types.get(command_type).is_some_and(|declared| declared.inline)
    }

    /// `command_type` as a metric label: its declared name, or `unknown`
    /// for any other (a record's type must not mint metric series).
    pub fn label(&self, command_type: &str) -> &'static str {
        self.served.get_key_value(command_type).map_or("unknown", |(name, _)| name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_ledger_type_has_its_handler() {
        let registry = Registry::builtin();
        for command_type in CommandTypes::builtin().iter() {
            assert!(registry.get(&command_type.name).is_some(), "{}", command_type.name);
            assert_eq!(registry.runs_inline(&command_type.name), command_type.name != "ledger.statement");
            assert_eq!(registry.label(&command_type.name), command_type.name);
        }
        assert_eq!(registry.label("ledger.mint"), "unknown");
    }
}
