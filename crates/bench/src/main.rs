//! `onceflow-bench`: measures a running onceflow stack from outside, through
//! its public HTTP and SSE interfaces only, so a figure describes the services
//! with the settings they really run with (see `scripts/bench.sh`, which
//! starts the release stack, runs each measurement and prints the table).
//!
//! Each subcommand prints one JSON object on standard output:
//!
//! - `setup`: open the accounts the deposits go to.
//! - `accept`: ingest's `202`s per second with fresh keys from N connections.
//! - `latency`: accept → SSE latency (from the `202` to the `job.succeeded`
//!   event on the tenant's stream) at a fixed submission rate.
//! - `submit` + `drain`: a backlog of deposits, then the rate at which their
//!   results stream out once the processor runs (first to last event).
//! - `idle`: N idle SSE subscribers, and the notifier's resident memory each
//!   costs (read from `/proc/<pid>/status`).
//! - `fanout`: N subscribers, E commands: deliveries per second.
//! - `handler-latency`, `handler-drain`: the same for commands of a push
//!   handler (`bench.noop`), which this client serves itself ([`handler`]):
//!   202 → handler request latency, and the drain of a backlog (queued with
//!   `submit --noop`).
//!
//! The client is built to stay out of the way: streams are counted on raw
//! bytes except where a job id is needed, and every request reuses one HTTP
//! client.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};
use futures::StreamExt as _;
use hdrhistogram::Histogram;
use serde_json::{Value, json};
use tokio::task::JoinSet;

mod fair_share;
mod handler;
mod subscribers;

use subscribers::count_events;

