-- Webhook deliveries: one per terminal result event that carries a
-- callback_url, created in the transaction that stores the event (so a
-- redelivered result, whose event_id is already stored, creates none).
--
-- The table is the delivery queue. Workers of every notifier instance claim
-- due rows with `FOR UPDATE SKIP LOCKED` and hold them by a lease
-- (lease_token, lease_until) while the HTTP request is under way, without
-- keeping a transaction open; a worker that dies leaves a lease that expires,
-- and the row is claimed again. Outcomes are written only by the lease holder
-- (`WHERE lease_token = $token`), so a worker whose lease ran out cannot
-- overwrite the next one's result.
CREATE TABLE webhook_deliveries (
    -- The `webhook-id` header: the same on every attempt and redrive.
    id               uuid        PRIMARY KEY,
    event_id         text        NOT NULL UNIQUE,
    tenant           text        NOT NULL,
    job_id           uuid        NOT NULL,
    correlation_id   text        NOT NULL,
    event_type       text        NOT NULL,
    url              text        NOT NULL,
    -- The exact bytes POSTed (and signed) on every attempt.
    body             text        NOT NULL,
    -- Trace context of the result event, so each attempt joins its trace.
    traceparent      text,
    tracestate       text,
    status           text        NOT NULL DEFAULT 'pending'
                                 CHECK (status IN ('pending', 'succeeded', 'failed')),
    -- Attempts claimed so far (an attempt counts from its claim, so one cut
    -- short by a crash still counts against the schedule).
    attempts         integer     NOT NULL DEFAULT 0,
    -- `attempts` when the delivery was last redriven: the schedule starts
    -- again from there.
    round_start      integer     NOT NULL DEFAULT 0,
    next_attempt_at  timestamptz NOT NULL DEFAULT now(),
    lease_token      uuid,
    lease_until      timestamptz,
    last_status_code integer,
    last_error       text,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    finished_at      timestamptz
);
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (next_attempt_at) WHERE status = 'pending';
CREATE INDEX webhook_deliveries_by_job ON webhook_deliveries (tenant, job_id, created_at);

-- Every attempt, as it went.
CREATE TABLE webhook_attempts (
    id              bigserial   PRIMARY KEY,
    delivery_id     uuid        NOT NULL REFERENCES webhook_deliveries (id),
    attempt         integer     NOT NULL,
    started_at      timestamptz NOT NULL,
    latency_ms      integer     NOT NULL,
    -- The receiver's answer; NULL when none came (timeout, connection error,
    -- refusal before sending).
    status_code     integer,
    succeeded       boolean     NOT NULL,
    error           text,
    -- The first bytes of the receiver's answer, for debugging it.
    response_excerpt text,
    -- When the next attempt is due; NULL when this attempt ended the delivery.
    next_attempt_at timestamptz
);
CREATE INDEX webhook_attempts_by_delivery ON webhook_attempts (delivery_id, id);

-- Wake every notifier instance's delivery worker at commit.
CREATE FUNCTION onceflow_webhooks_notify() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('onceflow_webhooks', '');
    RETURN NULL;
END;
$$;

CREATE TRIGGER onceflow_webhooks_notify
AFTER INSERT ON webhook_deliveries
FOR EACH STATEMENT EXECUTE FUNCTION onceflow_webhooks_notify();
