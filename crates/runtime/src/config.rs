//! Layered configuration: each service embeds its defaults as TOML, which a
//! file (`--config`) and then `ONCEFLOW_`-prefixed environment variables
//! override. Nested keys use a double underscore:
//! `ONCEFLOW_KAFKA__BROKERS=127.0.0.1:9092` sets `kafka.brokers`.
//!
//! A setting the service does not know is refused at start, so a misspelt
//! variable or key (`ONCEFLOW_KAFKA__BROKER`) stops the service with its
//! name instead of being ignored. Two kinds are not refused: the top-level
//! settings of the other onceflow services ([`SERVICE_SETTINGS`]), so one
//! environment or file may configure all three, and the `ONCEFLOW_`
//! variables of onceflow's tools ([`NOT_SETTINGS`], [`NOT_SETTINGS_PREFIXES`]:
//! the CLI's, the scripts' and the tests').

use std::{collections::BTreeMap, path::Path};

use figment::{
    Figment,
    providers::{Env, Format, Toml},
};
use serde::{Serialize, de::DeserializeOwned};
use serde_json::Value;

use crate::{Error, Result};

/// The environment prefix of every setting.
pub const ENV_PREFIX: &str = "ONCEFLOW_";

/// The top-level settings of all three services (a test checks this against
/// each service's configuration).
pub const SERVICE_SETTINGS: &[&str] = &[
    "admin",
    "command_types_file",
    "database",
    "execution_status_url",
    "executions",
    "group_commit",
    "group_id",
    "http",
    "idempotency_ttl_secs",
    "in_flight_wait_ms",
    "kafka",
    "lanes",
    "listen",
    "max_batch",
    "max_body_bytes",
    "probe_records",
    "results_group_id",
    "retry",
    "shed",
    "sse",
    "stream_limits",
    "submit_limits",
    "sweep_batch",
    "sweep_interval_secs",
    "telemetry",
    "tenants",
    "webhooks",
    "workers",
];

/// `ONCEFLOW_` variables (after the prefix) that are not service settings:
/// the `--config` file, the `onceflow` CLI's and the local stack scripts'.
pub const NOT_SETTINGS: &[&str] = &[
    "CONFIG",
    "API_KEY",
    "ADMIN_TOKEN",
    "INGEST_URL",
    "NOTIFIER_URL",
    "PROCESSOR_URL",
    "KAFKA_BROKERS",
    "TOPIC_PREFIX",
    "BROKER_ADDR",
    "BROKER_STORAGE",
    "PG_HOST",
    "PG_PORT",
    "PY_VENV",
];

/// Prefixes (after `ONCEFLOW_`) of the test harness's, the benchmark's and
/// the check scripts' variables.
pub const NOT_SETTINGS_PREFIXES: &[&str] = &["TEST_", "BENCH_", "ASYNCAPI_", "SCHEMATHESIS_"];

fn not_a_setting(name: &str) -> bool {
    let name = name.to_ascii_uppercase();
    NOT_SETTINGS.contains(&name.as_str()) || NOT_SETTINGS_PREFIXES.iter().any(|prefix| name.starts_with(prefix))
}

/// Load `T` from the embedded `defaults`, then `file` if given, then the
/// environment, refusing any setting `T` does not have (see the module's docs).
pub fn load<T: DeserializeOwned + Serialize>(defaults: &str, file: Option<&Path>) -> Result<T> {
    let mut figment = Figment::new().merge(Toml::string(defaults));
    if let Some(file) = file {
        if !file.exists() {
            return Err(Error::Config(format!("config file {} does not exist", file.display())));
        }
        figment = figment.merge(Toml::file(file));
    }
    let figment = figment.merge(Env::prefixed(ENV_PREFIX).filter(|name| !not_a_setting(name.as_str())).split("__"));
    let config: T = figment.extract().map_err(|e| Error::Config(e.to_string()))?;
    let given: Value = figment.extract().map_err(|e| Error::Config(e.to_string()))?;
    let known = serde_json::to_value(&config).map_err(|e| Error::Config(e.to_string()))?;
    let mut unknown = Vec::new();
    unknown_keys(&given, &known, &mut Vec::new(), &mut unknown);
    unknown.retain(|path| known.get(&path[0]).is_some() || !SERVICE_SETTINGS.contains(&path[0].as_str()));
    if unknown.is_empty() {
        return Ok(config);
    }
    let named: Vec<String> = unknown.iter().map(|path| describe(&figment, path)).collect();
    Err(Error::Config(format!(
        "unknown setting{}: {} (check the spelling against the service's defaults file, or `config` output)",
        if named.len() == 1 { "" } else { "s" },
        named.join(", ")
    )))
}

