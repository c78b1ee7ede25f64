//! The SQL of executions and key queues (migration `0007_executions.sql`).
//!
//! The one rule every function here keeps: a `key_queues` row exists exactly
//! while its key has an execution not yet ended, and its `head` is the oldest
//! such execution. Who may break it, and how it is kept:
//!
//! - a lane adds executions ([`enqueue`]): it inserts them and upserts their
//!   keys' rows (`ON CONFLICT DO UPDATE` locks an existing row), in one
//!   transaction;
//! - the dispatcher ends a head ([`advance`]): it locks the key's row first
//!   and only then, in a new statement (a new snapshot), looks for the next
//!   execution, so a lane's execution committed while it waited is seen.
//!
//! Either the lane's upsert waits for the dispatcher's commit (then finds the
//! row gone and inserts it with its own execution as head, or finds it
//! advanced), or the dispatcher's lock waits for the lane's commit (then sees
//! its execution). Both take several keys' rows in key order, so they do not
//! deadlock each other.
//!
//! The statements, by role, each in a module of its own and re-exported
//! here: `handover` (a lane's), `claims` (taking heads to run), `ends`
//! (ending executions and moving queues on), `waits` (holding heads back)
//! and `views` (what a client sees).

mod claims;
mod ends;
mod handover;
mod views;
mod waits;

pub(super) use claims::EXECUTION_COLUMNS;
pub use claims::{Attempt, Execution, claim, lock_ready, queued, ready_keys};
pub use ends::{Ending, advance, end};
pub use handover::{NewExecution, busy, enqueue};
pub use views::{ExecutionView, view};
pub use waits::{Wait, hold, hold_head, hold_types, next_ready_in, retry_later};

use sqlx::{PgConnection, Row as _, postgres::PgRow};

/// A queue of commands that take effect one at a time, in order: a tenant's
/// ordering key, or a command of its own when its type has none.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct QueueKey {
    pub tenant: String,
    /// The ordering scope; empty for a command without an ordering key.
    pub scope: String,
    /// The ordering key's value; the job id for a command without one.
    pub value: String,
}

impl QueueKey {
    fn of_row(row: &PgRow) -> Result<Self, sqlx::Error> {
        Ok(Self { tenant: row.try_get("tenant")?, scope: row.try_get("scope")?, value: row.try_get("ordering_key")? })
    }
}

/// Columns of keys, for `unnest`.
fn columns<'a>(keys: impl Iterator<Item = &'a QueueKey>) -> (Vec<&'a str>, Vec<&'a str>, Vec<&'a str>) {
    let mut columns = (Vec::new(), Vec::new(), Vec::new());
    for key in keys {
        columns.0.push(key.tenant.as_str());
        columns.1.push(key.scope.as_str());
        columns.2.push(key.value.as_str());
    }
    columns
}

/// Wake every dispatcher and waiting pull worker at commit (notifications
/// of one transaction are merged).
pub async fn notify(tx: &mut PgConnection) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT pg_notify($1, '')").bind(CHANNEL).execute(tx).await?;
    Ok(())
}

/// The channel of work that became ready (migration 0007's trigger, and
/// [`notify`]).
pub const CHANNEL: &str = "onceflow_executions";
