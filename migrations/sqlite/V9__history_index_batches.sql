-- The per-account index of the log (V2), one row per account and indexing batch instead of one
-- row per entry.
--
-- Every `history_index_batch` entries the writer indexed the new ones, one row each: with many
-- accounts, each row went to its own account's end of the index, a seek and a page of its own,
-- ~2.5 µs per entry of the writer's time (a tenth of a spend's). Now each account's entries of
-- a batch are one row: the array of their ids, ascending, keyed by the account and the last
-- of them. A batch of 8,192 entries over 1,000 accounts writes ~1,000 rows instead of 8,192.
--
-- Rows of one account never overlap: a row holds consecutive ids of the account within one batch
-- (a range of the log above the batch before it), at most 1,024 of them, which bounds what a
-- history read parses whatever the batch size. So a row's ids are all above the previous row's
-- `last_entry`, and a read that wants entries below some id takes the first row ending at or
-- above it, then the rows before it.
CREATE TABLE ledger_by_account_batches (
    account_id INTEGER NOT NULL,
    last_entry INTEGER NOT NULL,
    -- JSON array of the account's entry ids in the batch, ascending; the last is `last_entry`.
    entries    TEXT    NOT NULL,
    PRIMARY KEY (account_id, last_entry)
) WITHOUT ROWID;

INSERT INTO ledger_by_account_batches (account_id, last_entry, entries)
    SELECT account_id, max(entry_id), json_group_array(entry_id ORDER BY entry_id) FROM (
        SELECT account_id, entry_id, (row_number() OVER (PARTITION BY account_id ORDER BY entry_id) - 1) / 1024 AS chunk
        FROM ledger_by_account)
    GROUP BY account_id, chunk;

DROP TABLE ledger_by_account;
