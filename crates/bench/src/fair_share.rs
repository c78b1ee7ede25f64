//! `fair-share`: one tenant floods ingest while another submits at a calm
//! rate; what each is answered, and the calm tenant's accept latency (from
//! sending the request to its answer), which the flood must not raise,
//! against the calm tenant alone measured first in the same run.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use hdrhistogram::Histogram;
use serde_json::{Value, json};
use tokio::{
    sync::{Semaphore, oneshot},
    task::JoinSet,
};

use crate::{Bench, histogram, millis, record};

/// How long the calm tenant runs alone first, for the run's baseline.
const BASELINE: Duration = Duration::from_secs(10);

/// How long each window of the per-window figures is.
const WINDOW: Duration = Duration::from_secs(5);

/// One tenant's answers: status → count, and the latency of each answer,
/// in all and per [`WINDOW`] since the start (the flood's accepted phase and
/// its refused phase differ).
#[derive(Default)]
struct Answers {
    statuses: HashMap<String, u64>,
    latencies: Option<Histogram<u64>>,
    windows: Vec<Histogram<u64>>,
}

impl Answers {
    fn add(&mut self, status: String, sent: Instant, started: Instant) {
        let took = sent.elapsed();
        *self.statuses.entry(status).or_default() += 1;
        record(self.latencies.get_or_insert_with(histogram), took);
        let window = (sent.saturating_duration_since(started).as_secs_f64() / WINDOW.as_secs_f64()) as usize;
        while self.windows.len() <= window {
            self.windows.push(histogram());
        }
        record(&mut self.windows[window], took);
    }

    fn sent(&self) -> u64 {
        self.statuses.values().sum()
    }

    fn p99_ms(&self) -> f64 {
        self.latencies.as_ref().map_or(0.0, |latencies| millis(latencies, 0.99))
    }

    fn report(&self, sent_per_sec: f64) -> Value {
        let latencies = self.latencies.clone().unwrap_or_else(histogram);
        let windows: Vec<Value> = self
            .windows
            .iter()
            .map(|window| json!({"p50_ms": millis(window, 0.5), "p99_ms": millis(window, 0.99)}))
            .collect();
        json!({
            "sent_per_sec": sent_per_sec,
            "statuses": self.statuses,
            "p50_ms": millis(&latencies, 0.5),
            "p99_ms": millis(&latencies, 0.99),
            "max_ms": latencies.max() as f64 / 1000.0,
            "per_5s": windows,
        })
    }
}

impl Bench {
    /// First the calm tenant (`calm`, a bench with the other tenant's key)
    /// alone at `rate` for [`BASELINE`]: the baseline of this run. Then the
    /// flood (this bench's tenant) at `flood_rate` per second, at most
    /// `flood_connections` requests in flight, beside the calm tenant at
    /// `rate`, both open loop, for `duration`.
    pub(crate) async fn fair_share(
        &self,
        calm: &Bench,
        flood_rate: u64,
        flood_connections: usize,
        rate: u64,
        duration: Duration,
    ) -> anyhow::Result<Value> {
        let alone = calm_apart(calm.clone(), rate, BASELINE).await??;
        let started = Instant::now();
        let calm_answers = calm_apart(calm.clone(), rate, duration);
        let flood = Arc::new(Mutex::new(Answers::default()));
        let places = Arc::new(Semaphore::new(flood_connections));
        let stop = started + duration;
        let mut unsent = 0u64;
        let mut requests = JoinSet::new();

        // Ticks of 1 ms, each sending its share of the flood rate.
        let mut ticker = tokio::time::interval(Duration::from_millis(1));
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        let mut due = 0.0;
        let mut sent = 0u64;
        while Instant::now() < stop {
            ticker.tick().await;
            due += flood_rate as f64 / 1000.0;
            while due >= 1.0 {
                due -= 1.0;
                let Ok(place) = places.clone().try_acquire_owned() else {
                    unsent += 1;
                    continue;
                };
                sent += 1;
                let (bench, answers) = (self.clone(), flood.clone());
                requests.spawn(async move {
                    let sent = Instant::now();
                    let status = bench.post(&bench.deposit()).await.map_or("error".to_owned(), |(s, _)| s.to_string());
                    answers.lock().expect("answers").add(status, sent, started);
                    drop(place);
                });
            }
            // Reap what ended, so the set stays small.
            while requests.try_join_next().is_some() {}
        }
        let elapsed = started.elapsed().as_secs_f64();
        while requests.join_next().await.is_some() {}
        let calm_answers = calm_answers.await??;
        let flood = flood.lock().expect("answers");
        let p99_ratio = calm_answers.p99_ms() / alone.p99_ms().max(0.001);
        Ok(json!({"fair_share": {
            "seconds": elapsed,
            "flood": {"rate_asked": flood_rate, "connections": flood_connections, "unsent": unsent, "answers": flood.report(sent as f64 / elapsed)},
            "calm_alone": {"rate_asked": rate, "seconds": BASELINE.as_secs(), "answers": alone.report(alone.sent() as f64 / BASELINE.as_secs_f64())},
            "calm": {"rate_asked": rate, "answers": calm_answers.report(calm_answers.sent() as f64 / elapsed)},
            "calm_p99_vs_alone": p99_ratio,
        }}))
    }
}

/// The calm tenant at `rate` for `duration`, on a thread, runtime and HTTP
/// client of its own: the flood's load generator, however busy, never delays
/// its requests inside this process, so what it measures is ingest's answer
/// as another tenant's client (on a machine of its own) sees it.
fn calm_apart(calm: Bench, rate: u64, duration: Duration) -> oneshot::Receiver<anyhow::Result<Answers>> {
    let (done, answers) = oneshot::channel();
    std::thread::spawn(move || {
        let run = || -> anyhow::Result<Answers> {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            let calm = Bench { http: reqwest::Client::builder().build()?, ..calm };
            Ok(runtime.block_on(calm.calm(rate, duration)))
        };
        let _ = done.send(run());
    });
    answers
}

impl Bench {
    /// Deposits at `rate`, open loop, for `duration`: what was answered.
    async fn calm(&self, rate: u64, duration: Duration) -> Answers {
        let answers = Arc::new(Mutex::new(Answers::default()));
        let started = Instant::now();
        let mut calls = JoinSet::new();
        let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / rate.max(1) as f64));
        while started.elapsed() < duration {
            ticker.tick().await;
            let (calm, answers) = (self.clone(), answers.clone());
            calls.spawn(async move {
                let sent = Instant::now();
                let status = calm.post(&calm.deposit()).await.map_or("error".to_owned(), |(s, _)| s.to_string());
                answers.lock().expect("answers").add(status, sent, started);
            });
        }
        while calls.join_next().await.is_some() {}
        std::mem::take(&mut *answers.lock().expect("answers"))
    }
}
