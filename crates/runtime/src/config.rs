//! Layered configuration: each service embeds its defaults as TOML, which a
//! file (`--config`) and then `ONCEFLOW_`-prefixed environment variables
//! override. Nested keys use a double underscore:
//! `ONCEFLOW_KAFKA__BROKERS=127.0.0.1:9092` sets `kafka.brokers`.

use std::{collections::BTreeMap, path::Path};

use figment::{
    Figment,
    providers::{Env, Format, Toml},
};
use serde::de::DeserializeOwned;

use crate::{Error, Result};

/// The environment prefix of every setting.
pub const ENV_PREFIX: &str = "ONCEFLOW_";

/// Load `T` from the embedded `defaults`, then `file` if given, then the environment.
pub fn load<T: DeserializeOwned>(defaults: &str, file: Option<&Path>) -> Result<T> {
    let mut figment = Figment::new().merge(Toml::string(defaults));
    if let Some(file) = file {
        if !file.exists() {
            return Err(Error::Config(format!("config file {} does not exist", file.display())));
        }
        figment = figment.merge(Toml::file(file));
    }
    figment.merge(Env::prefixed(ENV_PREFIX).split("__")).extract().map_err(|e| Error::Config(e.to_string()))
}

/// Settings of the Kafka connection, shared by every service.
#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
pub struct KafkaConfig {
    /// `bootstrap.servers`.
    pub brokers: String,
    /// Put in front of every topic name; empty in production, unique per test.
    #[serde(default)]
    pub topic_prefix: String,
    /// Partitions of topics this service creates if they are missing.
    pub partitions: i32,
    /// Consumer session timeout; short enough that a crashed consumer's
    /// partitions move on quickly.
    pub session_timeout_ms: u32,
    /// librdkafka properties of this service's consumers, applied over
    /// onceflow's own (e.g. `"fetch.wait.max.ms" = "100"`, TLS or SASL
    /// settings); the ones exactly-once rests on are refused at start (see
    /// `onceflow_runtime::kafka`).
    #[serde(default)]
    pub consumer: BTreeMap<String, String>,
    /// librdkafka properties of this service's producers, likewise.
    #[serde(default)]
    pub producer: BTreeMap<String, String>,
}

impl KafkaConfig {
    pub fn topics(&self) -> onceflow_contracts::topics::Topics {
        onceflow_contracts::topics::Topics::with_prefix(&self.topic_prefix)
    }
}

/// Settings of the PostgreSQL connection.
#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
pub struct DatabaseConfig {
    pub url: String,
    /// Upper bound of the pool; requests beyond it wait `acquire_timeout_ms`.
    pub max_connections: u32,
    pub acquire_timeout_ms: u64,
}

/// Settings of logs and traces.
#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
pub struct TelemetryConfig {
    /// `json` (one object per line, for machines) or `pretty` (for people).
    pub log_format: LogFormat,
    /// An `EnvFilter` directive, e.g. `info,onceflow=debug`. `RUST_LOG` wins if set.
    pub log_filter: String,
    /// OTLP/HTTP endpoint for traces (e.g. `http://collector:4318/v1/traces`);
    /// spans are still created and propagated when absent.
    #[serde(default)]
    pub otlp_endpoint: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Json,
    Pretty,
}
