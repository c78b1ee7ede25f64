//! Claiming due deliveries (`webhook_deliveries`, see
//! `migrations/0002_webhooks.sql` and later) for one attempt each, under a
//! lease, fairly across tenants:
//!
//! - tenants take turns: every tenant's earliest due delivery before any
//!   tenant's second, and no tenant more than its room (its share of this
//!   instance's workers less its attempts in flight, see [`super::share`]),
//!   so a tenant with a backlog and slow receivers cannot fill the workers;
//! - past deliveries whose (tenant, destination) circuit breaker is open or
//!   probing (they wait, their attempts untouched), with exactly one probe
//!   per breaker whose cool-down is over;
//! - past deliveries with an earlier one of their ordering key to their URL
//!   still pending, so each key's webhooks go out in order (migration 0006).
//!
//! Rows are picked from a snapshot and then locked with `SKIP LOCKED`,
//! checking again that they are still pending, due and unleased: the
//! workers of every instance claim at once without waiting on each other or
//! claiming the same row. The lease (not a held transaction) keeps a row
//! reserved while the HTTP request runs.
//!
//! Between claims, [`NextDue`] tells the worker when the next claim could
//! take something.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::{PgPool, Row as _, postgres::PgRow};
use uuid::Uuid;

use super::share::Rooms;

/// A delivery claimed by one worker for one attempt.
#[derive(Debug, Clone)]
pub struct Claimed {
    pub id: Uuid,
    pub tenant: String,
    pub job_id: Uuid,
    pub correlation_id: String,
    pub url: String,
    pub body: String,
    pub traceparent: Option<String>,
    pub tracestate: Option<String>,
    /// The number of this attempt (1 for the first).
    pub attempt: i32,
    /// Attempts made since the delivery was created or last redriven,
    /// this one included: what the retry schedule counts.
    pub attempts_in_round: u32,
    /// The previous attempt was claimed by a worker whose lease ran out
    /// before it recorded an outcome (it crashed or was cut off).
    pub previous_abandoned: bool,
    /// Fences this worker's writes: only the lease holder may record.
    pub lease_token: Uuid,
    /// `scheme://host:port`: with the tenant, the key of its circuit breaker
    /// (`None` only for a URL without a host, which is never sent).
    pub destination: Option<String>,
    /// Claimed as the half-open probe of its (tenant, destination) breaker.
    pub probe: bool,
    /// The tenant's endpoint (this URL) is disabled: end it unsent.
    pub endpoint_disabled: Option<Uuid>,
}

/// What a claim returns of each delivery: its fields, whether the previous
/// claim's lease ran out, and whether its endpoint is disabled.
const CLAIMED_COLUMNS: &str = "d.id, d.tenant, d.job_id, d.correlation_id, d.url, d.body, d.traceparent,
    d.tracestate, d.attempts, d.round_start, d.destination, due.expired_lease IS NOT NULL AS previous_abandoned,
    (SELECT e.id FROM webhook_endpoints e WHERE e.tenant = d.tenant AND e.url = d.url AND e.state = 'disabled')
        AS endpoint_disabled";

/// A delivery `w` may go only when no earlier one of its key to its URL is
/// still pending (see `store::Order`).
const NO_EARLIER_PENDING: &str = "NOT EXISTS (SELECT 1 FROM webhook_deliveries p
     WHERE p.tenant = w.tenant AND p.url = w.url AND p.order_key = w.order_key AND p.event_seq < w.event_seq
       AND p.status = 'pending')";

/// The room of tenant `tenant_column` in a claim: its own (`$3`, `$4`), or
/// the default (`$5`).
fn room_of(tenant_column: &str) -> String {
    format!(
        "coalesce((SELECT r.room FROM unnest($3::text[], $4::int4[]) AS r(tenant, room)
                    WHERE r.tenant = {tenant_column}), $5)"
    )
}

