//! The command line: every command, flag and `ONCEFLOW_*` variable of the
//! `onceflow` binary, with defaults that reach the local stack
//! (`scripts/stack.sh up`).
//!
//! The CLI's variables use single underscores (`ONCEFLOW_KAFKA_BROKERS`);
//! the services read `ONCEFLOW_`-prefixed settings with `__` between nested
//! keys (`ONCEFLOW_KAFKA__BROKERS`). None of the CLI's names is a setting of
//! any service (a unit test checks them against the services' defaults), so
//! exporting them in a shell that also starts the stack changes nothing in
//! the services, and the CLI reads no service variable.

use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use uuid::Uuid;

use crate::error::EXIT_CODES_HELP;

/// The environment variables the CLI reads, and only the CLI.
pub mod env {
    pub const INGEST_URL: &str = "ONCEFLOW_INGEST_URL";
    pub const NOTIFIER_URL: &str = "ONCEFLOW_NOTIFIER_URL";
    pub const PROCESSOR_URL: &str = "ONCEFLOW_PROCESSOR_URL";
    pub const API_KEY: &str = "ONCEFLOW_API_KEY";
    pub const ADMIN_TOKEN: &str = "ONCEFLOW_ADMIN_TOKEN";
    pub const KAFKA_BROKERS: &str = "ONCEFLOW_KAFKA_BROKERS";
    pub const TOPIC_PREFIX: &str = "ONCEFLOW_TOPIC_PREFIX";
    #[cfg(test)]
    pub const ALL: [&str; 7] =
        [INGEST_URL, NOTIFIER_URL, PROCESSOR_URL, API_KEY, ADMIN_TOKEN, KAFKA_BROKERS, TOPIC_PREFIX];
}

const AFTER_HELP: &str = "\
Every flag of the connection can also be set by its ONCEFLOW_* variable (shown with each flag).
These are read only by this CLI: they use single underscores, while the services read their own
settings as ONCEFLOW_<SECTION>__<KEY> (e.g. ONCEFLOW_KAFKA__BROKERS), and no name is shared.
";

/// The `onceflow` command line.
#[derive(Debug, Parser)]
#[command(
    name = "onceflow",
    version,
    about = "Submit commands to onceflow, follow jobs and event streams, read the results topic, \
             and redrive dead letters and webhook deliveries.",
    after_help = format!("{AFTER_HELP}\n{EXIT_CODES_HELP}"),
)]
pub struct Cli {
    #[command(flatten)]
    pub connection: Connection,
    /// Print JSON, one document per line, instead of text.
    #[arg(long, global = true, help_heading = "Common")]
    pub json: bool,
    /// How long to keep retrying a service or broker that is unreachable,
    /// busy (409/429/503) or failing, in seconds.
    #[arg(long, global = true, help_heading = "Common", value_name = "SECS", default_value = "30", value_parser = seconds)]
    pub timeout: Duration,
    #[command(subcommand)]
    pub command: Command,
}

/// Where the services and the broker are, and the credentials.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Connection")]
pub struct Connection {
    /// Ingest's base URL (commands and jobs).
    #[arg(long, global = true, env = env::INGEST_URL, default_value = "http://127.0.0.1:8080", value_parser = base_url)]
    pub ingest_url: String,
    /// The notifier's base URL (event streams and webhook deliveries).
    #[arg(long, global = true, env = env::NOTIFIER_URL, default_value = "http://127.0.0.1:8082", value_parser = base_url)]
    pub notifier_url: String,
    /// The processor's base URL (dead letters).
    #[arg(long, global = true, env = env::PROCESSOR_URL, default_value = "http://127.0.0.1:8081", value_parser = base_url)]
    pub processor_url: String,
    /// The tenant's API key (the local stack's development key by default).
    #[arg(long, global = true, env = env::API_KEY, default_value = "dev-onceflow-key", hide_env_values = true, hide_default_value = true)]
    pub api_key: String,
    /// The processor's admin token (its `admin.token`), for `dead-letters`.
    #[arg(long, global = true, env = env::ADMIN_TOKEN, hide_env_values = true)]
    pub admin_token: Option<String>,
    /// The broker's bootstrap servers, for `results`.
    #[arg(long, global = true, env = env::KAFKA_BROKERS, default_value = "127.0.0.1:9092")]
    pub kafka_brokers: String,
    /// Put in front of the topic names, as the services' `kafka.topic_prefix`.
    #[arg(long, global = true, env = env::TOPIC_PREFIX, default_value = "")]
    pub topic_prefix: String,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Submit a command: prints the Idempotency-Key (on stderr) and the 202
    /// answer (job id, correlation id, status URL). Retries with the same key
    /// on connection errors and on 409/429/503, honouring Retry-After.
    Submit(SubmitArgs),
    /// Show a job: its status, result or error.
    Job(JobArgs),
    /// Cancel a job: a queued one ends `cancelled` at once; a running one's
    /// handler or worker is told, and it ends `cancelled` when it confirms or
    /// after the processor's grace period (unless it completes first).
    Cancel(JobArgs),
    /// Follow the tenant's result events as they happen (Server-Sent Events),
    /// resuming with Last-Event-ID after any disconnect.
    Watch(WatchArgs),
    /// Read the results topic from the broker and decode its Avro records.
    Results(ResultsArgs),
    /// Dead-lettered commands on the processor (needs the admin token).
    #[command(subcommand)]
    DeadLetters(DeadLetterCommand),
    /// Webhook deliveries on the notifier.
    #[command(subcommand)]
    Deliveries(DeliveryCommand),
    /// The synthetic probe: one `onceflow.probe` command through ingest, the
    /// processor, the results topic and the notifier, each stage timed; exit
    /// 0 when it went through within the deadline. `--every` repeats it and
    /// serves its metrics.
    Probe(ProbeArgs),
}

