-- The inbox: one row per command message ever applied (or dead-lettered).
-- Its primary key is what makes a redelivered message a no-op.
CREATE TABLE inbox (
    message_id   uuid        PRIMARY KEY,
    tenant       text        NOT NULL,
    command_type text        NOT NULL,
    outcome      text        NOT NULL CHECK (outcome IN ('succeeded', 'failed', 'dead_lettered')),
    processed_at timestamptz NOT NULL DEFAULT now()
);

-- The ledger. Every posting's entries sum to zero; money enters through the
-- per-currency system account `world:<CUR>`, the only kind allowed below zero.
CREATE TABLE accounts (
    tenant     text        NOT NULL,
    account_id text        NOT NULL,
    currency   char(3)     NOT NULL,
    balance    bigint      NOT NULL DEFAULT 0,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant, account_id),
    CHECK (account_id LIKE 'world:%' OR balance >= 0)
);

CREATE TABLE postings (
    posting_id uuid        PRIMARY KEY,
    tenant     text        NOT NULL,
    kind       text        NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE entries (
    posting_id uuid   NOT NULL REFERENCES postings,
    tenant     text   NOT NULL,
    account_id text   NOT NULL,
    amount     bigint NOT NULL,
    PRIMARY KEY (posting_id, account_id),
    FOREIGN KEY (tenant, account_id) REFERENCES accounts
);
CREATE INDEX entries_by_account ON entries (tenant, account_id);
