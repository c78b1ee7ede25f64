//! Circuit breakers of webhook destinations, kept in PostgreSQL.
//!
//! The state machine is `onceflow_webhook::breaker` (when a breaker opens,
//! which outcomes count, how long it stays open); this module stores one
//! breaker per tenant and destination (`scheme://host:port`) in
//! `webhook_breakers` (see [`Key`]).
//!
//! Why per tenant: a breaker holds back every delivery it covers. Shared by
//! every tenant, one tenant's failing receiver (a bad path, a receiver it
//! took down, a host that throttles only it) would hold another tenant's
//! deliveries to the same host, e.g. a shared webhook relay service. Per
//! tenant, a tenant's failures only ever hold its own deliveries; a host
//! down for everyone opens each tenant's breaker after that tenant's own
//! failures, and each sends its own probe.
//!
//! Why PostgreSQL and not each instance's memory: a breaker is shared by
//! every worker of every notifier instance, and the rules are about all of
//! them together. With state per instance, N instances would each need their
//! own run of failures before holding back (N times the load on a receiver
//! that is already down), each would send its own probe when half-open
//! ("exactly one probe" would be one per instance), and a restart would
//! forget an open breaker and hit the receiver with the whole backlog. The
//! deliveries already live in PostgreSQL and every attempt already ends in a
//! transaction there, so the breaker row is updated in that same transaction:
//! one extra row lock per attempt, exact counts, no second store to keep
//! consistent, and the state survives restarts.
//!
//! How it meets the worker:
//! - [`record`] runs in the transaction that records an attempt: it locks the
//!   breaker's row (always before any delivery row, so lock order is fixed),
//!   feeds the outcome to the state machine and saves it. When the breaker
//!   opens, its pending deliveries are moved to the end of the cool-down
//!   (their attempt count untouched), so the due-deliveries query does not
//!   wade through them; when it closes, every instance's worker is woken to
//!   send them.
//! - `claims::claim_due` skips deliveries whose breaker is not closed;
//!   `claims::claim_probes` claims exactly one due delivery per breaker whose
//!   cool-down is over and marks the breaker half-open with that claim's
//!   lease (if the probing worker dies, the lease runs out and another
//!   delivery becomes the probe).
//! - [`report`] exports the states as metrics from every instance, with no
//!   tenant or destination in any label (tenants choose both).
//!
//! Which breakers are open, and why, is in the log: every transition is
//! logged (`webhook circuit breaker opened/closed`, with the tenant, the
//! destination and the reason) and counted in
//! `onceflow_webhook_breaker_transitions_total{to}`; a tenant sees the
//! breaker a delivery waits on in `GET /v1/deliveries/{id}`.

use std::time::Duration;

use chrono::{DateTime, Utc};
use onceflow_webhook::{
    BreakerPolicy,
    breaker::{Breaker, Signal, State, Transition},
};
use sqlx::{PgConnection, PgPool, Row as _};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::store::CHANNEL;

/// Which breaker: a tenant's, for one destination (`scheme://host:port`).
#[derive(Debug, Clone, Copy)]
pub struct Key<'a> {
    pub tenant: &'a str,
    pub destination: &'a str,
}

