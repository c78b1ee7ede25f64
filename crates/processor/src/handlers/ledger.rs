//! The double-entry ledger that ships with onceflow. A duplicate effect would
//! show up as money: the sum of all customer balances must equal the sum of
//! all deposits, which the tests check after crashes and redeliveries.
//!
//! Every posting writes entries that sum to zero. Money enters through the
//! system account `world:<CUR>` of its currency, the only account allowed to go
//! below zero.
//!
//! Every balance a posting would produce is computed with checked arithmetic
//! on the locked rows before anything is written: one that would leave the
//! 64-bit range (many deposits adding past `i64::MAX`, the `world:<CUR>`
//! account going below `i64::MIN`) refuses the command as
//! `amount_out_of_range`, with nothing changed, so every account stays usable.
//! Ingest bounds each amount ([`payload::MAX_AMOUNT`]), which keeps this out
//! of reach of ordinary use; the check covers whatever bypassed the door.
//!
//! Every handler here decides its refusals before its first write
//! ([`Refusals::BeforeWriting`]), so a batch applies them without a savepoint
//! each. A deposit, the hot path, is one round trip: the `ledger_deposit`
//! function of the processor's migrations (`0005_ledger_deposit.sql`) locks,
//! checks and posts by the rules of this module; and a batch's run of
//! deposits is one round trip too ([`deposits`], `ledger_deposits` of
//! `0006_ledger_deposits.sql`).

use onceflow_contracts::payload::{self, ledger};
use serde::de::DeserializeOwned;
use sqlx::{PgConnection, Row as _};

use super::{Builtins, BulkFuture, CommandContext, HandlerError, HandlerFuture, Refusals};

pub fn register(registry: &mut Builtins) {
    registry.register(ledger::OPEN_ACCOUNT, open_account, Refusals::BeforeWriting);
    registry.register_bulk(ledger::DEPOSIT, deposit, deposits);
    registry.register(ledger::TRANSFER, transfer, Refusals::BeforeWriting);
    registry.register(ledger::STATEMENT, statement, Refusals::BeforeWriting);
}

/// Entries read per page of a statement.
pub const STATEMENT_PAGE_SIZE: i64 = 50;
/// A statement lists at most this many entries, the most recent ones; its
/// count and opening and closing balances always cover every entry, and
/// `truncated` says whether older ones were left out. Bounded so that the
/// result of an account of any length fits in one Kafka record with room to
/// spare (see the test `a_full_statement_fits_well_within_one_record`).
pub const STATEMENT_MAX_ENTRIES: usize = 1_000;
/// The error code of a posting that would take a balance out of the 64-bit range.
pub const AMOUNT_OUT_OF_RANGE: &str = "amount_out_of_range";
/// A statement reports progress each time it crosses a multiple of this percent.
pub const STATEMENT_PROGRESS_STEP: i64 = 25;

fn payload<T: DeserializeOwned>(command: &CommandContext) -> Result<T, HandlerError> {
    payload::parse(&command.command_type, &command.payload).map_err(|e| HandlerError::Poison(e.to_string()))
}

fn open_account<'a>(tx: &'a mut PgConnection, command: &'a CommandContext) -> HandlerFuture<'a> {
    Box::pin(async move {
        let p: ledger::OpenAccount = payload(command)?;
        let created = sqlx::query(
            "INSERT INTO accounts (tenant, account_id, currency) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
        )
        .bind(&command.tenant)
        .bind(&p.account_id)
        .bind(&p.currency)
        .execute(&mut *tx)
        .await?;
        if created.rows_affected() == 0 {
            return Err(HandlerError::refused("account_exists", format!("account {} already exists", p.account_id)));
        }
        Ok(serde_json::json!({"account_id": p.account_id, "currency": p.currency, "balance": 0}))
    })
}

/// A deposit: money from the currency's `world:<CUR>` into the account, in
/// one round trip (the `ledger_deposit` function of the processor's
/// migrations, which locks, checks and posts by the same rules as
/// [`transfer`]); deposits are the ledger's hot path.
fn deposit<'a>(tx: &'a mut PgConnection, command: &'a CommandContext) -> HandlerFuture<'a> {
    Box::pin(async move {
        let p = deposit_payload(command)?;
        let row = sqlx::query("SELECT balance, out_of_range FROM ledger_deposit($1, $2, $3, $4)")
            .bind(&command.tenant)
            .bind(&p.account_id)
            .bind(p.amount)
            .bind(command.job_id)
            .fetch_one(&mut *tx)
            .await?;
        deposit_outcome(&p, &row)
    })
}

