-- The playground: packages (the prompts runs use), sessions (multi-turn conversations, shareable
-- by token) with their turns, and runs (one model call each: the billing record, kept when its
-- session is deleted). Times are Unix milliseconds (UTC); token counts, credits and money
-- (micro-dollars) are integers. Owners and accounts are the accounts' external ids (no foreign
-- key to `accounts`). Written by the writer thread, each change in its own transaction.

CREATE TABLE packages (
    id         TEXT    PRIMARY KEY,
    name       TEXT    NOT NULL,
    version    TEXT    NOT NULL,
    prompt     TEXT    NOT NULL,
    created_ms INTEGER NOT NULL,
    updated_ms INTEGER NOT NULL
);

CREATE TABLE sessions (
    id          TEXT    PRIMARY KEY,
    owner       TEXT    NOT NULL,
    package_id  TEXT,
    model       TEXT    NOT NULL,
    title       TEXT    NOT NULL,
    -- The turns stored (= the last turn's seq: turns are only appended, and deleted with the session).
    turn_count  INTEGER NOT NULL DEFAULT 0 CHECK (turn_count >= 0),
    -- Whoever has it reads the conversation; NULL: not shared.
    share_token TEXT,
    created_ms  INTEGER NOT NULL,
    updated_ms  INTEGER NOT NULL
);
CREATE INDEX sessions_by_owner ON sessions (owner, created_ms DESC, id DESC);
CREATE UNIQUE INDEX sessions_by_share_token ON sessions (share_token);

CREATE TABLE session_turns (
    session_id TEXT    NOT NULL REFERENCES sessions (id),
    seq        INTEGER NOT NULL CHECK (seq >= 1),
    role       TEXT    NOT NULL CHECK (role IN ('user', 'assistant')),
    content    TEXT    NOT NULL,
    run_id     TEXT,
    at_ms      INTEGER NOT NULL,
    PRIMARY KEY (session_id, seq)
);

CREATE TABLE runs (
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
    outcome            TEXT    NOT NULL CHECK (outcome IN ('completed', 'failed', 'interrupted')),
    error              TEXT,
    hold_id            INTEGER,
    at_ms              INTEGER NOT NULL
);
CREATE INDEX runs_by_account ON runs (account, at_ms DESC, id DESC);
