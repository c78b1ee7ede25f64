//! The JSON log lines' span fields, recorded without reading them back.
//!
//! tracing-subscriber's `JsonFields` writes a span's fields as a JSON object
//! when the span is made and, for every later `Span::record`, parses that
//! object back into a map, adds the new fields and writes it all again. The
//! HTTP layer records on every request's span (its status, its outcome), so
//! in a flood of refused requests that re-parse was about a seventh of
//! ingest's CPU (`perf`, 60 µs a refusal). [`AppendingJsonFields`] appends
//! instead: the new fields' object is spliced in before the closing brace. A
//! field recorded twice is then written twice; the event formatter reads the
//! object back with serde_json, which keeps the last, so log lines show each
//! field once, with its latest value, as before.

use std::fmt;

use tracing_subscriber::{
    field::{RecordFields, VisitOutput as _},
    fmt::{
        FormatFields, FormattedFields,
        format::{JsonVisitor, Writer},
    },
};

/// JSON span fields for the `fmt` layer (`.json().fmt_fields(AppendingJsonFields)`).
#[derive(Debug, Default, Clone, Copy)]
pub struct AppendingJsonFields;

impl<'writer> FormatFields<'writer> for AppendingJsonFields {
    fn format_fields<R: RecordFields>(&self, mut writer: Writer<'writer>, fields: R) -> fmt::Result {
        let mut visitor = JsonVisitor::new(&mut writer);
        fields.record(&mut visitor);
        visitor.finish()
    }

    fn add_fields(
        &self,
        current: &'writer mut FormattedFields<Self>,
        fields: &tracing::span::Record<'_>,
    ) -> fmt::Result {
        let mut added = String::new();
        let mut visitor = JsonVisitor::new(&mut added);
        fields.record(&mut visitor);
        visitor.finish()?;
        if added.len() <= 2 {
            // `{}`: nothing recorded.
            return Ok(());
        }
        if current.fields.len() <= 2 {
            // Nothing written yet, or `{}`.
            current.fields = added;
            return Ok(());
        }
        current.fields.pop();
        current.fields.push(',');
        current.fields.push_str(&added[1..]);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use tracing_subscriber::layer::SubscriberExt as _;

    use super::*;

    /// What the `fmt` layer writes, kept for the test to read.
    #[derive(Clone, Default)]
    struct Lines(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Lines {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("lines").extend_from_slice(bytes);
            Ok(bytes.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn fields_recorded_later_show_once_with_their_latest_value() {
        let lines = Lines::default();
        let writer = lines.clone();
        let layer = tracing_subscriber::fmt::layer()
            .json()
            .with_current_span(true)
            .with_span_list(true)
            .fmt_fields(AppendingJsonFields)
            .with_writer(move || writer.clone());
        let subscriber = tracing_subscriber::registry().with(layer);
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("request", route = "/v1/commands", status = tracing::field::Empty, n = 1);
            span.record("status", 429);
            span.record("n", 2);
            span.record("text", "ignored: not a field of the span");
            let _entered = span.enter();
            tracing::info!(answer = "refused", "done");
        });
        let output = String::from_utf8(lines.0.lock().expect("lines").clone()).expect("utf-8");
        let line: serde_json::Value = serde_json::from_str(output.trim()).expect("one JSON line");
        assert_eq!(
            line["span"],
            serde_json::json!({"name": "request", "route": "/v1/commands", "status": 429, "n": 2}),
            "{output}"
        );
        assert_eq!(line["spans"][0], line["span"]);
        assert_eq!(line["fields"]["answer"], "refused");
    }
}
