"""The durable spool: accepted webhooks, what was applied, and the dead letters, in one SQLite file.

`SpoolDB` is the synchronous core (the CLI uses it directly, even while a server runs, since
SQLite in WAL mode lets several processes share the file). `Spool` is the asyncio face the
server and dispatcher use: every call runs on one dedicated thread, and concurrent `put`s are
grouped into one transaction so that N requests cost one fsync, not N. `spool.lock.SpoolLock`
keeps a second server off a spool file that one already delivers from.

Its file's transactions, errors and disk room are `sqlite_file.SqliteFile`; its backfill lane
is `sqlite_lane`, its tables `sqlite_schema`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import sqlite3
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from gateway.errors import SpoolError, SpoolFull
from gateway.shapes.webhooks import direction_of
from gateway.spool import audit as trail
from gateway.spool import erasure, lane
from gateway.spool import prune as retention
from gateway.spool.sqlite_file import (
    AUDIT_CHANGE_BYTES,
    AUDIT_RECORD_BYTES,
    BUSY_TIMEOUT_S,
    DEFAULT_MIN_FREE_BYTES,
    RECORD_BYTES,
    ROW_OVERHEAD_BYTES,
    _row_cost,
)
from gateway.spool.sqlite_lane import SqliteLane
from gateway.spool.sqlite_schema import (
    _DIRECTION_INDEX,
    _SCHEMA,
    SCHEMA_VERSION,
    _sent_history,
)
from gateway.spool.store import CODES, TO_DIDOMI, Dead, Pending, StoredItem
from gateway.words import Direction

# What callers import from here, wherever it is defined.
__all__ = [
    "AUDIT_CHANGE_BYTES",
    "AUDIT_RECORD_BYTES",
    "DEFAULT_MIN_FREE_BYTES",
    "Dead",
    "Pending",
    "SpoolDB",
]
log = logging.getLogger("gateway.spool")


class SpoolDB(SqliteLane):
    """Synchronous access to the spool file; use from one thread at a time."""

    def __init__(
        self,
        path: str | Path,
        *,
        max_pending: int = 1_000_000,
        dedupe_window_s: float = 7 * 86_400.0,
        min_free_bytes: int = DEFAULT_MIN_FREE_BYTES,
        clock: Callable[[], float] = time.time,
        person_key: str = "",
    ) -> None:
        self.path = Path(path)
        self.max_pending = max_pending
        self.dedupe_window_s = dedupe_window_s
        self.min_free_bytes = min_free_bytes
        self.clock = clock
        # Why intake is refused for lack of disk space, while it is; None when there is room.
        self.low_on_disk: str | None = None
        self.committed_at = 0.0  # time.monotonic() of the last commit, to prove the file writable
        self.on_shed: Callable[[int], None] = lambda count: None  # told of audit records shed
        self._shed_logged_at = -math.inf  # monotonic: shedding is warned about once a minute
        self._shed_unlogged = 0
        self._data_version: int | None = None  # as `written_elsewhere` last read it
        self.writers = contextlib.nullcontext()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # isolation_level=None: we issue BEGIN/COMMIT ourselves, to group writes.
            self.db = sqlite3.connect(
                self.path, isolation_level=None, check_same_thread=False, timeout=BUSY_TIMEOUT_S
            )
            self._refuse_newer()
            self.db.execute("PRAGMA journal_mode=WAL")
            # FULL: a commit survives power loss, which is what a 202 promises.
            self.db.execute("PRAGMA synchronous=FULL")
            # Some builds (Debian's) zero every freed page by default, so an acknowledgement
            # would write as many bytes as it deletes: on a full disk it could never commit.
            # FAST zeroes only what the delete rewrites anyway.
            self.db.execute("PRAGMA secure_delete=FAST")
            self.db.executescript(_SCHEMA + trail.SCHEMA + retention.SCHEMA + lane.SCHEMA)
            self._migrate()
            self._page_size = int(self.db.execute("PRAGMA page_size").fetchone()[0])
            # Read outside a transaction: the CLI beside a server must not wait for its lock.
            self.person_key = trail.person_key(self.db, person_key)
            self.floors = retention.floors(self.db)  # per target; refreshed by each prune
            self.pending = self.count_pending()
            self.pending_to_didomi = self.count_pending("to_didomi")
            self.pending_backfill = self.count_backfill()
        except (OSError, sqlite3.Error) as exc:
            raise SpoolError(f"cannot open the spool {self.path}: {exc}") from exc

    def _refuse_newer(self) -> None:
        """Refuse, before touching it, a file whose schema a newer gateway wrote."""
        version = int(self.db.execute("PRAGMA user_version").fetchone()[0])
        if version > SCHEMA_VERSION:
            self.db.close()
            raise SpoolError(
                f"the spool {self.path} was written by a newer gateway (schema version {version};"
                f" this one knows up to {SCHEMA_VERSION}): run that version or a later one, or"
                " point delivery.spool at another file"
            )

    def _migrate(self) -> None:
        """Bring a spool file written by an older gateway up to this schema."""
        columns = {row[1] for row in self.db.execute("PRAGMA table_info(inbox)")}
        if "direction" not in columns:

            def add(db: sqlite3.Connection) -> None:
                db.execute("ALTER TABLE inbox ADD COLUMN direction INTEGER NOT NULL DEFAULT 0")
                # Braze's reports stored before the column existed are still bound for Didomi.
                db.execute(f"UPDATE inbox SET direction = 1 WHERE {TO_DIDOMI}")  # noqa: S608 - a constant

            self._tx(add)
        if "replayed_at" not in columns:
            self.db.execute("ALTER TABLE inbox ADD COLUMN replayed_at REAL")
        letters = {row[1] for row in self.db.execute("PRAGMA table_info(dead_letters)")}
        if "direction" not in letters:
            self.db.execute("ALTER TABLE dead_letters ADD COLUMN direction INTEGER")
        self.db.execute(_DIRECTION_INDEX)  # also serves the backfill lane (direction 2)
        # backfill_progress: `lane.SCHEMA` creates it in older files too (IF NOT EXISTS).
        audit = {row[1] for row in self.db.execute("PRAGMA table_info(audit)")}
        if "changes" not in audit:
            # Records written before keep their one change in target, state and rule.
            self.db.execute("ALTER TABLE audit ADD COLUMN changes TEXT")
        keyed = [row[1] for row in self.db.execute("PRAGMA table_info(sent)") if row[5]]
        if "state" not in keyed:
            # A key of (person, target) kept one state per target: rebuilt with the state in it.
            self._tx(_sent_history)
        if int(self.db.execute("PRAGMA user_version").fetchone()[0]) < SCHEMA_VERSION:
            self.db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def close(self) -> None:
        """Close the file; a WAL checkpoint folds the log back in."""
        self.db.close()

    # -- intake -------------------------------------------------------------------------------

    def handoff_from(self) -> int:
        """The highest inbox id ever given (rows deleted since included)."""
        with self._reading("the last inbox id"):
            row = self.db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'inbox'").fetchone()
        return int(row[0]) if row else 0

    @property
    def owned(self) -> frozenset[int] | None:
        """All partitions: one gateway owns a SQLite spool (`SpoolLock`)."""
        return None

    @property
    def generation(self) -> int:
        """Ownership never changes on SQLite."""
        return 0

    def put_many(
        self, items: Sequence[StoredItem], rows: list[tuple[int, Pending]] | None = None
    ) -> list[bool | Exception]:
        """Store webhooks in one transaction: True stored, False duplicate, SpoolFull no room.

        `rows`, when given, receives (item index, stored row) once the transaction commits:
        what `Spool` hands to delivery without reading it back.
        """
        new: list[tuple[int, Pending]] = []
        now = self.clock()
        room = self.max_pending - self.pending
        if self.low_on_disk is not None:
            self._give_back()
        self._shed_for(sum(_row_cost(key, body) for key, _, body, *_ in items))
        short = False
        reverse = 0

        def work(db: sqlite3.Connection) -> tuple[list[bool | Exception], int]:
            nonlocal short
            nonlocal reverse
            results: list[bool | Exception] = []
            stored = 0
            disk, reusable = self._room()
            new.clear()  # a retried transaction starts over
            for index, (key, kind, body, *_) in enumerate(items):
                if key is not None:
                    # Seen before, but longer ago than the window: a new delivery, not a duplicate.
                    cur = db.execute(
                        "INSERT INTO seen(key, at) VALUES (?, ?) ON CONFLICT(key) DO UPDATE"
                        " SET at = excluded.at WHERE seen.at < ?",
                        (key, now, now - self.dedupe_window_s),
                    )
                    if cur.rowcount == 0:
                        results.append(False)
                        continue
                cost = _row_cost(key, body)
                # Its WAL frames, then the pages the checkpoint adds where no free page is left.
                needed = cost + max(0, cost - reusable)
                left = max(0, reusable - cost)
                if stored >= room or self._above_reserve(disk - needed, left) < 0:
                    if key is not None:
                        db.execute("DELETE FROM seen WHERE key = ?", (key,))
                    if stored >= room:
                        results.append(SpoolFull(f"the spool holds {self.max_pending} updates"))
                    else:
                        short = True
                        results.append(SpoolFull(self._short_of_room()))
                    continue
                cur = db.execute(
                    "INSERT INTO inbox(received_at, type, body, direction) VALUES (?, ?, ?, ?)",
                    (now, kind, body, _code(kind)),
                )
                new.append((index, Pending(int(cur.lastrowid or 0), now, kind, body)))
                if direction_of(kind) == "to_didomi":
                    reverse += 1
                disk -= needed
                reusable = left
                stored += 1
                results.append(True)
            if self._above_reserve(disk, reusable) <= 0:
                short = True
            return results, stored

        results, stored = self._tx(work)
        if rows is not None:
            rows.extend(new)
        self.low_on_disk = self._short_of_room() if short else None
        self._stored(stored, reverse, len(items))
        return results

    # -- delivery -----------------------------------------------------------------------------

    def fetch(self, after_id: int, limit: int, direction: Direction = "to_braze") -> list[Pending]:
        """The oldest pending webhooks going `direction` with an id above `after_id`."""
        with self._reading("pending webhooks"):
            rows = self.db.execute(
                "SELECT id, received_at, type, body, replayed_at FROM inbox"
                " WHERE direction = ? AND id > ? ORDER BY id LIMIT ?",
                (CODES[direction], after_id, limit),
            ).fetchall()
        return [Pending(i, at, kind, body, replayed_at=again) for i, at, kind, body, again in rows]

    def _hash(self, person: str) -> str:
        return trail.person_hash(self.person_key, person)

    def _by_person(
        self, what: str, columns: str, table: str, persons: Iterable[str]
    ) -> list[tuple[Any, ...]]:
        """Rows of `table` keyed by the persons or their hashes, each named by its person."""
        names = {p: p for p in persons}
        names.update({trail.person_hash(self.person_key, p): p for p in list(names)})
        keys = list(names)
        out: list[tuple[Any, ...]] = []
        with self._reading(what):
            for start in range(0, len(keys), 500):  # SQLite caps bound parameters
                chunk = keys[start : start + 500]
                marks = ",".join("?" * len(chunk))
                for person, *rest in self.db.execute(
                    f"SELECT person, {columns} FROM {table} WHERE person IN ({marks})",  # noqa: S608 - only constants and placeholders are interpolated
                    chunk,
                ):
                    out.append((names[person], *rest))
        return out

    def ack(
        self,
        done: Sequence[int],
        applied: Sequence[tuple[str, str, float]] = (),
        dead: Sequence[Dead] = (),
        *,
        sent: Sequence[tuple[str, str, str, float]] = (),
        direction: Direction = "to_braze",
        audit: Sequence[trail.Record] = (),
        erase: Sequence[str] = (),
    ) -> None:
        """In one transaction: drop delivered rows, record applied times (and the states sent
        to Braze, when the reverse path needs them), move refused rows, write the audit trail,
        and scrub the persons whose erasure this acknowledges (`erasure.scrub`)."""
        now = self.clock()
        # What it adds must not grow the file into the reserve while old records hold it.
        records = sum(len(record.changes) or 1 for record in audit)  # a packed one is larger
        self._shed_for((records + len(applied) + len(sent)) * RECORD_BYTES, ack=True)

        def work(db: sqlite3.Connection) -> int:
            for item in dead:
                db.execute(
                    "INSERT INTO dead_letters(created_at, received_at, type, body, person, reason,"
                    " direction) SELECT ?, received_at, type, body, ?, ?, direction FROM inbox"
                    " WHERE id = ?",
                    (now, item.person, item.reason, item.id),
                )
            ids = [*done, *(item.id for item in dead)]
            removed = 0
            for start in range(0, len(ids), 500):
                chunk = ids[start : start + 500]
                marks = ",".join("?" * len(chunk))
                removed += db.execute(
                    f"DELETE FROM inbox WHERE id IN ({marks})",  # noqa: S608 - only placeholders are interpolated
                    chunk,
                ).rowcount
            db.executemany(
                "INSERT INTO applied(person, target, at) VALUES (?, ?, ?) ON CONFLICT DO UPDATE"
                " SET at = max(at, excluded.at)",
                applied,
            )
            db.executemany(
                "INSERT INTO sent(person, target, state, at) VALUES (?, ?, ?, ?)"
                " ON CONFLICT DO UPDATE SET at = max(at, excluded.at)",
                sent,
            )
            trail.write(db, self.person_key, audit)
            if erase:
                # The scrub's deleted cells and pages are zeroed, not only unlinked: its own
                # rows are few. The rest of the batch was deleted under FAST (under ON, the
                # acknowledgement would write as many bytes as it deletes); the pages that
                # freed are zeroed after the commit, in steps of their own (`erasure.mark`).
                db.execute("PRAGMA secure_delete=ON")
                try:
                    removed += erasure.scrub(db, erase, self._hash, max(ids, default=0))
                finally:
                    db.execute("PRAGMA secure_delete=FAST")
                erasure.mark(db)
            return removed

        removed = self._tx(work)
        if erase:
            self._truncate_after_erasure()
            try:
                self.finish_erasures()  # a first step now, if the disk has room for it
            except SpoolError as exc:  # the acknowledgement is committed: the rest can wait
                log.warning("could not zero the erased person's free pages yet: %s", exc)
            self.pending_to_didomi = self.count_pending("to_didomi")
        self.pending = max(0, self.pending - removed)
        if direction == "to_didomi":
            self.pending_to_didomi = max(0, self.pending_to_didomi - removed)
        self._watch_room()

    def prune(
        self, table: str, cutoff: float, limit: int, after: retention.Cursor = None
    ) -> tuple[int, retention.Cursor]:
        """One retention batch of `table` (`retention.prune`); refreshes the floors it moves."""
        result = self._tx(lambda db: retention.prune(db, table, cutoff, limit, after))
        if table == "applied" and result[0]:
            self.floors = retention.floors(self.db)
        return result

    def written_elsewhere(self) -> bool:
        """Whether another connection committed since last asked (SQLite's data_version moves
        only for those): a CLI replay, found by one cheap pragma instead of a read of the inbox."""
        with self._reading("the spool's data version"):
            version = int(self.db.execute("PRAGMA data_version").fetchone()[0])
        moved = version != self._data_version
        self._data_version = version
        return moved

    def recount(self, direction: Direction = "to_braze") -> tuple[int, int]:
        """Re-read (pending, dead) of `direction` from the file: another process may replay.

        Runs on the spool thread, between writes, so no put or ack is lost to the reset.
        """
        self.pending = self.count_pending()
        self.pending_to_didomi = self.count_pending("to_didomi")
        self.pending_backfill = self.count_backfill()
        if self.low_on_disk is not None:
            self._refresh_room()  # room may come back from outside: an operator freeing space
        return self.pending_of(direction), self.count_dead(direction)

    # -- dead letters -------------------------------------------------------------------------

    def replay(self, ids: Sequence[int] | None = None) -> int:
        """Move dead letters back into the inbox; returns how many.

        A replayed row keeps its `received_at`: an undated or clamped choice is dated at it,
        and dated at the replay it would overwrite the person's newer choices. Only
        `give_up_after_s` starts again, from `replayed_at`.
        """
        now = self.clock()

        def work(db: sqlite3.Connection) -> int:
            where, params = _which(ids)
            size, count = db.execute(
                f"SELECT coalesce(sum(length(body)), 0), count(*) FROM dead_letters {where}",  # noqa: S608 - only placeholders are interpolated
                params,
            ).fetchone()
            # Replayed rows are intake too: they must not eat the room acknowledgements need.
            disk, reusable = self._room()
            cost = size + size // 32 + count * ROW_OVERHEAD_BYTES
            left = max(0, reusable - cost)
            if self._above_reserve(disk - cost - max(0, cost - reusable), left) < 0:
                raise SpoolFull(f"{self._short_of_room()}, or replay fewer letters with --id")
            moved = db.execute(
                "INSERT INTO inbox(received_at, type, body, direction, replayed_at)"  # noqa: S608 - only placeholders are interpolated
                f" SELECT received_at, type, body,"
                f" coalesce(direction, CASE WHEN {TO_DIDOMI} THEN 1 ELSE 0 END), ?"
                f" FROM dead_letters {where} ORDER BY id",
                (now, *params),
            ).rowcount
            db.execute(f"DELETE FROM dead_letters {where}", params)  # noqa: S608 - only placeholders are interpolated
            return moved

        moved = self._tx(work)
        self.pending += moved
        self.pending_to_didomi = self.count_pending("to_didomi")
        return moved

    def purge(self, ids: Sequence[int] | None = None) -> int:
        """Delete dead letters for good; returns how many."""
        where, params = _which(ids)
        return self._tx(
            lambda db: db.execute(f"DELETE FROM dead_letters {where}", params).rowcount  # noqa: S608 - only placeholders are interpolated
        )


def _code(kind: str) -> int:
    return CODES[direction_of(kind)]


def _which(ids: Sequence[int] | None) -> tuple[str, tuple[int, ...]]:
    if ids is None:
        return "", ()
    return f"WHERE id IN ({','.join('?' * len(ids))})", tuple(ids)