/// Deposits in bulk: every deposit of a batch's run in one round trip (the
/// `ledger_deposits` function, which calls `ledger_deposit` for each in
/// order). A payload that does not parse or an amount that is not positive
/// is answered for its command alone, and the others still go.
fn deposits<'a>(tx: &'a mut PgConnection, commands: &'a [CommandContext]) -> BulkFuture<'a> {
    Box::pin(async move {
        let parsed: Vec<Result<ledger::Deposit, HandlerError>> = commands.iter().map(deposit_payload).collect();
        let valid = || commands.iter().zip(&parsed).filter_map(|(command, p)| Some((command, p.as_ref().ok()?)));
        let tenants: Vec<&str> = valid().map(|(command, _)| command.tenant.as_str()).collect();
        let accounts: Vec<&str> = valid().map(|(_, p)| p.account_id.as_str()).collect();
        let amounts: Vec<i64> = valid().map(|(_, p)| p.amount).collect();
        let postings: Vec<uuid::Uuid> = valid().map(|(command, _)| command.job_id).collect();
        let rows = if accounts.is_empty() {
            Vec::new()
        } else {
            sqlx::query("SELECT balance, out_of_range FROM ledger_deposits($1, $2, $3, $4)")
                .bind(&tenants)
                .bind(&accounts)
                .bind(&amounts)
                .bind(&postings)
                .fetch_all(&mut *tx)
                .await?
        };
        // One row per deposit sent, in order.
        if rows.len() != accounts.len() {
            let answered = format!("ledger_deposits answered {} rows for {} deposits", rows.len(), accounts.len());
            return Err(HandlerError::Database(sqlx::Error::Protocol(answered)));
        }
        let mut rows = rows.iter();
        Ok(parsed
            .into_iter()
            .map(|p| {
                let p = p?;
                let row = rows.next().ok_or(HandlerError::Database(sqlx::Error::RowNotFound))?;
                deposit_outcome(&p, row)
            })
            .collect())
    })
}

fn deposit_payload(command: &CommandContext) -> Result<ledger::Deposit, HandlerError> {
    let p: ledger::Deposit = payload(command)?;
    check_positive(p.amount)?;
    Ok(p)
}

/// A deposit's result from its row of `ledger_deposit`.
fn deposit_outcome(p: &ledger::Deposit, row: &sqlx::postgres::PgRow) -> Result<serde_json::Value, HandlerError> {
    let balance: Option<i64> = row.try_get("balance")?;
    let out_of_range: Option<String> = row.try_get("out_of_range")?;
    match (balance, out_of_range) {
        (Some(balance), None) => Ok(serde_json::json!({"account_id": p.account_id, "balance": balance})),
        (_, Some(account)) => Err(out_of_range_refusal(&account, p.amount)),
        (None, None) => Err(unknown_account(&p.account_id)),
    }
}

fn transfer<'a>(tx: &'a mut PgConnection, command: &'a CommandContext) -> HandlerFuture<'a> {
    Box::pin(async move {
        let p: ledger::Transfer = payload(command)?;
        check_positive(p.amount)?;
        if p.from == p.to {
            return Err(HandlerError::refused("same_account", format!("{} cannot transfer to itself", p.from)));
        }
        // Lock in a fixed order so two opposite transfers cannot deadlock.
        let (first, second) = if p.from < p.to { (&p.from, &p.to) } else { (&p.to, &p.from) };
        let first = lock_account(tx, &command.tenant, first).await?;
        let second = lock_account(tx, &command.tenant, second).await?;
        let (from, to) = if first.id == p.from { (first, second) } else { (second, first) };
        if from.currency != to.currency {
            return Err(HandlerError::refused(
                "currency_mismatch",
                format!("{} is in {} but {} is in {}", from.id, from.currency, to.id, to.currency),
            ));
        }
        if from.balance < p.amount {
            return Err(HandlerError::refused(
                "insufficient_funds",
                format!("{} holds {}, the transfer needs {}", from.id, from.balance, p.amount),
            ));
        }
        let from_balance = in_range(from.balance.checked_sub(p.amount), &from, p.amount)?;
        let to_balance = in_range(to.balance.checked_add(p.amount), &to, p.amount)?;
        post_transfer(tx, command, &from.id, &to.id, p.amount).await?;
        Ok(serde_json::json!({
            "from": {"account_id": from.id, "balance": from_balance},
            "to": {"account_id": to.id, "balance": to_balance},
        }))
    })
}