#[derive(Debug, Parser)]
#[command(about = "Measure a running onceflow stack from outside")]
struct Cli {
    /// Ingest's base URL.
    #[arg(long, env = "ONCEFLOW_BENCH_INGEST", default_value = "http://127.0.0.1:8080")]
    ingest: String,
    /// The notifier's base URL.
    #[arg(long, env = "ONCEFLOW_BENCH_NOTIFIER", default_value = "http://127.0.0.1:8082")]
    notifier: String,
    /// The tenant's API key.
    #[arg(long, env = "ONCEFLOW_BENCH_API_KEY", default_value = "dev-onceflow-key")]
    api_key: String,
    /// The accounts deposits go to are named `<account>-0` ... `<account>-<N-1>`,
    /// one after another: keys spread over the partitions, as many customers'
    /// would.
    #[arg(long, default_value = "bench")]
    account: String,
    /// How many accounts (N above); at least 1.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u64).range(1..))]
    accounts: u64,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Open the accounts (harmless if they exist).
    Setup,
    /// `connections` clients submit deposits with fresh keys for `seconds`.
    Accept {
        #[arg(long, default_value_t = 16)]
        connections: usize,
        #[arg(long, default_value_t = 10)]
        seconds: u64,
    },
    /// Deposits at `rate` per second for `seconds`; accept → SSE latency.
    Latency {
        #[arg(long)]
        rate: u64,
        #[arg(long, default_value_t = 10)]
        seconds: u64,
    },
    /// Submit `count` deposits (or `bench.noop` commands) as fast as
    /// `connections` allow.
    Submit {
        #[arg(long)]
        count: u64,
        #[arg(long, default_value_t = 16)]
        connections: usize,
        /// `bench.noop` commands, served by `handler-drain`, not deposits.
        #[arg(long)]
        noop: bool,
    },
    /// Serve `bench.noop` on `port` and submit its commands at `rate` per
    /// second for `seconds`: 202 → handler request latency.
    HandlerLatency {
        #[arg(long)]
        rate: u64,
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        #[arg(long, default_value_t = 8091)]
        port: u16,
    },
    /// Serve `bench.noop` on `port` and wait for `count` terminal events on
    /// the tenant's stream (from now): the drain rate of a backlog of them.
    HandlerDrain {
        #[arg(long)]
        count: u64,
        #[arg(long, default_value_t = 8091)]
        port: u16,
        #[arg(long, default_value_t = 600)]
        timeout_secs: u64,
    },
    /// Wait for `count` terminal events on the tenant's stream (from now);
    /// the rate between the first and the last.
    Drain {
        #[arg(long)]
        count: u64,
        #[arg(long, default_value_t = 600)]
        timeout_secs: u64,
    },
    /// Hold `count` idle SSE subscribers; the notifier's memory per subscriber.
    Idle {
        #[arg(long)]
        count: usize,
        /// The notifier's process id (its memory is read from /proc).
        #[arg(long)]
        pid: u32,
    },
    /// This tenant floods ingest with deposits at `flood_rate` per second
    /// while the tenant of `--calm-api-key` submits at `rate`: what each is
    /// answered, and the calm tenant's accept latency.
    FairShare {
        #[arg(long)]
        flood_rate: u64,
        #[arg(long, default_value_t = 50)]
        rate: u64,
        #[arg(long, default_value_t = 30)]
        seconds: u64,
        /// The calm tenant's API key.
        #[arg(long)]
        calm_api_key: String,
        /// The most flood requests in flight at once (so connections): the
        /// load generator shares the machine with the services, so its own
        /// work is bounded; ticks with no place free are counted `unsent`.
        #[arg(long, default_value_t = 256)]
        flood_connections: usize,
    },
    /// `subscribers` streams receive the results of `events` deposits.
    Fanout {
        #[arg(long)]
        subscribers: usize,
        #[arg(long)]
        events: u64,
        #[arg(long, default_value_t = 600)]
        timeout_secs: u64,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let bench = Bench::new(&cli)?;
    let report = match cli.command {
        Command::Setup => bench.setup().await?,
        Command::Accept { connections, seconds } => bench.accept(connections, Duration::from_secs(seconds)).await?,
        Command::Latency { rate, seconds } => bench.latency(rate, Duration::from_secs(seconds)).await?,
        Command::Submit { count, connections, noop } => bench.submit(count, connections, noop).await?,
        Command::HandlerLatency { rate, seconds, port } => {
            bench.handler_latency(rate, Duration::from_secs(seconds), port).await?
        }
        Command::HandlerDrain { count, port, timeout_secs } => {
            bench.handler_drain(count, port, Duration::from_secs(timeout_secs)).await?
        }
        Command::Drain { count, timeout_secs } => bench.drain(count, Duration::from_secs(timeout_secs)).await?,
        Command::Idle { count, pid } => bench.idle(count, pid).await?,
        Command::FairShare { flood_rate, rate, seconds, calm_api_key, flood_connections } => {
            let calm = Bench { api_key: calm_api_key, ..bench.clone() };
            bench.fair_share(&calm, flood_rate, flood_connections, rate, Duration::from_secs(seconds)).await?
        }
        Command::Fanout { subscribers, events, timeout_secs } => {
            bench.fanout(subscribers, events, Duration::from_secs(timeout_secs)).await?
        }
    };
    println!("{report}");
    Ok(())
}

/// The event every deposit ends with.
const SUCCEEDED: &[u8] = b"event: job.succeeded";

#[derive(Clone)]
struct Bench {
    http: reqwest::Client,
    ingest: String,
    notifier: String,
    api_key: String,
    account: String,
    accounts: u64,
    /// The next deposit's account, round robin.
    next_account: Arc<AtomicU64>,
}

impl Bench {
    fn new(cli: &Cli) -> anyhow::Result<Self> {
        let http = reqwest::Client::builder().pool_max_idle_per_host(1024).build()?;
        Ok(Self {
            http,
            ingest: cli.ingest.trim_end_matches('/').to_owned(),
            notifier: cli.notifier.trim_end_matches('/').to_owned(),
            api_key: cli.api_key.clone(),
            account: cli.account.clone(),
            accounts: cli.accounts,
            next_account: Arc::default(),
        })
    }

    /// POST one command under a fresh key; the status and, on `202`, the job id.
    async fn post(&self, body: &Value) -> anyhow::Result<(u16, Option<String>)> {
        let response = self
            .http
            .post(format!("{}/v1/commands", self.ingest))
            .bearer_auth(&self.api_key)
            .header("idempotency-key", uuid::Uuid::new_v4().to_string())
            .json(body)
            .send()
            .await?;
        let status = response.status().as_u16();
        let job_id = if status == 202 {
            let accepted: Value = response.json().await?;
            accepted["job_id"].as_str().map(str::to_owned)
        } else {
            None
        };
        Ok((status, job_id))
    }

    fn account(&self, n: u64) -> String {
        format!("{}-{n}", self.account)
    }

    fn deposit(&self) -> Value {
        let n = self.next_account.fetch_add(1, Ordering::Relaxed) % self.accounts;
        json!({"type": "ledger.deposit", "payload": {"account_id": self.account(n), "amount": 1}})
    }

