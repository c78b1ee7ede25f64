//! A no-op push handler the benchmark serves itself, for the command type
//! `bench.noop` (declared in `config/development/command-types.toml`): it
//! answers every call `200 {}` at once and notes when each job's first call
//! arrived, so the load client measures 202 → handler request latency and
//! the drain rate of handler-backed commands from outside the services.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use axum::{Router, body::Bytes, extract::State, routing::post};
use serde_json::{Value, json};
use tokio::task::JoinSet;

use crate::{Bench, latencies_until_seen, millis, rate, subscribers::count_events};

/// When each job's first call arrived, by job id.
pub type Arrivals = Arc<Mutex<HashMap<String, Instant>>>;

/// Serve `POST /noop` on 127.0.0.1:`port` until dropped; the arrivals.
pub async fn serve(port: u16) -> anyhow::Result<(Arrivals, tokio::task::JoinHandle<()>)> {
    async fn noop(State(arrivals): State<Arrivals>, body: Bytes) -> &'static str {
        let at = Instant::now();
        if let Ok(call) = serde_json::from_slice::<Value>(&body)
            && let Some(job) = call["job_id"].as_str()
        {
            arrivals.lock().expect("arrivals").entry(job.to_owned()).or_insert(at);
        }
        "{}"
    }
    let arrivals = Arrivals::default();
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
    let router = Router::new().route("/noop", post(noop)).with_state(arrivals.clone());
    let server = tokio::spawn(async move {
        let _ = axum::serve(listener, router).await;
    });
    Ok((arrivals, server))
}

/// A `bench.noop` command; its ordering key one of 1,024, round robin, so
/// the calls spread over many keys as many customers' would.
pub fn noop_command(n: u64) -> Value {
    serde_json::json!({"type": "bench.noop", "payload": {"key": format!("k-{}", n % 1024)}})
}

impl Bench {
    /// `bench.noop` commands at `rate` per second for `duration`, served
    /// here: the latency from each `202` to its first call's arrival.
    pub(crate) async fn handler_latency(&self, rate: u64, duration: Duration, port: u16) -> anyhow::Result<Value> {
        let (arrivals, server) = serve(port).await?;
        // Settled once a probe's call arrives within a second of its 202
        // (work queued earlier would otherwise count as this one's latency).
        let started = Instant::now();
        loop {
            anyhow::ensure!(started.elapsed() < Duration::from_secs(300), "the stack did not settle within 300 s");
            let (status, job) = self.post(&noop_command(0)).await?;
            let Some(job) = job else {
                tokio::time::sleep(Duration::from_secs(1)).await;
                anyhow::ensure!(matches!(status, 429 | 503), "a probe answered {status}");
                continue;
            };
            let accepted = Instant::now();
            while accepted.elapsed() < Duration::from_secs(5) && !arrivals.lock().expect("arrivals").contains_key(&job)
            {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            let arrived = arrivals.lock().expect("arrivals").get(&job).copied();
            if arrived.is_some_and(|at| at.saturating_duration_since(accepted) < Duration::from_secs(1)) {
                break;
            }
        }
        let settle = started.elapsed();
        let accepted_at: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
        let refused: Arc<Mutex<HashMap<String, u64>>> = Arc::default();
        let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / rate.max(1) as f64));
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut submissions = JoinSet::new();
        let stop = Instant::now() + duration;
        let mut n = 0;
        while Instant::now() < stop {
            ticker.tick().await;
            n += 1;
            let (bench, accepted_at, refused) = (self.clone(), accepted_at.clone(), refused.clone());
            submissions.spawn(async move {
                let answer = match bench.post(&noop_command(n)).await {
                    Ok((202, Some(job))) => {
                        accepted_at.lock().expect("accepted").insert(job, Instant::now());
                        return;
                    }
                    Ok((status, _)) => status.to_string(),
                    Err(_) => "error".to_owned(),
                };
                *refused.lock().expect("refused").entry(answer).or_default() += 1;
            });
        }
        while submissions.join_next().await.is_some() {}
        let (latencies, missing) = latencies_until_seen(&accepted_at, &arrivals).await;
        server.abort();
        Ok(json!({"handler_latency": {
            "rate_per_sec": rate,
            "settled_after_secs": settle.as_secs_f64(),
            "accepted": accepted_at.lock().expect("accepted").len(),
            "refused": refused.lock().expect("refused").clone(),
            "missing": missing,
            "p50_ms": millis(&latencies, 0.5),
            "p99_ms": millis(&latencies, 0.99),
            "max_ms": latencies.max() as f64 / 1000.0,
        }}))
    }

    /// Serve `bench.noop` and count `count` terminal events on the tenant's
    /// stream: the rate between the first and the last.
    pub(crate) async fn handler_drain(&self, count: u64, port: u16, timeout: Duration) -> anyhow::Result<Value> {
        let (arrivals, server) = serve(port).await?;
        let stream = self.stream("/v1/events").await?;
        eprintln!("handler-drain: serving bench.noop on port {port}, subscribed; waiting for {count} results");
        let counted = count_events(stream, count, Instant::now() + timeout).await?;
        server.abort();
        let calls = arrivals.lock().expect("arrivals").len();
        Ok(json!({"handler_drain": {
            "events": counted.events,
            "calls": calls,
            "per_sec": rate(counted.events, counted.first, counted.last),
        }}))
    }
}
