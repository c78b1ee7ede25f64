-- Webhooks keep the order of their command's key: the deliveries to one
-- endpoint of the results of one ordering key (the result record's Kafka
-- key) go out one at a time, in the order their events were stored (`seq`,
-- which follows the results topic's order for one key). A delivery waits
-- while an earlier one of its key to the same URL is still pending
-- (in flight, or waiting for its next attempt); one that ended, delivered or
-- failed, lets the next go. Rows from before this migration have no key and
-- wait for nothing.
ALTER TABLE webhook_deliveries ADD COLUMN order_key text, ADD COLUMN event_seq bigint;
CREATE INDEX webhook_deliveries_in_order ON webhook_deliveries (tenant, url, order_key, event_seq)
    WHERE status = 'pending';
