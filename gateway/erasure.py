"""Erasure scrubbing: once Braze has acknowledged a person's `user.deleted`, the spool forgets them.

Run by `SpoolDB.ack` inside the transaction that acknowledges the erasure, with
`PRAGMA secure_delete=ON` (so deleted cells and freed pages are zeroed). What it does, per person:

- Braze's pending reports about them (the reverse path) and their dead letters go: writing an
  erased person's choices back to Didomi would undo the erasure. A row goes only when one of
  its identifier fields names the person exactly (a substring test would take other people's
  rows: an external id `42` is inside many bodies); emails compare without case;
- their `applied` and `sent` rows are re-keyed by the person's hash, so a late retry of an old
  choice is still refused as stale (`SpoolDB.applied_times` reads both keys);
- their audit records go, except those of the erasure itself (kept under the hash, as proof).

Pages freed earlier without zeroing (deliveries acknowledged under `secure_delete=FAST`) may
still hold old bodies: `zero_free_pages` fills them with zeros, a bounded chunk per call so no
acknowledgement holds the write lock for long, and `SpoolDB.finish_erasures` goes on in the
background (with the WAL's truncation, which a reader can put off) until it is all done.

Didomi's own pending events for them that arrived after the erasure stay: each is a new
instruction, delivered if it is newer than the erasure and refused as stale otherwise.
"""

from __future__ import annotations

import sqlite3
from typing import TYPE_CHECKING, Any

import msgspec

if TYPE_CHECKING:
    from .store import Conn

_FILL = "erasure-fill-"  # meta keys of the zero blobs that hold free pages while they are zeroed
FILL_PAGES = 16_384  # per call: 64 MiB of 4 KiB pages, a few hundred milliseconds of writing
_decode = msgspec.json.Decoder()


# Whether a body holds a text (lowercased), in each engine's SQL: the prefilter of `scrub`.
# On PostgreSQL through `encode(body, 'escape')`, not `convert_from`, which refuses a body with
# a byte that is not UTF-8 (msgspec lets them through in fields it skips): the erasure would
# then never commit. The needle is escaped the same way (`escaped`).
SQLITE_CONTAINS = "instr(lower(CAST(body AS TEXT)), ?) > 0"
POSTGRESQL_CONTAINS = "strpos(lower(encode(body, 'escape')), ?) > 0"


def escaped(person: str) -> str:
    """`person`, lowercased, as PostgreSQL's `encode(..., 'escape')` spells its UTF-8 bytes."""
    out = []
    for byte in person.lower().encode():
        if byte == 0x5C:
            out.append("\\\\")
        elif byte == 0 or byte >= 0x80:
            out.append(f"\\{byte:03o}")
        else:
            out.append(chr(byte))
    return "".join(out)


def scrub(
    db: Conn,
    person: str,
    hashed: str,
    contains: str = SQLITE_CONTAINS,
    needle: str | None = None,
) -> int:
    """Remove `person`'s data from the spool; returns how many inbox rows went."""
    # A cheap prefilter in SQL, then an exact test of the identifier fields in Python.
    needle = needle if needle is not None else person.lower()
    inbox = db.execute(
        f"SELECT id, type, body FROM inbox WHERE direction = 1 AND {contains}",  # noqa: S608 - a constant
        (needle,),
    ).fetchall()
    gone = [row_id for row_id, kind, body in inbox if names(kind, bytes(body), person)]
    letters = db.execute(
        f"SELECT id, type, body, person FROM dead_letters WHERE person = ? OR {contains}",  # noqa: S608 - a constant
        (person, needle),
    ).fetchall()
    dead = [
        i for i, kind, body, who in letters if who == person or names(kind, bytes(body), person)
    ]
    db.executemany("DELETE FROM inbox WHERE id = ?", [(i,) for i in gone])
    db.executemany("DELETE FROM dead_letters WHERE id = ?", [(i,) for i in dead])
    db.execute(
        "INSERT INTO applied(person, target, at) SELECT ?, target, at FROM applied"
        " WHERE person = ? ON CONFLICT (person, target) DO UPDATE"
        " SET at = CASE WHEN excluded.at > applied.at THEN excluded.at ELSE applied.at END",
        (hashed, person),
    )
    db.execute("DELETE FROM applied WHERE person = ?", (person,))
    db.execute(
        "INSERT INTO sent(person, target, state, at) SELECT ?, target, state, at FROM sent"
        " WHERE person = ? ON CONFLICT (person, target, state) DO UPDATE"
        " SET at = excluded.at WHERE excluded.at >= sent.at",
        (hashed, person),
    )
    db.execute("DELETE FROM sent WHERE person = ?", (person,))
    db.execute(
        "DELETE FROM audit WHERE person = ? AND coalesce(event_type, '') != 'user.deleted'",
        (hashed,),
    )
    return len(gone)


def names(kind: str, body: bytes, person: str) -> bool:
    """Whether a stored body's identifier fields name `person` (emails without case)."""
    try:
        doc = _decode.decode(body)
    except msgspec.DecodeError:
        return False
    found: list[Any] = []
    if kind == "braze.step":
        found += [_get(doc, "external_id"), _get(doc, "email")]
    elif kind == "braze.currents":
        found += [_get(doc, "user", "external_user_id"), _get(doc, "properties", "email_address")]
    else:  # Didomi's: the entity (or both sides of an update) names its user
        for side in ("entity", "new_entity", "old_entity"):
            entity = _get(doc, "parameters", side)
            found += [
                _get(entity, "organization_user_id"),
                _get(entity, "user", "organization_user_id"),
            ]
    folded = person.casefold()
    return any(
        isinstance(name, str) and (name == person or ("@" in name and name.casefold() == folded))
        for name in found
    )


def _get(doc: Any, *path: str) -> Any:
    for key in path:
        if not isinstance(doc, dict):
            return None
        doc = doc.get(key)
    return doc


def zero_free_pages(db: sqlite3.Connection, max_pages: int = FILL_PAGES) -> bool:
    """Zero up to `max_pages` free pages; True once no unzeroed free page is left.

    A zero blob takes free pages and writes zeros to them; the blobs are kept (holding those
    pages) until the free list is empty, then deleted under secure_delete=ON, which zeroes
    the pages again as they are freed. Without VACUUM, which rewrites the whole file.
    """
    free = int(db.execute("PRAGMA freelist_count").fetchone()[0])
    if free:
        size = int(db.execute("PRAGMA page_size").fetchone()[0])
        count = int(
            db.execute("SELECT count(*) FROM meta WHERE key LIKE 'erasure-fill-%'").fetchone()[0]
        )
        take = min(free, max_pages)
        db.execute(
            "INSERT INTO meta(key, value) VALUES (?, zeroblob(?))", (f"{_FILL}{count}", take * size)
        )
        if take < free:
            return False
    db.execute("DELETE FROM meta WHERE key LIKE 'erasure-fill-%'")
    return True


def pending(db: sqlite3.Connection) -> bool:
    """Whether an erasure's zeroing or WAL truncation is still to finish."""
    row = db.execute(
        "SELECT 1 FROM meta WHERE key LIKE 'erasure-fill-%' OR key = 'erasure-wal' LIMIT 1"
    ).fetchone()
    return row is not None
