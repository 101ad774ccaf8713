"""The PostgreSQL spool: the records of `spool.SpoolDB`, in one database that replicas share.

Selected by `delivery.spool = "postgresql://user@host/db"` (the password from libpq's
`PGPASSWORD`, or a `.pgpass` file: never in gateway.toml). The tables live in their own schema,
`didomi_braze_gateway`, created and migrated by the gateway (`gateway migrate`, or at start)
under an advisory lock, so replicas starting together migrate once.

What differs from SQLite, and why:
- Intake transactions take one advisory lock (`_INTAKE_LOCK`): row ids then commit in id
  order, so a delivery cursor that has passed an id never misses a row committed after it.
  Commits are still grouped, so N webhooks cost one commit whichever replica takes them.
- Each row carries the partition of its person (`store.PARTITIONS`); `fetch` returns only
  the partitions this replica holds a lease on (`replicas.Replicas` keeps `owned`).
- Pending counts are estimates between recounts: every replica takes webhooks, so no one
  process counts them all as they arrive. `delivery.max_pending` is then a soft bound.
- Disk room is PostgreSQL's to manage: a full disk there is a `SpoolFull` (a 503), and
  nothing else of `delivery.min_free_bytes` applies.
- An erasure deletes and re-keys the person's rows as on SQLite; their old row versions stay
  in the table files until autovacuum reuses the space, and in the database's WAL archive and
  backups for as long as those are kept (the README's "Personal data" says so).
"""

from __future__ import annotations

import functools
import logging
import time
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

from gateway.errors import SpoolError, SpoolFull
from gateway.shapes.webhooks import direction_of
from gateway.spool import audit as trail
from gateway.spool import erasure, lane
from gateway.spool import prune as retention
from gateway.spool.postgres_conn import SCHEMA, PgConn, connect, psycopg, redact
from gateway.spool.postgres_schema import MIGRATIONS, VERSION, migrate
from gateway.spool.store import CODES, PARTITIONS, Dead, Pending, SpoolBase, StoredItem, person_of
from gateway.words import Direction

# What callers import from here, wherever it is defined.
__all__ = [
    "MIGRATIONS",
    "SCHEMA",
    "VERSION",
    "PgConn",
    "PgSpoolDB",
    "connect",
    "migrate",
    "partition",
    "redact",
]

log = logging.getLogger("gateway.spool")
T = TypeVar("T")

_INTAKE_LOCK = 0x6462_6777_0002


def partition(person: str | None) -> int:
    """The partition of a person's rows (crc32: stable across processes and versions)."""
    if not person:
        return 0
    return zlib.crc32(person.encode()) % PARTITIONS


