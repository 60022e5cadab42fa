-- prpm-playground on PostgreSQL: the same model as the SQLite schema (V1 to V3 there), in one
-- step. Times are timestamptz; credits are bigint; money is bigint micro-dollars.

CREATE TABLE accounts (
    id                BIGSERIAL PRIMARY KEY,
    external_id       TEXT        NOT NULL UNIQUE,
    kind              TEXT        NOT NULL CHECK (kind IN ('user', 'organisation')),
    monthly           BIGINT      NOT NULL CHECK (monthly >= 0),
    rollover          BIGINT      NOT NULL CHECK (rollover >= 0),
    purchased         BIGINT      NOT NULL CHECK (purchased >= 0),
    held              BIGINT      NOT NULL CHECK (held >= 0),
    -- [[amount, expires_ms], ...] sorted by expiry; rollover = their sum.
    rollover_lots     JSONB       NOT NULL DEFAULT '[]',
    next_expiry       TIMESTAMPTZ,
    plan_credits      BIGINT,
    plan_active       BOOLEAN,
    period_end        TIMESTAMPTZ,
    plan_anchor_day   INTEGER,
    org_member        BOOLEAN     NOT NULL DEFAULT FALSE,
    tier_override     TEXT,
    cost_day          DATE,
    day_cost_micros   BIGINT      NOT NULL DEFAULT 0 CHECK (day_cost_micros >= 0),
    cost_month        DATE,
    month_cost_micros BIGINT      NOT NULL DEFAULT 0 CHECK (month_cost_micros >= 0),
    held_cost_micros  BIGINT      NOT NULL DEFAULT 0 CHECK (held_cost_micros >= 0),
    throttle          JSONB,
    throttle_lifts    TIMESTAMPTZ,
    -- Admitted request times inside the last hour (Unix ms), oldest first.
    requests          BIGINT[]    NOT NULL DEFAULT '{}',
    alerted           INTEGER     NOT NULL DEFAULT 0,
    created_at        TIMESTAMPTZ NOT NULL,
    updated_at        TIMESTAMPTZ NOT NULL
);
CREATE INDEX accounts_next_expiry ON accounts (next_expiry) WHERE next_expiry IS NOT NULL;
CREATE INDEX accounts_period_end ON accounts (period_end) WHERE period_end IS NOT NULL;

CREATE TABLE holds (
    id          BIGSERIAL PRIMARY KEY,
    account_id  BIGINT      NOT NULL REFERENCES accounts (id),
    amount      BIGINT      NOT NULL CHECK (amount > 0),
    cost_micros BIGINT      NOT NULL DEFAULT 0 CHECK (cost_micros >= 0),
    deadline    TIMESTAMPTZ NOT NULL,
    status      TEXT        NOT NULL CHECK (status IN ('open', 'settled', 'released', 'expired')),
    reference   TEXT        NOT NULL,
    created_at  TIMESTAMPTZ NOT NULL,
    closed_at   TIMESTAMPTZ
);
CREATE INDEX holds_open_by_account ON holds (account_id) WHERE status = 'open';
CREATE INDEX holds_open_by_deadline ON holds (deadline) WHERE status = 'open';

-- The append-only transaction log.
CREATE TABLE ledger_entries (
    id              BIGSERIAL PRIMARY KEY,
    account_id      BIGINT      NOT NULL REFERENCES accounts (id),
    at              TIMESTAMPTZ NOT NULL,
    kind            TEXT        NOT NULL,
    d_monthly       BIGINT      NOT NULL,
    d_rollover      BIGINT      NOT NULL,
    d_purchased     BIGINT      NOT NULL,
    d_held          BIGINT      NOT NULL,
    balance_after   BIGINT      NOT NULL,
    held_after      BIGINT      NOT NULL,
    source          TEXT,
    hold_id         BIGINT,
    ref_entry       BIGINT,
    reference       TEXT        NOT NULL,
    rollover_expires_at TIMESTAMPTZ
);
CREATE INDEX ledger_entries_by_account ON ledger_entries (account_id, id);
CREATE INDEX ledger_entries_by_ref ON ledger_entries (ref_entry) WHERE ref_entry IS NOT NULL;
CREATE FUNCTION ledger_entries_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'ledger_entries is append-only';
END;
$$;
CREATE TRIGGER ledger_entries_no_update BEFORE UPDATE OR DELETE ON ledger_entries
    FOR EACH ROW EXECUTE FUNCTION ledger_entries_append_only();