/// A statement of an account: every entry in posting order with its running
/// balance, read page by page with a keyset cursor (the posting id, a UUIDv7,
/// so time-ordered), reporting progress every 25 % before the result. The
/// account row is share-locked for the statement's transaction, so no posting
/// to the account (each locks it for update) can slip in between pages: the
/// entries and the closing balance are one consistent picture. The result is
/// a bounded summary of an account of any length: the entry count, the
/// opening balance (before the first entry listed) and the closing balance,
/// and at most [`STATEMENT_MAX_ENTRIES`] entries, the most recent, with
/// `truncated` when older ones were left out.
fn statement<'a>(tx: &'a mut PgConnection, command: &'a CommandContext) -> HandlerFuture<'a> {
    Box::pin(async move {
        let p: ledger::Statement = payload(command)?;
        let account =
            sqlx::query("SELECT currency, balance FROM accounts WHERE tenant = $1 AND account_id = $2 FOR SHARE")
                .bind(&command.tenant)
                .bind(&p.account_id)
                .fetch_optional(&mut *tx)
                .await?
                .ok_or_else(|| unknown_account(&p.account_id))?;
        let currency: String = account.try_get("currency")?;
        let balance: i64 = account.try_get("balance")?;
        let total: i64 = sqlx::query_scalar("SELECT count(*) FROM entries WHERE tenant = $1 AND account_id = $2")
            .bind(&command.tenant)
            .bind(&p.account_id)
            .fetch_one(&mut *tx)
            .await?;
        command.progress.report(0).await?;

        let mut entries: std::collections::VecDeque<serde_json::Value> = std::collections::VecDeque::new();
        let mut seen = 0i64;
        let mut running = 0i64;
        // The balance before the first entry listed: 0 unless older entries were left out.
        let mut opening = 0i64;
        let mut cursor = uuid::Uuid::nil();
        let mut reported = 0i64;
        loop {
            let page = sqlx::query(
                "SELECT e.posting_id, e.amount, p.kind, p.created_at FROM entries e JOIN postings p USING (posting_id)
                 WHERE e.tenant = $1 AND e.account_id = $2 AND e.posting_id > $3
                 ORDER BY e.posting_id LIMIT $4",
            )
            .bind(&command.tenant)
            .bind(&p.account_id)
            .bind(cursor)
            .bind(STATEMENT_PAGE_SIZE)
            .fetch_all(&mut *tx)
            .await?;
            let Some(last) = page.last() else { break };
            cursor = last.try_get("posting_id")?;
            for row in &page {
                let amount: i64 = row.try_get("amount")?;
                // Every posting was checked, so only a ledger edited by hand overflows here.
                running = running.checked_add(amount).ok_or_else(|| {
                    HandlerError::refused(
                        "ledger_inconsistent",
                        format!("the entries of {} add up past the 64-bit range", p.account_id),
                    )
                })?;
                let posted_at: chrono::DateTime<chrono::Utc> = row.try_get("created_at")?;
                seen += 1;
                if entries.len() == STATEMENT_MAX_ENTRIES
                    && let Some(oldest) = entries.pop_front()
                {
                    opening = oldest["balance_after"].as_i64().unwrap_or(opening);
                }
                entries.push_back(serde_json::json!({
                    "posting_id": row.try_get::<uuid::Uuid, _>("posting_id")?,
                    "kind": row.try_get::<String, _>("kind")?,
                    "amount": amount,
                    "balance_after": running,
                    "posted_at": posted_at.to_rfc3339(),
                }));
            }
            // Progress at each step crossed, never the 100 % the result stands for.
            let step = (seen * 100 / total.max(1)) / STATEMENT_PROGRESS_STEP * STATEMENT_PROGRESS_STEP;
            if step > reported && step < 100 {
                reported = step;
                command.progress.report(i32::try_from(step).unwrap_or(99)).await?;
            }
            if i64::try_from(page.len()).unwrap_or(0) < STATEMENT_PAGE_SIZE {
                break;
            }
        }
        if running != balance {
            // Cannot happen while every posting goes through `post`; a retry
            // would see the same data, so refuse rather than publish a lie.
            return Err(HandlerError::refused(
                "ledger_inconsistent",
                format!("entries of {} sum to {running} but its balance is {balance}", p.account_id),
            ));
        }
        Ok(serde_json::json!({
            "account_id": p.account_id,
            "currency": currency,
            "opening_balance": opening,
            "closing_balance": running,
            "entry_count": seen,
            "truncated": i64::try_from(entries.len()).unwrap_or(i64::MAX) < seen,
            "entries": entries,
        }))
    })
}

