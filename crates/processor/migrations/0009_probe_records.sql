-- The synthetic probe's inbox rows, for their sweep (probe_records in the
-- processor's settings; crates/processor/src/worker/inbox.rs): the sweep
-- finds the probe tenant's old `onceflow.probe` rows through this index
-- instead of scanning the whole inbox. Partial, so it holds only the probe's
-- rows (about 1,440 a day), and other commands' inbox inserts do not pay for
-- it. The sweep's statement names the type as this literal, so the planner
-- can use the index.
CREATE INDEX inbox_probe_records ON inbox (tenant, processed_at) WHERE command_type = 'onceflow.probe';
