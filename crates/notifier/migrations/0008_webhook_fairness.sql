-- Webhooks fair across tenants (see webhooks/claims.rs and breakers.rs).

-- Circuit breakers per tenant and destination: one tenant's failing
-- receiver never holds another tenant's deliveries to the same host (a
-- shared host, e.g. a webhook relay service, may serve tenants very
-- differently), and what the breaker counts is that tenant's attempts only.
--
-- Breakers that are open or half-open now are copied to every tenant with a
-- pending delivery to their destination, so what they hold stays held until
-- their probe; closed ones are dropped (their counts start again from zero).
ALTER TABLE webhook_breakers DROP CONSTRAINT webhook_breakers_pkey;
ALTER TABLE webhook_breakers ADD COLUMN tenant text;
-- While not closed: since when, without closing in between (probes that fail
-- keep it). What `onceflow_webhook_breaker_longest_open_seconds` reports.
ALTER TABLE webhook_breakers ADD COLUMN opened_at timestamptz;
INSERT INTO webhook_breakers
    (tenant, destination, state, consecutive_failures, window_start, window_attempts, window_failures, openings,
     open_until, probe_token, probe_until, updated_at, opened_at)
SELECT DISTINCT d.tenant, b.destination, b.state, b.consecutive_failures, b.window_start, b.window_attempts,
       b.window_failures, b.openings, b.open_until, b.probe_token, b.probe_until, b.updated_at, b.updated_at
  FROM webhook_breakers b
  JOIN webhook_deliveries d ON d.destination = b.destination AND d.status = 'pending'
 WHERE b.tenant IS NULL AND b.state <> 'closed';
DELETE FROM webhook_breakers WHERE tenant IS NULL;
ALTER TABLE webhook_breakers ALTER COLUMN tenant SET NOT NULL;
ALTER TABLE webhook_breakers ADD PRIMARY KEY (tenant, destination);

-- The fair claim walks the tenants with pending deliveries (through
-- webhook_deliveries_by_url, whose first column is the tenant) and takes
-- each one's earliest due deliveries, up to its share, through this index.
CREATE INDEX webhook_deliveries_due_by_tenant ON webhook_deliveries (tenant, next_attempt_at)
    WHERE status = 'pending';
