"""The SQLite spool's tables, and the rebuild of an older file's `sent`."""

from __future__ import annotations

import sqlite3

# `PRAGMA user_version` of a file this gateway wrote: raised with every change of the tables'
# shape or meaning, so an older gateway refuses the file instead of misreading it (records with
# packed changes read as records without any, say). Files from before it say 0 and are migrated.
SCHEMA_VERSION = 1

_SENT = """
CREATE TABLE IF NOT EXISTS sent (     -- the states sent to Braze, to know Braze's echoes of them
    person TEXT NOT NULL,
    target TEXT NOT NULL,
    state TEXT NOT NULL,
    at REAL NOT NULL,                 -- when Braze last acknowledged that state
    -- One row per state, not per target: Currents reports each write, in any order, so every
    -- state sent within the echo window must be known (at most three rows per target).
    PRIMARY KEY (person, target, state)
) WITHOUT ROWID;
"""
_SCHEMA = """
CREATE TABLE IF NOT EXISTS inbox (
    -- AUTOINCREMENT: ids never come back after a delete, so the dispatcher's cursor never
    -- skips a row stored after the inbox was emptied.
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    received_at REAL NOT NULL,
    type TEXT NOT NULL,
    body BLOB NOT NULL,
    -- 0: Didomi's webhooks, to Braze; 1: Braze's reports, to Didomi. Indexed with the id, so
    -- either direction reads its own rows only, however many of the other's wait.
    direction INTEGER NOT NULL DEFAULT 0,
    -- Set by a dead letter's replay, which keeps `received_at` (the choice's dating).
    replayed_at REAL
);
CREATE TABLE IF NOT EXISTS seen (     -- duplicate deliveries, within the dedupe window
    key TEXT PRIMARY KEY,
    at REAL NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS seen_at ON seen(at);
CREATE TABLE IF NOT EXISTS applied (  -- time of the last choice applied, per person and target
    person TEXT NOT NULL,
    target TEXT NOT NULL,
    at REAL NOT NULL,
    PRIMARY KEY (person, target)
) WITHOUT ROWID;
{sent}
CREATE TABLE IF NOT EXISTS dead_letters (
    id INTEGER PRIMARY KEY AUTOINCREMENT,  -- an id the CLI printed never names another letter
    created_at REAL NOT NULL,
    received_at REAL NOT NULL,
    type TEXT NOT NULL,
    body BLOB NOT NULL,
    person TEXT,
    reason TEXT NOT NULL,
    -- The inbox direction it came from, so a replay puts a backfilled user back in its lane
    -- (its type is a live webhook's); NULL in letters written before: told by their type.
    direction INTEGER
);
""".replace("{sent}", _SENT.strip())
# Dead letters of Braze's reports (the reverse path) are told apart by their type.
_DIRECTION_INDEX = "CREATE INDEX IF NOT EXISTS inbox_direction ON inbox(direction, id)"


def _sent_history(db: sqlite3.Connection) -> None:
    """Rebuild an older spool's `sent` (one state per target) keyed by its state too."""
    db.execute("ALTER TABLE sent RENAME TO sent_one_state")
    db.execute(_SENT)
    db.execute("INSERT INTO sent SELECT person, target, state, at FROM sent_one_state")
    db.execute("DROP TABLE sent_one_state")
