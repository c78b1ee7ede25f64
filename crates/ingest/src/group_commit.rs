//! Group commit: accepted commands made durable many per transaction.
//!
//! Each accepted command needs its idempotency record, its job and its
//! outbox row committed before its `202`. One transaction per request pays a
//! commit (a WAL flush) and five round trips per command; under load the
//! requests that arrive together share one instead. A request hands its
//! [`Acceptance`] to a committer task and waits; the committer takes every
//! acceptance waiting (up to `max_group`) and commits them together:
//!
//! ```text
//! BEGIN; SET LOCAL lock_timeout
//! claim every key and insert the jobs of those claimed (one statement)
//! every outbox row of those claimed (one statement)
//! COMMIT, then each request answers its own 202
//! ```
//!
//! Only the ordinary case is committed in a group: a key not yet recorded.
//! A key that already has an unexpired record (a client's retry: requests
//! are not looked up before they are grouped) is found by a plain read in
//! the group's first statement and left alone: the group never claims it, so
//! it takes no lock on its row, and a retry storm of one key cannot make
//! other requests' groups wait for that row (each retry is answered
//! [`Grouped::Recorded`] and replays the record without a lock). A key twice
//! in one group, a key another transaction holds (a concurrent duplicate
//! still in flight: the group waits at most [`GROUP_LOCK_TIMEOUT_MS`] for
//! it), or any error of the group's transaction sends the request back to
//! the one-request path, which waits for an in-flight duplicate as the
//! contract says and replays a recorded answer; no request is retried more
//! than that once. A request whose group
//! committed and then failed to hear back finds its own record there and
//! replays it. The queue to the committers is bounded: when it is full, the
//! request takes the one-request path at once.

use std::collections::HashSet;

use onceflow_outbox::OutboxMessage;
use onceflow_runtime::vitals::Vitals;
use sqlx::PgPool;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::config::GroupCommitConfig;

/// How an `INSERT INTO idempotency_keys` claims a key: a key already
/// recorded is taken over only when its record expired (then `RETURNING`
/// names it), so an unexpired record is never overwritten. Shared by the
/// group and the one-request path, which must claim alike.
macro_rules! claim_on_conflict {
    () => {
        "ON CONFLICT (tenant, idempotency_key) DO UPDATE
             SET fingerprint = EXCLUDED.fingerprint, job_id = EXCLUDED.job_id,
                 response_status = EXCLUDED.response_status, response_body = EXCLUDED.response_body,
                 response_location = EXCLUDED.response_location, created_at = now(),
                 expires_at = EXCLUDED.expires_at
             WHERE idempotency_keys.expires_at < now()"
    };
}
pub(crate) use claim_on_conflict;

/// How long a group waits for a key another transaction holds before its
/// requests go the one-request way (which waits `in_flight_wait_ms`).
pub const GROUP_LOCK_TIMEOUT_MS: u64 = 50;

/// One accepted command, everything of it ready to be made durable.
pub struct Acceptance {
    pub tenant: String,
    pub key: String,
    pub fingerprint: [u8; 32],
    pub job_id: Uuid,
    pub correlation_id: String,
    pub command_type: String,
    /// The `202` as stored for replay (status, body, `Location`).
    pub response_status: i16,
    pub response_body: Vec<u8>,
    pub response_location: String,
    pub ttl_secs: f64,
    pub outbox: OutboxMessage,
}

/// What became of an acceptance handed to the committers.
pub enum Grouped {
    /// Committed with its group: answer its `202`.
    Committed(Acceptance),
    /// Not committed: make it durable on the one-request path.
    Alone(Acceptance),
    /// Not committed because its key has an unexpired record: replay it.
    Recorded(Acceptance),
}

type Item = (Acceptance, oneshot::Sender<Grouped>);

/// The handle requests use; cheap to clone.
#[derive(Clone)]
pub struct GroupCommitter {
    queue: Option<mpsc::Sender<Item>>,
}

