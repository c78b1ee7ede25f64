-- Executions and key queues: commands the processor drives from the database
-- instead of applying them in the transaction that records them (see
-- crates/processor/src/executions/mod.rs for the argument for exactly-once
-- and per-key order).
--
-- An execution is recorded with its inbox row, in the lane's transaction; the
-- lane's offset is stored after that commit, so a lane never waits for work.
-- Commands of one ordering key (tenant, scope, value) run one at a time, in
-- `seq` order: the order in which the lanes recorded them, which is the order
-- of their partition, which is the order their 202s were given.
CREATE TABLE executions (
    job_id         uuid        PRIMARY KEY,
    -- Order within a key; a redriven dead letter takes a new one (the end of
    -- its key's queue).
    seq            bigserial   NOT NULL UNIQUE,
    tenant         text        NOT NULL,
    -- The ordering key; an unordered command has the scope '' and its job id
    -- as value, a queue of its own.
    scope          text        NOT NULL,
    ordering_key   text        NOT NULL,
    command_type   text        NOT NULL,
    state          text        NOT NULL DEFAULT 'queued'
                   CHECK (state IN ('queued', 'running', 'succeeded', 'failed', 'dead_lettered')),
    -- Attempts the handler's own failures spent (a 5xx, a timeout); outages
    -- (429, 503, no connection) spend none and are counted apart.
    attempts       integer     NOT NULL DEFAULT 0,
    outages        integer     NOT NULL DEFAULT 0,
    -- The running attempt: its id fences a late answer of an attempt that
    -- was given up (its deadline passed, its processor died).
    attempt_id     uuid,
    deadline       timestamptz,
    -- The last failure, {"code", "message"}, for `waiting_for` and the logs.
    last_error     jsonb,
    -- The command as it was recorded: its envelope headers ([[name, value],
    -- ...]), the key of its results and the record's value (the Avro command),
    -- enough to call its handler, publish its result and dead-letter it.
    envelope       jsonb       NOT NULL,
    result_key     text        NOT NULL,
    record         bytea       NOT NULL,
    -- Where the record was on the commands topic (a dead letter says so).
    origin_partition integer   NOT NULL,
    origin_offset  bigint      NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT now(),
    started_at     timestamptz,
    ended_at       timestamptz
);
-- A key's queue, in order: what the dispatcher reads when a head ends.
CREATE INDEX executions_of_key ON executions (tenant, scope, ordering_key, seq)
    WHERE state IN ('queued', 'running');
-- Attempts whose processor may have died.
CREATE INDEX executions_running ON executions (deadline) WHERE state = 'running';

-- One row per key with an execution not yet ended: its head (the oldest
-- such execution, the only one that may run) and when the head may start.
-- The row's lock orders a lane that adds to the queue against the dispatcher
-- that ends its head, so neither misses the other (see executions/store.rs).
CREATE TABLE key_queues (
    tenant       text        NOT NULL,
    scope        text        NOT NULL,
    ordering_key text        NOT NULL,
    head         uuid        NOT NULL,
    -- The head's type: the dispatcher claims per type, within its concurrency.
    command_type text        NOT NULL,
    -- NULL while the head runs.
    ready_at     timestamptz,
    -- Why the head waits, while it does: retry, handler_unavailable,
    -- breaker, locked.
    waiting      text,
    PRIMARY KEY (tenant, scope, ordering_key)
);
CREATE INDEX key_queues_ready ON key_queues (command_type, ready_at) WHERE ready_at IS NOT NULL;
-- A key's row comes and goes with its work, and a head's row is updated at
-- every claim and wait: a small table with a large churn, whose dead
-- versions every claim's index scan would walk past. Vacuumed after every
-- thousand dead rows, without throttling (as the hot accounts rows, 0004).
ALTER TABLE key_queues SET (
    autovacuum_vacuum_scale_factor = 0,
    autovacuum_vacuum_threshold = 1000,
    autovacuum_vacuum_cost_delay = 0
);

-- Wake the dispatchers when a queue gets a head: at commit, once per
-- statement, merged within a transaction.
-- An inbox row whose command was handed to an execution says so until the
-- execution ends.
ALTER TABLE inbox DROP CONSTRAINT inbox_outcome_check;
ALTER TABLE inbox ADD CONSTRAINT inbox_outcome_check
    CHECK (outcome IN ('deferred', 'succeeded', 'failed', 'dead_lettered'));

CREATE FUNCTION key_queues_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('onceflow_executions', '');
    RETURN NULL;
END
$$;
CREATE TRIGGER key_queues_notify AFTER INSERT ON key_queues
    FOR EACH STATEMENT EXECUTE FUNCTION key_queues_notify();