/// Record the outcome of the attempt claimed with `lease_token` on
/// `key`'s breaker, inside the caller's transaction. `signal` is
/// `None` for an attempt that says nothing about the destination (never
/// sent, cut off by shutdown): it only frees the probe slot if it held it.
/// Returns, while the breaker is open, when deliveries there may go next.
pub async fn record(
    tx: &mut PgConnection,
    policy: &BreakerPolicy,
    key: Key<'_>,
    signal: Option<Signal>,
    lease_token: Uuid,
) -> Result<Option<DateTime<Utc>>, sqlx::Error> {
    // Insert-or-lock in one statement: the no-op update takes the row lock.
    let row = sqlx::query(
        "INSERT INTO webhook_breakers (tenant, destination) VALUES ($1, $2)
         ON CONFLICT (tenant, destination) DO UPDATE SET destination = EXCLUDED.destination
         RETURNING state, consecutive_failures, window_start, window_attempts, window_failures, openings,
                   open_until, probe_token, now() AS now",
    )
    .bind(key.tenant)
    .bind(key.destination)
    .fetch_one(&mut *tx)
    .await?;
    let now: DateTime<Utc> = row.try_get("now")?;
    let before = Breaker {
        state: State::parse(row.try_get("state")?),
        consecutive_failures: count(row.try_get("consecutive_failures")?),
        window_start: row.try_get("window_start")?,
        window_attempts: count(row.try_get("window_attempts")?),
        window_failures: count(row.try_get("window_failures")?),
        openings: count(row.try_get("openings")?),
        open_until: row.try_get("open_until")?,
    };
    let probe_token: Option<Uuid> = row.try_get("probe_token")?;
    let probe = before.state == State::HalfOpen && probe_token == Some(lease_token);
    let mut breaker = before.clone();
    let transition = match signal {
        Some(signal) => breaker.record(policy, signal, probe, now),
        None if probe => {
            breaker.release_probe(now);
            None
        }
        None => None,
    };
    if breaker != before {
        save(tx, key, &breaker).await?;
    }
    if let Some(transition) = &transition {
        announce(key, transition);
        match transition.to {
            State::Open => hold_pending(tx, key, breaker.open_until).await?,
            // Wake every instance: the held deliveries are due now.
            State::Closed => {
                sqlx::query("SELECT pg_notify($1, '')").bind(CHANNEL).execute(&mut *tx).await?;
            }
            State::HalfOpen => {}
        }
    }
    Ok(breaker.open_until.filter(|_| breaker.state == State::Open))
}

/// Close every breaker, when breakers are turned off
/// (`webhooks.breaker.enabled = false`): nothing records outcomes any more,
/// so a breaker left open would hold its deliveries for good.
pub async fn close_all(pool: &PgPool) -> Result<u64, sqlx::Error> {
    let closed = sqlx::query(
        "UPDATE webhook_breakers
            SET state = 'closed', consecutive_failures = 0, window_attempts = 0, window_failures = 0,
                openings = 0, open_until = NULL, probe_token = NULL, probe_until = NULL, opened_at = NULL,
                updated_at = now()
          WHERE state <> 'closed'",
    )
    .execute(pool)
    .await?;
    Ok(closed.rows_affected())
}

fn count(value: i32) -> u32 {
    u32::try_from(value).unwrap_or(0)
}

fn stored(value: u32) -> i32 {
    i32::try_from(value).unwrap_or(i32::MAX)
}

async fn save(tx: &mut PgConnection, key: Key<'_>, breaker: &Breaker) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE webhook_breakers
            SET state = $2, consecutive_failures = $3, window_start = $4, window_attempts = $5,
                window_failures = $6, openings = $7, open_until = $8,
                probe_token = CASE WHEN $2 = 'half_open' THEN probe_token END,
                probe_until = CASE WHEN $2 = 'half_open' THEN probe_until END,
                opened_at = CASE WHEN $2 <> 'closed' THEN coalesce(opened_at, now()) END,
                updated_at = now()
          WHERE destination = $1 AND tenant = $9",
    )
    .bind(key.destination)
    .bind(breaker.state.as_str())
    .bind(stored(breaker.consecutive_failures))
    .bind(breaker.window_start)
    .bind(stored(breaker.window_attempts))
    .bind(stored(breaker.window_failures))
    .bind(stored(breaker.openings))
    .bind(breaker.open_until)
    .bind(key.tenant)
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// Move the breaker's pending deliveries that are not in flight to the
/// end of the cool-down: they wait there without spending attempts, and the
/// API shows when they go next.
async fn hold_pending(
    tx: &mut PgConnection,
    key: Key<'_>,
    open_until: Option<DateTime<Utc>>,
) -> Result<(), sqlx::Error> {
    let held = sqlx::query(
        "UPDATE webhook_deliveries SET next_attempt_at = $2, updated_at = now()
          WHERE destination = $1 AND tenant = $3 AND status = 'pending' AND next_attempt_at < $2
            AND (lease_until IS NULL OR lease_until < now())",
    )
    .bind(key.destination)
    .bind(open_until)
    .bind(key.tenant)
    .execute(&mut *tx)
    .await?;
    tracing::debug!(
        tenant = key.tenant,
        destination = key.destination,
        held = held.rows_affected(),
        "deliveries held by the open breaker"
    );
    Ok(())
}