impl GroupCommitter {
    /// Start `config.committers` committer tasks on `pool` (none when
    /// `config.max_group` is 1: every request commits alone).
    pub fn start(
        pool: &PgPool,
        config: &GroupCommitConfig,
        tasks: &mut tokio::task::JoinSet<()>,
        vitals: &Vitals,
        shutdown: &CancellationToken,
    ) -> Self {
        if config.max_group <= 1 || config.committers == 0 {
            return Self { queue: None };
        }
        let (queue, receiver) = mpsc::channel(config.max_group * config.committers);
        let receiver = std::sync::Arc::new(tokio::sync::Mutex::new(receiver));
        for committer in 0..config.committers {
            let task = run(pool.clone(), receiver.clone(), config.max_group, shutdown.clone());
            tasks.spawn(vitals.watch(format!("committer {committer}"), shutdown, task));
        }
        Self { queue: Some(queue) }
    }

    /// Commit `acceptance` with whatever else is waiting, or hand it back;
    /// `None` only when the committers stopped (shutdown) before answering,
    /// in which case nothing of it was committed unless its group's commit
    /// went through, and a retry with the same key finds out which.
    pub async fn commit(&self, acceptance: Acceptance) -> Option<Grouped> {
        let Some(queue) = &self.queue else { return Some(Grouped::Alone(acceptance)) };
        let (reply, answer) = oneshot::channel();
        if let Err(refused) = queue.try_send((acceptance, reply)) {
            // Full (or shut down): this one commits alone, now.
            let (acceptance, _) = refused.into_inner();
            return Some(Grouped::Alone(acceptance));
        }
        answer.await.ok()
    }
}

/// One committer: a group at a time, from the shared queue, until `shutdown`.
async fn run(
    pool: PgPool,
    queue: std::sync::Arc<tokio::sync::Mutex<mpsc::Receiver<Item>>>,
    max_group: usize,
    shutdown: CancellationToken,
) {
    loop {
        let mut group = Vec::with_capacity(max_group);
        {
            let mut queue = queue.lock().await;
            let first = tokio::select! {
                () = shutdown.cancelled() => return,
                first = queue.recv() => first,
            };
            let Some(first) = first else { return };
            group.push(first);
            while group.len() < max_group {
                match queue.try_recv() {
                    Ok(item) => group.push(item),
                    Err(_) => break,
                }
            }
        }
        commit_group(&pool, group).await;
    }
}

/// Commit `group` and answer every request in it.
async fn commit_group(pool: &PgPool, group: Vec<Item>) {
    // A key twice in one group: the later ones go alone (and replay).
    let mut seen = HashSet::with_capacity(group.len());
    let (mut members, repeats): (Vec<Item>, Vec<Item>) =
        group.into_iter().partition(|(a, _)| seen.insert((a.tenant.clone(), a.key.clone())));
    for (acceptance, reply) in repeats {
        let _ = reply.send(Grouped::Alone(acceptance));
    }
    // One order for every group, so two groups never wait on each other in a cycle.
    members.sort_by(|(a, _), (b, _)| (&a.tenant, &a.key).cmp(&(&b.tenant, &b.key)));
    let acceptances: Vec<&Acceptance> = members.iter().map(|(a, _)| a).collect();
    let outcome = match claim_and_commit(pool, &acceptances).await {
        Ok(outcome) => outcome,
        Err(error) => {
            tracing::debug!(%error, size = members.len(), "group not committed; its requests commit alone");
            metrics::counter!("onceflow_ingest_group_fallbacks_total").increment(1);
            GroupOutcome::default()
        }
    };
    metrics::histogram!("onceflow_ingest_commit_batch_size").record(outcome.claimed.len() as f64);
    for (acceptance, reply) in members {
        let grouped = if outcome.claimed.contains(&acceptance.job_id) {
            Grouped::Committed(acceptance)
        } else if outcome.recorded.contains(&acceptance.job_id) {
            Grouped::Recorded(acceptance)
        } else {
            Grouped::Alone(acceptance)
        };
        // The request may have gone (client disconnected): nothing to answer.
        let _ = reply.send(grouped);
    }
}

/// What a group's transaction did with its acceptances, by job id.
#[derive(Default)]
struct GroupOutcome {
    /// Committed: their keys claimed, their jobs and outbox rows written.
    claimed: HashSet<Uuid>,
    /// Left alone: their keys have an unexpired record.
    recorded: HashSet<Uuid>,
}

