-- The latest state of every webhook endpoint (a tenant's callback URL) that
-- the notifier ever disabled, fed by the compacted onceflow.webhook-endpoints
-- topic (see src/endpoints.rs). POST /v1/commands refuses a command whose
-- callback_url is disabled for its tenant: one primary-key lookup.
CREATE TABLE webhook_endpoint_states (
    tenant      text        NOT NULL,
    url         text        NOT NULL,
    endpoint_id uuid        NOT NULL,
    state       text        NOT NULL CHECK (state IN ('enabled', 'disabled')),
    -- The notifier's version of this state; a record with a lower or equal
    -- one (a redelivery, or one overtaken) changes nothing.
    version     bigint      NOT NULL,
    reason      text,
    changed_at  timestamptz NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant, url)
);
