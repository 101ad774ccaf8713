"""Erasure scrubbing: once Braze has acknowledged a person's `user.deleted`, the spool forgets them.

Run by `SpoolDB.ack` inside the transaction that acknowledges the erasure, with
`PRAGMA secure_delete=ON` (so deleted cells and freed pages are zeroed) and followed by a
truncating WAL checkpoint (so no old frame keeps a copy). What it does, per person:

- Braze's pending reports about them (the reverse path) and their dead letters go: writing an
  erased person's choices back to Didomi would undo the erasure;
- their `applied` and `sent` rows are re-keyed by the person's hash, so a late retry of an old
  choice is still refused as stale (`SpoolDB.applied_times` reads both keys);
- their audit records go, except those of the erasure itself (kept under the hash, as proof);
- pages freed earlier without zeroing (deliveries acknowledged under `secure_delete=FAST`) are
  filled with zeros, by writing one zero blob as large as the free list and deleting it.

Didomi's own pending events for them that arrived after the erasure stay: each is a new
instruction, delivered if it is newer than the erasure and refused as stale otherwise.
"""

from __future__ import annotations

import sqlite3

import msgspec

_FILL = "erasure-fill"


def scrub(db: sqlite3.Connection, person: str, hashed: str) -> int:
    """Remove `person`'s data from the spool; returns how many inbox rows went."""
    # Bodies are JSON: the identifier appears in them as this exact string.
    needle = msgspec.json.encode(person)
    removed = db.execute(
        "DELETE FROM inbox WHERE type LIKE 'braze.%' AND instr(body, ?) > 0", (needle,)
    ).rowcount
    db.execute("DELETE FROM dead_letters WHERE person = ? OR instr(body, ?) > 0", (person, needle))
    db.execute(
        "INSERT INTO applied(person, target, at) SELECT ?, target, at FROM applied"
        " WHERE person = ? ON CONFLICT DO UPDATE SET at = max(at, excluded.at)",
        (hashed, person),
    )
    db.execute("DELETE FROM applied WHERE person = ?", (person,))
    db.execute(
        "INSERT INTO sent(person, target, state, at) SELECT ?, target, state, at FROM sent"
        " WHERE person = ? ON CONFLICT DO UPDATE SET state = excluded.state, at = excluded.at"
        " WHERE excluded.at >= sent.at",
        (hashed, person),
    )
    db.execute("DELETE FROM sent WHERE person = ?", (person,))
    db.execute(
        "DELETE FROM audit WHERE person = ? AND coalesce(event_type, '') != 'user.deleted'",
        (hashed,),
    )
    _zero_free_pages(db)
    return removed


def _zero_free_pages(db: sqlite3.Connection) -> None:
    """Overwrite every free page with zeros, without VACUUM (which rewrites the whole file)."""
    free = int(db.execute("PRAGMA freelist_count").fetchone()[0])
    if not free:
        return
    size = int(db.execute("PRAGMA page_size").fetchone()[0])
    # A blob larger than the free list takes every free page (trunks too) and writes zeros to
    # them; deleting it under secure_delete=ON zeroes them again as they are freed.
    db.execute(
        "INSERT OR REPLACE INTO meta(key, value) VALUES (?, zeroblob(?))", (_FILL, free * size)
    )
    db.execute("DELETE FROM meta WHERE key = ?", (_FILL,))
