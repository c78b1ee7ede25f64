-- Every result event the notifier has seen, once (event_id is unique). `seq`
-- is the SSE event id clients resume from. Inserts take a transaction-level
-- advisory lock, so sequence numbers become visible in order and a reader
-- tailing `seq > last` can never skip one that commits late.
CREATE TABLE events (
    seq            bigserial   PRIMARY KEY,
    event_id       text        NOT NULL UNIQUE,
    tenant         text        NOT NULL,
    job_id         uuid        NOT NULL,
    correlation_id text        NOT NULL,
    event_type     text        NOT NULL,
    terminal       boolean     NOT NULL,
    -- The event as clients see it (SSE data, webhook body).
    data           jsonb       NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX events_by_tenant ON events (tenant, seq);
CREATE INDEX events_by_job ON events (job_id, seq);
CREATE INDEX events_by_correlation ON events (correlation_id, seq);

-- Wake every notifier instance's stream hub at commit.
CREATE FUNCTION onceflow_events_notify() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('onceflow_events', '');
    RETURN NULL;
END;
$$;

CREATE TRIGGER onceflow_events_notify
AFTER INSERT ON events
FOR EACH STATEMENT EXECUTE FUNCTION onceflow_events_notify();
