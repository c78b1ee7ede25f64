-- pgbench: ingest's transaction for one accepted command, statement for
-- statement as crates/ingest/src/commands.rs issues it (claim the key with
-- the stored response, the job, the command into the outbox).
-- The raw baseline of ingest's 202/s (scripts/bench.sh).
\set n random(1, 9223372036854775806)
-- BEGIN and SET LOCAL go in one round trip, as ingest sends them.
BEGIN \; SET LOCAL lock_timeout = '2000ms';
INSERT INTO idempotency_keys
    (tenant, idempotency_key, fingerprint, job_id, response_status, response_body, response_location, expires_at)
VALUES ('dev', md5(:n::text), decode(md5(:n::text) || md5(:n::text), 'hex'), md5(:n::text)::uuid, 202,
        convert_to('{"job_id":"0190b3c4-0000-7000-8000-000000000001","correlation_id":"5f1c2b9e-0000-4000-8000-000000000001","status":"accepted","status_url":"/v1/jobs/0190b3c4-0000-7000-8000-000000000001"}', 'UTF8'),
        '/v1/jobs/0190b3c4-0000-7000-8000-000000000001', now() + make_interval(secs => 86400))
ON CONFLICT (tenant, idempotency_key) DO UPDATE
    SET fingerprint = EXCLUDED.fingerprint, job_id = EXCLUDED.job_id,
        response_status = EXCLUDED.response_status, response_body = EXCLUDED.response_body,
        response_location = EXCLUDED.response_location, created_at = now(), expires_at = EXCLUDED.expires_at
    WHERE idempotency_keys.expires_at < now()
RETURNING job_id;
INSERT INTO jobs (job_id, tenant, correlation_id, command_type, status)
    VALUES (md5(:n::text)::uuid, 'dev', md5(:n::text), 'ledger.deposit', 'accepted');
INSERT INTO onceflow_outbox (topic, message_key, payload, headers)
    VALUES ('onceflow.commands', 'bench', decode(repeat('ab', 140), 'hex'),
            '[["message-id", "0190b3c4-0000-7000-8000-000000000001"], ["correlation-id", "5f1c2b9e-0000-4000-8000-000000000001"], ["tenant-id", "dev"], ["message-type", "ledger.deposit"], ["schema-id", "io.onceflow.v1.Command@0000000000000000"], ["content-type", "application/avro"], ["traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"]]');
COMMIT;
