-- Fewer bytes and less work per spend (the batch writes one idempotency row and one usage row
-- per keyed spend).
--
-- A keyed command's first result is stored as SQLite stores it (`store/outcome.rs`): the hot
-- effects (held, settled, released, spent) as a compact record of 15 to 40 bytes, every other
-- one as its JSON text (~150 to 250 bytes), both as the bytes of one `bytea` (a record starts
-- with byte 1, a JSON text with `{`). The server no longer parses a JSON document per command.
-- Keys are opaque: they are compared byte by byte (COLLATE "C"), not by the locale's rules.
ALTER TABLE idempotency
    ALTER COLUMN key TYPE TEXT COLLATE "C",
    ALTER COLUMN outcome TYPE BYTEA USING convert_to(outcome::text, 'UTF8');

-- No query reads usage records by time alone (the analytics refresh finds the records it has
-- not rolled up by `usage_records_not_rolled_up`), so the index only cost an insert per spend.
DROP INDEX usage_records_by_time;
