-- `cancelled`: a terminal status its tenant gives a job (POST /v1/jobs/{id}/cancel),
-- version 3 of the result schema.
ALTER TABLE jobs DROP CONSTRAINT jobs_status_check;
ALTER TABLE jobs ADD CONSTRAINT jobs_status_check
    CHECK (status IN ('accepted', 'processing', 'succeeded', 'failed', 'dead_lettered', 'cancelled'));
