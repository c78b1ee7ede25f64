//! The dispatcher: takes the ready heads of key queues and runs them, within
//! each command type's `concurrency`, until shutdown.
//!
//! It wakes when a lane commits work (`LISTEN onceflow_executions`), when one
//! of its runs ends (the key's next head is ready), when the earliest held
//! head becomes ready, and at least every `poll_interval_ms`. Every instance
//! runs one; they share the queues through row locks (`SKIP LOCKED`).
//!
//! Ends of push calls go to one recorder task, which commits many at once
//! (bounded queue: a full one makes the calls wait, and with them the
//! claims); a processor that dies with ends unrecorded leaves their
//! attempts to expire and be called again (at least once, recorded once).

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex},
    time::Duration,
};

use chrono::{DateTime, Utc};
use onceflow_contracts::JobStatus;
use onceflow_runtime::{failure::Failure, telemetry};
use onceflow_webhook::{
    BreakerPolicy, RetryPolicy,
    breaker::{Breaker, Signal, State, signal_of_status},
};
use sqlx::postgres::PgListener;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use super::{
    builtin::Ran,
    callbacks::Callbacks,
    endings::{AfterFailure, End, job_of},
    leases::{self, Counted},
    push::{Answer, Caller, PushRequest},
    store::{self, Attempt, Execution, QueueKey, Wait},
};
use crate::{
    config::ExecutionsConfig,
    handlers::ServedBy,
    worker::{Poison, Worker},
};

/// Ends of push calls waiting to be recorded, at most; calls wait beyond.
const END_QUEUE: usize = 1024;
/// Ends recorded in one transaction, at most.
const ENDS_PER_COMMIT: usize = 128;

/// One push-served command type.
struct PushSlot {
    name: &'static str,
    url: url::Url,
    /// The handler's breaker: its scheme, host and port.
    destination: String,
    permits: Arc<Semaphore>,
    timeout: Duration,
    heartbeat_timeout: Duration,
    retry: RetryPolicy,
}

/// The breaker of a handler, as this instance sees it.
struct HandlerHealth {
    breaker: Breaker,
    /// While half-open: the one probe is out.
    probing: bool,
}

/// What a handler's breaker lets through now.
enum Admission {
    /// Calls go out.
    Open(usize),
    /// One call, the probe.
    Probe,
    /// None until the cool-down ends.
    Blocked,
}

/// Drives executions (see the module's docs).
pub struct Dispatcher {
    worker: Worker,
    config: ExecutionsConfig,
    caller: Option<Arc<Caller>>,
    push: Vec<Arc<PushSlot>>,
    builtin_types: Vec<String>,
    builtin_permits: Arc<Semaphore>,
    /// Keys a built-in run of this instance holds, so one is not started twice.
    running: Arc<Mutex<HashSet<QueueKey>>>,
    health: Arc<Mutex<HashMap<String, HandlerHealth>>>,
    wake: Arc<Notify>,
    callbacks: Arc<Callbacks>,
    /// Polls of pull workers waiting for work, told with `notify_waiters`.
    ready: Arc<Notify>,
}

impl Dispatcher {
    /// A dispatcher of every type `worker`'s registry serves; built-in runs
    /// at most `builtin_runs` at once (each holds a database connection).
    /// Refuses a push handler without a signing secret or at an address the
    /// SSRF rules forbid. `ready` is told whenever work may have become
    /// ready (pull workers' polls wait on it).
    pub fn new(
        worker: Worker,
        config: ExecutionsConfig,
        builtin_runs: usize,
        callbacks: Arc<Callbacks>,
        ready: Arc<Notify>,
    ) -> Result<Self, String> {
        config.push.breaker.validate()?;
        let mut push = Vec::new();
        let mut builtin_types = Vec::new();
        for declared in worker.registry.command_types().iter() {
            match worker.registry.served_by(&declared.name) {
                Some(ServedBy::Push(url)) => {
                    let destination = onceflow_webhook::breaker::destination(url)
                        .ok_or_else(|| format!("push URL {url} of `{}` has no host", declared.name))?;
                    refuse_forbidden_address(url, &config.push.allowlist)
                        .map_err(|e| format!("push URL of `{}`: {e}", declared.name))?;
                    push.push(Arc::new(PushSlot {
                        name: worker.registry.label(&declared.name),
                        url: url.clone(),
                        destination,
                        permits: Arc::new(Semaphore::new(declared.concurrency as usize)),
                        timeout: declared.attempt_timeout,
                        heartbeat_timeout: declared.heartbeat_timeout,
                        retry: declared.retry.clone(),
                    }));
                }
                Some(ServedBy::Builtin(_)) => builtin_types.push(declared.name.clone()),
                // Pull workers take their own (`super::pull`).
                Some(ServedBy::Pull) | None => {}
            }
        }
        let caller = if push.is_empty() { None } else { Some(Arc::new(Caller::new(&config.push)?)) };
        Ok(Self {
            worker,
            config,
            caller,
            push,
            builtin_types,
            builtin_permits: Arc::new(Semaphore::new(builtin_runs.max(1))),
            running: Arc::default(),
            health: Arc::default(),
            wake: Arc::new(Notify::new()),
            callbacks,
            ready,
        })
    }

