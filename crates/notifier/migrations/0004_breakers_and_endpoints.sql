-- Circuit breakers and disabled endpoints (see webhooks/breakers.rs and
-- webhooks/endpoints.rs).

-- Where a delivery goes, `scheme://host:port` (onceflow_webhook::breaker::
-- destination): the key of its breaker. Set at enqueue; deliveries created
-- before this migration get it at their next attempt (until then no breaker
-- holds them back).
ALTER TABLE webhook_deliveries ADD COLUMN destination text;
CREATE INDEX webhook_deliveries_by_destination ON webhook_deliveries (destination, next_attempt_at)
    WHERE status = 'pending';

-- `endpoint_disabled`: ended without an attempt because the tenant's endpoint
-- (its callback URL) is disabled.
ALTER TABLE webhook_deliveries DROP CONSTRAINT webhook_deliveries_status_check;
ALTER TABLE webhook_deliveries ADD CONSTRAINT webhook_deliveries_status_check
    CHECK (status IN ('pending', 'succeeded', 'failed', 'endpoint_disabled'));
CREATE INDEX webhook_deliveries_by_url ON webhook_deliveries (tenant, url) WHERE status = 'pending';

-- One circuit breaker per destination, shared by every worker of every
-- notifier instance. A row is locked (FOR UPDATE) while an attempt's outcome
-- is recorded, and before any delivery row of that destination, so the
-- counts are exact and the lock order is always breaker, then deliveries.
CREATE TABLE webhook_breakers (
    destination          text        PRIMARY KEY,
    state                text        NOT NULL DEFAULT 'closed'
                                     CHECK (state IN ('closed', 'open', 'half_open')),
    consecutive_failures integer     NOT NULL DEFAULT 0,
    window_start         timestamptz NOT NULL DEFAULT now(),
    window_attempts      integer     NOT NULL DEFAULT 0,
    window_failures      integer     NOT NULL DEFAULT 0,
    -- Openings since it last closed: grows the cool-down.
    openings             integer     NOT NULL DEFAULT 0,
    -- While open: when the probe may go.
    open_until           timestamptz,
    -- While half-open: the lease token of the probe's claim, and when that
    -- lease runs out (then another delivery may be the probe).
    probe_token          uuid,
    probe_until          timestamptz,
    updated_at           timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX webhook_breakers_not_closed ON webhook_breakers (open_until) WHERE state <> 'closed';

-- Endpoints (a tenant's callback URL) whose state ever changed: disabled when
-- they answered 410 Gone, enabled again through the API. URLs never disabled
-- have no row (and are enabled). `version` grows with every change and
-- travels with the state event, so ingest keeps the latest.
CREATE TABLE webhook_endpoints (
    id          uuid        PRIMARY KEY,
    tenant      text        NOT NULL,
    url         text        NOT NULL,
    state       text        NOT NULL CHECK (state IN ('enabled', 'disabled')),
    version     bigint      NOT NULL,
    reason      text,
    disabled_at timestamptz,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    UNIQUE (tenant, url)
);
CREATE INDEX webhook_endpoints_by_tenant ON webhook_endpoints (tenant, updated_at);
