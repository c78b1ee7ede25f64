//! `onceflow job ID [--wait]`: a job from ingest's `GET /v1/jobs/{id}`, and
//! following it until it ends (also for `submit --wait`) by polling at the
//! pace of the `Retry-After` ingest sends while the job runs.

use std::time::Duration;

use onceflow_contracts::JobStatus;
use reqwest::Method;
use serde_json::Value;
use tokio::time::Instant;

use crate::{
    Context,
    api::{self, Repeat},
    args::{JobArgs, WaitArgs},
    error::CliError,
    output,
    progress::Progress,
};

/// Between polls when ingest sends no `Retry-After`.
const DEFAULT_POLL: Duration = Duration::from_secs(1);

/// A job as ingest shows it; `raw` is the answer as sent, for `--json`.
#[derive(Debug, Clone)]
pub struct Job {
    pub raw: Value,
    pub job_id: String,
    pub status: JobStatus,
    pub progress_percent: Option<i64>,
}

impl Job {
    fn parse(raw: Value) -> Result<Self, String> {
        let job_id = raw["job_id"].as_str().ok_or("no job_id")?.to_owned();
        let status = raw["status"].as_str().and_then(JobStatus::parse).ok_or("no known status")?;
        let progress_percent = raw["progress_percent"].as_i64();
        Ok(Self { raw, job_id, status, progress_percent })
    }

    /// `Ok` unless the job ended without succeeding.
    pub fn outcome(&self) -> Result<(), CliError> {
        match self.status {
            JobStatus::Failed | JobStatus::DeadLettered | JobStatus::Cancelled => Err(CliError::JobUnsuccessful {
                job_id: self.job_id.clone(),
                status: self.status,
                error: output::error_text(&self.raw["error"]),
            }),
            _ => Ok(()),
        }
    }

    /// The job for a person, one field a line.
    pub fn human(&self) -> String {
        let field = |name: &str| self.raw.get(name).filter(|v| !v.is_null()).map(output::text_of);
        let mut lines = vec![
            format!("job          {}", self.job_id),
            format!("type         {}", field("type").unwrap_or_default()),
            format!("status       {}", self.status.as_str()),
        ];
        if let Some(percent) = self.progress_percent.filter(|_| !self.status.is_terminal()) {
            lines.push(format!("progress     {percent}%"));
        }
        if let Some(result) = field("result") {
            lines.push(format!("result       {result}"));
        }
        if let Some(error) = output::error_text(&self.raw["error"]) {
            lines.push(format!("error        {error}"));
        }
        if let Some(attempts) = field("attempts") {
            lines.push(format!("attempts     {attempts}"));
        }
        if let Some(waiting_for) = field("waiting_for") {
            lines.push(format!("waiting for  {waiting_for}"));
        }
        lines.push(format!("correlation  {}", field("correlation_id").unwrap_or_default()));
        lines.push(format!("created      {}", field("created_at").unwrap_or_default()));
        lines.push(format!("updated      {}", field("updated_at").unwrap_or_default()));
        lines.join("\n")
    }
}

pub async fn run(ctx: &Context, args: JobArgs) -> Result<(), CliError> {
    let job_id = args.job_id.to_string();
    let job = if args.wait.wait { wait(ctx, &job_id, &args.wait).await? } else { fetch(ctx, &job_id).await?.0 };
    print(ctx, &job)?;
    job.outcome()
}

/// Cancel the job, then show it (`--wait`: once it ended).
pub async fn cancel(ctx: &Context, args: JobArgs) -> Result<(), CliError> {
    let path = format!("/v1/jobs/{}/cancel", args.job_id);
    let answer =
        ctx.api.call(&ctx.ingest, Repeat::OnlyIfUnsent, |http| ctx.ingest.request(http, Method::POST, &path)).await?;
    let cancellation = answer.json(&ctx.ingest)?;
    if ctx.json {
        output::json(&cancellation)?;
    } else {
        let state = cancellation["state"].as_str().unwrap_or_default();
        output::line(&if state == "cancelled" {
            format!("job {} cancelled", args.job_id)
        } else {
            format!("job {} is {state}: its handler or worker was told to stop", args.job_id)
        })?;
    }
    if !args.wait.wait {
        return Ok(());
    }
    let job = wait(ctx, &args.job_id.to_string(), &args.wait).await?;
    print(ctx, &job)?;
    job.outcome()
}

/// Print the job as text or one JSON line.
pub fn print(ctx: &Context, job: &Job) -> Result<(), CliError> {
    if ctx.json { output::json(&job.raw) } else { output::line(&job.human()) }
}

/// The job and the `Retry-After` ingest sent with it.
async fn fetch(ctx: &Context, job_id: &str) -> Result<(Job, Option<Duration>), CliError> {
    let path = format!("/v1/jobs/{job_id}");
    let answer = ctx.api.call(&ctx.ingest, Repeat::Safe, |http| ctx.ingest.request(http, Method::GET, &path)).await?;
    let job = Job::parse(answer.json(&ctx.ingest)?).map_err(|e| CliError::unreadable("ingest", "job", e))?;
    Ok((job, api::retry_after(&answer.headers)))
}

/// Poll the job until it ends (or `--wait-timeout`), showing its progress.
pub async fn wait(ctx: &Context, job_id: &str, args: &WaitArgs) -> Result<Job, CliError> {
    let started = Instant::now();
    let mut progress = Progress::start(job_id);
    let result = async {
        loop {
            let (job, retry_after) = fetch(ctx, job_id).await?;
            progress.update(job.status, job.progress_percent);
            if job.status.is_terminal() {
                return Ok(job);
            }
            let pause = retry_after.unwrap_or(DEFAULT_POLL);
            if let Some(limit) = args.wait_timeout
                && started.elapsed() + pause > limit
            {
                return Err(CliError::Unavailable {
                    service: "ingest",
                    reason: format!(
                        "job {job_id} still {} after {}s (--wait-timeout)",
                        job.status.as_str(),
                        limit.as_secs_f64()
                    ),
                });
            }
            tokio::time::sleep(pause).await;
        }
    }
    .await;
    progress.finish();
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_job_reads_from_ingest_json_and_ends_by_its_status() {
        let raw = serde_json::json!({
            "job_id": "0192f1c2-7d3e-7000-8000-000000000000", "correlation_id": "c1", "type": "ledger.transfer",
            "status": "failed", "error": {"code": "insufficient_funds", "message": "balance 5 < 10"},
            "created_at": "2026-12-02T10:00:00Z", "updated_at": "2026-12-02T10:00:01Z"
        });
        let job = Job::parse(raw).unwrap();
        assert!(job.human().contains("error        insufficient_funds: balance 5 < 10"));
        let Err(CliError::JobUnsuccessful { status, .. }) = job.outcome() else { panic!("failed is unsuccessful") };
        assert_eq!(status, JobStatus::Failed);
        let running =
            Job::parse(serde_json::json!({"job_id": "j", "status": "processing", "progress_percent": 50})).unwrap();
        assert!(running.outcome().is_ok());
        assert!(running.human().contains("progress     50%"));
        assert!(Job::parse(serde_json::json!({"job_id": "j", "status": "sleeping"})).is_err());
    }
}
