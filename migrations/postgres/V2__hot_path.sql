-- The hot path writes the log, the usage records and the holds of an account under that
-- account's row lock, after reading it: a foreign key would make the server look the account up
-- again for every row (measured: half the cost of the log insert). The code guarantees the
-- references and `verify()` checks them; the keys go.
ALTER TABLE ledger_entries DROP CONSTRAINT ledger_entries_account_id_fkey;
ALTER TABLE usage_records DROP CONSTRAINT usage_records_account_id_fkey;
ALTER TABLE holds DROP CONSTRAINT holds_account_id_fkey;
ALTER TABLE cost_alerts DROP CONSTRAINT cost_alerts_account_id_fkey;
