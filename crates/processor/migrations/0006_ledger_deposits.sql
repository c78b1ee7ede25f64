-- Many deposits in one round trip: the deposits of a batch, in order, each by
-- ledger_deposit (0005), one result row per deposit in the order given.
--
-- Why: a batch holds world:<CUR> locked from its first deposit to its commit,
-- so every round trip a deposit costs inside that lock is paid by every other
-- lane in turn. With one call per deposit, a batch of ~62 deposits held it
-- for ~81 ms (~1.3 ms per deposit, mostly the round trip on a busy machine);
-- the same deposits as one call hold it for the time the server takes to run
-- them.
--
-- A loop, not `unnest(...) CROSS JOIN LATERAL ledger_deposit(...)`: the order
-- in which a query calls a function is the planner's choice, and deposits to
-- one account must apply in the order of their commands.
CREATE FUNCTION ledger_deposits(
    p_tenants text[], p_accounts text[], p_amounts bigint[], p_postings uuid[]
) RETURNS TABLE (balance bigint, out_of_range text) LANGUAGE plpgsql AS $$
BEGIN
    IF cardinality(p_accounts) <> cardinality(p_tenants)
       OR cardinality(p_amounts) <> cardinality(p_tenants)
       OR cardinality(p_postings) <> cardinality(p_tenants) THEN
        RAISE EXCEPTION 'ledger_deposits: arrays of different lengths' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    FOR i IN 1 .. cardinality(p_tenants) LOOP
        SELECT d.balance, d.out_of_range INTO balance, out_of_range
          FROM ledger_deposit(p_tenants[i], p_accounts[i], p_amounts[i], p_postings[i]) d;
        RETURN NEXT;
    END LOOP;
END
$$;
