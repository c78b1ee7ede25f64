//! Traces: an OTLP/HTTP receiver the services export to, and a trace shown
//! as a tree of its spans.

use std::net::SocketAddr;

/// One span as an OTLP receiver got it, decoded from the protobuf.
#[derive(Debug, Clone)]
pub struct ReceivedSpan {
    /// The resource's `service.name`.
    pub service: String,
    /// Every resource attribute, as text.
    pub resource: std::collections::HashMap<String, String>,
    /// Hex, as in a `traceparent`.
    pub trace_id: String,
    pub span_id: String,
    /// `None` for a root span.
    pub parent_span_id: Option<String>,
    pub name: String,
    /// `SERVER`, `CLIENT`, `PRODUCER`, `CONSUMER`, `INTERNAL` (or `UNSPECIFIED`).
    pub kind: String,
    /// Every attribute, as text.
    pub attributes: std::collections::HashMap<String, String>,
    pub start_unix_nano: u64,
}

impl ReceivedSpan {
    /// Attribute `key`, if the span has it.
    pub fn attribute(&self, key: &str) -> Option<&str> {
        self.attributes.get(key).map(String::as_str)
    }
}

/// An OTLP/HTTP trace receiver on 127.0.0.1 (a real HTTP server on a free
/// port, as a collector's): `POST /v1/traces` with an
/// `application/x-protobuf` `ExportTraceServiceRequest` is decoded and kept.
/// Anything else is refused (`404`, `415`, `400` for bytes that do not
/// decode), as a collector would.
#[derive(Debug)]
pub struct OtlpReceiver {
    pub addr: SocketAddr,
    spans: std::sync::Arc<std::sync::Mutex<Vec<ReceivedSpan>>>,
    server: tokio::task::JoinHandle<()>,
}

impl OtlpReceiver {
    pub async fn start() -> Self {
        use axum::{
            body::Bytes,
            extract::State,
            http::{HeaderMap, StatusCode, header},
            response::IntoResponse,
            routing::post,
        };
        use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
        use prost::Message as _;

        type Spans = std::sync::Arc<std::sync::Mutex<Vec<ReceivedSpan>>>;
        async fn export(State(spans): State<Spans>, headers: HeaderMap, body: Bytes) -> axum::response::Response {
            let content_type = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or_default();
            if content_type != "application/x-protobuf" {
                return (StatusCode::UNSUPPORTED_MEDIA_TYPE, "OTLP/HTTP protobuf only").into_response();
            }
            let Ok(request) = ExportTraceServiceRequest::decode(body) else {
                return (StatusCode::BAD_REQUEST, "not an ExportTraceServiceRequest").into_response();
            };
            spans.lock().expect("receiver lock").extend(OtlpReceiver::decode(request));
            let answer = ExportTraceServiceResponse::default().encode_to_vec();
            ([(header::CONTENT_TYPE, "application/x-protobuf")], answer).into_response()
        }
        let spans = Spans::default();
        let router = axum::Router::new().route("/v1/traces", post(export)).with_state(spans.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("receiver port");
        let addr = listener.local_addr().expect("receiver address");
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        Self { addr, spans, server }
    }

    /// The collector's base URL, as `OTEL_EXPORTER_OTLP_ENDPOINT` takes it.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The traces URL, as `telemetry.otlp_endpoint` takes it.
    pub fn traces_url(&self) -> String {
        format!("http://{}/v1/traces", self.addr)
    }

    /// Every span received so far.
    pub fn spans(&self) -> Vec<ReceivedSpan> {
        self.spans.lock().expect("receiver lock").clone()
    }

    /// The spans of trace `trace_id` received so far.
    pub fn trace(&self, trace_id: &str) -> Vec<ReceivedSpan> {
        self.spans().into_iter().filter(|span| span.trace_id == trace_id).collect()
    }

    fn decode(
        request: opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest,
    ) -> Vec<ReceivedSpan> {
        use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
        let mut spans = Vec::new();
        for resource_spans in request.resource_spans {
            let resource = attributes(resource_spans.resource.map(|r| r.attributes).unwrap_or_default());
            let service = resource.get("service.name").cloned().unwrap_or_default();
            for span in resource_spans.scope_spans.into_iter().flat_map(|scope| scope.spans) {
                let kind = SpanKind::try_from(span.kind).map_or("UNKNOWN", |kind| kind.as_str_name());
                spans.push(ReceivedSpan {
                    service: service.clone(),
                    resource: resource.clone(),
                    trace_id: hex::encode(&span.trace_id),
                    span_id: hex::encode(&span.span_id),
                    parent_span_id: (!span.parent_span_id.is_empty()).then(|| hex::encode(&span.parent_span_id)),
                    name: span.name,
                    kind: kind.trim_start_matches("SPAN_KIND_").to_owned(),
                    attributes: attributes(span.attributes),
                    start_unix_nano: span.start_time_unix_nano,
                });
            }
        }
        spans
    }
}

impl Drop for OtlpReceiver {
    fn drop(&mut self) {
        self.server.abort();
    }
}

/// OTLP key-values as text (`AnyValue`'s scalar as it prints; arrays and
/// maps in their debug form, which no test compares).
fn attributes(
    pairs: Vec<opentelemetry_proto::tonic::common::v1::KeyValue>,
) -> std::collections::HashMap<String, String> {
    use opentelemetry_proto::tonic::common::v1::any_value::Value;
    pairs
        .into_iter()
        .map(|pair| {
            let value = match pair.value.and_then(|value| value.value) {
                Some(Value::StringValue(text)) => text,
                Some(Value::BoolValue(flag)) => flag.to_string(),
                Some(Value::IntValue(number)) => number.to_string(),
                Some(Value::DoubleValue(number)) => number.to_string(),
                Some(other) => format!("{other:?}"),
                None => String::new(),
            };
            (pair.key, value)
        })
        .collect()
}

/// `spans` (one trace) as a tree, each span under its parent, siblings by
/// start time: `service  KIND  name  key attributes`. A span whose parent is
/// not among `spans` (e.g. a client's own span) is shown as a root.
pub fn span_tree(spans: &[ReceivedSpan]) -> String {
    const SHOWN: [&str; 6] = [
        "http.route",
        "http.response.status_code",
        "messaging.destination.name",
        "messaging.destination.partition.id",
        "messaging.kafka.offset",
        "correlation_id",
    ];
    fn walk(spans: &[&ReceivedSpan], parent: Option<&str>, depth: usize, out: &mut String) {
        let mut children: Vec<&&ReceivedSpan> = spans
            .iter()
            .filter(|span| match parent {
                Some(parent) => span.parent_span_id.as_deref() == Some(parent),
                None => span.parent_span_id.as_ref().is_none_or(|id| spans.iter().all(|s| &s.span_id != id)),
            })
            .collect();
        children.sort_by_key(|span| span.start_unix_nano);
        for span in children {
            let shown: Vec<String> =
                SHOWN.iter().filter_map(|key| span.attribute(key).map(|value| format!("{key}={value}"))).collect();
            out.push_str(&format!(
                "{:indent$}{} [{}] {} {{{}}}\n",
                "",
                span.service,
                span.kind,
                span.name,
                shown.join(", "),
                indent = depth * 2
            ));
            walk(spans, Some(&span.span_id), depth + 1, out);
        }
    }
    let spans: Vec<&ReceivedSpan> = spans.iter().collect();
    let mut out = String::new();
    walk(&spans, None, 0, &mut out);
    out
}