/// Log the transition (where an operator finds which breakers open, and
/// why) and count it.
fn announce(key: Key<'_>, transition: &Transition) {
    let (from, to) = (transition.from.as_str(), transition.to.as_str());
    let reason = transition.reason.as_str();
    let (tenant, destination) = (key.tenant, key.destination);
    if transition.to == State::Open {
        tracing::warn!(tenant, destination, from, to, reason, "webhook circuit breaker opened");
    } else {
        tracing::info!(tenant, destination, from, to, reason, "webhook circuit breaker closed");
    }
    metrics::counter!("onceflow_webhook_breaker_transitions_total", "to" => to).increment(1);
}

/// Export the breakers' states every `interval` until `shutdown`, read from
/// the shared table so every instance reports the same (a transition made
/// by another instance shows up here too), none with a tenant or a
/// destination in its labels:
/// - `onceflow_webhook_breakers{state}`: breakers (tenant and destination)
///   per state;
/// - `onceflow_webhook_breaker_longest_open_seconds`: how long the breaker
///   open longest has been open or probing without closing in between (0
///   when none is); which one it is, the log says (`webhook circuit breaker
///   opened`);
/// - `onceflow_webhook_deliveries_waiting`: pending deliveries held by a
///   breaker that is not closed;
/// - `onceflow_webhook_queue_depth{state}`: pending deliveries, `due` (their
///   next attempt's time has come) or `scheduled` (waiting for a retry's
///   backoff), so a queue that grows shows before deliveries run late.
pub async fn report(pool: PgPool, interval: Duration, shutdown: CancellationToken) {
    loop {
        if let Err(error) = report_once(&pool).await {
            tracing::debug!(%error, "cannot read the webhook breakers for metrics; retrying");
        }
        if !onceflow_runtime::shutdown::pause(interval, &shutdown).await {
            return;
        }
    }
}

async fn report_once(pool: &PgPool) -> Result<(), sqlx::Error> {
    let counts: Vec<(String, i64)> =
        sqlx::query_as("SELECT state, count(*) FROM webhook_breakers GROUP BY state").fetch_all(pool).await?;
    for state in [State::Closed, State::Open, State::HalfOpen] {
        let n = counts.iter().find(|(name, _)| State::parse(name) == state).map_or(0, |(_, n)| *n);
        metrics::gauge!("onceflow_webhook_breakers", "state" => state.as_str()).set(n as f64);
    }
    // Through the partial index of breakers not closed.
    let longest: f64 = sqlx::query_scalar(
        "SELECT coalesce(EXTRACT(EPOCH FROM now() - min(opened_at))::float8, 0)
           FROM webhook_breakers WHERE state <> 'closed'",
    )
    .fetch_one(pool)
    .await?;
    metrics::gauge!("onceflow_webhook_breaker_longest_open_seconds").set(longest.max(0.0));
    let waiting: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM webhook_deliveries d
           JOIN webhook_breakers b ON b.tenant = d.tenant AND b.destination = d.destination AND b.state <> 'closed'
          WHERE d.status = 'pending'",
    )
    .fetch_one(pool)
    .await?;
    metrics::gauge!("onceflow_webhook_deliveries_waiting").set(waiting as f64);
    // Counted through the partial index of pending deliveries.
    let (due, scheduled): (i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE next_attempt_at <= now()), count(*) FILTER (WHERE next_attempt_at > now())
           FROM webhook_deliveries WHERE status = 'pending'",
    )
    .fetch_one(pool)
    .await?;
    metrics::gauge!("onceflow_webhook_queue_depth", "state" => "due").set(due as f64);
    metrics::gauge!("onceflow_webhook_queue_depth", "state" => "scheduled").set(scheduled as f64);
    Ok(())
}