    /// The push handlers' client, when a push handler is declared.
    pub fn caller(&self) -> Option<Arc<Caller>> {
        self.caller.clone()
    }

    /// Dispatch until `shutdown`. Outages of the database are waited out;
    /// nothing here ends a command but a run or a call.
    pub async fn run(self, shutdown: CancellationToken) {
        let this = Arc::new(self);
        let (ends, ended) = mpsc::channel::<End>(END_QUEUE);
        let listening = tokio::spawn(this.clone().listen(shutdown.clone()));
        let expiring = tokio::spawn(super::timeouts::sweep(
            this.worker.clone(),
            this.config.clone(),
            this.wake.clone(),
            shutdown.clone(),
        ));
        let recording = tokio::spawn(this.clone().record(ended, shutdown.clone()));
        let gauges = tokio::spawn(super::gauges::report(this.worker.clone(), shutdown.clone()));
        let mut backoff = this.worker.retry.backoff();
        let poll = Duration::from_millis(this.config.poll_interval_ms.max(1));
        while !shutdown.is_cancelled() {
            let next = match this.dispatch_ready(&ends).await {
                Ok(next) => {
                    backoff = this.worker.retry.backoff();
                    next.map_or(poll, |next| next.min(poll))
                }
                Err(error) => {
                    tracing::warn!(%error, "the dispatcher cannot read the queues; trying again");
                    metrics::counter!("onceflow_outage_waits_total", "stage" => "dispatch").increment(1);
                    backoff.next_delay()
                }
            };
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = this.wake.notified() => {}
                () = tokio::time::sleep(next) => {}
            }
        }
        drop(ends);
        for task in [listening, expiring, gauges] {
            task.abort();
        }
        // Ends already queued are recorded before the processor stops.
        let _ = recording.await;
    }

    /// Start what is ready; how long until the next held head is ready.
    async fn dispatch_ready(self: &Arc<Self>, ends: &mpsc::Sender<End>) -> Result<Option<Duration>, sqlx::Error> {
        let pool = &self.worker.pool;
        let free = self.builtin_permits.available_permits();
        if free > 0 && !self.builtin_types.is_empty() {
            let running = self.running.lock().map(|running| running.len()).unwrap_or(0);
            let limit = i64::try_from(free + running).unwrap_or(i64::MAX);
            for key in store::ready_keys(pool, &self.builtin_types, limit).await? {
                let Ok(permit) = self.builtin_permits.clone().try_acquire_owned() else { break };
                let fresh = self.running.lock().map(|mut running| running.insert(key.clone())).unwrap_or(false);
                if fresh {
                    tokio::spawn(self.clone().run_builtin(key, permit));
                }
            }
        }
        for slot in &self.push {
            let limit = match self.admission(slot) {
                Admission::Blocked => continue,
                Admission::Probe => 1,
                Admission::Open(free) => free,
            };
            if limit == 0 {
                continue;
            }
            let attempt = Attempt { holder: "call", worker: None, timeout: slot.timeout, lease: None };
            let claimed = store::claim(pool, slot.name, i64::try_from(limit).unwrap_or(1), attempt).await?;
            for execution in claimed {
                let Ok(permit) = slot.permits.clone().try_acquire_owned() else { break };
                tokio::spawn(self.clone().call(slot.clone(), execution, permit, ends.clone()));
            }
        }
        store::next_ready_in(pool).await
    }

    /// What `slot`'s handler breaker lets through now.
    fn admission(&self, slot: &PushSlot) -> Admission {
        let free = slot.permits.available_permits();
        let Ok(mut health) = self.health.lock() else { return Admission::Open(free) };
        let Some(handler) = health.get_mut(&slot.destination) else { return Admission::Open(free) };
        match handler.breaker.state {
            State::Closed => Admission::Open(free),
            State::Open if handler.breaker.open_until.is_some_and(|until| until <= Utc::now()) && free > 0 => {
                handler.breaker.state = State::HalfOpen;
                handler.probing = true;
                Admission::Probe
            }
            State::Open | State::HalfOpen => Admission::Blocked,
        }
    }

    /// Count `signal` against `slot`'s handler; when its breaker opens, hold
    /// the keys of every type it serves until the cool-down ends.
    async fn judge(&self, slot: &PushSlot, signal: Signal, probe: bool) {
        let policy: &BreakerPolicy = &self.config.push.breaker;
        if !policy.enabled {
            return;
        }
        let opened: Option<DateTime<Utc>> = {
            let Ok(mut health) = self.health.lock() else { return };
            let now = Utc::now();
            let handler = health
                .entry(slot.destination.clone())
                .or_insert_with(|| HandlerHealth { breaker: Breaker::closed(now), probing: false });
            let probe = probe && handler.probing;
            if probe {
                handler.probing = false;
            }
            let transition = handler.breaker.record(policy, signal, probe, now);
            if let Some(transition) = &transition {
                tracing::warn!(destination = %slot.destination, from = transition.from.as_str(),
                    to = transition.to.as_str(), reason = %transition.reason, "push handler breaker");
                metrics::counter!("onceflow_handler_breaker_transitions_total", "to" => transition.to.as_str())
                    .increment(1);
            }
            transition.filter(|t| t.to == State::Open).and(handler.breaker.open_until)
        };
        if let Some(until) = opened {
            let types: Vec<&str> = self
                .push
                .iter()
                .filter(|other| other.destination == slot.destination)
                .map(|other| other.name)
                .collect();
            if let Err(error) = store::hold_types(&self.worker.pool, &types, until).await {
                tracing::warn!(%error, "cannot mark the handler's keys as waiting for its breaker");
            }
        }
    }

    /// One attempt of a push execution, and what its answer makes of it.
    async fn call(
        self: Arc<Self>,
        slot: Arc<PushSlot>,
        execution: Execution,
        permit: OwnedSemaphorePermit,
        ends: mpsc::Sender<End>,
    ) {
        let span = super::builtin::execution_span(&execution);
        let probe = self.health.lock().is_ok_and(|health| health.get(&slot.destination).is_some_and(|h| h.probing));
        async {
            let end = self.attempt(&slot, execution, probe).await;
            drop(permit);
            if let Some(end) = end
                && ends.send(end).await.is_err()
            {
                tracing::info!("shutting down before the end was recorded; the attempt expires and runs again");
            }
        }
        .instrument(span)
        .await;
        self.wake.notify_one();
    }

    /// Call the handler; an end to record, or `None` when the execution was
    /// put back to wait (or could not be).
    async fn attempt(&self, slot: &PushSlot, execution: Execution, probe: bool) -> Option<End> {
        let worker = &self.worker;
        let attempt = execution.attempts + 1;
        if attempt > i32::try_from(slot.retry.max_attempts).unwrap_or(i32::MAX) {
            // Its last attempt expired (its processor died): no call is left.
            let poison = Poison::new("attempts_exhausted", "every attempt of its retry policy was spent");
            let error = poison.job_error();
            return Some(worker.end_of(execution, JobStatus::DeadLettered, None, Some(error), Some(poison)));
        }
        let (command, job) = job_of(&execution);
        let Some(command) = command else {
            let poison = Poison::new("undecodable", "its command record no longer decodes");
            let error = poison.job_error();
            return Some(worker.end_of(execution, JobStatus::DeadLettered, None, Some(error), Some(poison)));
        };
        let payload: serde_json::Value = serde_json::from_str(&command.payload_json).unwrap_or_default();
        let deadline = (Utc::now() + slot.timeout).to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        let attempt_id = execution.attempt_id.map(|id| id.to_string()).unwrap_or_default();
        let request = PushRequest {
            job_id: &job.job_id,
            command_type: &job.command_type,
            tenant: &job.tenant,
            correlation_id: &execution.envelope.correlation_id,
            payload: &payload,
            attempt,
            attempt_id: &attempt_id,
            deadline: &deadline,
            callback_url: job.callback_url.as_deref(),
            callbacks: &self.callbacks.links(&execution, slot.timeout),
        };
        let (traceparent, _) = telemetry::current_trace_context();
        let Some(caller) = &self.caller else { return None };
        let started = std::time::Instant::now();
        let (answer, status) = caller.call(&slot.url, &request, slot.timeout, traceparent.as_deref()).await;
        let outcome = match &answer {
            Answer::Succeeded(_) => "succeeded",
            Answer::Accepted => "accepted",
            Answer::Refused { .. } | Answer::TooLarge { .. } => "refused",
            Answer::Unavailable { .. } => "unavailable",
            Answer::Failed { .. } => "failed",
        };
        metrics::counter!("onceflow_handler_calls_total", "type" => slot.name, "outcome" => outcome).increment(1);
        metrics::histogram!("onceflow_handler_call_duration_seconds", "type" => slot.name)
            .record(started.elapsed().as_secs_f64());
        let signal = match (&answer, status) {
            (_, Some(status)) => signal_of_status(status),
            (Answer::Failed { .. } | Answer::Unavailable { .. }, None) => Signal::Unhealthy,
            (_, None) => Signal::Healthy,
        };
        self.judge(slot, signal, probe).await;
        match answer {
            Answer::Succeeded(result) => {
                tracing::info!(attempt, "the handler succeeded");
                Some(worker.end_of(execution, JobStatus::Succeeded, Some(result.to_string()), None, None))
            }
            Answer::Refused { code, message } => {
                tracing::info!(attempt, %code, "the handler refused the command");
                let error = onceflow_contracts::JobError { code, message };
                Some(worker.end_of(execution, JobStatus::Failed, None, Some(error), None))
            }
            Answer::TooLarge { size } => {
                let message = format!("the handler's answer has more than {size} bytes; no message carries it");
                let error = onceflow_contracts::JobError { code: crate::worker::RESULT_TOO_LARGE.to_owned(), message };
                Some(worker.end_of(execution, JobStatus::Failed, None, Some(error), None))
            }
            Answer::Unavailable { reason, retry_after } => {
                let delay = worker.retry.delay_after(execution.outages).max(retry_after.unwrap_or_default());
                tracing::warn!(attempt, %reason, delay_ms = delay.as_millis(), "the handler is unavailable; waiting");
                let error = serde_json::json!({"code": "handler_unavailable", "message": reason});
                self.put_back(&execution, Counted::Outage, Wait::HandlerUnavailable, delay, &error).await;
                None
            }
            Answer::Accepted => {
                tracing::info!(attempt, "the handler accepted the command; it reports through callbacks");
                let (job_id, attempt_id) = (execution.job_id, execution.attempt_id.unwrap_or_default());
                if let Err(error) = leases::accept(&worker.pool, job_id, attempt_id, slot.heartbeat_timeout).await {
                    tracing::warn!(%error, "cannot record that the handler accepted; its call's deadline holds");
                }
                None
            }
            Answer::Failed { reason, retry_after } => {
                match worker.after_failure(&execution, &slot.retry, &reason, retry_after) {
                    AfterFailure::Retry(delay) => {
                        tracing::warn!(attempt, %reason, delay_ms = delay.as_millis(), "the handler failed; retrying");
                        let error = serde_json::json!({"code": "handler_failed", "message": reason});
                        self.put_back(&execution, Counted::Attempt, Wait::Retry, delay, &error).await;
                        None
                    }
                    AfterFailure::DeadLetter(end) => {
                        tracing::warn!(attempt, %reason, "the handler failed its last attempt; dead-lettering");
                        Some(*end)
                    }
                }
            }
        }
    }

    /// Put a running attempt back to wait, through outages of the database
    /// (until shutdown; then its deadline expires it).
    async fn put_back(
        &self,
        execution: &Execution,
        counted: Counted,
        wait: Wait,
        delay: Duration,
        error: &serde_json::Value,
    ) {
        let mut backoff = self.worker.retry.backoff();
        for _ in 0..10 {
            match store::retry_later(&self.worker.pool, execution, counted, wait, delay, error).await {
                Ok(()) => return,
                Err(error) => {
                    tracing::warn!(%error, "cannot put the execution back to wait; trying again");
                    tokio::time::sleep(backoff.next_delay()).await;
                }
            }
        }
        tracing::error!("the execution could not be put back; its attempt expires and it runs again");
    }

    /// A built-in run of `key`, then a wake for the next.
    async fn run_builtin(self: Arc<Self>, key: QueueKey, permit: OwnedSemaphorePermit) {
        let max = self.config.max_batch;
        match self.worker.run_builtin(&key, max).await {
            Ok(Ran::Ended(count)) => tracing::debug!(count, "built-in executions ended"),
            Ok(Ran::Held | Ran::NotTaken) => {}
            Err(error) => tracing::warn!(%error, "a built-in run met an outage; its key is tried again"),
        }
        if let Ok(mut running) = self.running.lock() {
            running.remove(&key);
        }
        drop(permit);
        self.wake.notify_one();
    }

    /// Record ends as they come, many per transaction. An outage is waited
    /// out (the ends wait in memory meanwhile; a processor that dies leaves
    /// their attempts to expire and run again). Data the database refuses is
    /// no outage: the batch's ends are then recorded one by one, and an end
    /// whose handler's answer cannot be stored is recorded without it.
    async fn record(self: Arc<Self>, mut ended: mpsc::Receiver<End>, shutdown: CancellationToken) {
        let mut batch = Vec::with_capacity(ENDS_PER_COMMIT);
        while ended.recv_many(&mut batch, ENDS_PER_COMMIT).await > 0 {
            if !self.record_through_outages(&batch, &shutdown).await {
                return;
            }
            batch.clear();
            self.wake.notify_one();
        }
    }

    /// Record `batch`, waiting out outages; `false` if shutdown came first.
    async fn record_through_outages(&self, batch: &[End], shutdown: &CancellationToken) -> bool {
        let mut backoff = self.worker.retry.backoff();
        loop {
            match self.record_batch(batch).await {
                Ok(()) => return true,
                Err(error) if Failure::of_database(&error).is_data() => {
                    tracing::warn!(%error, count = batch.len(), "ends the database refuses; recording them one by one");
                    for end in batch {
                        if let Err(error) = self.record_batch(std::slice::from_ref(end)).await {
                            self.record_without_answer(end, &error).await;
                        }
                    }
                    return true;
                }
                Err(error) => {
                    tracing::warn!(%error, count = batch.len(), "cannot record ends; trying again");
                    metrics::counter!("onceflow_outage_waits_total", "stage" => "record_ends").increment(1);
                    if !backoff.wait(shutdown).await {
                        return false;
                    }
                }
            }
        }
    }

    /// An end the database refused alone: recorded `failed` with a fixed
    /// error instead of the handler's answer. Should even that fail, the
    /// attempt expires and its command runs again (its attempts bound that).
    async fn record_without_answer(&self, end: &End, error: &sqlx::Error) {
        tracing::error!(%error, job_id = %end.execution.job_id, "the handler's answer cannot be stored; the job fails");
        let message = "the handler's answer could not be stored (the database refused it)".to_owned();
        let error = onceflow_contracts::JobError { code: "unrecordable_answer".to_owned(), message };
        let replacement = self.worker.end_of(end.execution.clone(), JobStatus::Failed, None, Some(error), None);
        if let Err(error) = self.record_batch(std::slice::from_ref(&replacement)).await {
            tracing::error!(%error, job_id = %end.execution.job_id, "cannot record the end; its attempt expires");
        }
    }

    async fn record_batch(&self, batch: &[End]) -> Result<(), sqlx::Error> {
        let mut tx = self.worker.pool.begin().await?;
        self.worker.record_ends(&mut tx, batch).await?;
        tx.commit().await
    }

    /// Wake the dispatcher at every commit that queues work.
    async fn listen(self: Arc<Self>, shutdown: CancellationToken) {
        let mut backoff = self.worker.retry.backoff();
        while !shutdown.is_cancelled() {
            let listener = async {
                let mut listener = PgListener::connect_with(&self.worker.pool).await?;
                listener.listen(store::CHANNEL).await?;
                loop {
                    listener.recv().await?;
                    self.wake.notify_one();
                    self.ready.notify_waiters();
                }
            };
            let result: Result<(), sqlx::Error> = tokio::select! {
                () = shutdown.cancelled() => return,
                result = listener => result,
            };
            if let Err(error) = result {
                tracing::warn!(%error, "lost the executions' notifications; polling until they are back");
            }
            if !backoff.wait(&shutdown).await {
                return;
            }
        }
    }
}

/// A push URL whose host is an address literal the SSRF rules forbid is
/// refused at start (a host name is checked at every connection).
fn refuse_forbidden_address(url: &url::Url, allowlist: &onceflow_webhook::Allowlist) -> Result<(), String> {
    let address = match url.host() {
        Some(url::Host::Ipv4(address)) => std::net::IpAddr::V4(address),
        Some(url::Host::Ipv6(address)) => std::net::IpAddr::V6(address),
        _ => return Ok(()),
    };
    let host = url.host_str().unwrap_or_default();
    onceflow_webhook::ssrf::check_address(host, address, url.port_or_known_default(), allowlist)
        .map_err(|error| format!("{error} (list it in executions.push.allowlist to permit it)"))
}
