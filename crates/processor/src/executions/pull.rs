//! Pull workers: `POST /v1/workers/poll` hands out commands of `pull` types
//! to workers without a public address.
//!
//! A worker authenticates with a key of its own (`[[workers]]`: name, key
//! digest, the types it may take) and asks for up to `max_tasks` tasks of
//! some of its types. The poll answers at once when any is ready, or waits
//! up to `wait_ms` (at most 30 s) for one: it wakes when work becomes ready
//! on any instance (the executions' notification channel) and looks at
//! least every second.
//!
//! Each task is its key's head, claimed as a push call is (`running`, a
//! fresh attempt id), held by the worker with a lease of the type's
//! `heartbeat_timeout_ms`: heartbeats extend it, `complete` and `fail` end
//! the attempt, `release` hands it back ([`super::callbacks`], with the
//! task's token). A lease that ends without them is given up within a second
//! ([`super::timeouts`]) and the command handed out again, with the same
//! `Idempotency-Key`. A worker that dies after a poll's claim but before it
//! read the answer leaves its tasks to their leases likewise.
//!
//! A poll also answers, at once, which of the worker's tasks their tenants
//! cancelled (`cancelled`): the worker stops them and confirms with `fail`
//! or `release`.

use std::{collections::HashMap, sync::Arc, time::Duration};

use axum::{
    Json,
    extract::State,
    http::{HeaderMap, StatusCode},
};
use chrono::{DateTime, Utc};
use onceflow_catalogue::Handler;
use onceflow_runtime::{
    auth::{ApiKeys, TenantKey},
    problem::Problem,
    telemetry,
};
use serde_json::Value;
use tokio::time::Instant;
use uuid::Uuid;

use super::{
    api::ApiState,
    callbacks::Links,
    endings::job_of,
    leases,
    store::{self, Attempt},
};
use crate::{config::WorkerKey, worker::Worker};

/// The longest a poll waits for work.
pub const MAX_WAIT: Duration = Duration::from_secs(30);
/// The most tasks one poll takes.
pub const MAX_TASKS: u32 = 64;

/// The configured workers.
#[derive(Clone)]
pub struct Workers {
    keys: ApiKeys,
    types: Arc<HashMap<String, Vec<String>>>,
}

impl Workers {
    /// The workers of `keys`; a type a worker names must be a `pull` type
    /// (one that is not declared here is only warned about).
    pub fn configured(keys: &[WorkerKey], worker: &Worker) -> Result<Self, String> {
        let mut types = HashMap::new();
        for key in keys {
            for name in &key.types {
                match worker.registry.declared(name).map(|t| &t.handler) {
                    Some(Handler::Pull) => {}
                    Some(_) => return Err(format!("workers: `{name}` of worker {:?} is not a pull type", key.name)),
                    // A shared configuration may name types this instance's
                    // file does not declare: no task of them comes, as said.
                    None => tracing::warn!(worker = %key.name, command_type = %name,
                        "a worker names a type that is not declared here; it gets no tasks of it"),
                }
            }
            if types.insert(key.name.clone(), key.types.clone()).is_some() {
                return Err(format!("workers: the name {:?} is given twice", key.name));
            }
        }
        let tenant_keys: Vec<TenantKey> = keys
            .iter()
            .map(|k| TenantKey { tenant: k.name.clone(), api_key_sha256: k.api_key_sha256.clone() })
            .collect();
        let keys = if tenant_keys.is_empty() {
            ApiKeys::new(&[])
        } else {
            ApiKeys::configured(&tenant_keys).map_err(|e| e.to_string().replace("tenants", "workers"))?
        };
        Ok(Self { keys, types: Arc::new(types) })
    }
}

/// A poll.
#[derive(Debug, Default, serde::Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Poll {
    /// The types wanted, among the worker's own; absent: all of them.
    pub types: Option<Vec<String>>,
    /// 1-64; 1 by default.
    pub max_tasks: Option<u32>,
    /// How long to wait for a task when none is ready, at most 30,000 ms
    /// (the default).
    pub wait_ms: Option<u64>,
}

/// One command handed to a worker.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct Task {
    pub job_id: Uuid,
    #[serde(rename = "type")]
    pub command_type: String,
    pub tenant: String,
    pub correlation_id: String,
    #[schema(value_type = Object)]
    pub payload: Value,
    /// The same for every attempt and redrive of the job: pass it on.
    pub idempotency_key: Uuid,
    /// 1 for the first attempt.
    pub attempt: i32,
    pub attempt_id: Uuid,
    /// The attempt's end, whatever the heartbeats.
    pub attempt_deadline: DateTime<Utc>,
    /// Without a heartbeat by then, the task is given up and handed out again.
    pub lease_expires_at: DateTime<Utc>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
    pub callbacks: Links,
}

/// What a poll got.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct Tasks {
    pub tasks: Vec<Task>,
    /// Jobs this worker holds that their tenants cancelled: stop them, and
    /// confirm with `fail` or `release`.
    pub cancelled: Vec<Uuid>,
}

fn refused(status: StatusCode, slug: &'static str, detail: String) -> Problem {
    Problem::new(status, slug, status.canonical_reason().unwrap_or("Error"), detail)
}

