-- Billing, as SQLite's V5: purchases (credit packs and subscriptions bought through Stripe),
-- the Stripe events received (each kept once, by its id), Stripe customers and the accounts they
-- pay for, and credit debts (credits refunded after they were spent; at most
-- MAX_BUCKET_CREDITS). Times are timestamptz (kept to the millisecond); credits and cents are
-- bigint. Accounts are the accounts' external ids (no foreign key to `accounts`). Ids that lists
-- are ordered by compare byte by byte (COLLATE "C"), as SQLite's do.

CREATE TABLE purchases (
    id               TEXT COLLATE "C" PRIMARY KEY,
    account          TEXT        NOT NULL,
    kind             TEXT        NOT NULL CHECK (kind IN ('pack', 'subscription')),
    product          TEXT        NOT NULL,
    credits          BIGINT      NOT NULL CHECK (credits >= 0),
    amount_cents     BIGINT      NOT NULL CHECK (amount_cents >= 0),
    currency         TEXT        NOT NULL,
    status           TEXT        NOT NULL CHECK (status IN ('pending', 'completed', 'failed', 'partially_refunded', 'refunded')),
    checkout_session TEXT,
    payment_intent   TEXT,
    customer         TEXT,
    credited         BOOLEAN     NOT NULL,
    refunded_cents   BIGINT      NOT NULL CHECK (refunded_cents >= 0 AND refunded_cents <= amount_cents),
    credits_reversed BIGINT      NOT NULL CHECK (credits_reversed >= 0 AND credits_reversed <= credits),
    -- Optimistic concurrency: every save checks the version it read and adds one.
    version          BIGINT      NOT NULL CHECK (version >= 1),
    created_at       TIMESTAMPTZ NOT NULL,
    updated_at       TIMESTAMPTZ NOT NULL
);
CREATE UNIQUE INDEX purchases_by_checkout_session ON purchases (checkout_session) WHERE checkout_session IS NOT NULL;
CREATE UNIQUE INDEX purchases_by_payment_intent ON purchases (payment_intent) WHERE payment_intent IS NOT NULL;

CREATE TABLE stripe_events (
    id          TEXT COLLATE "C" PRIMARY KEY,
    -- Stripe's event type.
    kind        TEXT        NOT NULL,
    -- Stripe's `created` (Unix seconds).
    created     BIGINT      NOT NULL,
    status      TEXT        NOT NULL CHECK (status IN ('received', 'processed', 'ignored', 'unmatched')),
    account     TEXT,
    -- The verified raw payload.
    payload     TEXT        NOT NULL,
    received_at TIMESTAMPTZ NOT NULL
);
CREATE INDEX stripe_events_by_status ON stripe_events (status, received_at, id);

CREATE TABLE stripe_customers (
    customer   TEXT        PRIMARY KEY,
    account    TEXT        NOT NULL,
    updated_at TIMESTAMPTZ NOT NULL
);

CREATE TABLE credit_debts (
    account    TEXT        PRIMARY KEY,
    credits    BIGINT      NOT NULL CHECK (credits >= 0 AND credits <= 1000000000000),
    updated_at TIMESTAMPTZ NOT NULL
);
