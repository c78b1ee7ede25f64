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
}

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