/// Take tasks, waiting for some.
#[utoipa::path(post, path = "/v1/workers/poll", tag = "workers", security(("worker_key" = [])),
    request_body(content = Option<Poll>, content_type = "application/json"),
    responses(
        (status = 200, description = "The tasks (none when the wait ended first)", body = Tasks),
        (status = 400, description = "max_tasks or wait_ms out of range", body = onceflow_runtime::openapi::ProblemDocument, content_type = "application/problem+json"),
        (status = 401, description = "No or unknown worker key", body = onceflow_runtime::openapi::ProblemDocument, content_type = "application/problem+json"),
        (status = 403, description = "A type the worker may not take", body = onceflow_runtime::openapi::ProblemDocument, content_type = "application/problem+json"),
    ))]
pub async fn poll(
    State(state): State<ApiState>,
    headers: HeaderMap,
    body: Option<Json<Poll>>,
) -> Result<Json<Tasks>, Problem> {
    let name = state.workers.keys.authenticate(&headers).ok_or_else(Problem::unauthorized)?.0;
    let Json(poll) = body.unwrap_or_default();
    let own = state.workers.types.get(&name).cloned().unwrap_or_default();
    let wanted = match poll.types {
        Some(types) => {
            if let Some(foreign) = types.iter().find(|t| !own.contains(t)) {
                return Err(refused(
                    StatusCode::FORBIDDEN,
                    "forbidden-type",
                    format!("worker {name:?} may not take `{foreign}`"),
                ));
            }
            types
        }
        None => own,
    };
    let max_tasks = poll.max_tasks.unwrap_or(1);
    if !(1..=MAX_TASKS).contains(&max_tasks) {
        return Err(refused(StatusCode::BAD_REQUEST, "invalid-poll", format!("max_tasks is 1-{MAX_TASKS}")));
    }
    let wait = Duration::from_millis(poll.wait_ms.unwrap_or(MAX_WAIT.as_millis() as u64));
    if wait > MAX_WAIT {
        return Err(refused(
            StatusCode::BAD_REQUEST,
            "invalid-poll",
            format!("wait_ms is at most {}", MAX_WAIT.as_millis()),
        ));
    }
    let until = Instant::now() + wait;
    // Cancellations already asked when the poll came are answered with it,
    // but only a new one ends its wait early: a worker that polls while it
    // winds a cancelled task down does not spin.
    let mut told: Option<Vec<Uuid>> = None;
    loop {
        // Registered before looking, so a wake between the look and the
        // wait is not lost.
        let woken = state.ready.notified();
        tokio::pin!(woken);
        woken.as_mut().enable();
        let outage = |error: sqlx::Error| {
            tracing::warn!(%error, "a poll met an outage of the database");
            refused(StatusCode::SERVICE_UNAVAILABLE, "unavailable", "the database is unavailable".to_owned())
                .retry_after(1)
        };
        let cancelled = leases::cancelled_for(&state.worker.pool, &name).await.map_err(outage)?;
        let tasks = take(&state, &name, &wanted, max_tasks).await.map_err(outage)?;
        let now = Instant::now();
        let new_cancellation = told.as_ref().is_some_and(|told| cancelled.iter().any(|id| !told.contains(id)));
        if !tasks.is_empty() || new_cancellation || now >= until {
            return Ok(Json(Tasks { tasks, cancelled }));
        }
        told.get_or_insert(cancelled);
        tokio::select! {
            () = woken => {}
            () = tokio::time::sleep((until - now).min(Duration::from_secs(1))) => {}
        }
    }
}

/// Claim up to `max_tasks` ready heads of `types` for worker `name`.
async fn take(state: &ApiState, name: &str, types: &[String], max_tasks: u32) -> Result<Vec<Task>, sqlx::Error> {
    let worker = &state.worker;
    let mut tasks = Vec::new();
    for command_type in types {
        let left = i64::from(max_tasks) - tasks.len() as i64;
        if left <= 0 {
            break;
        }
        let Some(declared) = worker.registry.declared(command_type) else { continue };
        let attempt = Attempt {
            holder: "worker",
            worker: Some(name),
            timeout: declared.attempt_timeout,
            lease: Some(declared.heartbeat_timeout),
        };
        let claimed_at = Utc::now();
        for execution in store::claim(&worker.pool, command_type, left, attempt).await? {
            let (command, job) = job_of(&execution);
            let payload = command
                .as_ref()
                .and_then(|command| serde_json::from_str(&command.payload_json).ok())
                .unwrap_or(Value::Null);
            metrics::counter!("onceflow_worker_tasks_total", "type" => worker.registry.label(command_type))
                .increment(1);
            tasks.push(Task {
                job_id: execution.job_id,
                command_type: job.command_type,
                tenant: job.tenant,
                correlation_id: execution.envelope.correlation_id.clone(),
                payload,
                idempotency_key: execution.job_id,
                attempt: execution.attempts + 1,
                attempt_id: execution.attempt_id.unwrap_or_default(),
                attempt_deadline: claimed_at + declared.attempt_timeout,
                lease_expires_at: claimed_at + declared.heartbeat_timeout.min(declared.attempt_timeout),
                traceparent: execution.envelope.traceparent.clone().or_else(|| telemetry::current_trace_context().0),
                callbacks: state.callbacks.links(&execution, declared.attempt_timeout),
            });
        }
    }
    Ok(tasks)
}