#[derive(Debug, Args)]
pub struct ProbeArgs {
    /// The most a probe may take, every stage included, in seconds.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub deadline_secs: u64,
    /// Probe every this many seconds, forever, serving the probe's metrics.
    #[arg(long, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..=86400))]
    pub every: Option<u64>,
    /// With --every: where `/metrics` (onceflow_probe_*) is served.
    #[arg(long, default_value = "127.0.0.1:9464", value_name = "HOST:PORT")]
    pub metrics_listen: String,
}

#[derive(Debug, Args)]
pub struct SubmitArgs {
    /// The command type, e.g. ledger.deposit.
    #[arg(value_name = "TYPE")]
    pub command_type: String,
    /// The payload: JSON, `@FILE` to read it from a file, or `-` for stdin.
    #[arg(long, value_name = "JSON|@FILE|-")]
    pub payload: String,
    /// Use this key instead of a new one (repeat an earlier submission).
    #[arg(long, value_parser = idempotency_key)]
    pub idempotency_key: Option<String>,
    /// Where the notifier POSTs the outcome (a signed webhook).
    #[arg(long, value_name = "URL")]
    pub callback_url: Option<String>,
    /// Correlate this command with others (`X-Correlation-Id`).
    #[arg(long, value_name = "ID")]
    pub correlation_id: Option<String>,
    #[command(flatten)]
    pub wait: WaitArgs,
}

#[derive(Debug, Args)]
pub struct JobArgs {
    /// The job id (from the 202 answer).
    pub job_id: Uuid,
    #[command(flatten)]
    pub wait: WaitArgs,
}

/// Following a job until it ends.
#[derive(Debug, Args)]
pub struct WaitArgs {
    /// Follow the job until it ends; exit 0 if it succeeded, 1 if not.
    /// Elapsed time and status changes are shown on stderr when it is a terminal.
    #[arg(long)]
    pub wait: bool,
    /// Give up waiting after this many seconds (exit 4); waits as long as it takes without.
    #[arg(long, value_name = "SECS", value_parser = seconds, requires = "wait")]
    pub wait_timeout: Option<Duration>,
}

#[derive(Debug, Args)]
pub struct WatchArgs {
    /// Only this job's events (from its first); exits when the job has ended.
    #[arg(long, value_name = "ID", conflicts_with = "correlation")]
    pub job: Option<Uuid>,
    /// Only the events of this correlation id (from the first).
    #[arg(long, value_name = "ID")]
    pub correlation: Option<String>,
    /// Start after this event id (the `id` of an event seen before).
    #[arg(long, value_name = "EVENT_ID")]
    pub from: Option<u64>,
}

#[derive(Debug, Args)]
pub struct ResultsArgs {
    /// Start at this offset in every partition (from the beginning without
    /// --from-offset or --from-time).
    #[arg(long, value_name = "N", conflicts_with = "from_time")]
    pub from_offset: Option<u64>,
    /// Only records written at or after this time (RFC 3339, e.g.
    /// 2026-12-02T10:00:00Z), from the first the broker finds.
    #[arg(long, value_name = "RFC3339", value_parser = rfc3339)]
    pub from_time: Option<chrono::DateTime<chrono::Utc>>,
    /// Keep reading new records instead of stopping at the end.
    #[arg(long)]
    pub follow: bool,
}

#[derive(Debug, Subcommand)]
pub enum DeadLetterCommand {
    /// List dead-lettered commands, newest first.
    List {
        /// How many (the processor allows 1 to 1000).
        #[arg(long, default_value = "100", value_parser = clap::value_parser!(u16).range(1..=1000))]
        limit: u16,
    },
    /// Put a dead-lettered command back on the commands topic (it still takes effect at most once).
    Redrive {
        /// The command's message id (its job id).
        message_id: Uuid,
    },
}

