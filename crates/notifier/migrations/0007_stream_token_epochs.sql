-- Revocation of stream tokens (see revocation.rs): each tenant's token
-- epoch. A token carries the epoch it was issued in; one older than its
-- tenant's is refused. POST /v1/stream-tokens/revoke moves the epoch on, and
-- every notifier instance hears of it here (NOTIFY), closing the streams
-- opened with older tokens. A tenant without a row is at epoch 0.
CREATE TABLE stream_token_epochs (
    tenant     text        PRIMARY KEY,
    epoch      bigint      NOT NULL CHECK (epoch > 0),
    revoked_at timestamptz NOT NULL DEFAULT now()
);

-- The payload is `<epoch>:<tenant>` (the epoch first: a tenant may hold a colon).
CREATE FUNCTION onceflow_stream_token_epochs_notify() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('onceflow_stream_token_epochs', NEW.epoch || ':' || NEW.tenant);
    RETURN NULL;
END;
$$;

CREATE TRIGGER onceflow_stream_token_epochs_notify
AFTER INSERT OR UPDATE ON stream_token_epochs
FOR EACH ROW EXECUTE FUNCTION onceflow_stream_token_epochs_notify();
