-- Cost control: tiers as data, per-account cost counters, throttles, the request window,
-- alerts, and per-user daily usage rollups. Money in integer micro-dollars, times in Unix ms.

-- `cost_limits_config`: every tier's limits (NULL: no limit). Admins change them through the
-- library; tiers are never removed (accounts may name them).
CREATE TABLE cost_tiers (
    name                      TEXT    PRIMARY KEY,
    monthly_revenue_micros    INTEGER NOT NULL CHECK (monthly_revenue_micros >= 0),
    monthly_cost_limit_micros INTEGER CHECK (monthly_cost_limit_micros >= 0),
    daily_cost_limit_micros   INTEGER CHECK (daily_cost_limit_micros >= 0),
    hourly_request_limit      INTEGER CHECK (hourly_request_limit >= 0),
    alert_threshold_pct       INTEGER CHECK (alert_threshold_pct BETWEEN 1 AND 100),
    throttle_on_exceed        INTEGER NOT NULL
);
INSERT INTO cost_tiers VALUES
    ('free',                 0,       500000,       100000,  10,   80,   1),
    ('prpm_plus_individual', 6000000, 5000000,      1000000, 100,  90,   1),
    ('prpm_plus_org',        3000000, 2500000,      500000,  100,  90,   1),
    ('unlimited',            0,       999999990000, NULL,    NULL, NULL, 0);

ALTER TABLE accounts ADD COLUMN org_member        INTEGER NOT NULL DEFAULT 0;
ALTER TABLE accounts ADD COLUMN tier_override     TEXT;
ALTER TABLE accounts ADD COLUMN plan_anchor_day   INTEGER;
-- The UTC day (its midnight) and month (its first midnight) the counters count.
ALTER TABLE accounts ADD COLUMN cost_day_ms       INTEGER;
ALTER TABLE accounts ADD COLUMN day_cost_micros   INTEGER NOT NULL DEFAULT 0 CHECK (day_cost_micros >= 0);
ALTER TABLE accounts ADD COLUMN cost_month_ms     INTEGER;
ALTER TABLE accounts ADD COLUMN month_cost_micros INTEGER NOT NULL DEFAULT 0 CHECK (month_cost_micros >= 0);
-- Worst-case cost of open holds (= the sum of their cost_micros).
ALTER TABLE accounts ADD COLUMN held_cost_micros  INTEGER NOT NULL DEFAULT 0 CHECK (held_cost_micros >= 0);
-- JSON of the throttle (reason, since), NULL when not throttled; throttle_lifts_ms is when a
-- cost throttle ends by itself (NULL for an admin's).
ALTER TABLE accounts ADD COLUMN throttle          TEXT;
ALTER TABLE accounts ADD COLUMN throttle_lifts_ms INTEGER;
-- Admitted request times inside the last hour: little-endian i64 ms, oldest first.
ALTER TABLE accounts ADD COLUMN requests          BLOB;
-- Alerts recorded this month: bit 0 at risk, bit 1 threshold.
ALTER TABLE accounts ADD COLUMN alerted           INTEGER NOT NULL DEFAULT 0;

ALTER TABLE holds ADD COLUMN cost_micros INTEGER NOT NULL DEFAULT 0 CHECK (cost_micros >= 0);

-- Alerts, one per account, kind and month (the unique key makes a second one impossible).
CREATE TABLE cost_alerts (
    id           INTEGER PRIMARY KEY,
    account_id   INTEGER NOT NULL REFERENCES accounts (id),
    kind         TEXT    NOT NULL CHECK (kind IN ('at_risk', 'threshold')),
    month_ms     INTEGER NOT NULL,
    cost_micros  INTEGER NOT NULL,
    limit_micros INTEGER NOT NULL,
    at_ms        INTEGER NOT NULL,
    UNIQUE (account_id, kind, month_ms)
);

-- Usage per account and UTC day, rolled up from usage_records up to `rolled_upto` (an
-- entry id) by the writer every history-index batch and by the analytics refresh job.
CREATE TABLE usage_daily (
    account_id         INTEGER NOT NULL,
    day_ms             INTEGER NOT NULL,
    runs               INTEGER NOT NULL,
    credits            INTEGER NOT NULL,
    input_tokens       INTEGER NOT NULL,
    output_tokens      INTEGER NOT NULL,
    cache_read_tokens  INTEGER NOT NULL,
    cache_write_tokens INTEGER NOT NULL,
    cost_micros        INTEGER NOT NULL,
    PRIMARY KEY (account_id, day_ms)
) WITHOUT ROWID;
CREATE INDEX usage_daily_by_day ON usage_daily (day_ms);

CREATE TABLE usage_rollup_state (
    id          INTEGER PRIMARY KEY CHECK (id = 1),
    rolled_upto INTEGER NOT NULL CHECK (rolled_upto >= 0)
);
INSERT INTO usage_daily
    SELECT account_id, (at_ms / 86400000) * 86400000, count(*), sum(credits), sum(input_tokens), sum(output_tokens),
           sum(cache_read_tokens), sum(cache_write_tokens), sum(cost_micros)
    FROM usage_records GROUP BY 1, 2;
INSERT INTO usage_rollup_state (id, rolled_upto) VALUES (1, COALESCE((SELECT max(entry_id) FROM usage_records), 0));
