//! `onceflow probe`: the synthetic probe. One `onceflow.probe` command (it
//! changes nothing but its own job's records) goes the public way, each stage
//! timed from outside, as a client would see it:
//!
//! - `accept`: `POST /v1/commands` until its `202`;
//! - `status`: from the `202` until `GET /v1/jobs/{id}` says `succeeded`
//!   (the processor applied it, its result went through the results topic
//!   into ingest's job status);
//! - `stream`: from the `202` until the job's terminal event on the
//!   notifier's `GET /v1/jobs/{id}/events`.
//!
//! It prints one JSON line (`ok`, `job_id`, the stage that failed, each
//! stage's seconds) and exits 0 when every stage completed within
//! `--deadline-secs`, 4 (unavailable) when one did not. With `--every SECS`
//! it probes forever and serves `onceflow_probe_success` (1 or 0, the last
//! probe), `onceflow_probe_duration_seconds{stage}` (the last probe's) and
//! `onceflow_probe_runs_total{outcome}` on `--metrics-listen`, for
//! Prometheus and the probe's alerts.

use std::time::{Duration, Instant};

use onceflow_runtime::probe_records;
use reqwest::{Method, header::CONTENT_TYPE};
use serde_json::{Value, json};
use tokio_stream::StreamExt as _;

use crate::{Context, api::Repeat, args::ProbeArgs, error::CliError, output};

/// How often the job's status is asked while it runs.
const STATUS_POLL: Duration = Duration::from_millis(100);