/// Lease the rows of `picked` (a CTE of ids) that are still claimable, and
/// return them: the last part of both claims.
const LEASE_PICKED: &str = "UPDATE webhook_deliveries d
            SET lease_token = $1,
                lease_until = now() + make_interval(secs => $2),
                attempts = d.attempts + 1,
                updated_at = now()
           FROM (SELECT w.id, w.lease_until AS expired_lease FROM webhook_deliveries w
                  WHERE w.id IN (SELECT id FROM picked)
                    AND w.status = 'pending' AND w.next_attempt_at <= now()
                    AND (w.lease_until IS NULL OR w.lease_until < now())
                  FOR UPDATE OF w SKIP LOCKED) due
          WHERE d.id = due.id";

/// Claim up to `limit` due deliveries for `lease`, the tenants taking turns
/// within their `rooms`, past those whose breaker is not closed.
///
/// The tenants with pending deliveries are found by a loose index scan (one
/// index probe per tenant, whatever their backlogs), and each one's earliest
/// due deliveries, at most its room, through `webhook_deliveries_due_by_tenant`;
/// then the first turn of every tenant goes before anyone's second. Each
/// tenant's scan is limited by the claim's `limit`, a parameter, rather than
/// by its room, an expression: with a limit it cannot know, the planner
/// guesses a tenth of the table and JIT-compiles the query (measured with 50
/// tenants and 200,000 pending deliveries: 26 ms a claim, 23 of them JIT,
/// against 9 ms this way).
pub async fn claim_due(pool: &PgPool, lease: Duration, rooms: &Rooms, limit: i64) -> Result<Vec<Claimed>, sqlx::Error> {
    let sql = format!(
        "WITH RECURSIVE tenants AS (
             (SELECT tenant FROM webhook_deliveries WHERE status = 'pending' ORDER BY tenant LIMIT 1)
             UNION ALL
             SELECT (SELECT w.tenant FROM webhook_deliveries w
                      WHERE w.status = 'pending' AND w.tenant > t.tenant ORDER BY w.tenant LIMIT 1)
               FROM tenants t WHERE t.tenant IS NOT NULL),
         rooms AS (SELECT t.tenant, {room} AS room FROM tenants t WHERE t.tenant IS NOT NULL),
         picked AS (
             SELECT turns.id FROM rooms
              CROSS JOIN LATERAL (
                  SELECT w.id, w.next_attempt_at, row_number() OVER (ORDER BY w.next_attempt_at) AS turn
                    FROM webhook_deliveries w
                   WHERE w.tenant = rooms.tenant AND w.status = 'pending' AND w.next_attempt_at <= now()
                     AND (w.lease_until IS NULL OR w.lease_until < now())
                     AND NOT EXISTS (SELECT 1 FROM webhook_breakers b
                                      WHERE b.tenant = w.tenant AND b.destination = w.destination
                                        AND b.state <> 'closed')
                     AND {NO_EARLIER_PENDING}
                   ORDER BY w.next_attempt_at
                   LIMIT $6) turns
              WHERE rooms.room > 0 AND turns.turn <= rooms.room
              ORDER BY turns.turn, turns.next_attempt_at
              LIMIT $6)
         {LEASE_PICKED}
      RETURNING {CLAIMED_COLUMNS}, false AS probe",
        room = room_of("t.tenant"),
    );
    claim(pool, &sql, lease, rooms, limit).await
}