#[derive(Debug, Subcommand)]
pub enum DeliveryCommand {
    /// A job's webhook deliveries with every attempt.
    List {
        /// The job id.
        job_id: Uuid,
    },
    /// Make a failed delivery pending again (same webhook-id, fresh retry schedule).
    Redrive {
        /// The delivery id (its webhook-id).
        delivery_id: Uuid,
    },
}

fn seconds(raw: &str) -> Result<Duration, String> {
    let seconds: f64 = raw.parse().map_err(|_| format!("`{raw}` is not a number of seconds"))?;
    Duration::try_from_secs_f64(seconds).map_err(|_| format!("`{raw}` is not a number of seconds from 0"))
}

fn base_url(raw: &str) -> Result<String, String> {
    let url = url::Url::parse(raw).map_err(|e| format!("`{raw}` is not a URL: {e}"))?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return Err(format!("`{raw}` is not an http(s) URL"));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(format!("`{raw}` must be a base URL, without query or fragment"));
    }
    Ok(url.as_str().trim_end_matches('/').to_owned())
}

/// The service's rule: 1 to 255 visible ASCII characters.
fn idempotency_key(raw: &str) -> Result<String, String> {
    if (1..=255).contains(&raw.len()) && raw.bytes().all(|b| b.is_ascii_graphic()) {
        Ok(raw.to_owned())
    } else {
        Err("an idempotency key is 1 to 255 visible ASCII characters".to_owned())
    }
}

