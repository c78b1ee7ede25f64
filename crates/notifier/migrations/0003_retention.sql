-- How far the event log has been pruned: every event with seq <= pruned_through
-- may be gone. A client resuming from an older Last-Event-ID is told so in
-- its stream instead of silently missing events.
CREATE TABLE events_retention (
    singleton      boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    pruned_through bigint  NOT NULL DEFAULT 0
);
INSERT INTO events_retention DEFAULT VALUES;
CREATE INDEX events_by_age ON events (created_at);