struct Account {
    id: String,
    currency: String,
    balance: i64,
}

/// An amount moves money one way only; a record that bypassed the door's
/// validation may carry zero or less.
fn check_positive(amount: i64) -> Result<(), HandlerError> {
    if amount > 0 {
        Ok(())
    } else {
        Err(HandlerError::refused(AMOUNT_OUT_OF_RANGE, format!("amount must be positive, got {amount}")))
    }
}

/// The balance `account` would have after moving `amount`, or the refusal
/// when it leaves the 64-bit range.
fn in_range(balance: Option<i64>, account: &Account, amount: i64) -> Result<i64, HandlerError> {
    balance.ok_or_else(|| out_of_range_refusal(&account.id, amount))
}

fn out_of_range_refusal(account_id: &str, amount: i64) -> HandlerError {
    HandlerError::refused(
        AMOUNT_OUT_OF_RANGE,
        format!("moving {amount} would take the balance of {account_id} out of range"),
    )
}

fn unknown_account(account_id: &str) -> HandlerError {
    HandlerError::refused("unknown_account", format!("account {account_id} does not exist"))
}

/// The account, locked for update.
async fn lock_account(tx: &mut PgConnection, tenant: &str, account_id: &str) -> Result<Account, HandlerError> {
    let row = sqlx::query("SELECT currency, balance FROM accounts WHERE tenant = $1 AND account_id = $2 FOR UPDATE")
        .bind(tenant)
        .bind(account_id)
        .fetch_optional(&mut *tx)
        .await?
        .ok_or_else(|| unknown_account(account_id))?;
    Ok(Account { id: account_id.to_owned(), currency: row.try_get("currency")?, balance: row.try_get("balance")? })
}

/// Move `amount` from `debit` to `credit` as one balanced `transfer` posting
/// of the job: the posting, its two entries and both balances in one
/// statement (one round trip; the entries' foreign key to the posting is
/// checked at its end). A deposit posts inside `ledger_deposit`.
async fn post_transfer(
    tx: &mut PgConnection,
    command: &CommandContext,
    debit: &str,
    credit: &str,
    amount: i64,
) -> Result<(), HandlerError> {
    sqlx::query(
        "WITH posting AS (
             INSERT INTO postings (posting_id, tenant, kind) VALUES ($1, $2, 'transfer') RETURNING posting_id
         ), entries AS (
             INSERT INTO entries (posting_id, tenant, account_id, amount)
             SELECT posting_id, $2, entry.account_id, entry.amount
               FROM posting, (VALUES ($3, -$5::bigint), ($4, $5::bigint)) AS entry (account_id, amount)
         )
         UPDATE accounts SET balance = balance + CASE account_id WHEN $3 THEN -$5::bigint ELSE $5::bigint END
          WHERE tenant = $2 AND account_id IN ($3, $4)",
    )
    .bind(command.job_id)
    .bind(&command.tenant)
    .bind(debit)
    .bind(credit)
    .bind(amount)
    .execute(&mut *tx)
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_statement_fits_well_within_one_record() {
        // The widest entry there can be: the longest kind, 20-digit numbers.
        let entry = serde_json::json!({
            "posting_id": uuid::Uuid::max(),
            "kind": "transfer",
            "amount": i64::MIN,
            "balance_after": i64::MIN,
            "posted_at": chrono::DateTime::<chrono::Utc>::MAX_UTC.to_rfc3339(),
        });
        let result = serde_json::json!({
            "account_id": "a".repeat(64),
            "currency": "EUR",
            "opening_balance": i64::MIN,
            "closing_balance": i64::MIN,
            "entry_count": i64::MAX,
            "truncated": true,
            "entries": vec![entry; STATEMENT_MAX_ENTRIES],
        });
        let size = result.to_string().len();
        assert!(size < onceflow_outbox::MAX_MESSAGE_BYTES / 2, "{size} bytes");
    }
}