/// The group's transaction.
async fn claim_and_commit(pool: &PgPool, group: &[&Acceptance]) -> Result<GroupOutcome, sqlx::Error> {
    // The lock timeout set with BEGIN: one round trip, not two.
    let mut tx = pool.begin_with(format!("BEGIN; SET LOCAL lock_timeout = '{GROUP_LOCK_TIMEOUT_MS}ms'")).await?;
    let text = |field: fn(&Acceptance) -> &str| -> Vec<&str> { group.iter().map(|a| field(a)).collect() };
    let tenants = text(|a| a.tenant.as_str());
    let keys = text(|a| a.key.as_str());
    let locations = text(|a| a.response_location.as_str());
    let correlation_ids = text(|a| a.correlation_id.as_str());
    let command_types = text(|a| a.command_type.as_str());
    let fingerprints: Vec<&[u8]> = group.iter().map(|a| &a.fingerprint[..]).collect();
    let job_ids: Vec<Uuid> = group.iter().map(|a| a.job_id).collect();
    let statuses: Vec<i16> = group.iter().map(|a| a.response_status).collect();
    let bodies: Vec<&[u8]> = group.iter().map(|a| a.response_body.as_slice()).collect();
    let ttls: Vec<f64> = group.iter().map(|a| a.ttl_secs).collect();
    // In one statement: the keys with an unexpired record, read without a
    // lock and left alone; the others claimed as the one-request path claims
    // them (an expired record is taken over); the jobs of the keys claimed.
    let rows: Vec<(Uuid, bool)> = sqlx::query_as(concat!(
        "WITH batch AS (
             SELECT * FROM unnest($1::text[], $2::text[], $3::bytea[], $4::uuid[], $5::int2[], $6::bytea[],
                                  $7::text[], $8::float8[], $9::text[], $10::text[])
                 AS b(tenant, idempotency_key, fingerprint, job_id, response_status, response_body,
                      response_location, ttl_secs, correlation_id, command_type)
         ), recorded AS (
             SELECT b.job_id FROM batch b
             JOIN idempotency_keys k ON k.tenant = b.tenant AND k.idempotency_key = b.idempotency_key
             WHERE k.expires_at >= now()
         ), claimed AS (
             INSERT INTO idempotency_keys
                 (tenant, idempotency_key, fingerprint, job_id, response_status, response_body, response_location,
                  expires_at)
             SELECT tenant, idempotency_key, fingerprint, job_id, response_status, response_body, response_location,
                    now() + make_interval(secs => ttl_secs)
             FROM batch WHERE job_id NOT IN (SELECT job_id FROM recorded) ",
        claim_on_conflict!(),
        " RETURNING job_id
         ), created AS (
             INSERT INTO jobs (job_id, tenant, correlation_id, command_type, status)
             SELECT b.job_id, b.tenant, b.correlation_id, b.command_type, 'accepted'
             FROM batch b JOIN claimed USING (job_id)
             RETURNING job_id
         )
         SELECT job_id, true FROM created UNION ALL SELECT job_id, false FROM recorded",
    ))
    .bind(&tenants)
    .bind(&keys)
    .bind(&fingerprints)
    .bind(&job_ids)
    .bind(&statuses)
    .bind(&bodies)
    .bind(&locations)
    .bind(&ttls)
    .bind(&correlation_ids)
    .bind(&command_types)
    .fetch_all(&mut *tx)
    .await?;
    let (mut claimed, mut recorded) = (HashSet::new(), HashSet::new());
    for (job_id, created) in rows {
        if created {
            claimed.insert(job_id)
        } else {
            recorded.insert(job_id)
        };
    }
    let messages: Vec<OutboxMessage> =
        group.iter().filter(|a| claimed.contains(&a.job_id)).map(|a| a.outbox.clone()).collect();
    onceflow_outbox::enqueue_all(&mut tx, &messages).await.map_err(|error| match error {
        onceflow_outbox::Error::Database(error) => error,
        other => sqlx::Error::Protocol(other.to_string()),
    })?;
    tx.commit().await?;
    Ok(GroupOutcome { claimed, recorded })
}
