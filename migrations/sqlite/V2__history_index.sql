-- The per-account index of the log, maintained off the hot path.
--
-- A B-tree index on ledger_entries (account_id, id) costs every spend a write to its
-- account's end of the index, a page no other spend of a group shares. Instead the writer
-- appends entries to ledger_entries only and, every `history_index_batch` entries, indexes
-- the new ones in one statement (each account's new entries then share pages). Entries
-- above `indexed_upto` are found by scanning the (bounded) tail of the log.
CREATE TABLE ledger_by_account (
    account_id INTEGER NOT NULL,
    entry_id   INTEGER NOT NULL,
    PRIMARY KEY (account_id, entry_id)
) WITHOUT ROWID;

CREATE TABLE ledger_index_state (
    id           INTEGER PRIMARY KEY CHECK (id = 1),
    indexed_upto INTEGER NOT NULL CHECK (indexed_upto >= 0)
);

INSERT INTO ledger_by_account (account_id, entry_id)
    SELECT account_id, id FROM ledger_entries ORDER BY account_id, id;
INSERT INTO ledger_index_state (id, indexed_upto)
    VALUES (1, COALESCE((SELECT max(id) FROM ledger_entries), 0));
DROP INDEX ledger_entries_by_account;
