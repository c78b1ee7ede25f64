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
//!
//! The rest of the dispatcher, each in a module of its own: `health` (the
//! push handlers' circuit breakers), `call` (one attempt of a push
//! execution) and `record` (the recorder task of their ends).

mod call;
mod health;
mod record;

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex},
    time::Duration,
};

use onceflow_webhook::RetryPolicy;
use sqlx::postgres::PgListener;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_util::sync::CancellationToken;

use super::{
    builtin::Ran,
    callbacks::Callbacks,
    endings::End,
    push::Caller,
    store::{self, Attempt, QueueKey},
};
use crate::{config::ExecutionsConfig, handlers::ServedBy, worker::Worker};
use health::{Admission, HandlerHealth};

/// Ends of push calls waiting to be recorded, at most; calls wait beyond.
const END_QUEUE: usize = 1024;

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
