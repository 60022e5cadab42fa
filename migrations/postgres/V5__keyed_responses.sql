-- Responses to HTTP requests that carried an `Idempotency-Key`: a repeat of the request (same
-- account, key and request fingerprint) gets the stored response; the same key with another
-- request is a conflict. One row per (account, key), never changed once written.
CREATE TABLE keyed_responses (
    account     TEXT    NOT NULL,
    key         TEXT    NOT NULL,
    fingerprint TEXT    NOT NULL,
    status      INTEGER NOT NULL CHECK (status BETWEEN 100 AND 599),
    body        TEXT    NOT NULL,
    at_ms       BIGINT  NOT NULL,
    PRIMARY KEY (account, key)
);
