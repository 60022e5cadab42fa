-- A charge's usage is columns of its log entry, not a row of its own: one heap row and two index
-- entries fewer per spend (a throw-away build without the usage record ran 15-20 % faster over
-- 1,000 accounts; see the README's PostgreSQL figures). An entry has usage when `model` is
-- set; its credits are the entry's charge (`-(d_monthly + d_rollover + d_purchased)`), its
-- account, time and hold the entry's.
ALTER TABLE ledger_entries
    ADD COLUMN operation          TEXT,
    ADD COLUMN model              TEXT,
    ADD COLUMN input_tokens       BIGINT,
    ADD COLUMN output_tokens      BIGINT,
    ADD COLUMN cache_read_tokens  BIGINT,
    ADD COLUMN cache_write_tokens BIGINT,
    ADD COLUMN cost_micros        BIGINT,
    ADD CONSTRAINT ledger_entries_usage_whole CHECK (
        (model IS NULL AND operation IS NULL AND input_tokens IS NULL AND output_tokens IS NULL AND cache_read_tokens IS NULL
         AND cache_write_tokens IS NULL AND cost_micros IS NULL)
        OR (model IS NOT NULL AND operation IS NOT NULL AND input_tokens >= 0 AND output_tokens >= 0 AND cache_read_tokens >= 0
            AND cache_write_tokens >= 0 AND cost_micros >= 0));

-- The records not rolled up yet are rolled up first, so that everything up to the log's highest
-- id is in `usage_daily` when the watermark below starts there.
INSERT INTO usage_daily (account_id, day, runs, credits, input_tokens, output_tokens, cache_read_tokens, cache_write_tokens, cost_micros)
SELECT account_id, (at AT TIME ZONE 'UTC')::date, count(*), SUM(credits), SUM(input_tokens), SUM(output_tokens), SUM(cache_read_tokens),
       SUM(cache_write_tokens), SUM(cost_micros)
FROM usage_records WHERE NOT rolled_up GROUP BY 1, 2
ON CONFLICT (account_id, day) DO UPDATE SET runs = usage_daily.runs + excluded.runs, credits = usage_daily.credits + excluded.credits,
    input_tokens = usage_daily.input_tokens + excluded.input_tokens, output_tokens = usage_daily.output_tokens + excluded.output_tokens,
    cache_read_tokens = usage_daily.cache_read_tokens + excluded.cache_read_tokens,
    cache_write_tokens = usage_daily.cache_write_tokens + excluded.cache_write_tokens, cost_micros = usage_daily.cost_micros + excluded.cost_micros;

-- The records move into their entries: the one time the append-only log is updated, inside this
-- migration's transaction.
ALTER TABLE ledger_entries DISABLE TRIGGER ledger_entries_no_update;
UPDATE ledger_entries l SET operation = u.operation, model = u.model, input_tokens = u.input_tokens, output_tokens = u.output_tokens,
    cache_read_tokens = u.cache_read_tokens, cache_write_tokens = u.cache_write_tokens, cost_micros = u.cost_micros
FROM usage_records u WHERE u.entry_id = l.id;
ALTER TABLE ledger_entries ENABLE TRIGGER ledger_entries_no_update;
DROP TABLE usage_records;

-- The roll-up's watermark: every entry with usage up to `rolled_upto` is in `usage_daily`, and
-- none is added there later. Ids are not assigned in commit order, so the roll-up takes
-- `pg_advisory_xact_lock(USAGE_LOCK)` (waiting for every transaction that writes usage, each of
-- which holds the shared lock from before it takes ids until it commits), and a write whose ids
-- were taken before its lock checks that they lie above the watermark (see the store).
CREATE TABLE usage_rollup (
    id          INTEGER PRIMARY KEY CHECK (id = 1),
    rolled_upto BIGINT  NOT NULL CHECK (rolled_upto >= 0)
);
INSERT INTO usage_rollup (id, rolled_upto) VALUES (1, COALESCE((SELECT max(id) FROM ledger_entries), 0));

-- The records as they were, for readers (the analysis reader, `verify()`): an entry's usage.
CREATE VIEW usage_records AS
SELECT id AS entry_id, account_id, at, hold_id, operation, model, input_tokens, output_tokens, cache_read_tokens, cache_write_tokens,
       -(d_monthly + d_rollover + d_purchased) AS credits, cost_micros
FROM ledger_entries WHERE model IS NOT NULL;
