//! Logs and traces. Every service calls [`init`] once at start.
//!
//! Logs are `tracing` events, formatted as JSON lines (or pretty for people)
//! with the fields of every enclosing span, which is how each line of a
//! command's work carries its `correlation_id`: the span opened for the command
//! records it, and every event inside inherits it. Spans are also OpenTelemetry
//! spans, exported over OTLP/HTTP when an endpoint is configured, and their
//! context crosses Kafka as a W3C `traceparent` header ([`current_trace_context`],
//! [`set_parent_from`], [`consumer_span!`](crate::consumer_span)).
//!
//! The trace pipeline follows OpenTelemetry's standard environment, as any
//! OpenTelemetry SDK does:
//!
//! - export is on when `telemetry.otlp_endpoint` is set (it wins, taken as the
//!   full traces URL), or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` (likewise), or
//!   `OTEL_EXPORTER_OTLP_ENDPOINT` (the collector's base URL, `/v1/traces`
//!   appended); `OTEL_EXPORTER_OTLP_HEADERS` and `_TIMEOUT` apply as the
//!   exporter reads them;
//! - the batch processor reads `OTEL_BSP_SCHEDULE_DELAY`,
//!   `OTEL_BSP_MAX_QUEUE_SIZE` (spans beyond a full queue are dropped, never
//!   waited for), `OTEL_BSP_MAX_EXPORT_BATCH_SIZE` and `OTEL_BSP_EXPORT_TIMEOUT`;
//! - the resource: `service.name` (the binary's name unless `OTEL_SERVICE_NAME`
//!   or `OTEL_RESOURCE_ATTRIBUTES` names one), `service.version` (the crate's
//!   version) and `service.instance.id` (a UUID per process), each unless
//!   `OTEL_RESOURCE_ATTRIBUTES` sets it, plus every other attribute given there.

use std::collections::HashMap;

use opentelemetry::{Key, KeyValue, global, trace::TracerProvider as _};
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::{
    Resource,
    propagation::TraceContextPropagator,
    resource::{EnvResourceDetector, ResourceDetector as _},
    trace::SdkTracerProvider,
};
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use tracing_subscriber::{
    EnvFilter, Layer as _, filter::LevelFilter, layer::SubscriberExt as _, util::SubscriberInitExt as _,
};

use crate::{
    Error, Result,
    config::{LogFormat, TelemetryConfig},
};

/// Flushes and shuts the trace pipeline down when dropped.
#[derive(Debug)]
pub struct TelemetryGuard {
    provider: SdkTracerProvider,
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        // Nothing useful can be done if the final flush fails at exit.
        let _ = self.provider.shutdown();
    }
}

/// The variables that alone turn trace export on (see the module docs).
const OTLP_ENDPOINT_VARIABLES: [&str; 2] = ["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT"];

/// Install the global subscriber, tracer provider and propagator.
///
/// A second call in one process (tests start several services) keeps the first
/// subscriber and returns a guard of its own.
pub fn init(service_name: &'static str, config: &TelemetryConfig) -> Result<TelemetryGuard> {
    install_tls_provider();
    let mut builder = SdkTracerProvider::builder().with_resource(resource(service_name));
    let endpoint = export_endpoint(config, |name| std::env::var(name).ok());
    let exporting = endpoint.is_some();
    if let Some(endpoint) = endpoint {
        // The batch processor reads the OTEL_BSP_* variables itself.
        builder = builder.with_batch_exporter(span_exporter(endpoint)?);
    }
    let provider = builder.build();
    global::set_text_map_propagator(TraceContextPropagator::new());
    global::set_tracer_provider(provider.clone());

    let log_filter = || {
        EnvFilter::try_from_default_env()
            .or_else(|_| EnvFilter::try_new(&config.log_filter))
            .map_err(|e| Error::Telemetry(format!("log filter `{}`: {e}", config.log_filter)))
    };
    let fmt = match config.log_format {
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_current_span(true)
            .with_span_list(true)
            .fmt_fields(crate::log_fields::AppendingJsonFields)
            .boxed(),
        LogFormat::Pretty => tracing_subscriber::fmt::layer().boxed(),
    };
    // The log filter applies to log output only: spans stay recorded for
    // tracing whatever the log level, or a quiet `warn` filter would cut the
    // trace context that travels in Kafka headers.
    let otel = tracing_opentelemetry::layer().with_tracer(provider.tracer(service_name)).with_filter(TRACED);
    let fresh = FreshFilterState { logs: log_filter()? };
    // Already initialised in this process: keep the first subscriber.
    if tracing_subscriber::registry().with(fmt.with_filter(log_filter()?)).with(otel).with(fresh).try_init().is_ok() {
        EXPORTING.store(exporting, std::sync::atomic::Ordering::Relaxed);
    }
    Ok(TelemetryGuard { provider })
}

