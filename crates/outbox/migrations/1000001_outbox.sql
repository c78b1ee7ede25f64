-- The transactional outbox. Rows are inserted in the same transaction as the
-- business change that produced them and deleted once the relay has seen the
-- broker acknowledge them. Versions of this crate's migrations start at
-- 1000001 so they never collide with a service's own (1, 2, 3 ...).
CREATE TABLE onceflow_outbox (
    id          bigserial PRIMARY KEY,
    topic       text        NOT NULL,
    message_key text,
    payload     bytea       NOT NULL,
    -- The envelope as a JSON array of [name, value] pairs, in header order.
    headers     jsonb       NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT clock_timestamp()
);

-- Wake the relay at commit time; one notification per inserting statement,
-- merged by PostgreSQL within a transaction.
CREATE FUNCTION onceflow_outbox_notify() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('onceflow_outbox', '');
    RETURN NULL;
END;
$$;

CREATE TRIGGER onceflow_outbox_notify
AFTER INSERT ON onceflow_outbox
FOR EACH STATEMENT EXECUTE FUNCTION onceflow_outbox_notify();
