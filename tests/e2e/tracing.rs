//! One command, followed as an operator would: the three service binaries run
//! as processes and export their spans over OTLP/HTTP to a receiver of the
//! test (decoding the real protobuf), and log JSON lines to files.
//!
//! - The command's trace is one trace holding spans of all three services:
//!   the client's `traceparent` is continued by ingest's SERVER span, whose
//!   context the `202` answers; each publish is a PRODUCER span and each
//!   consumption a CONSUMER span, a child of the publish it consumed; the
//!   SSE send of the result is in it too. The span tree is printed.
//! - A webhook attempt is a CLIENT span of that trace, and the receiver gets
//!   its `traceparent`.
//! - Every JSON log line of the command's work, in every service, carries
//!   the command's correlation id.

use std::{collections::BTreeSet, time::Duration};

use onceflow_tests::{
    ApiResponse, DEV_API_KEY, IngestClient, OUTCOME_TIMEOUT, OtlpReceiver, ProcessStack, ReceivedSpan, SseClient,
    TestEnv, eventually, span_tree,
};
use serde_json::{Value, json};

/// Debug for onceflow's own crates, so the steps that log only at debug (the
/// projection, the notifier's store) are checked too.
const LOG_FILTER: &str = "info,sqlx::postgres::notice=warn,onceflow_ingest=debug,onceflow_processor=debug,\
                          onceflow_notifier=debug,onceflow_outbox=debug,onceflow_runtime=debug";

/// How long spans may take to reach the receiver once the work is done: the
/// batch delay is 100 ms, the rest is slack for a loaded machine.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(60);

/// What the client saw of its command.
struct Ran {
    job_id: String,
    correlation_id: String,
    /// The trace the client started, and its own span in it.
    client_trace_id: String,
    client_span_id: String,
    /// The `traceparent` of the `202`.
    answered_traceparent: String,
    /// The ids of the command's result events (from the SSE stream).
    event_ids: Vec<String>,
}

/// The variables of each service: its log filter, and, with a receiver,
/// export to it with a short batch delay. Ingest and the processor are
/// pointed at it by `OTEL_EXPORTER_OTLP_ENDPOINT` alone, the notifier by its
/// configuration key: both ways must work.
fn service_env(receiver: Option<&OtlpReceiver>) -> impl Fn(&str) -> Vec<(&'static str, String)> {
    let endpoints = receiver.map(|receiver| (receiver.base_url(), receiver.traces_url()));
    move |service| {
        // RUST_LOG too, because it wins over the configuration if inherited.
        let mut env =
            vec![("ONCEFLOW_TELEMETRY__LOG_FILTER", LOG_FILTER.to_owned()), ("RUST_LOG", LOG_FILTER.to_owned())];
        if let Some((base, traces)) = &endpoints {
            env.push(("OTEL_BSP_SCHEDULE_DELAY", "100".to_owned()));
            if service == "onceflow-notifier" {
                env.push(("ONCEFLOW_TELEMETRY__OTLP_ENDPOINT", traces.clone()));
            } else {
                env.push(("OTEL_EXPORTER_OTLP_ENDPOINT", base.clone()));
            }
        }
        env
    }
}

/// Submit `body` under `key` as part of the client's trace `traceparent`.
async fn submit_in_trace(api: &IngestClient, key: &str, body: &Value, traceparent: &str) -> ApiResponse {
    api.submit_raw(|request| {
        request.bearer_auth(DEV_API_KEY).header("idempotency-key", key).header("traceparent", traceparent).json(body)
    })
    .await
}

