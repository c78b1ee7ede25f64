-- Outbox rows the broker refuses for good (the record itself is invalid, not
-- the broker unavailable): the relay moves them here, with the error, so they
-- hold up neither their key's later rows nor anyone else's. An operator looks
-- at them here; republishing one is putting it back into onceflow_outbox
-- (it is then published after everything already published for its key).
CREATE TABLE onceflow_outbox_parked (
    id          bigint      PRIMARY KEY,
    topic       text        NOT NULL,
    message_key text,
    payload     bytea       NOT NULL,
    headers     jsonb       NOT NULL,
    created_at  timestamptz NOT NULL,
    error       text        NOT NULL,
    parked_at   timestamptz NOT NULL DEFAULT clock_timestamp()
);