class PgSpoolDB(SpoolBase):
    """Synchronous access to the PostgreSQL spool; use from one thread at a time."""

    def __init__(
        self,
        url: str,
        *,
        max_pending: int = 1_000_000,
        dedupe_window_s: float = 7 * 86_400.0,
        clock: Callable[[], float] = time.time,
        person_key: str = "",
        auto_migrate: bool = True,
    ) -> None:
        self.url = url
        self.where = redact(url)
        self.max_pending = max_pending
        self.dedupe_window_s = dedupe_window_s
        self.clock = clock
        self.low_on_disk: str | None = None  # PostgreSQL manages its own disk
        self.committed_at = 0.0
        # Set by `replicas.Replicas` while it holds leases; None: every partition (a CLI, or a
        # spool opened without replicas, reads and delivers all of them).
        self._owned: frozenset[int] | None = None
        self._generation = 0
        self._conn = connect(url)
        try:
            if auto_migrate:
                migrate(self._conn)
            else:
                self._require_schema()
            with self._reading("the spool's settings"):
                self.person_key = trail.person_key(self._conn, person_key, text_check=False)
                self.floors = retention.floors(self._conn)
            self.pending = self.count_pending()
            self.pending_to_didomi = self.count_pending("to_didomi")
            self.pending_backfill = self.count_backfill()
        except BaseException:
            self._conn.raw.close()
            raise

    def _require_schema(self) -> None:
        with self._reading("the schema version"):
            row = self._conn.raw.execute(b"SELECT max(version) FROM schema_version").fetchone()
        if row is None or row[0] != VERSION:
            raise SpoolError(
                f"the spool database {self.where} is at schema version {row and row[0]},"
                f" not {VERSION}: run `gateway migrate`"
            )

    # -- ownership (kept by replicas.Replicas) ------------------------------------------------

    @property
    def owned(self) -> frozenset[int] | None:
        """The partitions this replica may deliver now; None: all of them."""
        return self._owned

    @property
    def generation(self) -> int:
        """Bumped whenever `owned` changes."""
        return self._generation

    def set_owned(self, owned: frozenset[int] | None) -> None:
        """Deliver these partitions from now on (the leases' holder calls this)."""
        if owned != self._owned:
            self._owned = owned
            self._generation += 1

    # -- plumbing -----------------------------------------------------------------------------

    def close(self) -> None:
        """Close the connection."""
        self._conn.raw.close()

    @property
    def db(self) -> PgConn:
        """The connection (as `SpoolDB.db` is its sqlite3 one), for tests and tools."""
        return self._db()

    def _db(self) -> PgConn:
        """The connection, opened again if the last one broke (a restarted server, say)."""
        if self._conn.raw.closed or self._conn.raw.broken:
            log.warning("reconnecting to the spool database %s", self.where)
            self._conn = connect(self.url)
        return self._conn

    def _tx(self, work: Callable[[PgConn], T]) -> T:
        try:
            conn = self._db()
            with conn.raw.transaction():
                result = work(conn)
            self.committed_at = time.monotonic()
        except psycopg.Error as exc:
            raise self._error(exc, "be written") from exc
        return result

    def _error(self, exc: psycopg.Error, doing: str) -> SpoolError:
        state = getattr(exc, "sqlstate", None) or ""
        if state in ("53100", "53200"):  # disk_full, out_of_memory
            return SpoolFull(
                f"the spool database {self.where} has no room ({exc}); free space on its disk,"
                " the spool resumes by itself"
            )
        return SpoolError(f"the spool database {self.where} cannot {doing}: {exc}")

    @contextmanager
    def _reading(self, what: str) -> Iterator[PgConn]:
        try:
            yield self._db()
        except psycopg.Error as exc:
            raise self._error(exc, f"be read ({what})") from exc

    # -- intake -------------------------------------------------------------------------------

    def handoff_from(self) -> None:
        """Never: every replica writes rows, so delivery reads them from the database."""
        return

    def put_many(self, items: Sequence[StoredItem]) -> list[bool | Exception]:
        """Store webhooks in one transaction: True stored, False duplicate, SpoolFull no room."""
        now = self.clock()
        room = self.max_pending - self.pending
        reverse = 0

        def work(db: PgConn) -> tuple[list[bool | Exception], int]:
            nonlocal reverse
            # Ids then commit in their order, whichever replica takes the webhook (module doc).
            db.execute("SELECT pg_advisory_xact_lock(?)", (_INTAKE_LOCK,))
            results: list[bool | Exception] = []
            rows: list[tuple[float, str, bytes, int, int]] = []
            for item in items:
                key, kind, body = item[:3]
                if key is not None:
                    cur = db.execute(
                        "INSERT INTO seen(key, at) VALUES (?, ?) ON CONFLICT (key) DO UPDATE"
                        " SET at = excluded.at WHERE seen.at < ?",
                        (key, now, now - self.dedupe_window_s),
                    )
                    if cur.rowcount == 0:
                        results.append(False)
                        continue
                if len(rows) >= room:
                    if key is not None:
                        db.execute("DELETE FROM seen WHERE key = ?", (key,))
                    results.append(SpoolFull(f"the spool holds {self.max_pending} updates"))
                    continue
                code = CODES[direction_of(kind)]
                reverse += code
                rows.append((now, kind, body, code, partition(person_of(item))))
                results.append(True)
            db.executemany(
                "INSERT INTO inbox(received_at, type, body, direction, part)"
                " VALUES (?, ?, ?, ?, ?)",
                rows,
            )
            return results, len(rows)

        results, stored = self._tx(work)
        self._stored(stored, reverse, len(items))
        return results

    # -- delivery -----------------------------------------------------------------------------

    def fetch(self, after_id: int, limit: int, direction: Direction = "to_braze") -> list[Pending]:
        """The oldest pending webhooks going `direction` after `after_id`, of those owned."""
        owned = self._owned
        if owned is not None and not owned:
            return []
        parts = "" if owned is None else " AND part = ANY(?)"
        sql = (
            "SELECT id, received_at, type, body, part, replayed_at FROM inbox"  # noqa: S608 - a constant
            f" WHERE direction = ? AND id > ?{parts} ORDER BY id LIMIT ?"
        )
        params: tuple[Any, ...] = (CODES[direction], after_id)
        if owned is not None:
            params += (sorted(owned),)
        with self._reading("pending webhooks") as db:
            rows = db.execute(sql, (*params, limit)).fetchall()
        return [
            Pending(i, at, kind, bytes(body), part, again)
            for i, at, kind, body, part, again in rows
        ]

    def applied_times(self, persons: Iterable[str]) -> dict[tuple[str, str], float]:
        """As `SpoolBase.applied_times`, with the retention floors read afresh: they move when
        any replica prunes (the one holding partition 0)."""
        with self._reading("the retention floors") as db:
            self.floors = retention.floors(db)
        return super().applied_times(persons)

    def _by_person(
        self, what: str, columns: str, table: str, persons: Iterable[str]
    ) -> list[tuple[Any, ...]]:
        names = {p: p for p in persons}
        names.update({trail.person_hash(self.person_key, p): p for p in list(names)})
        if not names:
            return []
        with self._reading(what) as db:
            rows = db.execute(
                f"SELECT person, {columns} FROM {table} WHERE person = ANY(?)",  # noqa: S608 - constants only
                (list(names),),
            ).fetchall()
        return [(names[person], *rest) for person, *rest in rows]

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
        """In one transaction: what `SpoolDB.ack` does (without page zeroing, see the module)."""
        now = self.clock()

        def work(db: PgConn) -> int:
            db.executemany(
                "INSERT INTO dead_letters(created_at, received_at, type, body, person, reason,"
                " part, direction) SELECT ?, received_at, type, body, ?, ?, part, direction"
                " FROM inbox WHERE id = ?",
                [(now, item.person, item.reason, item.id) for item in dead],
            )
            ids = [*done, *(item.id for item in dead)]
            removed = 0
            if ids:
                removed = db.execute("DELETE FROM inbox WHERE id = ANY(?)", (ids,)).rowcount
            db.executemany(
                "INSERT INTO applied(person, target, at) VALUES (?, ?, ?)"
                " ON CONFLICT (person, target) DO UPDATE"
                " SET at = greatest(applied.at, excluded.at)",
                applied,
            )
            db.executemany(
                "INSERT INTO sent(person, target, state, at) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (person, target, state) DO UPDATE"
                " SET at = greatest(sent.at, excluded.at)",
                sent,
            )
            trail.write(db, self.person_key, audit)
            if erase:
                hash_of = functools.partial(trail.person_hash, self.person_key)
                removed += erasure.scrub(db, erase, hash_of, max(ids, default=0))
            return int(removed)

        removed = self._tx(work)
        if erase:
            self.pending_to_didomi = self.count_pending("to_didomi")
        self.pending = max(0, self.pending - removed)
        if direction == "to_didomi":
            self.pending_to_didomi = max(0, self.pending_to_didomi - removed)

    def prune(
        self, table: str, cutoff: float, limit: int, after: retention.Cursor = None
    ) -> tuple[int, retention.Cursor]:
        """One retention batch of `table`; refreshes the floors it moves."""
        result = self._tx(lambda db: retention.prune(db, table, cutoff, limit, after))
        if table == "applied" and result[0]:
            with self._reading("the retention floors") as db:
                self.floors = retention.floors(db)
        return result

    def finish_erasures(self) -> bool:
        """Nothing to finish: PostgreSQL has no free pages to zero (see the module)."""
        return True

    def recount(self, direction: Direction = "to_braze") -> tuple[int, int]:
        """Re-read (pending, dead) of `direction`: other replicas take and deliver too."""
        self.pending = self.count_pending()
        self.pending_to_didomi = self.count_pending("to_didomi")
        self.pending_backfill = self.count_backfill()
        return self.pending_of(direction), self.count_dead(direction)

    # -- dead letters -------------------------------------------------------------------------

    def replay(self, ids: Sequence[int] | None = None) -> int:
        """Move dead letters back into the inbox, keeping their dating (`SpoolDB.replay`)."""
        now = self.clock()

        def work(db: PgConn) -> int:
            db.execute("SELECT pg_advisory_xact_lock(?)", (_INTAKE_LOCK,))  # as intake does
            where, params = _which(ids)
            letters = db.execute(
                f"DELETE FROM dead_letters {where}"  # noqa: S608 - placeholders only
                " RETURNING id, received_at, type, body, part, direction",
                params,
            ).fetchall()
            letters.sort()
            db.executemany(
                "INSERT INTO inbox(received_at, type, body, direction, part, replayed_at)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                [
                    (received, kind, body, CODES[direction_of(kind)] if d is None else d, part, now)
                    for _, received, kind, body, part, d in letters
                ],
            )
            return len(letters)

        moved = self._tx(work)
        self.pending += moved
        self.pending_to_didomi = self.count_pending("to_didomi")
        return moved

    def purge(self, ids: Sequence[int] | None = None) -> int:
        """Delete dead letters for good; returns how many."""
        where, params = _which(ids)
        return int(
            self._tx(lambda db: db.execute(f"DELETE FROM dead_letters {where}", params).rowcount)  # noqa: S608 - placeholders only
        )

    # -- the backfill lane (`lane`) -----------------------------------------------------------

    def put_backfill(
        self,
        rows: Sequence[tuple[str, bytes, str]],
        source: str,
        position: str,
        counts: dict[str, int],
        *,
        finished: bool = False,
    ) -> int:
        """Store backfilled (key, body, person) rows and the source's progress, atomically."""
        now = self.clock()

        def work(db: PgConn) -> int:
            # As intake: ids commit in their order, so no delivery cursor passes one unseen.
            db.execute("SELECT pg_advisory_xact_lock(?)", (_INTAKE_LOCK,))
            stored = lane.store(db, rows, now, self.dedupe_window_s, partition)
            total = {**counts, "stored": counts.get("stored", 0) + stored}
            lane.save(db, source, position, total, now, finished)
            return stored

        stored = self._tx(work)
        self._stored(stored, 0, len(rows))
        return stored

    def backfill_progress(self, source: str) -> lane.Progress | None:
        """What the last backfill of `source` committed."""
        with self._reading("the backfill progress") as db:
            return lane.load(db, source)

    def fetch_backfill(self, after_id: int, limit: int) -> list[Pending]:
        """The oldest backfilled rows after `after_id`, of the partitions owned."""
        with self._reading("backfilled users") as db:
            return lane.fetch(db, after_id, limit, self._owned, with_part=True)

    def count_backfill(self) -> int:
        """Backfilled users waiting for delivery."""
        with self._reading("the backfill count") as db:
            return lane.count(db)


def _which(ids: Sequence[int] | None) -> tuple[str, tuple[Any, ...]]:
    if ids is None:
        return "", ()
    return "WHERE id = ANY(?)", (list(ids),)
