-- A batch writes every table it touches in one statement and commits in the same round trip,
-- so the check that each table took exactly the rows the batch computed runs inside that
-- statement: this raises (and the transaction rolls back) when they differ.
CREATE FUNCTION prpm_written(got BIGINT[], want BIGINT[]) RETURNS BIGINT[]
LANGUAGE plpgsql AS $$
BEGIN
    IF got IS DISTINCT FROM want THEN
        RAISE EXCEPTION 'batch wrote % rows per table, not %', got, want USING ERRCODE = 'XX000';
    END IF;
    RETURN got;
END
$$;