/// The paths of keys in `given` that `known` (the configuration as it
/// deserialized, serialized back) does not have.
fn unknown_keys(given: &Value, known: &Value, path: &mut Vec<String>, unknown: &mut Vec<Vec<String>>) {
    match (given, known) {
        (Value::Object(given), Value::Object(known)) => {
            for (key, value) in given {
                path.push(key.clone());
                match known.get(key) {
                    Some(known) => unknown_keys(value, known, path, unknown),
                    None => unknown.push(path.clone()),
                }
                path.pop();
            }
        }
        (Value::Array(given), Value::Array(known)) => {
            for (n, (given, known)) in given.iter().zip(known).enumerate() {
                path.push(n.to_string());
                unknown_keys(given, known, path, unknown);
                path.pop();
            }
        }
        _ => {}
    }
}

/// `kafka.broker (ONCEFLOW_KAFKA__BROKER)`, or `… (in FILE)`: where the key came from.
fn describe(figment: &Figment, path: &[String]) -> String {
    let dotted = path.join(".");
    let source = figment.find_metadata(&dotted).map(|metadata| match &metadata.source {
        Some(figment::Source::File(file)) => format!("in {}", file.display()),
        _ if metadata.name.contains("environment") => {
            format!("{ENV_PREFIX}{}", path.join("__").to_ascii_uppercase())
        }
        _ => metadata.name.to_string(),
    });
    match source {
        Some(source) => format!("{dotted} ({source})"),
        None => dotted,
    }
}

/// The configuration as `onceflow-<service> config` prints it, with every
/// secret replaced by `<redacted>`: each setting whose name says token,
/// secret, password, credential or private (`admin.token`,
/// `webhooks.secrets`, Kafka's `sasl.password`,
/// `sasl.oauthbearer.client.secret`), Kafka's other secret properties
/// ([`SECRET_PROPERTIES`]), and in every URL (a database's, a proxy's, an
/// OTLP collector's) the password of its user info and the value of every
/// query parameter named like a secret (`?password=`, `?sslpassword=`,
/// `?api_key=`).
pub fn redacted<T: Serialize>(config: &T) -> Result<Value> {
    let mut value = serde_json::to_value(config).map_err(|e| Error::Config(e.to_string()))?;
    redact(&mut value);
    Ok(value)
}

const REDACTED: &str = "<redacted>";

/// librdkafka properties that hold secrets without saying so in their name.
pub const SECRET_PROPERTIES: &[&str] = &["ssl.key.pem", "sasl.oauthbearer.config"];

/// Whether a setting or a URL query parameter named `key` holds a secret (a
/// number of seconds or milliseconds named after one does not).
fn is_secret(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    let named = ["token", "secret", "password", "credential", "private"].iter().any(|word| key.contains(word))
        && !key.ends_with("_secs")
        && !key.ends_with("_ms");
    named
        || SECRET_PROPERTIES.contains(&key.as_str())
        || ["key", "apikey", "api_key", "sig", "signature"].contains(&key.as_str())
}

