//! Recording the ends of push calls: one task commits many at once, waiting
//! out outages, and records one by one what the database refuses in a batch.

use std::sync::Arc;

use onceflow_contracts::JobStatus;
use onceflow_runtime::failure::Failure;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::Dispatcher;
use crate::executions::endings::End;

/// Ends recorded in one transaction, at most.
const ENDS_PER_COMMIT: usize = 128;

impl Dispatcher {
    /// Record ends as they come, many per transaction. An outage is waited
    /// out (the ends wait in memory meanwhile; a processor that dies leaves
    /// their attempts to expire and run again). Data the database refuses is
    /// no outage: the batch's ends are then recorded one by one, and an end
    /// whose handler's answer cannot be stored is recorded without it.
    pub(super) async fn record(self: Arc<Self>, mut ended: mpsc::Receiver<End>, shutdown: CancellationToken) {
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
}
