-- The same CHECKs on `holds.status` and `runs.outcome`, written so that SQLite evaluates them in
-- place.
--
-- SQLite compiles `x IN ('a', 'b', 'c')` (three values or more) in a CHECK into a temporary
-- b-tree built anew for every row written: on `holds` that was ~3.5 µs of the ~6 µs each hold,
-- settle and release spent in its statement, and on `runs` a share of every playground run. An
-- `OR` of equalities accepts exactly the same values and needs nothing built. SQLite cannot
-- change a CHECK in place, so both tables are rebuilt (the standard copy, drop and rename),
-- keeping every column, row, id and index as they were.

CREATE TABLE holds_v8 (
    id          INTEGER PRIMARY KEY,
    account_id  INTEGER NOT NULL REFERENCES accounts (id),
    amount      INTEGER NOT NULL CHECK (amount > 0),
    deadline_ms INTEGER NOT NULL,
    status      TEXT    NOT NULL CHECK (status = 'open' OR status = 'settled' OR status = 'released' OR status = 'expired'),
    reference   TEXT    NOT NULL,
    created_ms  INTEGER NOT NULL,
    closed_ms   INTEGER,
    cost_micros INTEGER NOT NULL DEFAULT 0 CHECK (cost_micros >= 0)
);
INSERT INTO holds_v8 (id, account_id, amount, deadline_ms, status, reference, created_ms, closed_ms, cost_micros)
    SELECT id, account_id, amount, deadline_ms, status, reference, created_ms, closed_ms, cost_micros FROM holds ORDER BY id;
DROP TABLE holds;
ALTER TABLE holds_v8 RENAME TO holds;
CREATE INDEX holds_open_by_account ON holds (account_id) WHERE status = 'open';
CREATE INDEX holds_open_by_deadline ON holds (deadline_ms) WHERE status = 'open';

CREATE TABLE runs_v8 (
    id                 TEXT    PRIMARY KEY,
    account            TEXT    NOT NULL,
    -- The session the run was part of (it may since have been deleted).
    session_id         TEXT,
    package_id         TEXT,
    model              TEXT    NOT NULL,
    with_prompt        INTEGER NOT NULL,
    input_tokens       INTEGER NOT NULL CHECK (input_tokens >= 0),
    output_tokens      INTEGER NOT NULL CHECK (output_tokens >= 0),
    cache_read_tokens  INTEGER NOT NULL CHECK (cache_read_tokens >= 0),
    cache_write_tokens INTEGER NOT NULL CHECK (cache_write_tokens >= 0),
    credits            INTEGER NOT NULL CHECK (credits >= 0),
    cost_micros        INTEGER NOT NULL CHECK (cost_micros >= 0),
    latency_ms         INTEGER NOT NULL CHECK (latency_ms >= 0),
    outcome            TEXT    NOT NULL CHECK (outcome = 'completed' OR outcome = 'failed' OR outcome = 'interrupted'),
    error              TEXT,
    hold_id            INTEGER,
    at_ms              INTEGER NOT NULL
);
INSERT INTO runs_v8 SELECT id, account, session_id, package_id, model, with_prompt, input_tokens, output_tokens, cache_read_tokens,
    cache_write_tokens, credits, cost_micros, latency_ms, outcome, error, hold_id, at_ms FROM runs ORDER BY rowid;
DROP TABLE runs;
ALTER TABLE runs_v8 RENAME TO runs;
CREATE INDEX runs_by_account ON runs (account, at_ms DESC, id DESC);
