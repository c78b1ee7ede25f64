-- A dead letter is kept whatever bytes its record carried: a NUL or invalid
-- UTF-8 in the record's key or a header must never keep it from being parked
-- (a text column refuses both, and a failing insert would halt its lane).
--
-- The key as the record's bytes.
ALTER TABLE dead_letters ALTER COLUMN message_key TYPE bytea USING convert_to(message_key, 'UTF8');

-- Every header of the record, in order, as {"name", "value"} when its value is
-- UTF-8 text without NUL, {"name", "base64"} otherwise, {"name"} without a value.
-- Rows written before this migration held [name, value] pairs of UTF-8 values.
UPDATE dead_letters SET headers = (
    SELECT coalesce(jsonb_agg(jsonb_build_object('name', h ->> 0, 'value', h ->> 1) ORDER BY n), '[]'::jsonb)
    FROM jsonb_array_elements(headers) WITH ORDINALITY AS e (h, n)
);

-- NULL when the record is also on the dead-letter topic; otherwise why the
-- broker refused it there (a record too large once the error headers are
-- added): then this table is the only place the dead letter is kept.
ALTER TABLE dead_letters ADD COLUMN topic_error text;
