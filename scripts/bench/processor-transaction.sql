-- pgbench: the processor's transaction for one ledger.deposit, statement for
-- statement as crates/processor/src/worker.rs and handlers/ledger.rs issue it
-- alone (inbox claim, effect on a savepoint, outcome, result into the outbox;
-- the effect is the ledger_deposit function of the processor's migrations).
-- The raw baseline of the processor's drain rate (scripts/bench.sh).
\set n random(1, 9223372036854775806)
-- One of the benchmark's accounts (pgbench -D accounts=N), as onceflow-bench spreads its deposits.
\set a random(0, :accounts - 1)
BEGIN;
INSERT INTO inbox (message_id, tenant, command_type, outcome)
    VALUES (md5(:n::text)::uuid, 'dev', 'ledger.deposit', 'succeeded') ON CONFLICT (message_id) DO NOTHING;
SAVEPOINT effect;
SELECT balance, out_of_range FROM ledger_deposit('dev', 'bench-' || :a, 1, md5(:n::text)::uuid);
RELEASE SAVEPOINT effect;
UPDATE inbox SET outcome = 'succeeded' WHERE message_id = md5(:n::text)::uuid;
INSERT INTO onceflow_outbox (topic, message_key, payload, headers)
    VALUES ('onceflow.results', md5(:n::text), decode(repeat('ab', 160), 'hex'),
            '[["message-id", "0190b3c4-0000-7000-8000-000000000001"], ["correlation-id", "5f1c2b9e-0000-4000-8000-000000000001"], ["tenant-id", "dev"], ["message-type", "job.succeeded"], ["schema-id", "io.onceflow.v1.ResultEvent@0000000000000000"], ["content-type", "application/avro"], ["causation-id", "0190b3c4-0000-7000-8000-000000000001"], ["traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"]]');
COMMIT;
