//! Logs and traces. Every service calls [`init`] once at start.
//!
//! Logs are `tracing` events, formatted as JSON lines (or pretty for people)
//! with the fields of every enclosing span, which is how each line of a
//! command's work carries its `correlation_id`: the span opened for the command
//! records it, and every event inside inherits it. Spans are also OpenTelemetry
//! spans, exported over OTLP/HTTP when an endpoint is configured, and their
//! context crosses Kafka as a W3C `traceparent` header ([`current_traceparent`],
//! [`set_parent_from`]).

use std::collections::HashMap;

use opentelemetry::{global, trace::TracerProvider as _};
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::{Resource, propagation::TraceContextPropagator, trace::SdkTracerProvider};
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use tracing_subscriber::{EnvFilter, Layer as _, layer::SubscriberExt as _, util::SubscriberInitExt as _};

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

/// Install the global subscriber, tracer provider and propagator.
///
/// A second call in one process (tests start several services) keeps the first
/// subscriber and returns a guard of its own.
pub fn init(service_name: &'static str, config: &TelemetryConfig) -> Result<TelemetryGuard> {
    let mut builder =
        SdkTracerProvider::builder().with_resource(Resource::builder().with_service_name(service_name).build());
    if let Some(endpoint) = &config.otlp_endpoint {
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_endpoint(endpoint)
            .build()
            .map_err(|e| Error::Telemetry(e.to_string()))?;
        builder = builder.with_batch_exporter(exporter);
    }
    let provider = builder.build();
    global::set_text_map_propagator(TraceContextPropagator::new());
    global::set_tracer_provider(provider.clone());

    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&config.log_filter))
        .map_err(|e| Error::Telemetry(format!("log filter `{}`: {e}", config.log_filter)))?;
    let fmt = match config.log_format {
        LogFormat::Json => tracing_subscriber::fmt::layer().json().with_current_span(true).with_span_list(true).boxed(),
        LogFormat::Pretty => tracing_subscriber::fmt::layer().boxed(),
    };
    // The log filter applies to log output only: spans stay recorded for
    // tracing whatever the log level, or a quiet `warn` filter would cut the
    // trace context that travels in Kafka headers.
    let otel = tracing_opentelemetry::layer()
        .with_tracer(provider.tracer(service_name))
        .with_filter(tracing_subscriber::filter::LevelFilter::INFO);
    // Already initialised in this process: keep the first subscriber.
    let _ = tracing_subscriber::registry().with(fmt.with_filter(filter)).with(otel).try_init();
    Ok(TelemetryGuard { provider })
}

/// The W3C `traceparent` (and `tracestate`) of the current span, to put on an
/// outgoing message.
pub fn current_trace_context() -> (Option<String>, Option<String>) {
    let context = tracing::Span::current().context();
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