/// Whether the process's spans go anywhere (see [`exporting`]).
static EXPORTING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether this process exports its spans. Every span still carries a trace
/// context (answers and Kafka records name it), so most spans are made
/// whatever this says; a leaf span made per delivery, which nothing but an
/// exporter would ever read, is made only when this is true.
pub fn exporting() -> bool {
    EXPORTING.load(std::sync::atomic::Ordering::Relaxed)
}

/// The OTLP/HTTP exporter to `endpoint` (`None`: the one the standard
/// variables name, which the exporter reads itself); `http` and `https` URLs.
fn span_exporter(endpoint: Option<&str>) -> Result<opentelemetry_otlp::SpanExporter> {
    let mut exporter = opentelemetry_otlp::SpanExporter::builder().with_http();
    if let Some(endpoint) = endpoint {
        exporter = exporter.with_endpoint(endpoint);
    }
    exporter.build().map_err(|e| Error::Telemetry(e.to_string()))
}

/// The TLS provider of the process's rustls clients: the OTLP exporter's
/// (its reqwest is built with `rustls-no-provider`, see the workspace
/// `Cargo.toml`) takes the installed default. Installing it twice is harmless.
fn install_tls_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// What the OpenTelemetry layer records.
const TRACED: LevelFilter = LevelFilter::INFO;

