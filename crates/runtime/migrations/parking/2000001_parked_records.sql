-- Records a consumer could never apply (guarantee G8), kept for an operator
-- to inspect and redrive (see onceflow_runtime::parking). Shared by every
-- service that consumes a topic; versions of these migrations start at
-- 2000001 so they never collide with a service's own (1, 2, 3 ...) or the
-- outbox's (1000001 ...).
CREATE TABLE parked_records (
    id              bigserial   PRIMARY KEY,
    -- Which consumer of the service parked it (its handler redrives it).
    consumer        text        NOT NULL,
    topic           text        NOT NULL,
    kafka_partition integer     NOT NULL,
    kafka_offset    bigint      NOT NULL,
    -- The record as it was on the topic, byte for byte.
    record_key      bytea,
    -- Header names (rdkafka only reads UTF-8 names) and values in record
    -- order; a NULL value is a header without one.
    header_names    text[]      NOT NULL,
    header_values   bytea[]     NOT NULL,
    payload         bytea,
    -- Why it could not be applied (the last error, after a failed redrive).
    error           text        NOT NULL,
    parked_at       timestamptz NOT NULL DEFAULT now(),
    redrive_count   integer     NOT NULL DEFAULT 0,
    last_redrive_at timestamptz,
    -- A record redelivered after a crash before its offset was committed is
    -- parked once.
    UNIQUE (consumer, topic, kafka_partition, kafka_offset)
);
