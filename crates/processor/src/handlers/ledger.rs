//! The double-entry ledger that ships with onceflow. A duplicate effect would
//! show up as money: the sum of all customer balances must equal the sum of
//! all deposits, which the tests check after crashes and redeliveries.
//!
//! Every posting writes entries that sum to zero. Money enters through the
//! system account `world:<CUR>` of its currency, the only account allowed to go
//! below zero.

use onceflow_contracts::catalogue::{self, ledger};
use serde::de::DeserializeOwned;
use sqlx::{PgConnection, Row as _};

use super::{CommandContext, HandlerError, HandlerFuture, Registry};

pub fn register(registry: &mut Registry) {
    registry.register(ledger::OPEN_ACCOUNT, open_account);
    registry.register(ledger::DEPOSIT, deposit);
    registry.register(ledger::TRANSFER, transfer);
    registry.register(ledger::STATEMENT, statement);
}

/// Entries read per page of a statement.
pub const STATEMENT_PAGE_SIZE: i64 = 50;
/// A statement lists at most this many entries, the most recent ones (about
/// 150 bytes each, so the result stays well below the 4 MiB a consumer decodes);
/// its count and closing balance always cover every entry.
pub const STATEMENT_MAX_ENTRIES: usize = 10_000;
/// A statement reports progress each time it crosses a multiple of this percent.
pub const STATEMENT_PROGRESS_STEP: i64 = 25;

fn payload<T: DeserializeOwned>(command: &CommandContext) -> Result<T, HandlerError> {
    catalogue::parse(&command.command_type, &command.payload).map_err(|e| HandlerError::Poison(e.to_string()))
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

fn deposit<'a>(tx: &'a mut PgConnection, command: &'a CommandContext) -> HandlerFuture<'a> {
    Box::pin(async move {
        let p: ledger::Deposit = payload(command)?;
        let account = lock_account(tx, &command.tenant, &p.account_id).await?;
        let world = format!("world:{}", account.currency);
        sqlx::query("INSERT INTO accounts (tenant, account_id, currency) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING")
            .bind(&command.tenant)
            .bind(&world)
            .bind(&account.currency)
            .execute(&mut *tx)
            .await?;
        post(tx, command, "deposit", &world, &p.account_id, p.amount).await?;
        Ok(serde_json::json!({"account_id": p.account_id, "balance": account.balance + p.amount}))
    })
}

fn transfer<'a>(tx: &'a mut PgConnection, command: &'a CommandContext) -> HandlerFuture<'a> {
    Box::pin(async move {
        let p: ledger::Transfer = payload(command)?;
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
        post(tx, command, "transfer", &from.id, &to.id, p.amount).await?;
        Ok(serde_json::json!({
            "from": {"account_id": from.id, "balance": from.balance - p.amount},
            "to": {"account_id": to.id, "balance": to.balance + p.amount},
        }))
    })
}

/// A statement of an account: every entry in posting order with its running
/// balance, read page by page with a keyset cursor (the posting id, a UUIDv7,
/// so time-ordered), reporting progress every 25 % before the result. The
/// account row is share-locked for the statement's transaction, so no posting
/// to the account (each locks it for update) can slip in between pages: the
/// entries and the closing balance are one consistent picture. At most
/// [`STATEMENT_MAX_ENTRIES`] (the most recent) are listed.
fn statement<'a>(tx: &'a mut PgConnection, command: &'a CommandContext) -> HandlerFuture<'a> {
    Box::pin(async move {
        let p: ledger::Statement = payload(command)?;
        let account =
            sqlx::query("SELECT currency, balance FROM accounts WHERE tenant = $1 AND account_id = $2 FOR SHARE")
                .bind(&command.tenant)
                .bind(&p.account_id)
                .fetch_optional(&mut *tx)
                .await?
                .ok_or_else(|| {
                    HandlerError::refused("unknown_account", format!("account {} does not exist", p.account_id))
                })?;
        let currency: String = account.try_get("currency")?;
        let balance: i64 = account.try_get("balance")?;
        let total: i64 = sqlx::query_scalar("SELECT count(*) FROM entries WHERE tenant = $1 AND account_id = $2")
            .bind(&command.tenant)
            .bind(&p.account_id)
            .fetch_one(&mut *tx)
            .await?;
        command.progress.report(0).await?;

        let mut entries = std::collections::VecDeque::new();
        let mut seen = 0i64;
        let mut running = 0i64;
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
                running += amount;
                let posted_at: chrono::DateTime<chrono::Utc> = row.try_get("created_at")?;
                seen += 1;
                if entries.len() == STATEMENT_MAX_ENTRIES {
                    entries.pop_front();
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
        // The balance before the first entry listed: 0 unless older entries were left out.
        let opening = entries.front().map_or(running, |first| {
            first["balance_after"].as_i64().unwrap_or(0) - first["amount"].as_i64().unwrap_or(0)
        });
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

async fn lock_account(tx: &mut PgConnection, tenant: &str, account_id: &str) -> Result<Account, HandlerError> {
    let row = sqlx::query("SELECT currency, balance FROM accounts WHERE tenant = $1 AND account_id = $2 FOR UPDATE")
        .bind(tenant)
        .bind(account_id)
        .fetch_optional(&mut *tx)
        .await?
        .ok_or_else(|| HandlerError::refused("unknown_account", format!("account {account_id} does not exist")))?;
    Ok(Account { id: account_id.to_owned(), currency: row.try_get("currency")?, balance: row.try_get("balance")? })
}

/// Move `amount` from `debit` to `credit` as one balanced posting of the job.
async fn post(
    tx: &mut PgConnection,
    command: &CommandContext,
    kind: &str,
    debit: &str,
    credit: &str,
    amount: i64,
) -> Result<(), HandlerError> {
    sqlx::query("INSERT INTO postings (posting_id, tenant, kind) VALUES ($1, $2, $3)")
        .bind(command.job_id)
        .bind(&command.tenant)
        .bind(kind)
        .execute(&mut *tx)
        .await?;
    sqlx::query(
        "INSERT INTO entries (posting_id, tenant, account_id, amount) VALUES ($1, $2, $3, $4), ($1, $2, $5, $6)",
    )
    .bind(command.job_id)
    .bind(&command.tenant)
    .bind(debit)
    .bind(-amount)
    .bind(credit)
    .bind(amount)
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "UPDATE accounts SET balance = balance + CASE account_id WHEN $2 THEN -$4::bigint ELSE $4::bigint END
         WHERE tenant = $1 AND account_id IN ($2, $3)",
    )
    .bind(&command.tenant)
    .bind(debit)
    .bind(credit)
    .bind(amount)
    .execute(&mut *tx)
    .await?;
    Ok(())
}
