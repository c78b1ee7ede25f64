//! What operators see of executions, per command type, every few seconds:
//! how many are queued and running (`onceflow_executions{type, state}`) and
//! how long the oldest queued one has waited
//! (`onceflow_execution_oldest_queued_seconds{type}`). Every instance reports
//! the same totals (they share the database): dashboards take `max`.
//!
//! Labels are the declared types only, so their number is bounded.

use std::time::Duration;

use sqlx::Row as _;
use tokio_util::sync::CancellationToken;

use crate::worker::Worker;

/// How often the gauges are read.
const INTERVAL: Duration = Duration::from_secs(5);

/// Report until `shutdown`.
pub async fn report(worker: Worker, shutdown: CancellationToken) {
    while !shutdown.is_cancelled() {
        if let Err(error) = report_once(&worker).await {
            tracing::debug!(%error, "cannot read the executions' gauges now");
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(INTERVAL) => {}
        }
    }
}

async fn report_once(worker: &Worker) -> Result<(), sqlx::Error> {
    let rows = sqlx::query(
        "SELECT command_type, count(*) FILTER (WHERE state = 'queued') AS queued,
                count(*) FILTER (WHERE state = 'running') AS running,
                coalesce(extract(epoch FROM now() - min(created_at) FILTER (WHERE state = 'queued')), 0)::float8
                    AS oldest_queued
         FROM executions WHERE state IN ('queued', 'running') GROUP BY command_type",
    )
    .fetch_all(&worker.pool)
    .await?;
    // Every declared type is set, to zero when it has none.
    for declared in worker.registry.command_types().iter() {
        let label = worker.registry.label(&declared.name);
        let row = rows.iter().find(|row| row.try_get::<String, _>("command_type").is_ok_and(|t| t == declared.name));
        let (queued, running, oldest) = match row {
            Some(row) => (
                row.try_get::<i64, _>("queued")?,
                row.try_get::<i64, _>("running")?,
                row.try_get::<f64, _>("oldest_queued")?,
            ),
            None => (0, 0, 0.0),
        };
        metrics::gauge!("onceflow_executions", "type" => label, "state" => "queued").set(queued as f64);
        metrics::gauge!("onceflow_executions", "type" => label, "state" => "running").set(running as f64);
        metrics::gauge!("onceflow_execution_oldest_queued_seconds", "type" => label).set(oldest);
    }
    Ok(())
}
