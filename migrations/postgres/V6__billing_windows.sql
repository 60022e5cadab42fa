-- Closing billing's crash and ordering windows (as SQLite's V7).
--
-- A refund reversal is claimed on the purchase row before its credits are taken back:
-- `reversing_to` is the level the claimed step moves `credits_reversed` to. It stays set until
-- the step is done, so whoever finds it set (a redelivery, another node, reconciliation)
-- finishes the same step under the same ledger key instead of losing it.
ALTER TABLE purchases ADD COLUMN reversing_to BIGINT CHECK (reversing_to IS NULL OR (reversing_to > credits_reversed AND reversing_to <= credits));

-- Every change to a credit debt, once per key: a repeat returns what the first did.
CREATE TABLE debt_updates (
    key        TEXT        PRIMARY KEY,
    account    TEXT        NOT NULL,
    -- What the caller asked for (either sign) and what it did after the clamps.
    requested  BIGINT      NOT NULL,
    applied    BIGINT      NOT NULL,
    debt_after BIGINT      NOT NULL CHECK (debt_after >= 0),
    at         TIMESTAMPTZ NOT NULL
);

-- The Stripe object an event is about, for lookups without a scan: the payment intent of a
-- charge, the subscription of a subscription event, the object's own id otherwise.
ALTER TABLE stripe_events ADD COLUMN object_ref TEXT;
UPDATE stripe_events SET object_ref = CASE
    WHEN kind LIKE 'charge.%' THEN payload::jsonb #>> '{data,object,payment_intent}'
    ELSE payload::jsonb #>> '{data,object,id}'
END;
CREATE INDEX stripe_events_by_ref ON stripe_events (object_ref, status, created, id) WHERE object_ref IS NOT NULL;