/// Submit one account opening in a trace of the client's own, follow it on
/// the notifier's job stream to its terminal event, and until ingest reports
/// it `succeeded`.
async fn run_one_command(stack: &ProcessStack) -> Ran {
    let client_trace_id = uuid::Uuid::new_v4().simple().to_string();
    let client_span_id = uuid::Uuid::new_v4().simple().to_string()[..16].to_owned();
    let account = format!("traced-{}", uuid::Uuid::new_v4().simple());
    let body = json!({"type": "ledger.open_account", "payload": {"account_id": account, "currency": "EUR"}});
    let api = IngestClient::at(&format!("http://{}", stack.ingest), DEV_API_KEY);
    let accepted = submit_in_trace(&api, &account, &body, &format!("00-{client_trace_id}-{client_span_id}-01")).await;
    assert_eq!(accepted.status, 202, "{}", String::from_utf8_lossy(&accepted.body));
    let answered_traceparent = accepted.header("traceparent").expect("the 202 carries a traceparent").to_owned();
    let job_id = accepted.json()["job_id"].as_str().expect("job id").to_owned();
    let correlation_id = accepted.json()["correlation_id"].as_str().expect("correlation id").to_owned();

    let mut stream = SseClient::connect(&format!("http://{}/v1/jobs/{job_id}/events", stack.notifier), None).await;
    let mut event_ids = Vec::new();
    loop {
        let event = stream.next_event(OUTCOME_TIMEOUT).await.expect("the job's events");
        let data: Value = serde_json::from_str(&event.data).expect("event JSON");
        event_ids.push(data["event_id"].as_str().expect("event id").to_owned());
        if event.event == "job.succeeded" {
            break;
        }
        assert_eq!(event.event, "job.processing", "{}", event.data);
    }
    eventually("ingest to report the job succeeded", OUTCOME_TIMEOUT, || async {
        (api.job(&job_id).await.json()["status"] == "succeeded").then_some(())
    })
    .await;
    Ran { job_id, correlation_id, client_trace_id, client_span_id, answered_traceparent, event_ids }
}

fn find(spans: &[ReceivedSpan], wanted: impl Fn(&ReceivedSpan) -> bool) -> Vec<&ReceivedSpan> {
    spans.iter().filter(|span| wanted(span)).collect()
}

