"""Erasure scrubbing: once Braze has acknowledged a person's `user.deleted`, the spool forgets them.

Run by `SpoolDB.ack` inside the transaction that acknowledges the erasure, with
`PRAGMA secure_delete=ON` (so deleted cells and freed pages are zeroed). What it does, for every
spelling the gateway matches as the person (`Persons`: ids exactly, emails without case):

- Braze's pending reports about them (the reverse path), Didomi's pending webhooks about them
  received before the rows the acknowledgement settles, and their dead letters go: writing an
  erased person's choices back to Didomi would undo the erasure. A row goes only when one of
  its identifier fields names the person (a substring test would take other people's rows:
  an external id `42` is inside many bodies);
- their `applied` and `sent` rows are re-keyed by the spelling's hash, so a late retry of an
  old choice is still refused as stale (`SpoolDB.applied_times` reads both keys);
- their audit records go, except those of the erasure itself (kept under the hash, as proof).
The `seen` keys name no person (event ids and digests): nothing there to scrub.

Pages freed without zeroing (deliveries acknowledged under `secure_delete=FAST`, the other rows
of the erasure's own batch included) may still hold old bodies. The acknowledgement only marks
that (`mark`): zeroing them there wrote up to `FILL_PAGES` pages of WAL in its transaction,
more than the disk reserve an acknowledgement may count on. `zero_free_pages` then fills them
with zeros in steps of their own, each sized to the disk's room (`SpoolDB.finish_erasures`,
right after the acknowledgement and then in the background, with the WAL's truncation, which
a reader can put off), until it is all done.

Didomi's own pending events for them that arrived later stay: each is a new instruction,
delivered if it is newer than the erasure and refused as stale otherwise.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import msgspec

if TYPE_CHECKING:
    from gateway.spool.conn import Conn

_FILL = "erasure-fill-"  # meta keys of the zero blobs that hold free pages while they are zeroed
_MARK = "erasure-zero"  # set by an erasure's acknowledgement: free pages are still to be zeroed
FILL_PAGES = 16_384  # per step at most: 64 MiB of 4 KiB pages, a few hundred milliseconds
CHUNK_ROWS = 500  # rows decoded at a time while looking for an erased person


# Only the fields that can name a person, per stored type: unknown fields are skipped as the
# gateway's own decoders skip them (a byte that is not UTF-8 there must not hide the row).
class _User(msgspec.Struct):
    organization_user_id: Any = None
    metadata: Any = None


class _Entity(msgspec.Struct):
    organization_user_id: Any = None
    metadata: Any = None
    user: _User | None = None


class _Parameters(msgspec.Struct):
    entity: _Entity | None = None
    new_entity: _Entity | None = None
    old_entity: _Entity | None = None


class _Didomi(msgspec.Struct):
    parameters: _Parameters | None = None


class _Step(msgspec.Struct):
    external_id: Any = None
    email: Any = None


class _CurrentsUser(msgspec.Struct):
    external_user_id: Any = None


class _CurrentsProperties(msgspec.Struct):
    email_address: Any = None


class _Currents(msgspec.Struct):
    user: _CurrentsUser | None = None
    properties: _CurrentsProperties | None = None


_DIDOMI = msgspec.json.Decoder(_Didomi)
_STEP = msgspec.json.Decoder(_Step)
_CURRENTS = msgspec.json.Decoder(_Currents)


class Persons:
    """The erased persons, and every spelling the gateway matches as one of them.

    An external id is matched exactly (Braze's and Didomi's ids are case-sensitive strings);
    an email address without case, by Unicode case folding ("Émile@X.org" is "émile@x.org").
    JSON escapes are decoded first, so `\u00c9mile` is "Émile" too. No SQL does this: SQLite's
    `lower()` folds ASCII only, and a body may spell a letter as an escape, so every candidate
    row is decoded and compared here.
    """

    def __init__(self, persons: Iterable[str]) -> None:
        self.exact = set(persons)
        self.folded = {p.casefold() for p in self.exact if "@" in p}

    def match(self, name: Any) -> bool:
        """Whether an identifier value names one of the persons."""
        if not isinstance(name, str) or not name:
            return False
        return name in self.exact or ("@" in name and name.casefold() in self.folded)

    def spellings(self, kind: str, body: bytes) -> set[str]:
        """The identifiers in a stored body that name one of the persons (empty: none)."""
        return {name for name in identifiers(kind, body) if self.match(name)}


def identifiers(kind: str, body: bytes) -> list[Any]:
    """Every value of a stored body's fields that can name a person."""
    try:
        if kind == "braze.step":
            step = _STEP.decode(body)
            return [step.external_id, step.email]
        if kind == "braze.currents":
            event = _CURRENTS.decode(body)
            return [
                event.user.external_user_id if event.user else None,
                event.properties.email_address if event.properties else None,
            ]
        doc = _DIDOMI.decode(body)
    except msgspec.DecodeError:
        return []
    found: list[Any] = []
    parameters = doc.parameters
    for entity in (
        (parameters.entity, parameters.new_entity, parameters.old_entity) if parameters else ()
    ):
        if entity is None:
            continue
        # `[identity] field` may be a metadata key (an email, say): any of them may name them.
        for holder in (entity, entity.user):
            if holder is None:
                continue
            found.append(holder.organization_user_id)
            if isinstance(holder.metadata, dict):
                found.extend(holder.metadata.values())
    return found