/// Claim the half-open probe of up to `limit` breakers whose cool-down is
/// over (or whose previous probe's lease ran out) and that have a due
/// delivery, within each tenant's room: for each, its earliest due delivery,
/// and the breaker becomes half-open with this claim's lease, in one
/// statement, so exactly one probe goes out per breaker whatever the number
/// of workers and instances.
pub async fn claim_probes(
    pool: &PgPool,
    lease: Duration,
    rooms: &Rooms,
    limit: i64,
) -> Result<Vec<Claimed>, sqlx::Error> {
    let sql = format!(
        "WITH turns AS (
             SELECT c.tenant, c.destination, c.open_until,
                    row_number() OVER (PARTITION BY c.tenant ORDER BY c.open_until) AS turn, {room} AS room
               FROM webhook_breakers c
              WHERE ((c.state = 'open' AND c.open_until <= now()) OR (c.state = 'half_open' AND c.probe_until < now()))
                AND EXISTS (SELECT 1 FROM webhook_deliveries w
                             WHERE w.destination = c.destination AND w.tenant = c.tenant
                               AND w.status = 'pending' AND w.next_attempt_at <= now())),
         ready AS (
             SELECT b.tenant, b.destination FROM webhook_breakers b
              WHERE (b.tenant, b.destination) IN (
                        SELECT tenant, destination FROM turns WHERE turn <= room ORDER BY turn, open_until LIMIT $6)
                AND ((b.state = 'open' AND b.open_until <= now()) OR (b.state = 'half_open' AND b.probe_until < now()))
              FOR UPDATE SKIP LOCKED),
         picked AS (
             SELECT ready.tenant, ready.destination, due.id FROM ready
              CROSS JOIN LATERAL (
                  SELECT w.id FROM webhook_deliveries w
                   WHERE w.tenant = ready.tenant AND w.destination = ready.destination
                     AND w.status = 'pending' AND w.next_attempt_at <= now()
                     AND (w.lease_until IS NULL OR w.lease_until < now())
                     AND {NO_EARLIER_PENDING}
                   ORDER BY w.next_attempt_at
                   LIMIT 1
                   FOR UPDATE OF w SKIP LOCKED) due),
         probing AS (
             UPDATE webhook_breakers b
                SET state = 'half_open', probe_token = $1, probe_until = now() + make_interval(secs => $2),
                    updated_at = now()
               FROM picked WHERE b.tenant = picked.tenant AND b.destination = picked.destination)
         {LEASE_PICKED}
      RETURNING {CLAIMED_COLUMNS}, true AS probe",
        room = room_of("c.tenant"),
    );
    claim(pool, &sql, lease, rooms, limit).await
}

/// Run a claim statement (`$1` the lease token, `$2` the lease in seconds,
/// `$3`-`$5` the tenants' rooms, `$6` the limit) under a new lease token.
async fn claim(
    pool: &PgPool,
    sql: &str,
    lease: Duration,
    rooms: &Rooms,
    limit: i64,
) -> Result<Vec<Claimed>, sqlx::Error> {
    let lease_token = Uuid::new_v4();
    let rows = sqlx::query(sql)
        .bind(lease_token)
        .bind(lease.as_secs_f64())
        .bind(&rooms.tenants)
        .bind(&rooms.rooms)
        .bind(rooms.default)
        .bind(limit)
        .fetch_all(pool)
        .await?;
    rows.iter().map(|row| claimed_from_row(row, lease_token)).collect()
}

fn claimed_from_row(row: &PgRow, lease_token: Uuid) -> Result<Claimed, sqlx::Error> {
    let attempt: i32 = row.try_get("attempts")?;
    let round_start: i32 = row.try_get("round_start")?;
    let url: String = row.try_get("url")?;
    // Deliveries from before destinations were stored get theirs now.
    let destination = row
        .try_get::<Option<String>, _>("destination")?
        .or_else(|| reqwest::Url::parse(&url).ok().as_ref().and_then(onceflow_webhook::breaker::destination));
    Ok(Claimed {
        id: row.try_get("id")?,
        tenant: row.try_get("tenant")?,
        job_id: row.try_get("job_id")?,
        correlation_id: row.try_get("correlation_id")?,
        url,
        body: row.try_get("body")?,
        traceparent: row.try_get("traceparent")?,
        tracestate: row.try_get("tracestate")?,
        attempt,
        attempts_in_round: u32::try_from(attempt - round_start).unwrap_or(1),
        previous_abandoned: row.try_get("previous_abandoned")?,
        lease_token,
        destination,
        probe: row.try_get("probe")?,
        endpoint_disabled: row.try_get("endpoint_disabled")?,
    })
}

/// When a breaker that is not closed lets its next delivery go (as the
/// probe): an open one's when its cool-down ends, a half-open one's when its
/// probe's lease runs out (its worker died).
fn breaker_ready_at(breaker: &str) -> String {
    format!(
        "CASE {breaker}.state WHEN 'open' THEN {breaker}.open_until WHEN 'half_open' THEN {breaker}.probe_until END"
    )
}

