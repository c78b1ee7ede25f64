//! Measurements of SSE subscribers: the notifier's memory per idle
//! subscriber, fan-out to many, and counting the events a stream delivers.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use futures::StreamExt as _;
use serde_json::{Value, json};
use tokio::task::JoinSet;

use crate::{Bench, SUCCEEDED, rate};

impl Bench {
    pub(crate) async fn idle(&self, count: usize, pid: u32) -> anyhow::Result<Value> {
        let before = resident_kib(pid)?;
        let mut held = Vec::with_capacity(count);
        let mut opening = JoinSet::new();
        let concurrency = Arc::new(tokio::sync::Semaphore::new(256));
        for _ in 0..count {
            let (bench, concurrency) = (self.clone(), concurrency.clone());
            opening.spawn(async move {
                let _permit = concurrency.acquire().await?;
                bench.stream("/v1/events").await
            });
        }
        while let Some(opened) = opening.join_next().await {
            held.push(opened??);
        }
        // What the subscribers hold once idle, not what opening them took: the
        // notifier's allocator (jemalloc) hands memory freed by the opening
        // work (requests, catch-up queries) back to the system only after it
        // has been free for a while (its decay, 10 s by default), so the
        // resident size is read each second until it has not moved by more
        // than 1 % for 5 s, after at least 12 s and at most 60 s.
        let opened = Instant::now();
        let at_3s = {
            tokio::time::sleep(Duration::from_secs(3)).await;
            resident_kib(pid)?
        };
        let mut samples = vec![at_3s];
        let after = loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            samples.push(resident_kib(pid)?);
            let recent = &samples[samples.len().saturating_sub(6)..];
            let (low, high) = (recent.iter().min().copied().unwrap_or(0), recent.iter().max().copied().unwrap_or(0));
            let steady = recent.len() == 6 && high - low <= high / 100;
            if (steady && opened.elapsed() >= Duration::from_secs(12)) || opened.elapsed() >= Duration::from_secs(60) {
                break samples[samples.len() - 1];
            }
        };
        drop(held);
        let per = |rss: u64| rss.saturating_sub(before) as f64 / count.max(1) as f64;
        Ok(json!({"idle": {
            "subscribers": count,
            "rss_before_kib": before,
            "rss_after_kib": after,
            "settled_after_secs": opened.elapsed().as_secs_f64(),
            "kib_per_subscriber": per(after),
            "kib_per_subscriber_at_3s": per(at_3s),
        }}))
    }

    pub(crate) async fn fanout(&self, subscribers: usize, events: u64, timeout: Duration) -> anyhow::Result<Value> {
        let deadline = Instant::now() + timeout;
        let mut streams = Vec::with_capacity(subscribers);
        for _ in 0..subscribers {
            streams.push(self.stream("/v1/events").await?);
        }
        let mut readers = JoinSet::new();
        for stream in streams {
            readers.spawn(count_events(stream, events, deadline));
        }
        self.submit(events, 16, false).await.context("submitting the events")?;
        let (mut first, mut last, mut deliveries) = (None::<Instant>, None::<Instant>, 0u64);
        while let Some(counted) = readers.join_next().await {
            let counted = counted??;
            deliveries += counted.events;
            first = match (first, counted.first) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            last = last.max(counted.last);
        }
        Ok(json!({"fanout": {
            "subscribers": subscribers,
            "events": events,
            "deliveries": deliveries,
            "deliveries_per_sec": rate(deliveries, first, last),
        }}))
    }
}

/// What one stream delivered.
pub(crate) struct Counted {
    pub(crate) events: u64,
    pub(crate) first: Option<Instant>,
    pub(crate) last: Option<Instant>,
}

/// Count `job.succeeded` events on `stream` (on raw bytes: a pattern split
/// across chunks is found through the kept tail) until `wanted` or `deadline`.
pub(crate) async fn count_events(stream: reqwest::Response, wanted: u64, deadline: Instant) -> anyhow::Result<Counted> {
    let mut bytes = stream.bytes_stream();
    let mut counted = Counted { events: 0, first: None, last: None };
    let mut window: Vec<u8> = Vec::new();
    while counted.events < wanted {
        let chunk = tokio::time::timeout_at(deadline.into(), bytes.next())
            .await
            .with_context(|| format!("only {} of {wanted} events before the deadline", counted.events))?
            .context("the stream ended")??;
        window.extend_from_slice(&chunk);
        let found = window.windows(SUCCEEDED.len()).filter(|w| *w == SUCCEEDED).count() as u64;
        if found > 0 {
            let now = Instant::now();
            counted.first.get_or_insert(now);
            counted.last = Some(now);
            counted.events += found;
        }
        let keep = window.len().min(SUCCEEDED.len() - 1);
        window.drain(..window.len() - keep);
    }
    Ok(counted)
}

/// The resident memory of process `pid`, in KiB.
fn resident_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).with_context(|| format!("process {pid}"))?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmRSS line")
}