def scrub(
    db: Conn, persons: Sequence[str], hash_of: Callable[[str], str], settled_upto: int = 0
) -> int:
    """Remove the persons' data from the spool; returns how many inbox rows went.

    `settled_upto` is the newest inbox id the acknowledging transaction settles: Didomi's
    pending webhooks naming them up to it are older instructions than the erasure (under
    another spelling the stale check, keyed by the exact identifier, would not refuse them);
    later ones stay, each a new instruction.
    """
    wanted = Persons(persons)
    spellings = set(wanted.exact)
    gone: list[int] = []
    candidates = [
        ("SELECT id, type, body FROM inbox WHERE direction = 1", ()),
        # Live webhooks and backfilled snapshots (direction 2) received before the erasure.
        ("SELECT id, type, body FROM inbox WHERE direction IN (0, 2) AND id <= ?", (settled_upto,)),
    ]
    for sql, params in candidates:
        for row_id, kind, body in _chunks(db.execute(sql, params)):
            found = wanted.spellings(kind, bytes(body))
            if found:
                gone.append(row_id)
                spellings |= found
    dead: list[int] = []
    for row_id, kind, body, who in _chunks(
        db.execute("SELECT id, type, body, person FROM dead_letters")
    ):
        found = wanted.spellings(kind, bytes(body))
        if wanted.match(who):
            found.add(who)
        if found:
            dead.append(row_id)
            spellings |= found
    if wanted.folded:
        # Applied times and sent states kept under another case of their email address.
        for table in ("applied", "sent"):
            rows = db.execute(f"SELECT DISTINCT person FROM {table} WHERE person LIKE '%@%'")  # noqa: S608 - a constant
            spellings |= {who for (who,) in rows.fetchall() if wanted.match(who)}
    db.executemany("DELETE FROM inbox WHERE id = ?", [(i,) for i in gone])
    db.executemany("DELETE FROM dead_letters WHERE id = ?", [(i,) for i in dead])
    for spelling in sorted(spellings):
        _forget(db, spelling, hash_of(spelling))
    return len(gone)


def _chunks(cursor: Any) -> Iterator[Any]:
    """The cursor's rows a few hundred at a time: a large backlog is never all in memory."""
    while rows := cursor.fetchmany(CHUNK_ROWS):
        yield from rows


def _forget(db: Conn, person: str, hashed: str) -> None:
    """Re-key one spelling's applied and sent rows by its hash; drop its audit but the erasure."""
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
    db.execute("DELETE FROM meta WHERE key LIKE 'erasure-fill-%' OR key = ?", (_MARK,))
    return True


def mark(db: sqlite3.Connection) -> None:
    """Note, in the acknowledging transaction, that free pages are still to be zeroed."""
    db.execute("INSERT OR IGNORE INTO meta(key, value) VALUES (?, 1)", (_MARK,))


def pending(db: sqlite3.Connection) -> bool:
    """Whether an erasure's zeroing or WAL truncation is still to finish."""
    row = db.execute(
        "SELECT 1 FROM meta WHERE key LIKE 'erasure-fill-%' OR key IN (?, 'erasure-wal') LIMIT 1",
        (_MARK,),
    ).fetchone()
    return row is not None