/// Redact every non-empty string under a secret's key, and the secrets of
/// every URL.
fn redact(value: &mut Value) {
    match value {
        Value::Object(map) => {
            for (key, value) in map.iter_mut() {
                if is_secret(key) {
                    redact_all(value);
                } else {
                    redact(value);
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(redact),
        Value::String(text) if text.contains("://") => *text = without_secrets(text),
        _ => {}
    }
}

fn redact_all(value: &mut Value) {
    match value {
        Value::String(text) if !text.is_empty() => *text = REDACTED.to_owned(),
        Value::Object(map) => map.values_mut().for_each(redact_all),
        Value::Array(items) => items.iter_mut().for_each(redact_all),
        _ => {}
    }
}

/// `scheme://user:password@host/path?password=x` with the password and the
/// secret query parameters redacted; anything else as it was.
fn without_secrets(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else { return url.to_owned() };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    let authority = match authority.rsplit_once('@') {
        Some((credentials, host)) => match credentials.split_once(':') {
            Some((user, _password)) => format!("{user}:{REDACTED}@{host}"),
            None => authority.to_owned(),
        },
        None => authority.to_owned(),
    };
    let (before_fragment, fragment) = match tail.split_once('#') {
        Some((before, fragment)) => (before, Some(fragment)),
        None => (tail, None),
    };
    let tail = match before_fragment.split_once('?') {
        Some((path, query)) => {
            let parameters: Vec<String> = query
                .split('&')
                .map(|parameter| match parameter.split_once('=') {
                    Some((name, _)) if is_secret(name) => format!("{name}={REDACTED}"),
                    _ => parameter.to_owned(),
                })
                .collect();
            format!("{path}?{}", parameters.join("&"))
        }
        None => before_fragment.to_owned(),
    };
    let fragment = fragment.map(|fragment| format!("#{fragment}")).unwrap_or_default();
    format!("{scheme}://{authority}{tail}{fragment}")
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
    /// Replicas of each partition of topics this service creates (1 suits a
    /// single broker; 3 is usual in production, with the broker's
    /// `min.insync.replicas` at 2, since producers wait for every in-sync
    /// replica). Topics that exist are left as they are.
    #[serde(default = "one_replica")]
    pub replication_factor: i32,
    /// Consumer session timeout; short enough that a crashed consumer's
    /// partitions move on quickly.
    pub session_timeout_ms: u32,
    /// librdkafka properties of every Kafka client of this service
    /// (consumers, producers, and the admin clients that create topics and
    /// answer readiness): where TLS and SASL go, e.g.
    /// `"security.protocol" = "SASL_SSL"`.
    #[serde(default)]
    pub client: BTreeMap<String, String>,
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

fn one_replica() -> i32 {
    1
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

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize, serde::Serialize)]
    struct Settings {
        listen: String,
        kafka: Nested,
        #[serde(default)]
        tenants: Vec<Nested>,
        #[serde(default)]
        extra: BTreeMap<String, String>,
    }

    #[derive(Debug, serde::Deserialize, serde::Serialize)]
    struct Nested {
        brokers: String,
        #[serde(default)]
        token: String,
    }

    const DEFAULTS: &str = "listen = \"a\"\n[kafka]\nbrokers = \"b\"\n";

    fn load_with(file: &str) -> Result<Settings> {
        let dir = std::env::temp_dir().join(format!("onceflow-config-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("service.toml");
        std::fs::write(&path, file).unwrap();
        let loaded = load(DEFAULTS, Some(&path));
        std::fs::remove_dir_all(&dir).unwrap();
        loaded
    }

    #[test]
    fn a_misspelt_key_is_refused_with_its_name_and_where_it_came_from() {
        let error = load_with("[kafka]\nbroker = \"x\"\n").unwrap_err().to_string();
        assert!(error.contains("kafka.broker (in "), "{error}");
        let error = load_with("lisen = \"x\"\n[[tenants]]\nbrokers = \"b\"\ntokne = \"t\"\n").unwrap_err().to_string();
        assert!(error.contains("unknown settings: lisen") && error.contains("tenants.0.tokne"), "{error}");
    }

    #[test]
    fn known_keys_free_maps_and_other_services_settings_are_accepted() {
        let loaded = load_with("listen = \"x\"\nlanes = 3\n[sse]\nbuffer = 1\n[extra]\n\"any.key\" = \"v\"\n").unwrap();
        assert_eq!(loaded.listen, "x");
        assert_eq!(loaded.extra["any.key"], "v");
    }

    #[test]
    fn tools_variables_are_not_settings() {
        for name in ["TEST_KAFKA_BROKERS", "bench_quick", "CONFIG", "API_KEY", "INGEST_URL"] {
            assert!(not_a_setting(name), "{name}");
        }
        for name in ["KAFKA__BROKERS", "KAFKA_BROKER", "LISTEN", "ADMIN__TOKEN"] {
            assert!(!not_a_setting(name), "{name}");
        }
    }

    #[test]
    fn secrets_are_redacted_and_nothing_else() {
        let config = serde_json::json!({
            "listen": "127.0.0.1:1",
            "admin": {"token": "hunter2"},
            "sse": {"token_secret": "", "token_ttl_secs": 600},
            "database": {"url": "postgres://onceflow:pw@db:5432/x?sslmode=require"},
            "kafka": {"consumer": {"sasl.password": "p", "sasl.username": "u"}},
            "tenants": [{"tenant": "dev", "api_key_sha256": "abc"}],
            "webhooks": {"secrets": {"dev": ["whsec_a", "whsec_b"]}},
        });
        let redacted = redacted(&config).unwrap();
        assert_eq!(redacted["admin"]["token"], REDACTED);
        assert_eq!(redacted["sse"]["token_secret"], "", "empty is shown as empty");
        assert_eq!(redacted["sse"]["token_ttl_secs"], 600);
        assert_eq!(redacted["database"]["url"], "postgres://onceflow:<redacted>@db:5432/x?sslmode=require");
        assert_eq!(redacted["kafka"]["consumer"]["sasl.password"], REDACTED);
        assert_eq!(redacted["kafka"]["consumer"]["sasl.username"], "u");
        assert_eq!(redacted["webhooks"]["secrets"]["dev"], serde_json::json!([REDACTED, REDACTED]));
        assert_eq!(redacted["tenants"][0]["api_key_sha256"], "abc", "a digest is no secret");
        assert_eq!(redacted["listen"], "127.0.0.1:1");
    }

    #[test]
    fn secrets_in_urls_query_parameters_and_kafka_properties_are_redacted() {
        let config = serde_json::json!({
            "database": {"url": "postgres://db/x?user=onceflow&password=pw&sslmode=require"},
            "telemetry": {"otlp_endpoint": "https://otel:collector-pw@collector.example:4318/v1/traces"},
            "http": {"proxy": "http://proxy-user:proxy-pw@proxy:3128?api_key=k#frag"},
            "kafka": {"client": {
                "ssl.key.pem": "-----BEGIN PRIVATE KEY-----",
                "sasl.oauthbearer.client.secret": "s",
                "sasl.oauthbearer.config": "principal=admin extension_secret=x",
                "ssl.certificate.pem": "-----BEGIN CERTIFICATE-----",
            }},
        });
        let redacted = redacted(&config).unwrap();
        assert_eq!(redacted["database"]["url"], "postgres://db/x?user=onceflow&password=<redacted>&sslmode=require");
        assert_eq!(redacted["telemetry"]["otlp_endpoint"], "https://otel:<redacted>@collector.example:4318/v1/traces");
        assert_eq!(redacted["http"]["proxy"], "http://proxy-user:<redacted>@proxy:3128?api_key=<redacted>#frag");
        for property in ["ssl.key.pem", "sasl.oauthbearer.client.secret", "sasl.oauthbearer.config"] {
            assert_eq!(redacted["kafka"]["client"][property], REDACTED, "{property}");
        }
        assert_eq!(redacted["kafka"]["client"]["ssl.certificate.pem"], "-----BEGIN CERTIFICATE-----");
    }
}
