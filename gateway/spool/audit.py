"""The audit trail: one record per change the gateway applied (or refused), in the spool file.

Records are written by `SpoolDB.ack`, in the transaction that acknowledges the rows they are
about, so the trail never claims a delivery that was rolled back. A person is stored only as a
keyed hash (HMAC-SHA256): `[retention] person_key` when set, so that hashes stay the same
across spools, else a random key kept in the spool's own `meta` table. Whoever holds the key
and a person's identifier can look their history up (`gateway trace`); the file alone names
nobody. The functions here take the connection of the transaction they run in (SQLite or PostgreSQL:
the SQL is written for both).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from gateway.errors import SpoolError

if TYPE_CHECKING:
    from gateway.spool.conn import Conn

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (      -- the spool's own settings, such as its person key
    key TEXT PRIMARY KEY,
    value BLOB NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at REAL NOT NULL,                  -- when the request was sent (or the outcome decided)
    person TEXT NOT NULL,              -- HMAC-SHA256 of the identifier, hex
    direction TEXT NOT NULL,           -- to_braze | to_didomi
    event_id TEXT,                     -- Didomi's event id; the one the gateway wrote, reversed
    event_type TEXT,                   -- the stored row's type (event.created, braze.step, ...)
    event_at REAL,                     -- when the choice was made, per the event
    endpoint TEXT,                     -- /users/track, /users/delete, /consents/events
    target TEXT,
    state TEXT,
    rule TEXT,                         -- file:line of the rule that produced the state
    status INTEGER,                    -- the other side's HTTP status; NULL without a request
    outcome TEXT NOT NULL,             -- delivered | stale | dead-lettered | skipped:<reason>
    detail TEXT                        -- the dead-letter reason, say; never a person
);
CREATE INDEX IF NOT EXISTS audit_person ON audit(person, at);
CREATE INDEX IF NOT EXISTS audit_event ON audit(event_id);
DROP INDEX IF EXISTS audit_at;        -- pruning goes by id, which follows time
"""

_KEY = "person_key"
_CHECK = "person_key_check"
# The first writer wins: two processes opening a new spool at once agree on one value.
_KEEP_FIRST = "INSERT INTO meta(key, value) VALUES (?, ?) ON CONFLICT (key) DO NOTHING"


@dataclass(frozen=True, slots=True)
class Record:
    """One audited change (or refusal) for one person, before the person is hashed."""

    person: str
    direction: str
    outcome: str
    at: float
    event_id: str | None = None
    event_type: str | None = None
    event_at: float | None = None
    endpoint: str | None = None
    target: str | None = None
    state: str | None = None
    rule: str | None = None
    status: int | None = None
    detail: str | None = None


@dataclass(frozen=True, slots=True)
class StoredRecord:
    """One stored audit record, as `gateway trace` shows it."""

    id: int
    at: float
    direction: str
    event_id: str | None
    event_type: str | None
    event_at: float | None
    endpoint: str | None
    target: str | None
    state: str | None
    rule: str | None
    status: int | None
    outcome: str
    detail: str | None


def state_text(state: object) -> str:
    """A target state as the trail spells it: Braze's word, or true/false for attributes."""
    if isinstance(state, bool):
        return "true" if state else "false"
    return str(state)


def person_key(db: Conn, configured: str, *, text_check: bool = True) -> bytes:
    """The HMAC key: the configured one, else this spool's own, created on first use.

    The spool remembers a fingerprint of the key its persons were hashed with: under another
    key every erased person's rows would be unreachable, and a late stale retry would be let
    through, so a different key is refused with the reason rather than used.
    """
    if configured:
        key = configured.encode()
    else:
        row = db.execute("SELECT value FROM meta WHERE key = ?", (_KEY,)).fetchone()
        if row is None:
            # OR IGNORE, then read back: two processes opening a new spool agree on one key.
            new = secrets.token_bytes(32)
            db.execute(_KEEP_FIRST, (_KEY, new))
            row = db.execute("SELECT value FROM meta WHERE key = ?", (_KEY,)).fetchone()
        key = bytes(row[0])
    check = hmac.new(key, b"didomi-braze-gateway person key", hashlib.sha256).hexdigest()
    # Text on SQLite, as earlier versions wrote and read it; PostgreSQL's column is bytea.
    db.execute(_KEEP_FIRST, (_CHECK, check if text_check else check.encode()))
    stored = db.execute("SELECT value FROM meta WHERE key = ?", (_CHECK,)).fetchone()[0]
    # Older SQLite spools hold it as text; PostgreSQL's `meta.value` is bytea.
    if (stored if isinstance(stored, str) else bytes(stored).decode()) != check:
        raise SpoolError(
            "this spool's persons are hashed with another key than retention.person_key:"
            " set the key it was written with (GATEWAY_PERSON_KEY), or leave it unset if it"
            " never was; under a new key erased persons would no longer be recognised"
        )
    return key


def person_hash(key: bytes, person: str) -> str:
    """The keyed hash that stands for `person` in the trail (and in erased rows)."""
    return hmac.new(key, person.encode(), hashlib.sha256).hexdigest()


def write(db: Conn, key: bytes, records: Sequence[Record]) -> None:
    """Insert audit records, hashing each person (once per person: a batch names each often)."""
    hashes: dict[str, str] = {}

    def hashed(person: str) -> str:
        found = hashes.get(person)
        if found is None:
            found = hashes[person] = person_hash(key, person)
        return found

    db.executemany(
        "INSERT INTO audit(at, person, direction, event_id, event_type, event_at, endpoint,"
        " target, state, rule, status, outcome, detail)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [
            (
                r.at,
                hashed(r.person),
                r.direction,
                r.event_id,
                r.event_type,
                r.event_at,
                r.endpoint,
                r.target,
                r.state,
                r.rule,
                r.status,
                r.outcome,
                r.detail,
            )
            for r in records
        ],
    )


_COLUMNS = (
    "id, at, direction, event_id, event_type, event_at, endpoint, target, state, rule, status,"
    " outcome, detail"
)


def of_person(db: Conn, hashed: str, since: float | None) -> list[StoredRecord]:
    """A person's records, newest first, from `since` (epoch seconds) on."""
    rows = db.execute(
        f"SELECT {_COLUMNS} FROM audit WHERE person = ? AND at >= ?"  # noqa: S608 - a constant
        " ORDER BY at DESC, id DESC",
        (hashed, since if since is not None else float("-inf")),
    ).fetchall()
    return [StoredRecord(*row) for row in rows]


def of_event(db: Conn, event_id: str) -> list[StoredRecord]:
    """Every record about one event id, newest first."""
    rows = db.execute(
        f"SELECT {_COLUMNS} FROM audit WHERE event_id = ? ORDER BY at DESC, id DESC",  # noqa: S608 - a constant
        (event_id,),
    ).fetchall()
    return [StoredRecord(*row) for row in rows]
