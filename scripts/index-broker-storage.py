#!/usr/bin/env python3
"""Index the nisshi broker's SQLite file so that fetching a backlog stays fast.

nisshi 0.7.0-pre.2 answers a fetch from its SQLite storage with one query of
each record's headers (its header_fetch.sql), on a table it gives no index:
every fetched record scanned every header of every topic. With onceflow's
eight envelope headers per record, a backlog of 35,000 commands made each
fetch take minutes and froze the local stack's consumers; with this index the
same backlog drains at about 1,100 commands/s (see the README: "The broker's
storage"). nisshi creates its tables with `create table if not exists` and
leaves an index it did not make alone, so the index is made once per file.

Waits up to 30 s for the broker to create its tables.
Usage: index-broker-storage.py PATH/broker.db
"""

import sqlite3
import sys
import time

path = sys.argv[1]
deadline = time.monotonic() + 30
while True:
    try:
        db = sqlite3.connect(path, timeout=10)
        try:
            if db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'header'").fetchone():
                db.execute("CREATE INDEX IF NOT EXISTS header_of_record ON header (topition, offset_id)")
                db.commit()
                break
        finally:
            db.close()
    except sqlite3.OperationalError as error:
        # The broker holds the file for a moment (creating its tables).
        reason = error
    if time.monotonic() > deadline:
        sys.exit(f"index-broker-storage: {path} has no header table after 30 s")
    time.sleep(0.2)