/// Works around tokio-rs/tracing#2519: per-layer filters hand their verdict
/// to the layers through thread-local state that only a call to `enabled`
/// refreshes, and a callsite whose interest is cached as "always" skips that
/// call. A `log` record (sqlx, rdkafka) that asks `enabled` and is not
/// dispatched leaves a stale verdict behind, and the next such event or span
/// of the thread is dropped: with a log filter above `info` for some target,
/// log lines went missing. This outermost layer makes the interest of every
/// callsite some filter wants "sometimes", so `enabled` runs, and refreshes
/// the verdicts, before each event and span; callsites no filter wants stay
/// "never" and cost nothing.
struct FreshFilterState {
    /// A copy of the log filter, to know which callsites it wants.
    logs: EnvFilter,
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for FreshFilterState {
    fn register_callsite(&self, metadata: &'static tracing::Metadata<'static>) -> tracing::subscriber::Interest {
        let logged = !tracing_subscriber::layer::Filter::<S>::callsite_enabled(&self.logs, metadata).is_never();
        if logged || metadata.level() <= &TRACED {
            tracing::subscriber::Interest::sometimes()
        } else {
            tracing::subscriber::Interest::never()
        }
    }

    fn max_level_hint(&self) -> Option<LevelFilter> {
        let logs = tracing_subscriber::layer::Filter::<S>::max_level_hint(&self.logs)?;
        Some(logs.max(TRACED))
    }
}

/// Whether to export spans, and where: `Some(Some(url))` for the configured
/// endpoint, `Some(None)` for the one the standard variables (read by `env`)
/// name, `None` to export nothing.
fn export_endpoint(config: &TelemetryConfig, env: impl Fn(&str) -> Option<String>) -> Option<Option<&str>> {
    let configured = config.otlp_endpoint.as_deref().filter(|url| !url.trim().is_empty());
    if configured.is_some() {
        return Some(configured);
    }
    OTLP_ENDPOINT_VARIABLES.iter().any(|name| env(name).is_some_and(|value| !value.trim().is_empty())).then_some(None)
}

/// The resource every span of this process carries: the SDK's detectors
/// (`OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`, `telemetry.sdk.*`), with
/// onceflow's defaults for what they leave unset.
fn resource(service_name: &'static str) -> Resource {
    let from_environment = EnvResourceDetector::new().detect();
    let named_by_environment = std::env::var("OTEL_SERVICE_NAME").is_ok_and(|name| !name.is_empty())
        || from_environment.get(&Key::from_static_str("service.name")).is_some();
    let defaults = [
        (!named_by_environment).then(|| KeyValue::new("service.name", service_name)),
        Some(KeyValue::new("service.version", env!("CARGO_PKG_VERSION"))),
        Some(KeyValue::new("service.instance.id", uuid::Uuid::new_v4().to_string())),
    ];
    let unset = defaults.into_iter().flatten().filter(|default| from_environment.get(&default.key).is_none());
    Resource::builder().with_attributes(unset).build()
}

/// The W3C `traceparent` (and `tracestate`) of the current span, to put on an
/// outgoing message.
pub fn current_trace_context() -> (Option<String>, Option<String>) {
    trace_context_of(&tracing::Span::current())
}

/// The W3C `traceparent` (and `tracestate`) naming `span`, to put on an
/// outgoing message whose receivers become its children.
pub fn trace_context_of(span: &tracing::Span) -> (Option<String>, Option<String>) {
    let context = span.context();
    let mut carrier = HashMap::new();
    global::get_text_map_propagator(|propagator| propagator.inject_context(&context, &mut carrier));
    (carrier.remove("traceparent"), carrier.remove("tracestate").filter(|s| !s.is_empty()))
}

/// Make `span` a child of the trace named by an incoming `traceparent`.
pub fn set_parent_from(span: &tracing::Span, traceparent: Option<&str>, tracestate: Option<&str>) {
    let Some(traceparent) = traceparent else { return };
    let mut carrier = HashMap::new();
    carrier.insert("traceparent".to_owned(), traceparent.to_owned());
    if let Some(state) = tracestate {
        carrier.insert("tracestate".to_owned(), state.to_owned());
    }
    let parent = global::get_text_map_propagator(|propagator| propagator.extract(&carrier));
    // A malformed traceparent just starts a new trace.
    let _ = span.set_parent(parent);
}

/// What [`consumer_span!`](crate::consumer_span) names, so its callers need
/// no imports of their own.
#[doc(hidden)]
pub mod macro_support {
    pub use onceflow_contracts::Envelope;
    pub use rdkafka::Message;
    pub use tracing;
}

/// The span of one Kafka record's processing: OpenTelemetry's CONSUMER span
/// of the messaging conventions (`process <topic>`), a child of the trace the
/// record's envelope carries, with the envelope's `correlation_id` (so every
/// log line inside carries it) and any further fields given.
///
/// `consumer_span!("store_result", &message, &envelope, job_id = %id)`, where
/// `message` is an `rdkafka` message and `envelope` its
/// [`onceflow_contracts::Envelope`].
#[macro_export]
macro_rules! consumer_span {
    ($name:literal, $message:expr, $envelope:expr $(, $($fields:tt)*)?) => {{
        use $crate::telemetry::macro_support::{Envelope, Message as _, tracing};
        let message = $message;
        let envelope: &Envelope = $envelope;
        let topic = message.topic();
        let span = tracing::info_span!(
            $name,
            otel.kind = "consumer",
            otel.name = %format!("process {topic}"),
            messaging.system = "kafka",
            messaging.operation.type = "process",
            messaging.operation.name = "process",
            messaging.destination.name = %topic,
            messaging.destination.partition.id = %message.partition(),
            messaging.kafka.offset = message.offset(),
            messaging.message.id = %envelope.message_id,
            correlation_id = %envelope.correlation_id,
            $($($fields)*)?
        );
        $crate::telemetry::set_parent_from(&span, envelope.traceparent.as_deref(), envelope.tracestate.as_deref());
        span
    }};
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(otlp_endpoint: Option<&str>) -> TelemetryConfig {
        TelemetryConfig {
            log_format: LogFormat::Json,
            log_filter: "info".to_owned(),
            otlp_endpoint: otlp_endpoint.map(str::to_owned),
        }
    }

    /// An environment holding just `set`.
    fn variables<'a>(set: &'a [(&str, &str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |name| set.iter().find(|(key, _)| *key == name).map(|(_, value)| (*value).to_owned())
    }

    #[test]
    fn the_configured_endpoint_wins_and_a_standard_variable_alone_turns_export_on() {
        let collector = [("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318")];
        let configured = config(Some("http://jaeger:4318/v1/traces"));
        assert_eq!(export_endpoint(&configured, variables(&collector)), Some(Some("http://jaeger:4318/v1/traces")));
        assert_eq!(export_endpoint(&config(None), variables(&collector)), Some(None));
        let traces_only = [("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://collector:4318/v1/traces")];
        assert_eq!(export_endpoint(&config(None), variables(&traces_only)), Some(None));
        assert_eq!(export_endpoint(&config(None), variables(&[])), None, "nothing set: no export");
        let blank = [("OTEL_EXPORTER_OTLP_ENDPOINT", " ")];
        assert_eq!(export_endpoint(&config(Some("")), variables(&blank)), None, "blank values count as unset");
    }

    /// An `https` collector is reached over TLS: the first bytes the exporter
    /// sends are a TLS handshake record (0x16), not an HTTP request and not
    /// nothing (a build without TLS refuses the scheme without connecting).
    #[test]
    fn an_https_endpoint_is_exported_to_over_tls() {
        use std::io::Read as _;

        use opentelemetry::trace::{Span as _, Tracer as _};

        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let (first_bytes, received) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            let mut first = [0_u8; 3];
            stream.read_exact(&mut first).unwrap();
            let _ = first_bytes.send(first);
        });
        install_tls_provider();
        let exporter = span_exporter(Some(&format!("https://127.0.0.1:{port}/v1/traces"))).unwrap();
        let provider = SdkTracerProvider::builder().with_simple_exporter(exporter).build();
        // Ends (and exports) at once; the export itself fails, as no TLS server answers.
        provider.tracer("probe").start("probe").end();
        let first = received.recv_timeout(std::time::Duration::from_secs(10)).expect("the exporter connected");
        assert_eq!(first[0], 0x16, "a TLS handshake record, got {first:?}");
        assert_eq!(first[1], 0x03, "TLS record version 3.x, got {first:?}");
    }
}
