-- One index fewer per spend. A usage record is the usage of one log entry (`entry_id`), of the
-- same account, and an account's log is already indexed (`ledger_entries_by_account`): an
-- account's usage is found by walking its log newest first and joining each entry to its
-- record by the primary key. The index on (account_id, entry_id) only cost an insert at a
-- random place per spend. `verify()` checks that each record's account is its entry's.
DROP INDEX usage_records_by_account;