fn rfc3339(raw: &str) -> Result<chrono::DateTime<chrono::Utc>, String> {
    chrono::DateTime::parse_from_rfc3339(raw)
        .map(|at| at.with_timezone(&chrono::Utc))
        .map_err(|e| format!("`{raw}` is not an RFC 3339 time ({e}), e.g. 2026-12-02T10:00:00Z"))
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory as _, error::ErrorKind};

    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("onceflow").chain(args.iter().copied()))
    }

    fn kind(args: &[&str]) -> ErrorKind {
        parse(args).expect_err("a usage error").kind()
    }

    #[test]
    fn the_command_line_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn submit_takes_a_type_a_payload_and_optional_key_and_wait() {
        let cli = parse(&[
            "submit",
            "ledger.deposit",
            "--payload",
            r#"{"account_id":"alice","amount":5}"#,
            "--idempotency-key",
            "deposit-1",
            "--wait",
            "--wait-timeout",
            "90",
        ])
        .unwrap();
        let Command::Submit(submit) = cli.command else { panic!("submit: {:?}", cli.command) };
        assert_eq!(submit.command_type, "ledger.deposit");
        assert_eq!(submit.idempotency_key.as_deref(), Some("deposit-1"));
        assert!(submit.wait.wait);
        assert_eq!(submit.wait.wait_timeout, Some(Duration::from_secs(90)));
        assert_eq!(kind(&["submit", "ledger.deposit"]), ErrorKind::MissingRequiredArgument);
        assert_eq!(kind(&["submit", "--payload", "{}"]), ErrorKind::MissingRequiredArgument);
        assert_eq!(
            kind(&["submit", "t", "--payload", "{}", "--wait-timeout", "5"]),
            ErrorKind::MissingRequiredArgument
        );
    }

    #[test]
    fn bad_values_are_usage_errors() {
        assert_eq!(kind(&["submit", "t", "--payload", "{}", "--idempotency-key", ""]), ErrorKind::ValueValidation);
        assert_eq!(kind(&["submit", "t", "--payload", "{}", "--idempotency-key", "a b"]), ErrorKind::ValueValidation);
        let long = "k".repeat(256);
        assert_eq!(kind(&["submit", "t", "--payload", "{}", "--idempotency-key", &long]), ErrorKind::ValueValidation);
        assert_eq!(kind(&["job", "not-a-uuid"]), ErrorKind::ValueValidation);
        assert_eq!(kind(&["job", "0192f1c2-7d3e-7000-8000-000000000000", "--timeout=-1"]), ErrorKind::ValueValidation);
        assert_eq!(
            kind(&["job", "0192f1c2-7d3e-7000-8000-000000000000", "--ingest-url", "ftp://x"]),
            ErrorKind::ValueValidation
        );
        assert_eq!(kind(&["results", "--from-time", "yesterday"]), ErrorKind::ValueValidation);
        assert_eq!(kind(&["results", "--from-offset=-3"]), ErrorKind::ValueValidation);
        assert_eq!(kind(&["dead-letters", "list", "--limit", "0"]), ErrorKind::ValueValidation);
        assert_eq!(kind(&["deliveries", "redrive", "42"]), ErrorKind::ValueValidation);
        assert_eq!(kind(&["frobnicate"]), ErrorKind::InvalidSubcommand);
    }

    #[test]
    fn watch_filters_by_job_or_correlation_not_both() {
        let cli = parse(&["watch", "--correlation", "order-7", "--from", "41", "--json"]).unwrap();
        assert!(cli.json);
        let Command::Watch(watch) = cli.command else { panic!("watch") };
        assert_eq!((watch.correlation.as_deref(), watch.from, watch.job), (Some("order-7"), Some(41), None));
        let job = "0192f1c2-7d3e-7000-8000-000000000000";
        assert_eq!(kind(&["watch", "--job", job, "--correlation", "c"]), ErrorKind::ArgumentConflict);
    }

    #[test]
    fn results_start_at_an_offset_or_a_time_not_both() {
        let cli = parse(&["results", "--from-time", "2026-12-02T10:00:00+01:00", "--follow"]).unwrap();
        let Command::Results(results) = cli.command else { panic!("results") };
        assert_eq!(results.from_time.unwrap().to_rfc3339(), "2026-12-02T09:00:00+00:00");
        assert!(results.follow);
        assert_eq!(
            kind(&["results", "--from-offset", "3", "--from-time", "2026-12-02T10:00:00Z"]),
            ErrorKind::ArgumentConflict
        );
    }

    #[test]
    fn connection_flags_go_anywhere_and_urls_lose_their_trailing_slash() {
        let cli =
            parse(&["deliveries", "list", "0192f1c2-7d3e-7000-8000-000000000000", "--notifier-url", "http://n:1/"])
                .unwrap();
        assert_eq!(cli.connection.notifier_url, "http://n:1");
        let cli =
            parse(&["--timeout", "2.5", "dead-letters", "redrive", "0192f1c2-7d3e-7000-8000-000000000000"]).unwrap();
        assert_eq!(cli.timeout, Duration::from_millis(2500));
    }

    /// The defaults reach `scripts/stack.sh up` (where the variable is unset).
    #[test]
    fn defaults_match_the_local_stack() {
        let cli = parse(&["dead-letters", "list"]).unwrap();
        let defaults = [
            (env::INGEST_URL, cli.connection.ingest_url.as_str(), "http://127.0.0.1:8080"),
            (env::PROCESSOR_URL, &cli.connection.processor_url, "http://127.0.0.1:8081"),
            (env::NOTIFIER_URL, &cli.connection.notifier_url, "http://127.0.0.1:8082"),
            (env::KAFKA_BROKERS, &cli.connection.kafka_brokers, "127.0.0.1:9092"),
            (env::API_KEY, &cli.connection.api_key, "dev-onceflow-key"),
            (env::TOPIC_PREFIX, &cli.connection.topic_prefix, ""),
        ];
        for (variable, value, default) in defaults {
            if std::env::var_os(variable).is_none() {
                assert_eq!(value, default, "{variable}");
            }
        }
        assert_eq!(cli.timeout, Duration::from_secs(30));
    }

    /// A service reads `ONCEFLOW_A__B` as setting `a.b` and `ONCEFLOW_A` as
    /// top-level `a`: none of the CLI's names may be one of its settings.
    #[test]
    fn no_cli_variable_is_a_service_setting() {
        let defaults = [
            include_str!("../../ingest/config/defaults.toml"),
            include_str!("../../processor/config/defaults.toml"),
            include_str!("../../notifier/config/defaults.toml"),
        ];
        // Top-level keys and tables (`ONCEFLOW_CONFIG` names a service's file).
        let mut settings = vec!["config".to_owned()];
        for toml in defaults {
            let mut in_table = false;
            for line in toml.lines().map(str::trim).filter(|line| !line.starts_with('#')) {
                if let Some(table) = line.strip_prefix('[').and_then(|l| l.split(['.', ']']).next()) {
                    settings.push(table.trim_matches('[').to_owned());
                    in_table = true;
                } else if let Some((key, _)) = line.split_once('=').filter(|_| !in_table) {
                    settings.push(key.trim().to_owned());
                }
            }
        }
        assert!(settings.contains(&"kafka".to_owned()) && settings.contains(&"listen".to_owned()), "{settings:?}");
        for variable in env::ALL {
            assert!(!variable.contains("__"), "{variable} has no nesting separator");
            let key = variable.strip_prefix("ONCEFLOW_").unwrap().to_lowercase();
            assert!(!settings.contains(&key), "{variable} would also set the services' `{key}`");
        }
        let help = Cli::command().render_long_help().to_string();
        for variable in env::ALL {
            assert!(help.contains(variable), "--help names {variable}");
        }
    }
}
