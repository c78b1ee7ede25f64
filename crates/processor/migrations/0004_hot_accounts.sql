-- Every deposit updates two accounts rows, one of them the currency's
-- world:<CUR>, so a handful of rows take thousands of updates a minute. Left
-- to the defaults, their dead versions pile up between autovacuum rounds (one
-- a minute at most) and every lock of those rows walks past them: a drain of
-- deposits fell from 540/s to 128-171/s with 6,000 dead versions in a table
-- of 14 rows. Pages kept mostly empty let each update stay on its page (a HOT
-- update, pruned when the page is next read) and autovacuum is asked after
-- every few hundred dead rows, without throttling.
ALTER TABLE accounts SET (
    fillfactor = 10,
    autovacuum_vacuum_scale_factor = 0,
    autovacuum_vacuum_threshold = 200,
    autovacuum_vacuum_cost_delay = 0,
    autovacuum_analyze_scale_factor = 0.5
);