/// When the next delivery this instance could claim comes due, so the
/// worker sleeps until then rather than looking again and again; it
/// remembers when it last looked.
///
/// Only what a claim could take then counts: a pending delivery of a tenant
/// with room (the others wait for an attempt of theirs to end, which wakes
/// the worker), not leased, whose breaker lets it go, and with no earlier
/// delivery of its key still pending. One that waits behind an earlier
/// delivery of its key (in flight to a slow receiver, or waiting for its
/// retry) is due only once that one ends: the end of that attempt wakes the
/// worker that made it, whose freed worker and place in the tenant's share
/// claim it at once; the earlier delivery's retry counts in its own right.
/// Counted as due, the waiting one would have the worker claim and look
/// again every 10 ms (its shortest sleep) for as long as the earlier attempt
/// lasts.
///
/// The look covers a window instead of every pending delivery, so it costs
/// the deliveries coming due around now, not the backlog:
/// - it starts at the last look (at most `horizon` back): what came due
///   before was there for the claim that ran since (the worker claims before
///   every look), which took what it could, and looking again at what it
///   could not take would only wake the worker for nothing, again and again;
/// - it ends `horizon` ahead (the worker's poll interval): the worker looks
///   again by then anyway, which also finds leases that ran out.
///
/// A breaker counts at the time it lets its probe go, if a delivery waits
/// for it by then (one behind an earlier delivery of its key would wake the
/// worker once: the next look starts after it).
#[derive(Debug, Default)]
pub struct NextDue {
    /// The database's clock at the last look.
    looked: Option<DateTime<Utc>>,
}

impl NextDue {
    /// How long until the next delivery that tenants other than `full` (no
    /// room left in this instance's share) could claim comes due, if one
    /// does within `horizon`.
    pub async fn within(
        &mut self,
        pool: &PgPool,
        full: &[String],
        horizon: Duration,
    ) -> Result<Option<Duration>, sqlx::Error> {
        // The scans run through `webhook_deliveries_due` from the window's
        // start, and through `webhook_deliveries_by_destination` for each
        // breaker (few: only those not closed) ready within the window;
        // `ready` bounds the first scan, so it stops short of the deliveries
        // a cool-down that ends in the window holds (moved to its end).
        let sql = format!(
            "WITH ready AS (
                 SELECT min(b.at) AS at
                   FROM (SELECT c.tenant, c.destination, {ready_at} AS at FROM webhook_breakers c
                          WHERE c.state <> 'closed' AND c.tenant <> ALL($1)) b
                  WHERE b.at > {since} AND b.at <= {until}
                    AND (SELECT w.next_attempt_at FROM webhook_deliveries w
                          WHERE w.tenant = b.tenant AND w.destination = b.destination AND w.status = 'pending'
                          ORDER BY w.next_attempt_at LIMIT 1) <= b.at)
             SELECT now() AS looked, EXTRACT(EPOCH FROM least(ready.at, (
                        SELECT w.next_attempt_at FROM webhook_deliveries w
                         WHERE w.status = 'pending' AND w.next_attempt_at > {since}
                           AND w.next_attempt_at < least({until}, ready.at)
                           AND w.tenant <> ALL($1)
                           AND (w.lease_until IS NULL OR w.lease_until < now())
                           AND NOT EXISTS (SELECT 1 FROM webhook_breakers b
                                            WHERE b.tenant = w.tenant AND b.destination = w.destination
                                              AND b.state <> 'closed' AND {held_until} >= w.next_attempt_at)
                           AND {NO_EARLIER_PENDING}
                         ORDER BY w.next_attempt_at
                         LIMIT 1)) - now())::float8 AS due_in
               FROM ready",
            ready_at = breaker_ready_at("c"),
            held_until = breaker_ready_at("b"),
            since = "greatest($2::timestamptz, now() - make_interval(secs => $3))",
            until = "now() + make_interval(secs => $3)",
        );
        let (looked, due_in): (DateTime<Utc>, Option<f64>) =
            sqlx::query_as(&sql).bind(full).bind(self.looked).bind(horizon.as_secs_f64()).fetch_one(pool).await?;
        self.looked = Some(looked);
        Ok(due_in.map(|s| Duration::from_secs_f64(s.max(0.0))))
    }
}
