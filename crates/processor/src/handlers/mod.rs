//! The handler registry: the extension point of the processor. A command type
//! is served by one handler; adding a domain means adding its payload types to
//! the contracts' catalogue and registering handlers here.
//!
//! A handler runs inside the processor's transaction (on a savepoint), so
//! whatever it writes commits together with the inbox row and the result's
//! outbox row, or not at all.

pub mod ledger;

use std::{collections::HashMap, future::Future, pin::Pin};

use sqlx::PgConnection;
use uuid::Uuid;

/// What a handler is given.
#[derive(Debug, Clone)]
pub struct CommandContext {
    pub job_id: Uuid,
    pub tenant: String,
    pub command_type: String,
    pub payload: serde_json::Value,
}

/// How a handler can fail; the processor's reaction depends on which.
#[derive(Debug, thiserror::Error)]
pub enum HandlerError {
    /// A business refusal (unknown account, insufficient funds): the job ends
    /// `failed` with this code. Never retried.
    #[error("{code}: {message}")]
    Refused { code: &'static str, message: String },
    /// The command can never succeed as written (payload does not fit its
    /// type): dead-lettered at once.
    #[error("poison: {0}")]
    Poison(String),
    /// Might work on a later attempt (lost connection, serialization failure).
    #[error("transient: {0}")]
    Transient(#[from] sqlx::Error),
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

/// Handlers by command type.
#[derive(Debug, Clone, Default)]
pub struct Registry {
    handlers: HashMap<&'static str, Handler>,
}

impl Registry {
    /// The registry of every handler that ships with onceflow.
    pub fn with_builtin_handlers() -> Self {
        let mut registry = Self::default();
        ledger::register(&mut registry);
        registry
    }

    pub fn register(&mut self, command_type: &'static str, handler: Handler) {
        self.handlers.insert(command_type, handler);
    }

    pub fn get(&self, command_type: &str) -> Option<Handler> {
        self.handlers.get(command_type).copied()
    }
}
