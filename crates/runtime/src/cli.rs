//! The command line every service binary shares:
//! `onceflow-<service> [--config FILE] [serve | migrate]`.

use std::{future::Future, path::PathBuf};

use clap::{Parser, Subcommand};
use serde::de::DeserializeOwned;
use tokio_util::sync::CancellationToken;

use crate::{
    config::{self, DatabaseConfig, TelemetryConfig},
    service::Running,
};

#[derive(Debug, Parser)]
struct Args {
    /// A TOML file overriding the embedded defaults; `ONCEFLOW_*` variables override both.
    #[arg(long, env = "ONCEFLOW_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the service (the default).
    Serve,
    /// Create the database if needed, apply migrations, and exit.
    Migrate,
    /// Print the effective configuration as JSON, secrets redacted, and exit.
    Config,
}

/// What a service's configuration must expose to the shared command line.
pub trait ServiceConfig: DeserializeOwned + serde::Serialize {
    fn telemetry(&self) -> &TelemetryConfig;
    fn database(&self) -> &DatabaseConfig;
}

/// The whole `main` of a service binary.
pub async fn main<C, S, F>(
    service_name: &'static str,
    defaults: &str,
    migrators: impl FnOnce() -> Vec<sqlx::migrate::Migrator>,
    start: S,
) -> anyhow::Result<()>
where
    C: ServiceConfig,
    S: FnOnce(C, CancellationToken) -> F,
    F: Future<Output = crate::Result<Running>>,
{
    let args = Args::parse();
    let config: C = config::load(defaults, args.config.as_deref())?;
    let _telemetry = crate::telemetry::init(service_name, config.telemetry())?;
    match args.command.unwrap_or(Command::Serve) {
        Command::Config => {
            println!("{}", serde_json::to_string_pretty(&config::redacted(&config)?)?);
        }
        Command::Migrate => {
            crate::postgres::prepare(config.database(), migrators()).await?;
            tracing::info!("migrations applied");
        }
        Command::Serve => {
            let shutdown = crate::shutdown::on_signal();
            let running = start(config, shutdown).await?;
            tracing::info!(http = %running.http_addr, "{service_name} started");
            running.wait().await;
            tracing::info!("{service_name} stopped");
        }
    }
    Ok(())
}