CREATE TABLE usage_records (
    entry_id           BIGINT      PRIMARY KEY,
    account_id         BIGINT      NOT NULL REFERENCES accounts (id),
    at                 TIMESTAMPTZ NOT NULL,
    hold_id            BIGINT,
    operation          TEXT        NOT NULL,
    model              TEXT        NOT NULL,
    input_tokens       BIGINT      NOT NULL,
    output_tokens      BIGINT      NOT NULL,
    cache_read_tokens  BIGINT      NOT NULL,
    cache_write_tokens BIGINT      NOT NULL,
    credits            BIGINT      NOT NULL,
    cost_micros        BIGINT      NOT NULL
);
CREATE INDEX usage_records_by_account ON usage_records (account_id, entry_id);
CREATE INDEX usage_records_by_time ON usage_records (at);

CREATE TABLE idempotency (
    key         TEXT        PRIMARY KEY,
    fingerprint BIGINT      NOT NULL,
    outcome     JSONB       NOT NULL,
    at          TIMESTAMPTZ NOT NULL
);

-- `cost_limits_config`: every tier's limits (NULL: no limit).
CREATE TABLE cost_tiers (
    name                      TEXT    PRIMARY KEY,
    monthly_revenue_micros    BIGINT  NOT NULL CHECK (monthly_revenue_micros >= 0),
    monthly_cost_limit_micros BIGINT  CHECK (monthly_cost_limit_micros >= 0),
    daily_cost_limit_micros   BIGINT  CHECK (daily_cost_limit_micros >= 0),
    hourly_request_limit      INTEGER CHECK (hourly_request_limit >= 0),
    alert_threshold_pct       INTEGER CHECK (alert_threshold_pct BETWEEN 1 AND 100),
    throttle_on_exceed        BOOLEAN NOT NULL
);
INSERT INTO cost_tiers VALUES
    ('free',                 0,       500000,       100000,  10,   80,   TRUE),
    ('prpm_plus_individual', 6000000, 5000000,      1000000, 100,  90,   TRUE),
    ('prpm_plus_org',        3000000, 2500000,      500000,  100,  90,   TRUE),
    ('unlimited',            0,       999999990000, NULL,    NULL, NULL, FALSE);

CREATE TABLE cost_alerts (
    id           BIGSERIAL   PRIMARY KEY,
    account_id   BIGINT      NOT NULL REFERENCES accounts (id),
    kind         TEXT        NOT NULL CHECK (kind IN ('at_risk', 'threshold')),
    month        DATE        NOT NULL,
    cost_micros  BIGINT      NOT NULL,
    limit_micros BIGINT      NOT NULL,
    at           TIMESTAMPTZ NOT NULL,
    UNIQUE (account_id, kind, month)
);

-- Usage per account and UTC day, rolled up by the analytics refresh (usage records are
-- marked rolled up, since entry ids are not assigned in commit order on PostgreSQL).
CREATE TABLE usage_daily (
    account_id         BIGINT NOT NULL,
    day                DATE   NOT NULL,
    runs               BIGINT NOT NULL,
    credits            BIGINT NOT NULL,
    input_tokens       BIGINT NOT NULL,
    output_tokens      BIGINT NOT NULL,
    cache_read_tokens  BIGINT NOT NULL,
    cache_write_tokens BIGINT NOT NULL,
    cost_micros        BIGINT NOT NULL,
    PRIMARY KEY (account_id, day)
);
CREATE INDEX usage_daily_by_day ON usage_daily (day);
ALTER TABLE usage_records ADD COLUMN rolled_up BOOLEAN NOT NULL DEFAULT FALSE;
CREATE INDEX usage_records_not_rolled_up ON usage_records (entry_id) WHERE NOT rolled_up;
