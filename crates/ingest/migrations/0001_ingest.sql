-- Idempotency records: one per (tenant, key). The stored response is replayed
-- byte for byte for every later request with the same key and fingerprint.
CREATE TABLE idempotency_keys (
    tenant            text        NOT NULL,
    idempotency_key   text        NOT NULL,
    -- SHA-256 of method, path and canonical JSON body.
    fingerprint       bytea       NOT NULL,
    job_id            uuid        NOT NULL,
    response_status   smallint    NOT NULL,
    response_body     bytea       NOT NULL,
    response_location text        NOT NULL,
    created_at        timestamptz NOT NULL DEFAULT now(),
    expires_at        timestamptz NOT NULL,
    PRIMARY KEY (tenant, idempotency_key)
);
CREATE INDEX idempotency_keys_expiry ON idempotency_keys (expires_at);

-- Ingest's projection of every job, fed by the results topic.
CREATE TABLE jobs (
    job_id           uuid        PRIMARY KEY,
    tenant           text        NOT NULL,
    correlation_id   text        NOT NULL,
    command_type     text        NOT NULL,
    status           text        NOT NULL CHECK (status IN ('accepted', 'processing', 'succeeded', 'failed', 'dead_lettered')),
    progress_percent integer,
    result           jsonb,
    error            jsonb,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX jobs_by_tenant ON jobs (tenant, created_at);
