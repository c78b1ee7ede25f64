-- A deposit's effect in one round trip. Deposits are the ledger's hot path:
-- every deposit of a currency locks the one world:<CUR> row until its batch
-- commits, so each round trip a deposit spends inside that lock is paid by
-- every lane of the processor in turn. pgbench of batches of 64 deposits, 4
-- clients, on one run: ~8.6 batches/s with the three statements this replaces
-- (lock the account, lock world:<CUR>, post), ~15 with this function.
--
-- Same rules as the Rust handler (crates/processor/src/handlers/ledger.rs),
-- which calls it: the customer's account is locked before world:<CUR> (every
-- deposit takes them in that order), world:<CUR> is created by the currency's
-- first deposit, and every refusal is decided before anything is written, so
-- a refused deposit changes nothing:
--   balance NULL, out_of_range NULL      the account does not exist
--   out_of_range = an account            its balance would leave the 64-bit range
--   otherwise                            applied; balance is the account's new one
-- The amount is positive (the handler refuses anything else before calling).
CREATE FUNCTION ledger_deposit(
    p_tenant text, p_account text, p_amount bigint, p_posting uuid,
    OUT balance bigint, OUT out_of_range text
) LANGUAGE plpgsql AS $$
DECLARE
    v_currency char(3);
    v_balance bigint;
    v_world text;
    v_world_balance bigint;
BEGIN
    SELECT a.currency, a.balance INTO v_currency, v_balance
      FROM accounts a WHERE a.tenant = p_tenant AND a.account_id = p_account FOR UPDATE;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    v_world := 'world:' || v_currency;
    SELECT a.balance INTO v_world_balance
      FROM accounts a WHERE a.tenant = p_tenant AND a.account_id = v_world FOR UPDATE;
    IF NOT FOUND THEN
        INSERT INTO accounts (tenant, account_id, currency) VALUES (p_tenant, v_world, v_currency)
            ON CONFLICT DO NOTHING;
        SELECT a.balance INTO STRICT v_world_balance
          FROM accounts a WHERE a.tenant = p_tenant AND a.account_id = v_world FOR UPDATE;
    END IF;
    -- Compared, not computed: the sum itself would raise on overflow.
    IF v_balance > 9223372036854775807 - p_amount THEN
        out_of_range := p_account;
        RETURN;
    END IF;
    IF v_world_balance < -9223372036854775808 + p_amount THEN
        out_of_range := v_world;
        RETURN;
    END IF;
    INSERT INTO postings (posting_id, tenant, kind) VALUES (p_posting, p_tenant, 'deposit');
    INSERT INTO entries (posting_id, tenant, account_id, amount)
        VALUES (p_posting, p_tenant, v_world, -p_amount), (p_posting, p_tenant, p_account, p_amount);
    UPDATE accounts a SET balance = a.balance - p_amount WHERE a.tenant = p_tenant AND a.account_id = v_world;
    UPDATE accounts a SET balance = a.balance + p_amount WHERE a.tenant = p_tenant AND a.account_id = p_account;
    balance := v_balance + p_amount;
END
$$;
