//! The metrics an operator reads, after real traffic through all three
//! services: RED per HTTP route, the processor's per-command durations,
//! consumer lag per partition and group, open SSE streams, database pool use
//! the outbox backlog and the webhook queue's depth, as real histograms, each metric with `# HELP`,
//! and no label holding a tenant, job or correlation id.

use std::collections::BTreeSet;

use onceflow_tests::{IngestClient, OUTCOME_TIMEOUT, SseClient, TestEnv, eventually};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_operators_metrics_appear_with_bounded_labels_after_traffic() {
    let mut env = TestEnv::new();
    let ingest = env.start_ingest().await;
    let processor = env.start_processor().await;
    let notifier = env.start_notifier().await;
    let api = IngestClient::new(&ingest);

    let open = json!({"type": "ledger.open_account", "payload": {"account_id": "metered", "currency": "EUR"}});
    let accepted = api.submit("metered-open", &open).await.json();
    let job_id = accepted["job_id"].as_str().expect("a job id").to_owned();
    let correlation_id = accepted["correlation_id"].as_str().expect("a correlation id").to_owned();
    let mut stream =
        SseClient::connect(&notifier.url(&format!("/v1/events?correlation_id={correlation_id}")), None).await;
    assert_eq!(stream.next_event(OUTCOME_TIMEOUT).await.expect("the outcome").event, "job.succeeded");
    eventually("the job to succeed", OUTCOME_TIMEOUT, || async {
        (api.job(&job_id).await.json()["status"] == "succeeded").then_some(())
    })
    .await;

    let processor_group = format!("processor-{}", env.id);
    let commands_topic = env.kafka.topics().commands;
    let wanted = [
        // RED of ingest's submit route, by template, method and status.
        r#"http_server_request_duration_seconds_bucket{http_route="/v1/commands",http_request_method="POST",http_response_status_code="202",le="0.005"}"#.to_owned(),
        r#"http_server_request_duration_seconds_bucket{http_route="/v1/jobs/{job_id}",http_request_method="GET",http_response_status_code="200",le="+Inf"}"#.to_owned(),
        r#"http_server_request_duration_seconds_count{http_route="/v1/events",http_request_method="GET",http_response_status_code="200"}"#.to_owned(),
        r#"onceflow_command_duration_seconds_bucket{type="ledger.open_account",outcome="succeeded",le="0.1"}"#.to_owned(),
        format!(r#"onceflow_kafka_consumer_lag_messages{{topic="{commands_topic}",partition="0",group="{processor_group}"}}"#),
        "onceflow_sse_connections ".to_owned(),
        r#"onceflow_db_pool_connections{state="in_use"}"#.to_owned(),
        "onceflow_outbox_backlog ".to_owned(),
        r#"onceflow_webhook_queue_depth{state="due"}"#.to_owned(),
    ];
    // The lag and pool watchers report every few seconds.
    let text = eventually("every metric to be reported", OUTCOME_TIMEOUT, || async {
        let text = reqwest::get(processor.url("/metrics")).await.ok()?.text().await.ok()?;
        wanted.iter().all(|line| text.contains(line.as_str())).then_some(text)
    })
    .await;

    // Every metric has its help and type; histograms are histograms.
    let declared = |prefix: &str| -> BTreeSet<String> {
        text.lines().filter_map(|line| line.strip_prefix(prefix)?.split(' ').next().map(str::to_owned)).collect()
    };
    let typed = declared("# TYPE ");
    let helped = declared("# HELP ");
    let undocumented: Vec<_> = typed.difference(&helped).collect();
    assert!(undocumented.is_empty(), "metrics without # HELP: {undocumented:?}");
    for histogram in ["http_server_request_duration_seconds", "onceflow_command_duration_seconds"] {
        assert!(text.contains(&format!("# TYPE {histogram} histogram")), "{histogram} is not a histogram");
    }
    // Bounded labels: no id a client chose, and no tenant.
    for id in [job_id.as_str(), correlation_id.as_str(), "tenant="] {
        assert!(!text.contains(id), "a label carries {id}");
    }
    drop(stream);
    env.teardown().await;
}

/// Every metric the code records is in the catalogue that gives it `# HELP`
/// (the test above sees only the metrics its traffic makes).
#[test]
fn every_metric_in_the_code_is_described() {
    let crates = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../crates");
    let mut sources = vec![crates];
    let mut undescribed = BTreeSet::new();
    while let Some(path) = sources.pop() {
        if path.is_dir() {
            sources.extend(std::fs::read_dir(&path).expect("a source directory").map(|e| e.expect("an entry").path()));
            continue;
        }
        if path.extension().is_none_or(|ext| ext != "rs") {
            continue;
        }
        let text = std::fs::read_to_string(&path).expect("a source file");
        for macro_call in ["metrics::counter!(", "metrics::gauge!(", "metrics::histogram!("] {
            for (at, _) in text.match_indices(macro_call) {
                let rest = text[at + macro_call.len()..].trim_start();
                // A literal name; a constant is checked where it is defined.
                let Some(literal) = rest.strip_prefix('"') else { continue };
                let name = literal.split('"').next().unwrap_or_default();
                if !onceflow_runtime::instruments::is_described(name) {
                    undescribed.insert(format!("{name} ({})", path.display()));
                }
            }
        }
    }
    assert!(undescribed.is_empty(), "metrics without a description in runtime::instruments: {undescribed:?}");
}