    async fn setup(&self) -> anyhow::Result<Value> {
        let mut jobs = Vec::new();
        for n in 0..self.accounts {
            let account = self.account(n);
            let body = json!({"type": "ledger.open_account", "payload": {"account_id": account, "currency": "EUR"}});
            let (status, job_id) = self.post(&body).await?;
            if status != 202 {
                bail!("opening account {account} answered {status}");
            }
            jobs.push(job_id);
        }
        Ok(json!({"setup": {"accounts": self.accounts, "job_ids": jobs}}))
    }

    /// An open SSE stream of the tenant's events from now (`path` and query).
    async fn stream(&self, path: &str) -> anyhow::Result<reqwest::Response> {
        let response = self
            .http
            .get(format!("{}{path}", self.notifier))
            .bearer_auth(&self.api_key)
            .header("accept", "text/event-stream")
            .send()
            .await?;
        if !response.status().is_success() {
            bail!("SSE {path} answered {}", response.status());
        }
        Ok(response)
    }

    async fn accept(&self, connections: usize, duration: Duration) -> anyhow::Result<Value> {
        let deadline = Instant::now() + duration;
        let mut clients = JoinSet::new();
        for _ in 0..connections {
            let bench = self.clone();
            clients.spawn(async move {
                let mut latencies = histogram();
                let mut statuses: HashMap<u16, u64> = HashMap::new();
                let body = bench.deposit();
                while Instant::now() < deadline {
                    let sent = Instant::now();
                    let status = bench.post(&body).await.map_or(0, |(status, _)| status);
                    record(&mut latencies, sent.elapsed());
                    *statuses.entry(status).or_default() += 1;
                }
                (latencies, statuses)
            });
        }
        let started = Instant::now();
        let mut latencies = histogram();
        let mut statuses: HashMap<u16, u64> = HashMap::new();
        while let Some(outcome) = clients.join_next().await {
            let (client_latencies, client_statuses) = outcome?;
            latencies.add(client_latencies)?;
            for (status, count) in client_statuses {
                *statuses.entry(status).or_default() += count;
            }
        }
        let elapsed = started.elapsed().as_secs_f64().max(duration.as_secs_f64());
        let accepted = statuses.get(&202).copied().unwrap_or(0);
        Ok(json!({"accept": {
            "connections": connections,
            "accepted_per_sec": accepted as f64 / elapsed,
            "p50_ms": millis(&latencies, 0.5),
            "p99_ms": millis(&latencies, 0.99),
            "statuses": statuses.iter().map(|(s, n)| (s.to_string(), json!(n))).collect::<serde_json::Map<_, _>>(),
        }}))
    }

