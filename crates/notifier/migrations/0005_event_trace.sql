-- The trace context of the step that stored each event, so the SSE send of
-- the event joins its command's trace. NULL for events stored before this
-- column existed, or without a trace.
ALTER TABLE events ADD COLUMN traceparent text, ADD COLUMN tracestate text;
