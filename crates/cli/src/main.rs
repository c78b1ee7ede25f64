//! `onceflow`: the command line of onceflow's users and operators. It talks
//! to the services over their public HTTP APIs (ingest, the notifier's
//! streams and deliveries, the processor's admin API) and reads the results
//! topic from the broker, as any outside client would.

mod admin;
mod api;
mod args;
mod error;
mod job;
mod output;
mod probe;
mod progress;
mod results;
mod submit;
mod watch;

use std::process::ExitCode;

use clap::Parser as _;

use crate::{
    api::{Api, Service},
    args::{Cli, Command},
    error::CliError,
};

/// What every command needs: the HTTP client, the services and the output mode.
pub struct Context {
    pub api: Api,
    pub ingest: Service,
    pub notifier: Service,
    pub processor_url: String,
    pub admin_token: Option<String>,
    pub kafka_brokers: String,
    pub topic_prefix: String,
    pub json: bool,
}

fn main() -> ExitCode {
    // Usage errors exit with clap's code 2, help and version with 0.
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => return error::exit(Err(CliError::Internal(format!("cannot start the runtime: {error}")))),
    };
    error::exit(runtime.block_on(run(cli)))
}

async fn run(cli: Cli) -> Result<(), CliError> {
    let connection = cli.connection;
    let ctx = Context {
        api: Api::new(cli.timeout)?,
        ingest: Service::new("ingest", &connection.ingest_url, Some(&connection.api_key)),
        notifier: Service::new("notifier", &connection.notifier_url, Some(&connection.api_key)),
        processor_url: connection.processor_url,
        admin_token: connection.admin_token.filter(|token| !token.is_empty()),
        kafka_brokers: connection.kafka_brokers,
        topic_prefix: connection.topic_prefix,
        json: cli.json,
    };
    match cli.command {
        Command::Submit(args) => submit::run(&ctx, args).await,
        Command::Job(args) => job::run(&ctx, args).await,
        Command::Cancel(args) => job::cancel(&ctx, args).await,
        Command::Watch(args) => watch::run(&ctx, args).await,
        Command::Results(args) => results::run(&ctx, args).await,
        Command::DeadLetters(command) => admin::dead_letters(&ctx, command).await,
        Command::Deliveries(command) => admin::deliveries(&ctx, command).await,
        Command::Probe(args) => probe::run(&ctx, args).await,
    }
}
