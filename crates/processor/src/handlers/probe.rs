//! `onceflow.probe`: the synthetic probe's command (`onceflow probe`). It
//! goes the whole way a command goes (ingest, the commands topic, the
//! processor's inbox, the results topic, the notifier) and changes nothing
//! but its own records: its result echoes when it was sent.

use onceflow_runtime::probe_records::COMMAND_TYPE;
use sqlx::PgConnection;

use super::{Builtins, CommandContext, HandlerError, HandlerFuture, Refusals};

pub fn register(registry: &mut Builtins) {
    registry.register(COMMAND_TYPE, probe, Refusals::BeforeWriting);
}

fn probe<'a>(_tx: &'a mut PgConnection, command: &'a CommandContext) -> HandlerFuture<'a> {
    Box::pin(async move {
        let sent_at = command.payload["sent_at"]
            .as_str()
            .ok_or_else(|| HandlerError::Poison(format!("{COMMAND_TYPE}: sent_at is not a string")))?;
        Ok(serde_json::json!({"probe": "ok", "sent_at": sent_at}))
    })
}
