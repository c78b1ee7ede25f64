-- Statements page through an account's entries in posting order.
CREATE INDEX entries_by_account_posting ON entries (tenant, account_id, posting_id);

-- Every dead-lettered command that has an envelope (so a message id), as it
-- arrived, with the error: what an operator lists and redrives. The record is
-- also on the dead-letter topic; this table is the processor's own index of it.
--
-- A redrive sets `redrive_pending`; the worker consumes that flag in the same
-- transaction as the command's effect, which is what lets a message whose
-- inbox outcome is `dead_lettered` be applied once more, and only once per
-- redrive. A plain redelivery (no pending redrive) stays a no-op.
CREATE TABLE dead_letters (
    message_id        uuid        PRIMARY KEY,
    tenant            text        NOT NULL,
    command_type      text        NOT NULL,
    job_id            text        NOT NULL,
    original_topic    text        NOT NULL,
    original_partition integer    NOT NULL,
    original_offset   bigint      NOT NULL,
    message_key       text,
    -- The original headers as [[name, value], ...] (UTF-8 values).
    headers           jsonb       NOT NULL,
    payload           bytea       NOT NULL,
    error_code        text        NOT NULL,
    error_message     text        NOT NULL,
    dead_lettered_at  timestamptz NOT NULL DEFAULT now(),
    redrive_count     integer     NOT NULL DEFAULT 0,
    redrive_pending   boolean     NOT NULL DEFAULT false,
    last_redriven_at  timestamptz,
    reapplied_at      timestamptz
);
CREATE INDEX dead_letters_by_time ON dead_letters (dead_lettered_at, message_id);
