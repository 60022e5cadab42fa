-- prpm-playground ledger, SQLite. Times are Unix milliseconds (UTC); credits are integers;
-- money is integer micro-dollars.

CREATE TABLE accounts (
    id             INTEGER PRIMARY KEY,
    external_id    TEXT    NOT NULL UNIQUE,
    kind           TEXT    NOT NULL CHECK (kind IN ('user', 'organisation')),
    monthly        INTEGER NOT NULL CHECK (monthly >= 0),
    rollover       INTEGER NOT NULL CHECK (rollover >= 0),
    purchased      INTEGER NOT NULL CHECK (purchased >= 0),
    held           INTEGER NOT NULL CHECK (held >= 0),
    -- JSON [[amount, expires_ms], ...] sorted by expiry; rollover = their sum.
    rollover_lots  TEXT    NOT NULL DEFAULT '[]',
    next_expiry_ms INTEGER,
    plan_credits   INTEGER,
    plan_active    INTEGER,
    period_end_ms  INTEGER,
    created_ms     INTEGER NOT NULL,
    updated_ms     INTEGER NOT NULL
);
CREATE INDEX accounts_next_expiry ON accounts (next_expiry_ms) WHERE next_expiry_ms IS NOT NULL;
CREATE INDEX accounts_period_end ON accounts (period_end_ms) WHERE period_end_ms IS NOT NULL;

CREATE TABLE holds (
    id          INTEGER PRIMARY KEY,
    account_id  INTEGER NOT NULL REFERENCES accounts (id),
    amount      INTEGER NOT NULL CHECK (amount > 0),
    deadline_ms INTEGER NOT NULL,
    status      TEXT    NOT NULL CHECK (status IN ('open', 'settled', 'released', 'expired')),
    reference   TEXT    NOT NULL,
    created_ms  INTEGER NOT NULL,
    closed_ms   INTEGER
);
CREATE INDEX holds_open_by_account ON holds (account_id) WHERE status = 'open';
CREATE INDEX holds_open_by_deadline ON holds (deadline_ms) WHERE status = 'open';

-- The append-only transaction log.
CREATE TABLE ledger_entries (
    id                  INTEGER PRIMARY KEY,
    account_id          INTEGER NOT NULL REFERENCES accounts (id),
    at_ms               INTEGER NOT NULL,
    kind                TEXT    NOT NULL,
    d_monthly           INTEGER NOT NULL,
    d_rollover          INTEGER NOT NULL,
    d_purchased         INTEGER NOT NULL,
    d_held              INTEGER NOT NULL,
    balance_after       INTEGER NOT NULL,
    held_after          INTEGER NOT NULL,
    source              TEXT,
    hold_id             INTEGER,
    ref_entry           INTEGER,
    reference           TEXT    NOT NULL,
    rollover_expires_ms INTEGER
);
CREATE INDEX ledger_entries_by_account ON ledger_entries (account_id, id);
CREATE INDEX ledger_entries_by_ref ON ledger_entries (ref_entry) WHERE ref_entry IS NOT NULL;
CREATE TRIGGER ledger_entries_no_update BEFORE UPDATE ON ledger_entries
BEGIN
    SELECT RAISE(ABORT, 'ledger_entries is append-only');
END;
CREATE TRIGGER ledger_entries_no_delete BEFORE DELETE ON ledger_entries
BEGIN
    SELECT RAISE(ABORT, 'ledger_entries is append-only');
END;

-- What every settle and metered spend consumed, keyed by its log entry (appends only; the
-- account's usage is found through ledger_entries_by_account).
CREATE TABLE usage_records (
    entry_id           INTEGER PRIMARY KEY,
    account_id         INTEGER NOT NULL REFERENCES accounts (id),
    at_ms              INTEGER NOT NULL,
    hold_id            INTEGER,
    operation          TEXT    NOT NULL,
    model              TEXT    NOT NULL,
    input_tokens       INTEGER NOT NULL,
    output_tokens      INTEGER NOT NULL,
    cache_read_tokens  INTEGER NOT NULL,
    cache_write_tokens INTEGER NOT NULL,
    credits            INTEGER NOT NULL,
    cost_micros        INTEGER NOT NULL
);

-- First results of keyed commands: a replay returns `outcome` and writes nothing. Rows are
-- appended in rowid order; only the narrow key index is written at a random place.
CREATE TABLE idempotency (
    id          INTEGER PRIMARY KEY,
    key         TEXT    NOT NULL UNIQUE,
    fingerprint INTEGER NOT NULL,
    outcome     TEXT    NOT NULL,
    at_ms       INTEGER NOT NULL
);