/// What one probe found.
struct Probe {
    job_id: Option<String>,
    /// Each stage that completed, with its seconds.
    stages: Vec<(&'static str, f64)>,
    /// The stage that did not complete, and why.
    failed: Option<(&'static str, String)>,
}

impl Probe {
    fn report(&self) -> Value {
        let stages: serde_json::Map<String, Value> =
            self.stages.iter().map(|(stage, seconds)| ((*stage).to_owned(), json!(seconds))).collect();
        json!({
            "ok": self.failed.is_none(),
            "job_id": self.job_id,
            "failed_stage": self.failed.as_ref().map(|(stage, _)| stage),
            "error": self.failed.as_ref().map(|(_, reason)| reason),
            "seconds": stages,
        })
    }
}

pub async fn run(ctx: &Context, args: ProbeArgs) -> Result<(), CliError> {
    let deadline = Duration::from_secs(args.deadline_secs);
    let Some(every) = args.every else {
        let probe = once(ctx, deadline).await;
        output::line(&probe.report().to_string())?;
        return match probe.failed {
            None => Ok(()),
            Some((stage, reason)) => {
                Err(CliError::Unavailable { service: "probe", reason: format!("{stage}: {reason}") })
            }
        };
    };
    serve_metrics(&args.metrics_listen).await?;
    loop {
        let started = Instant::now();
        let probe = once(ctx, deadline).await;
        record(&probe);
        output::line(&probe.report().to_string())?;
        tokio::time::sleep(Duration::from_secs(every).saturating_sub(started.elapsed())).await;
    }
}

/// One probe, every stage bounded by `deadline` from its start.
async fn once(ctx: &Context, deadline: Duration) -> Probe {
    let started = Instant::now();
    let mut probe = Probe { job_id: None, stages: Vec::new(), failed: None };
    let job_id = match tokio::time::timeout(deadline, accept(ctx)).await {
        Ok(Ok(job_id)) => job_id,
        Ok(Err(error)) => {
            probe.failed = Some(("accept", error.to_string()));
            return probe;
        }
        Err(_) => {
            probe.failed = Some(("accept", format!("no 202 within {deadline:?}")));
            return probe;
        }
    };
    let accepted = Instant::now();
    probe.stages.push(("accept", accepted.duration_since(started).as_secs_f64()));
    probe.job_id = Some(job_id.clone());
    let left = deadline.saturating_sub(started.elapsed());
    let (status, stream) = tokio::join!(
        tokio::time::timeout(left, succeeded(ctx, &job_id)),
        tokio::time::timeout(left, streamed(ctx, &job_id)),
    );
    for (stage, outcome) in [("status", status), ("stream", stream)] {
        match outcome {
            Ok(Ok(at)) => probe.stages.push((stage, at.duration_since(accepted).as_secs_f64())),
            Ok(Err(reason)) => {
                probe.failed.get_or_insert((stage, reason));
            }
            Err(_) => {
                probe.failed.get_or_insert((stage, format!("not done within {deadline:?} of the probe's start")));
            }
        }
    }
    probe
}

/// Submit the probe's command under a fresh key; its job id.
async fn accept(ctx: &Context) -> Result<String, CliError> {
    let key = format!("probe-{}", uuid::Uuid::new_v4());
    let body = json!({"type": probe_records::COMMAND_TYPE, "payload": {"sent_at": chrono::Utc::now().to_rfc3339()}})
        .to_string();
    let answer = ctx
        .api
        .call(&ctx.ingest, Repeat::Safe, |http| {
            ctx.ingest
                .request(http, Method::POST, "/v1/commands")
                .header("idempotency-key", &key)
                .header(CONTENT_TYPE, "application/json")
                .body(body.clone())
        })
        .await?;
    let accepted = answer.json(&ctx.ingest)?;
    accepted["job_id"]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| CliError::unreadable("ingest", "202 answer", "no job_id"))
}

/// When `GET /v1/jobs/{job_id}` first said `succeeded`.
async fn succeeded(ctx: &Context, job_id: &str) -> Result<Instant, String> {
    let path = format!("/v1/jobs/{job_id}");
    loop {
        let answer = ctx
            .api
            .call(&ctx.ingest, Repeat::Safe, |http| ctx.ingest.request(http, Method::GET, &path))
            .await
            .map_err(|error| error.to_string())?;
        let job = answer.json(&ctx.ingest).map_err(|error| error.to_string())?;
        match job["status"].as_str() {
            Some("succeeded") => return Ok(Instant::now()),
            Some("accepted" | "processing") => tokio::time::sleep(STATUS_POLL).await,
            other => return Err(format!("the job ended {}", other.unwrap_or("without a status"))),
        }
    }
}

/// When the job's terminal event arrived on its stream.
async fn streamed(ctx: &Context, job_id: &str) -> Result<Instant, String> {
    use eventsource_stream::Eventsource as _;
    let path = format!("/v1/jobs/{job_id}/events");
    let response = ctx
        .notifier
        .request(&ctx.api.http, Method::GET, &path)
        .header(reqwest::header::ACCEPT, "text/event-stream")
        .send()
        .await
        .map_err(|error| crate::api::describe(&error))?;
    if !response.status().is_success() {
        return Err(format!("the notifier answered {}", response.status()));
    }
    let mut events = response.bytes_stream().eventsource();
    while let Some(event) = events.next().await {
        let event = event.map_err(|error| format!("the stream broke: {error}"))?;
        match event.event.as_str() {
            "job.succeeded" => return Ok(Instant::now()),
            "job.failed" | "job.dead_lettered" | "job.cancelled" => {
                return Err(format!("the job ended {}", event.event));
            }
            _ => {}
        }
    }
    Err("the stream ended before the job's terminal event".to_owned())
}

/// The last probe, as the metrics say it.
fn record(probe: &Probe) {
    let ok = probe.failed.is_none();
    metrics::gauge!("onceflow_probe_success").set(if ok { 1.0 } else { 0.0 });
    for stage in ["accept", "status", "stream"] {
        // A stage that did not complete shows as NaN, not as its last good time.
        let seconds = probe.stages.iter().find(|(name, _)| *name == stage).map_or(f64::NAN, |(_, s)| *s);
        metrics::gauge!("onceflow_probe_duration_seconds", "stage" => stage).set(seconds);
    }
    let outcome = if ok { "success" } else { "failure" };
    metrics::counter!("onceflow_probe_runs_total", "outcome" => outcome).increment(1);
}

/// Serve `/livez`, `/readyz` and `/metrics` on `listen` until the process ends.
async fn serve_metrics(listen: &str) -> Result<(), CliError> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|error| CliError::Usage(format!("cannot listen on {listen} for the probe's metrics: {error}")))?;
    output::note(&format!("the probe's metrics: http://{listen}/metrics"));
    let router = onceflow_runtime::http::probes_of(Vec::new());
    let limits = onceflow_runtime::hygiene::HttpLimits::default();
    tokio::spawn(async move {
        let shutdown = tokio_util::sync::CancellationToken::new();
        if let Err(error) = onceflow_runtime::http::serve(listener, router, &limits, shutdown).await {
            output::note(&format!("the probe's metrics server failed: {error}"));
        }
    });
    Ok(())
}
