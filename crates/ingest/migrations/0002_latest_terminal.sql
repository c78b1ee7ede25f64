-- When the job's current terminal status happened: the occurred_at (Unix
-- milliseconds) of the result event that set it. A job can get more than one
-- terminal result (an operator redrives a dead-lettered command), and its
-- status follows the latest: a terminal result with a later occurred_at
-- replaces the current one; a duplicate or an older (reordered) one does not.
-- NULL for jobs that are not terminal (or became terminal before this column).
ALTER TABLE jobs ADD COLUMN terminal_occurred_at_ms bigint;
