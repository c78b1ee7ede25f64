//! What can go wrong, typed, and the exit code each kind gives, so a script
//! can tell a refused job from bad input from an outage.

use std::process::ExitCode;

use onceflow_contracts::JobStatus;

/// The exit codes, as `--help` and the README document them.
pub mod code {
    /// Done; a job that was followed ended `succeeded`.
    pub const OK: u8 = 0;
    /// A job ended `failed` (a business refusal) or `dead_lettered`.
    pub const JOB_FAILED: u8 = 1;
    /// Bad command line or local input (clap's own code for usage errors).
    pub const USAGE: u8 = 2;
    /// The service refused the request (a `4xx`: bad input, unknown key or
    /// token, no such job, a conflict), or the broker has no such topic.
    pub const REJECTED: u8 = 3;
    /// A service or the broker was unreachable or answered `5xx` until
    /// `--timeout` ran out, or a wait timed out.
    pub const UNAVAILABLE: u8 = 4;
    /// Anything else: an answer the CLI cannot read, a local I/O failure.
    pub const INTERNAL: u8 = 5;
}

/// The exit-code table of `--help` (the unit tests check it against [`code`]).
pub const EXIT_CODES_HELP: &str = "\
Exit codes:
  0  done; a followed job ended succeeded
  1  a job ended failed (refused) or dead_lettered
  2  usage error: bad arguments or unreadable --payload
  3  the service refused the request (4xx: bad input, unknown key, no such job, conflict)
  4  a service or the broker unreachable or failing (5xx) until --timeout, or --wait-timeout reached
  5  internal error: an unreadable answer or a local I/O failure";

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// Bad command line or local input, found after clap's own checks.
    #[error("{0}")]
    Usage(String),
    /// The service answered `4xx`.
    #[error("{service} refused the request ({status}{}): {detail}", kind.as_deref().map(|k| format!(" {k}")).unwrap_or_default())]
    Rejected { service: &'static str, status: u16, kind: Option<String>, detail: String },
    /// The service (or broker) could not be reached, failed, or a wait ran out.
    #[error("{service} unavailable: {reason}")]
    Unavailable { service: &'static str, reason: String },
    /// The job ended without succeeding.
    #[error("job {job_id} ended {}{}", status.as_str(), error.as_deref().map(|e| format!(": {e}")).unwrap_or_default())]
    JobUnsuccessful { job_id: String, status: JobStatus, error: Option<String> },
    /// Something the CLI did not expect.
    #[error("{0}")]
    Internal(String),
}

impl CliError {
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Usage(_) => code::USAGE,
            Self::Rejected { .. } => code::REJECTED,
            Self::Unavailable { .. } => code::UNAVAILABLE,
            Self::JobUnsuccessful { .. } => code::JOB_FAILED,
            Self::Internal(_) => code::INTERNAL,
        }
    }

    /// An answer that does not parse as what the service documents.
    pub fn unreadable(service: &str, what: &str, error: impl std::fmt::Display) -> Self {
        Self::Internal(format!("cannot read {service}'s {what}: {error}"))
    }
}

/// How a finished command ends the process.
pub fn exit(result: Result<(), CliError>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::from(code::OK),
        Err(error) => {
            crate::output::note(&format!("onceflow: {error}"));
            ExitCode::from(error.exit_code())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_has_its_own_documented_code() {
        let errors = [
            CliError::Usage("x".to_owned()),
            CliError::Rejected { service: "ingest", status: 422, kind: None, detail: "x".to_owned() },
            CliError::Unavailable { service: "ingest", reason: "x".to_owned() },
            CliError::JobUnsuccessful { job_id: "j".to_owned(), status: JobStatus::Failed, error: None },
            CliError::Internal("x".to_owned()),
        ];
        let mut codes: Vec<u8> = errors.iter().map(CliError::exit_code).collect();
        codes.push(code::OK);
        let mut distinct = codes.clone();
        distinct.sort_unstable();
        distinct.dedup();
        assert_eq!(distinct.len(), codes.len(), "distinct codes: {codes:?}");
        assert_eq!(code::USAGE, 2, "clap exits 2 on a usage error");
        for code in codes {
            assert!(EXIT_CODES_HELP.contains(&format!("\n  {code}  ")), "exit code {code} is documented");
        }
    }

    #[test]
    fn messages_name_the_service_and_the_problem() {
        let rejected = CliError::Rejected {
            service: "ingest",
            status: 422,
            kind: Some("invalid-command".to_owned()),
            detail: "amount must be positive".to_owned(),
        };
        assert_eq!(rejected.to_string(), "ingest refused the request (422 invalid-command): amount must be positive");
        let failed = CliError::JobUnsuccessful {
            job_id: "j1".to_owned(),
            status: JobStatus::Failed,
            error: Some("insufficient_funds: balance 5 < 10".to_owned()),
        };
        assert_eq!(failed.to_string(), "job j1 ended failed: insufficient_funds: balance 5 < 10");
    }
}
