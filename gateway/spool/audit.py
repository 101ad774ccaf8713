"""The audit trail: what the gateway applied (or refused) for each person, in the spool file.

One stored record per object sent (or refused) and event: the person, the event, the request
and its answer, with the changes it made packed in one column (`changes`: target, state and
rule of each). Packing writes one row and two index entries per person instead of per target,
the acknowledgement's largest cost; reading unpacks them, so `gateway trace` still shows one
line per change. Records written before the column existed keep theirs in `target`, `state`
and `rule`, and are read as they were.

Records are written by `SpoolDB.ack`, in the transaction that acknowledges the rows they are
about, so the trail never claims a delivery that was rolled back. A person is stored only as a
keyed hash (HMAC-SHA256): `[retention] person_key` when set, so that hashes stay the same
across spools, else a random key kept in the spool's own `meta` table. Whoever holds the key
and a person's identifier can look their history up (`gateway trace`); the file alone names
nobody. The functions here take the connection of the transaction they run in (SQLite or PostgreSQL:
the SQL is written for both).
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgspec

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
    detail TEXT,                       -- the dead-letter reason, say; never a person
    -- JSON [[target, state, rule], ...]: the record's changes, packed (target, state and rule
    -- are then NULL; records written before this column hold one change in those).
    changes TEXT
);
CREATE INDEX IF NOT EXISTS audit_person ON audit(person, at);
CREATE INDEX IF NOT EXISTS audit_event ON audit(event_id);
DROP INDEX IF EXISTS audit_at;        -- pruning goes by id, which follows time
"""

_KEY = "person_key"
_CHECK = "person_key_check"
# The first writer wins: two processes opening a new spool at once agree on one value.
_KEEP_FIRST = "INSERT INTO meta(key, value) VALUES (?, ?) ON CONFLICT (key) DO NOTHING"
# PostgreSQL's migration adding the packed column (SQLite's is `SpoolDB._migrate`).
PG_MIGRATION = "ALTER TABLE audit ADD COLUMN changes text;"

# One change of a record: (target, state, rule `file:line` or None).
Change = tuple[str, str | None, str | None]
# A target may be the rules' own str-like type: written as its text.
_encode_changes = msgspec.json.Encoder(enc_hook=str).encode
_decode_changes = msgspec.json.Decoder(list[tuple[str, str | None, str | None]]).decode


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
    # Several changes of one object and event at once, instead of `target`, `state`, `rule`.
    changes: tuple[Change, ...] = ()


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
    """Insert audit records, hashing each person once, one row per object and event.

    Records alike but for their changes (one per target, as a caller may hand them) are packed
    into one row; a record without a change (a skipped row, say) stays a row of its own.
    """
    hashes: dict[str, str] = {}
    rows: dict[object, tuple[Record, list[Change]]] = {}
    for n, r in enumerate(records):
        changes = r.changes or (((r.target, r.state, r.rule),) if r.target is not None else ())
        if not changes:
            rows[n] = (r, [])
            continue
        # Everything a stored row says but its changes.
        alike: tuple[object, ...] = (r.person, r.direction, r.outcome, r.at, r.event_id)
        alike += (r.event_type, r.event_at, r.endpoint, r.status, r.detail)
        found = rows.get(alike)
        if found is None:
            rows[alike] = (r, list(changes))
        else:
            found[1].extend(changes)
    values = []
    for r, packed in rows.values():
        hashed = hashes.get(r.person)
        if hashed is None:
            hashed = hashes[r.person] = person_hash(key, r.person)
        values.append(
            (
                r.at,
                hashed,
                r.direction,
                r.event_id,
                r.event_type,
                r.event_at,
                r.endpoint,
                r.status,
                r.outcome,
                r.detail,
                _encode_changes(packed).decode() if packed else None,
            )
        )
    db.executemany(
        "INSERT INTO audit(at, person, direction, event_id, event_type, event_at, endpoint,"
        " status, outcome, detail, changes) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        values,
    )


_COLUMNS = (
    "id, at, direction, event_id, event_type, event_at, endpoint, target, state, rule, status,"
    " outcome, detail, changes"
)


def _unpacked(rows: Sequence[Any]) -> list[StoredRecord]:
    """One StoredRecord per change, as the trail showed them when each change had its row:
    a record's changes last written first, as newest-first ids ordered them."""
    out: list[StoredRecord] = []
    for *row, packed in rows:
        record = StoredRecord(*row)
        if not packed:
            out.append(record)
            continue
        for target, state, rule in reversed(_decode_changes(packed)):
            out.append(dataclasses.replace(record, target=target, state=state, rule=rule))
    return out


def of_person(db: Conn, hashed: str, since: float | None) -> list[StoredRecord]:
    """A person's records, newest first, from `since` (epoch seconds) on."""
    rows = db.execute(
        f"SELECT {_COLUMNS} FROM audit WHERE person = ? AND at >= ?"  # noqa: S608 - a constant
        " ORDER BY at DESC, id DESC",
        (hashed, since if since is not None else float("-inf")),
    ).fetchall()
    return _unpacked(rows)


def of_event(db: Conn, event_id: str) -> list[StoredRecord]:
    """Every record about one event id, newest first."""
    rows = db.execute(
        f"SELECT {_COLUMNS} FROM audit WHERE event_id = ? ORDER BY at DESC, id DESC",  # noqa: S608 - a constant
        (event_id,),
    ).fetchall()
    return _unpacked(rows)
