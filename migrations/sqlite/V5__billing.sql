-- Billing: purchases (credit packs and subscriptions bought through Stripe), the Stripe events
-- received (each kept once, by its id), Stripe customers and the accounts they pay for, and
-- credit debts (credits refunded after they were spent; at most MAX_BUCKET_CREDITS). Times are
-- Unix milliseconds (UTC); credits and cents are integers. Accounts are the accounts' external
-- ids (no foreign key to `accounts`). Written by the writer thread, each change in its own
-- transaction.

CREATE TABLE purchases (
    id               TEXT    PRIMARY KEY,
    account          TEXT    NOT NULL,
    kind             TEXT    NOT NULL CHECK (kind IN ('pack', 'subscription')),
    product          TEXT    NOT NULL,
    credits          INTEGER NOT NULL CHECK (credits >= 0),
    amount_cents     INTEGER NOT NULL CHECK (amount_cents >= 0),
    currency         TEXT    NOT NULL,
    status           TEXT    NOT NULL CHECK (status IN ('pending', 'completed', 'failed', 'partially_refunded', 'refunded')),
    checkout_session TEXT,
    payment_intent   TEXT,
    customer         TEXT,
    credited         INTEGER NOT NULL CHECK (credited IN (0, 1)),
    refunded_cents   INTEGER NOT NULL CHECK (refunded_cents >= 0 AND refunded_cents <= amount_cents),
    credits_reversed INTEGER NOT NULL CHECK (credits_reversed >= 0 AND credits_reversed <= credits),
    -- Optimistic concurrency: every save checks the version it read and adds one.
    version          INTEGER NOT NULL CHECK (version >= 1),
    created_ms       INTEGER NOT NULL,
    updated_ms       INTEGER NOT NULL
);
CREATE UNIQUE INDEX purchases_by_checkout_session ON purchases (checkout_session) WHERE checkout_session IS NOT NULL;
CREATE UNIQUE INDEX purchases_by_payment_intent ON purchases (payment_intent) WHERE payment_intent IS NOT NULL;

CREATE TABLE stripe_events (
    id          TEXT    PRIMARY KEY,
    -- Stripe's event type.
    kind        TEXT    NOT NULL,
    -- Stripe's `created` (Unix seconds).
    created     INTEGER NOT NULL,
    status      TEXT    NOT NULL CHECK (status IN ('received', 'processed', 'ignored', 'unmatched')),
    account     TEXT,
    -- The verified raw payload.
    payload     TEXT    NOT NULL,
    received_ms INTEGER NOT NULL
);
CREATE INDEX stripe_events_by_status ON stripe_events (status, received_ms, id);

CREATE TABLE stripe_customers (
    customer   TEXT    PRIMARY KEY,
    account    TEXT    NOT NULL,
    updated_ms INTEGER NOT NULL
);

CREATE TABLE credit_debts (
    account    TEXT    PRIMARY KEY,
    credits    INTEGER NOT NULL CHECK (credits >= 0 AND credits <= 1000000000000),
    updated_ms INTEGER NOT NULL
);