/// The spans of the command's work, once every one the test expects has
/// arrived: ingest's SERVER span, the two publishes (command, result), the
/// three consumptions (processor, ingest's projection, the notifier's store)
/// and the SSE send.
fn complete(spans: &[ReceivedSpan]) -> bool {
    let count = |kind: &str| find(spans, |span| span.kind == kind).len();
    count("SERVER") >= 1
        && count("PRODUCER") >= 2
        && count("CONSUMER") >= 3
        && spans.iter().any(|span| span.service == "onceflow-notifier" && span.name == "sse send")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_command_is_one_trace_through_all_three_services() {
    let mut env = TestEnv::new();
    let receiver = OtlpReceiver::start().await;
    let mut stack = env.spawn_stack(service_env(Some(&receiver))).await;
    let topics = env.kafka.topics();
    let ran = run_one_command(&stack).await;

    let spans = eventually("the command's spans to be exported", EXPORT_TIMEOUT, || async {
        let spans = receiver.trace(&ran.client_trace_id);
        complete(&spans).then_some(spans)
    })
    .await;
    eprintln!("the trace of job {} ({} spans):\n{}", ran.job_id, spans.len(), span_tree(&spans));

    // One trace, all three services, each span with its resource.
    let services: BTreeSet<&str> = spans.iter().map(|span| span.service.as_str()).collect();
    assert_eq!(services, BTreeSet::from(ProcessStack::SERVICES));
    for span in &spans {
        assert_eq!(span.resource.get("service.version").map(String::as_str), Some(env!("CARGO_PKG_VERSION")));
        let instance = span.resource.get("service.instance.id").expect("service.instance.id");
        assert!(uuid::Uuid::parse_str(instance).is_ok(), "service.instance.id {instance}");
    }

    // Ingest's SERVER span continues the client's trace, with the HTTP
    // conventions' attributes, and is what the 202's traceparent names.
    let server = find(&spans, |span| span.kind == "SERVER");
    assert_eq!(server.len(), 1, "only the POST is in the command's trace");
    let server = server[0];
    assert_eq!(server.service, "onceflow-ingest");
    assert_eq!(server.parent_span_id.as_deref(), Some(ran.client_span_id.as_str()), "the client's span is the parent");
    assert_eq!(server.name, "POST /v1/commands");
    assert_eq!(server.attribute("http.request.method"), Some("POST"));
    assert_eq!(server.attribute("http.route"), Some("/v1/commands"));
    assert_eq!(server.attribute("http.response.status_code"), Some("202"));
    let answered: Vec<&str> = ran.answered_traceparent.split('-').collect();
    assert_eq!(answered.len(), 4, "traceparent {}", ran.answered_traceparent);
    assert_eq!(answered[1], ran.client_trace_id, "the 202 names the command's trace");
    assert_eq!(answered[2], server.span_id, "the 202 names ingest's server span");

    // Each publish: a PRODUCER span of the messaging conventions, acknowledged.
    let produced = |service: &str, topic: &str| {
        let found = find(&spans, |span| {
            span.kind == "PRODUCER"
                && span.service == service
                && span.attribute("messaging.destination.name") == Some(topic)
        });
        assert_eq!(found.len(), 1, "one publish by {service} to {topic}:\n{}", span_tree(&spans));
        let span = found[0];
        assert_eq!(span.attribute("messaging.system"), Some("kafka"));
        assert_eq!(span.attribute("messaging.operation.type"), Some("send"));
        assert_eq!(span.name, format!("send {topic}"));
        assert!(span.attribute("messaging.message.id").is_some(), "{span:?}");
        assert!(span.attribute("messaging.destination.partition.id").is_some(), "acknowledged: {span:?}");
        assert!(span.attribute("messaging.kafka.offset").is_some(), "acknowledged: {span:?}");
        assert_eq!(span.attribute("correlation_id"), Some(ran.correlation_id.as_str()));
        span
    };
    let command_published = produced("onceflow-ingest", &topics.commands);
    let result_published = produced("onceflow-processor", &topics.results);
    assert_eq!(command_published.attribute("messaging.message.id"), Some(ran.job_id.as_str()));

    // Each consumption: a CONSUMER span, the child of the publish it consumed.
    let consumed = |service: &str, publish: &ReceivedSpan| {
        let topic = publish.attribute("messaging.destination.name").expect("destination");
        let found = find(&spans, |span| span.kind == "CONSUMER" && span.service == service);
        assert_eq!(found.len(), 1, "one consumption by {service}:\n{}", span_tree(&spans));
        let span = found[0];
        assert_eq!(span.parent_span_id.as_deref(), Some(publish.span_id.as_str()), "{service} continues the publish");
        assert_eq!(span.attribute("messaging.system"), Some("kafka"));
        assert_eq!(span.attribute("messaging.destination.name"), Some(topic));
        assert_eq!(span.attribute("messaging.operation.type"), Some("process"));
        assert_eq!(span.attribute("messaging.message.id"), publish.attribute("messaging.message.id"));
        assert_eq!(span.attribute("correlation_id"), Some(ran.correlation_id.as_str()));
        span
    };
    let processed = consumed("onceflow-processor", command_published);
    assert_eq!(result_published.parent_span_id.as_deref(), Some(processed.span_id.as_str()), "the result's publish");
    let stored = consumed("onceflow-notifier", result_published);
    let projected = find(&spans, |span| span.kind == "CONSUMER" && span.service == "onceflow-ingest");
    assert_eq!(projected.len(), 1, "ingest's projection");
    assert_eq!(projected[0].parent_span_id.as_deref(), Some(result_published.span_id.as_str()));

    // The SSE stream's send of the result, under the notifier's store step.
    let sent = find(&spans, |span| span.name == "sse send");
    assert!(!sent.is_empty());
    for span in sent {
        assert_eq!(span.parent_span_id.as_deref(), Some(stored.span_id.as_str()), "{span:?}");
        assert_eq!(span.attribute("job_id"), Some(ran.job_id.as_str()));
    }

    // Probes are not traced: nothing to answer.
    let probe = reqwest::get(format!("http://{}/livez", stack.ingest)).await.expect("livez");
    assert!(probe.headers().get("traceparent").is_none(), "{:?}", probe.headers());

    stack.assert_alive();
    drop(stack);
    env.teardown().await;
}

/// Whether `value` (a JSON log line or part of it) has a `correlation_id`
/// field equal to `wanted`, at any depth (the event's own fields, the current
/// span's, any enclosing span's).
fn carries(value: &Value, wanted: &str) -> bool {
    match value {
        Value::Object(fields) => {
            fields.iter().any(|(key, value)| (key == "correlation_id" && value == wanted) || carries(value, wanted))
        }
        Value::Array(items) => items.iter().any(|item| carries(item, wanted)),
        _ => false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_log_line_of_a_commands_work_carries_its_correlation_id() {
    let mut env = TestEnv::new();
    let mut stack = env.spawn_stack(service_env(None)).await;
    let ran = run_one_command(&stack).await;

    let mut ids = vec![ran.job_id.clone()];
    ids.extend(ran.event_ids.iter().cloned());
    for service in ProcessStack::SERVICES {
        let lines = stack.log_lines(service);
        let mut naming = 0;
        for line in &lines {
            let Ok(json) = serde_json::from_str::<Value>(line) else { continue };
            if ids.iter().any(|id| line.contains(id.as_str())) {
                naming += 1;
                assert!(
                    carries(&json, &ran.correlation_id),
                    "{service} logged a line of job {} without its correlation id {}:\n{line}",
                    ran.job_id,
                    ran.correlation_id
                );
            }
        }
        assert!(naming > 0, "{service} logged nothing of job {}; see {}", ran.job_id, stack.log(service).display());
        eprintln!("{service}: {naming} log lines of job {}, each with its correlation id", ran.job_id);
    }

    stack.assert_alive();
    drop(stack);
    env.teardown().await;
}

/// A webhook attempt is a CLIENT span of the command's trace, and the POST
/// carries its `traceparent`, so the receiver can continue the trace.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_webhook_attempt_is_a_client_span_whose_traceparent_the_receiver_gets() {
    let mut env = TestEnv::new();
    let receiver = OtlpReceiver::start().await;
    let webhooks = onceflow_tests::WebhookReceiver::start().await;
    let exporting = service_env(Some(&receiver));
    let mut stack = env
        .spawn_stack(move |service| {
            let mut vars = exporting(service);
            // The test's receiver listens on loopback, which SSRF protection refuses unless allowed.
            vars.push(("ONCEFLOW_WEBHOOKS__ALLOWLIST", r#"["127.0.0.1"]"#.to_owned()));
            vars
        })
        .await;
    let trace_id = uuid::Uuid::new_v4().simple().to_string();
    let account = format!("hooked-{}", uuid::Uuid::new_v4().simple());
    let body = json!({
        "type": "ledger.open_account",
        "payload": {"account_id": account, "currency": "EUR"},
        "callback_url": webhooks.url("/hook"),
    });
    let api = IngestClient::at(&format!("http://{}", stack.ingest), DEV_API_KEY);
    let accepted = submit_in_trace(&api, &account, &body, &format!("00-{trace_id}-{}-01", &trace_id[..16])).await;
    assert_eq!(accepted.status, 202, "{}", String::from_utf8_lossy(&accepted.body));

    let delivered = webhooks.wait_for(1, OUTCOME_TIMEOUT).await;
    let traceparent = delivered[0].header("traceparent").to_owned();
    let parts: Vec<&str> = traceparent.split('-').collect();
    assert_eq!(parts.len(), 4, "the webhook carries a traceparent: {traceparent:?}");
    assert_eq!(parts[1], trace_id, "the webhook continues the command's trace");

    let spans = eventually("the webhook's CLIENT span to be exported", EXPORT_TIMEOUT, || async {
        let spans = receiver.trace(&trace_id);
        spans.iter().any(|span| span.kind == "CLIENT").then_some(spans)
    })
    .await;
    let client = find(&spans, |span| span.kind == "CLIENT");
    assert_eq!(client.len(), 1, "one attempt:\n{}", span_tree(&spans));
    let client = client[0];
    assert_eq!(client.service, "onceflow-notifier");
    assert_eq!(client.name, "POST");
    assert_eq!(client.attribute("http.request.method"), Some("POST"));
    assert_eq!(client.attribute("http.response.status_code"), Some("200"), "{client:?}");
    assert_eq!(parts[2], client.span_id, "the receiver's parent is the attempt's span");
    stack.assert_alive();
    drop(stack);
    env.teardown().await;
}
