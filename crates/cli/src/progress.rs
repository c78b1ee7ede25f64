//! What a person sees while a job runs (`submit --wait`, `job --wait`): a
//! spinner with the elapsed time and the job's status and progress, and a
//! line for each status change. Drawn on stderr only when it is a terminal
//! (indicatif hides itself otherwise), so scripts and logs get none of it.

use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use onceflow_contracts::JobStatus;

const TICK: Duration = Duration::from_millis(200);

pub struct Progress {
    bar: ProgressBar,
    job_id: String,
    last: Option<(JobStatus, Option<i64>)>,
}

impl Progress {
    pub fn start(job_id: &str) -> Self {
        let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
        if let Ok(style) = ProgressStyle::with_template("{spinner} [{elapsed_precise}] {msg}") {
            bar.set_style(style);
        }
        bar.set_message(format!("job {job_id}: waiting"));
        bar.enable_steady_tick(TICK);
        Self { bar, job_id: job_id.to_owned(), last: None }
    }

    /// Show the job's state; a change gets a line of its own.
    pub fn update(&mut self, status: JobStatus, percent: Option<i64>) {
        if self.last == Some((status, percent)) {
            return;
        }
        self.last = Some((status, percent));
        let state = state(status, percent);
        let elapsed = self.bar.elapsed().as_secs_f64();
        self.bar.println(format!("{elapsed:>7.1}s  job {} {state}", self.job_id));
        self.bar.set_message(format!("job {}: {state}", self.job_id));
    }

    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

/// `processing 50%`, `succeeded`.
fn state(status: JobStatus, percent: Option<i64>) -> String {
    match percent.filter(|_| !status.is_terminal()) {
        Some(percent) => format!("{} {percent}%", status.as_str()),
        None => status.as_str().to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_shows_only_while_the_job_runs() {
        assert_eq!(state(JobStatus::Processing, Some(25)), "processing 25%");
        assert_eq!(state(JobStatus::Succeeded, Some(75)), "succeeded");
        assert_eq!(state(JobStatus::Accepted, None), "accepted");
    }
}
