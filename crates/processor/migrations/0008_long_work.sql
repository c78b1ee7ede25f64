-- Long work: a push handler that answers 202 and reports through callbacks,
-- pull workers that hold their commands with leases, heartbeats, and the
-- timeouts of a command type (see crates/processor/src/executions/mod.rs).
ALTER TABLE executions
    -- Who holds a running attempt: 'call' (the processor's HTTP call is
    -- out), 'handler' (a push handler answered 202 and reports through
    -- callbacks), 'worker' (a pull worker leased it).
    ADD COLUMN holder           text CHECK (holder IN ('call', 'handler', 'worker')),
    -- The pull worker holding it, by its configured name.
    ADD COLUMN worker           text,
    -- The running attempt's hard end (its type's attempt timeout). `deadline`
    -- is its lease: heartbeats move it on, never past this.
    ADD COLUMN attempt_deadline timestamptz,
    ADD COLUMN heartbeat_at     timestamptz,
    ADD COLUMN progress_percent integer,
    -- What the last heartbeat said beside its percent (at most 4 KiB of JSON).
    ADD COLUMN progress_details jsonb,
    -- The command's own deadlines, from its type's timeouts: not started by
    -- `start_by`, or not ended by `end_by`, it ends failed (`timed_out`).
    ADD COLUMN start_by         timestamptz,
    ADD COLUMN end_by           timestamptz,
    -- The result it ended with (JSON text), so that a repeated completion is
    -- answered with what was stored.
    ADD COLUMN result           text;

CREATE INDEX executions_start_by ON executions (start_by) WHERE state = 'queued' AND start_by IS NOT NULL;
CREATE INDEX executions_end_by ON executions (end_by) WHERE state IN ('queued', 'running') AND end_by IS NOT NULL;

-- Cancellation: a tenant's cancel ends a queued execution at once; a running
-- one is told and ends `cancelled` when its handler or worker confirms, or
-- a grace period after the request.
ALTER TABLE executions ADD COLUMN cancel_requested_at timestamptz;
CREATE INDEX executions_cancelling ON executions (cancel_requested_at)
    WHERE state = 'running' AND cancel_requested_at IS NOT NULL;
ALTER TABLE executions DROP CONSTRAINT executions_state_check;
ALTER TABLE executions ADD CONSTRAINT executions_state_check
    CHECK (state IN ('queued', 'running', 'succeeded', 'failed', 'dead_lettered', 'cancelled'));
ALTER TABLE inbox DROP CONSTRAINT inbox_outcome_check;
ALTER TABLE inbox ADD CONSTRAINT inbox_outcome_check
    CHECK (outcome IN ('deferred', 'succeeded', 'failed', 'dead_lettered', 'cancelled'));

-- When the next held head becomes ready (the dispatcher asks after every
-- round): an index of its own, so thousands of running keys (whose ready_at
-- is NULL) are not scanned.
CREATE INDEX key_queues_next_ready ON key_queues (ready_at) WHERE ready_at IS NOT NULL;