    async fn latency(&self, rate: u64, duration: Duration) -> anyhow::Result<Value> {
        let accepted_at: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
        let delivered_at: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
        let stream = self.stream("/v1/events").await?;
        let reader = {
            let delivered_at = delivered_at.clone();
            tokio::spawn(async move {
                use eventsource_stream::Eventsource as _;
                let mut events = stream.bytes_stream().eventsource();
                while let Some(Ok(event)) = events.next().await {
                    if event.event != "job.succeeded" {
                        continue;
                    }
                    let at = Instant::now();
                    if let Ok(data) = serde_json::from_str::<Value>(&event.data)
                        && let Some(job) = data["job_id"].as_str()
                    {
                        delivered_at.lock().expect("deliveries").insert(job.to_owned(), at);
                    }
                }
            })
        };
        let settle = self.settle(&delivered_at).await?;
        let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / rate.max(1) as f64));
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut submissions = JoinSet::new();
        // What ingest answered other than 202 (429 or 503 when backpressure sheds), and failures.
        let refused: Arc<Mutex<HashMap<String, u64>>> = Arc::default();
        let stop = Instant::now() + duration;
        while Instant::now() < stop {
            ticker.tick().await;
            let (bench, accepted_at, refused) = (self.clone(), accepted_at.clone(), refused.clone());
            submissions.spawn(async move {
                let answer = match bench.post(&bench.deposit()).await {
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
        let submitted = accepted_at.lock().expect("accepted").len();
        let (latencies, missing) = latencies_until_seen(&accepted_at, &delivered_at).await;
        reader.abort();
        Ok(json!({"latency": {
            "rate_per_sec": rate,
            "settled_after_secs": settle.as_secs_f64(),
            "accepted": submitted,
            "refused": refused.lock().expect("refused").clone(),
            "missing": missing,
            "p50_ms": millis(&latencies, 0.5),
            "p99_ms": millis(&latencies, 0.99),
            "max_ms": latencies.max() as f64 / 1000.0,
        }}))
    }

    /// Wait until the stack is idle: a probe deposit's event must arrive within
    /// a second of its `202` (work queued by an earlier measurement would
    /// otherwise count as this one's latency). A probe refused with `429` or
    /// `503` (backpressure, while that work drains) is tried again a second later.
    /// Returns how long that took.
    async fn settle(&self, delivered_at: &Mutex<HashMap<String, Instant>>) -> anyhow::Result<Duration> {
        let started = Instant::now();
        loop {
            if started.elapsed() > Duration::from_secs(300) {
                bail!("the stack did not settle within 300 s");
            }
            let (status, job) = self.post(&self.deposit()).await?;
            if matches!(status, 429 | 503) {
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
            let job = job.with_context(|| format!("a probe deposit answered {status}"))?;
            let accepted = Instant::now();
            let delivered = loop {
                if let Some(at) = delivered_at.lock().expect("deliveries").get(&job) {
                    break *at;
                }
                if started.elapsed() > Duration::from_secs(300) {
                    bail!("the stack did not settle within 300 s");
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            };
            if delivered.saturating_duration_since(accepted) < Duration::from_secs(1) {
                return Ok(started.elapsed());
            }
        }
    }

    async fn submit(&self, count: u64, connections: usize, noop: bool) -> anyhow::Result<Value> {
        let next = Arc::new(AtomicU64::new(0));
        let accepted = Arc::new(AtomicU64::new(0));
        let started = Instant::now();
        let mut clients = JoinSet::new();
        for _ in 0..connections {
            let (bench, next, accepted) = (self.clone(), next.clone(), accepted.clone());
            clients.spawn(async move {
                let deposit = bench.deposit();
                loop {
                    let n = next.fetch_add(1, Ordering::Relaxed);
                    if n >= count {
                        break;
                    }
                    let body = if noop { handler::noop_command(n) } else { deposit.clone() };
                    if let Ok((202, _)) = bench.post(&body).await {
                        accepted.fetch_add(1, Ordering::Relaxed);
                    }
                }
            });
        }
        while clients.join_next().await.is_some() {}
        let accepted = accepted.load(Ordering::Relaxed);
        if accepted != count {
            bail!("only {accepted} of {count} submissions were accepted");
        }
        Ok(json!({"submit": {"accepted": accepted, "seconds": started.elapsed().as_secs_f64()}}))
    }

    async fn drain(&self, count: u64, timeout: Duration) -> anyhow::Result<Value> {
        let stream = self.stream("/v1/events").await?;
        eprintln!("drain: subscribed; waiting for {count} results");
        let counted = count_events(stream, count, Instant::now() + timeout).await?;
        Ok(json!({"drain": {
            "events": counted.events,
            "per_sec": rate(counted.events, counted.first, counted.last),
        }}))
    }
}

/// Wait for the stragglers, at most 30 s: every job of `accepted_at` (when
/// its `202` came) seen in `seen_at` (when it arrived where it is measured).
/// The latency of each from one to the other, and how many were never seen.
async fn latencies_until_seen(
    accepted_at: &Mutex<HashMap<String, Instant>>,
    seen_at: &Mutex<HashMap<String, Instant>>,
) -> (Histogram<u64>, u64) {
    let wait_until = Instant::now() + Duration::from_secs(30);
    let all_seen = || {
        let seen = seen_at.lock().expect("seen");
        accepted_at.lock().expect("accepted").keys().all(|job| seen.contains_key(job))
    };
    while Instant::now() < wait_until && !all_seen() {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut latencies = histogram();
    let mut missing = 0;
    let seen = seen_at.lock().expect("seen");
    for (job, accepted) in accepted_at.lock().expect("accepted").iter() {
        match seen.get(job) {
            Some(at) => record(&mut latencies, at.saturating_duration_since(*accepted)),
            None => missing += 1,
        }
    }
    (latencies, missing)
}

fn histogram() -> Histogram<u64> {
    // Microseconds up to 10 minutes, 3 significant digits.
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid histogram bounds")
}

fn record(histogram: &mut Histogram<u64>, elapsed: Duration) {
    histogram.saturating_record(u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX).max(1));
}

fn millis(histogram: &Histogram<u64>, quantile: f64) -> f64 {
    histogram.value_at_quantile(quantile) as f64 / 1000.0
}

fn rate(count: u64, first: Option<Instant>, last: Option<Instant>) -> f64 {
    match (first, last) {
        (Some(first), Some(last)) if last > first => count.saturating_sub(1) as f64 / (last - first).as_secs_f64(),
        _ => 0.0,
    }
}
