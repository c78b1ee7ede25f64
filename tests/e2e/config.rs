//! Configuration as an operator meets it, through the built binaries: a
//! misspelt setting stops a service at start with its name, another
//! service's setting in a shared environment does not, and `config` prints
//! the effective configuration with its secrets redacted.

use std::collections::BTreeSet;

use onceflow_runtime::{
    config::{self, SERVICE_SETTINGS},
    probe_records::ProbeRecords,
};
use onceflow_tests::{ProcessStack, ServiceProcess};
use serde_json::Value;

/// Run `onceflow-<service> config` with exactly the `ONCEFLOW_*` variables in `env`.
fn print_config(service: &str, env: &[(&str, &str)]) -> std::process::Output {
    ServiceProcess::command(service).arg("config").envs(env.iter().copied()).output().expect("the binary runs")
}

/// The top-level keys of a configuration, serialized.
fn top_level(config: serde_json::Result<Value>) -> BTreeSet<String> {
    config.expect("a configuration serializes").as_object().expect("an object").keys().cloned().collect()
}

#[test]
fn the_shared_list_names_every_top_level_setting_of_every_service() {
    let ingest: onceflow_ingest::IngestConfig = config::load(onceflow_ingest::config::DEFAULTS, None).unwrap();
    let processor: onceflow_processor::ProcessorConfig =
        config::load(onceflow_processor::config::DEFAULTS, None).unwrap();
    let notifier: onceflow_notifier::NotifierConfig = config::load(onceflow_notifier::config::DEFAULTS, None).unwrap();
    let every: BTreeSet<String> =
        [serde_json::to_value(ingest), serde_json::to_value(processor), serde_json::to_value(notifier)]
            .into_iter()
            .flat_map(top_level)
            .collect();
    let listed: BTreeSet<String> = SERVICE_SETTINGS.iter().map(|s| (*s).to_owned()).collect();
    assert_eq!(listed, every, "onceflow_runtime::config::SERVICE_SETTINGS is out of date");
}

/// Each service's defaults file documents `[probe_records]`, with the
/// values the code falls back to when a file leaves them out.
#[test]
fn every_defaults_file_documents_the_probe_records_as_the_code_defaults_them() {
    for (service, defaults) in [
        ("ingest", onceflow_ingest::config::DEFAULTS),
        ("processor", onceflow_processor::config::DEFAULTS),
        ("notifier", onceflow_notifier::config::DEFAULTS),
    ] {
        let file: Value = config::load(defaults, None).expect("the defaults load");
        let keys = file["probe_records"].as_object().map(serde_json::Map::len);
        assert_eq!(keys, Some(4), "{service} documents every key of [probe_records]");
        let documented: ProbeRecords = serde_json::from_value(file["probe_records"].clone())
            .unwrap_or_else(|e| panic!("{service} documents [probe_records]: {e}"));
        assert_eq!(documented, ProbeRecords::default(), "{service}");
    }
}

#[test]
fn a_misspelt_variable_stops_every_service_with_its_name() {
    for service in ProcessStack::SERVICES {
        for misspelt in ["ONCEFLOW_KAFKA__BROKER", "ONCEFLOW_LISEN", "ONCEFLOW_DATABASE__MAX_CONECTIONS"] {
            let output = print_config(service, &[(misspelt, "1")]);
            let stderr = String::from_utf8_lossy(&output.stderr);
            assert!(!output.status.success(), "{service} started with {misspelt}");
            assert!(stderr.contains(misspelt), "{service} does not name {misspelt}: {stderr}");
            assert!(output.stdout.is_empty(), "{service} printed a configuration");
        }
        // Settings of another service, and the tools' variables, are not misspelt.
        let output = print_config(
            service,
            &[("ONCEFLOW_LANES", "3"), ("ONCEFLOW_SSE__BUFFER", "7"), ("ONCEFLOW_TEST_ANYTHING", "x")],
        );
        assert!(output.status.success(), "{service}: {}", String::from_utf8_lossy(&output.stderr));
    }
}

#[test]
fn config_prints_the_effective_configuration_with_secrets_redacted() {
    let output = print_config(
        "onceflow-notifier",
        &[
            ("ONCEFLOW_ADMIN__TOKEN", "admin-hunter2-admin-hunter2"),
            ("ONCEFLOW_SSE__TOKEN_SECRET", "stream-hunter2-stream-hunter2-stream-hunter2"),
            ("ONCEFLOW_DATABASE__URL", "postgres://onceflow:db-hunter2@db.internal:5432/notifier?sslmode=require"),
            ("ONCEFLOW_SSE__BUFFER", "77"),
        ],
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert!(!stdout.contains("hunter2"), "a secret is printed: {stdout}");
    let printed: Value = serde_json::from_str(&stdout).expect("JSON");
    assert_eq!(printed["admin"]["token"], "<redacted>");
    assert_eq!(printed["sse"]["token_secret"], "<redacted>");
    assert_eq!(printed["database"]["url"], "postgres://onceflow:<redacted>@db.internal:5432/notifier?sslmode=require");
    assert_eq!(printed["sse"]["buffer"], 77, "the effective value, not the default");
}

/// A clean-up batch or interval of 0 would make its loop spin on the
/// database (a batch of 0 deletes nothing and never ends a round): refused
/// at start, naming the setting.
#[test]
fn a_clean_up_that_would_spin_is_refused_at_start() {
    for (service, variable) in [
        ("onceflow-ingest", "ONCEFLOW_SWEEP_BATCH"),
        ("onceflow-ingest", "ONCEFLOW_SWEEP_INTERVAL_SECS"),
        ("onceflow-notifier", "ONCEFLOW_SSE__PRUNE_BATCH"),
        ("onceflow-notifier", "ONCEFLOW_SSE__PRUNE_INTERVAL_SECS"),
    ] {
        let output = print_config(service, &[(variable, "0")]);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{service} started with {variable}=0");
        let setting = variable.trim_start_matches("ONCEFLOW_").replace("__", ".").to_lowercase();
        let name = setting.rsplit('.').next().unwrap_or(&setting);
        assert!(stderr.to_lowercase().contains(name), "{service} does not name {name}: {stderr}");
    }
}
