"""The durable spool: accepted webhooks, what was applied, and the dead letters, in one SQLite file.

`SpoolDB` is the synchronous core (the CLI uses it directly, even while a server runs, since
SQLite in WAL mode lets several processes share the file). `Spool` is the asyncio face the
server and dispatcher use: every call runs on one dedicated thread, and concurrent `put`s are
grouped into one transaction so that N requests cost one fsync, not N.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from .errors import SpoolError, SpoolFull

_SCHEMA = """
CREATE TABLE IF NOT EXISTS inbox (
    -- AUTOINCREMENT: ids never come back after a delete, so the dispatcher's cursor never
    -- skips a row stored after the inbox was emptied.
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    received_at REAL NOT NULL,
    type TEXT NOT NULL,
    body BLOB NOT NULL
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
CREATE TABLE IF NOT EXISTS dead_letters (
    id INTEGER PRIMARY KEY AUTOINCREMENT,  -- an id the CLI printed never names another letter
    created_at REAL NOT NULL,
    received_at REAL NOT NULL,
    type TEXT NOT NULL,
    body BLOB NOT NULL,
    person TEXT,
    reason TEXT NOT NULL
);
"""

T = TypeVar("T")
log = logging.getLogger("gateway.spool")


@dataclass(frozen=True, slots=True)
class Pending:
    """One accepted webhook waiting for Braze."""

    id: int
    received_at: float
    type: str
    body: bytes


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One webhook whose update Braze refused, with the reason."""

    id: int
    created_at: float
    received_at: float
    type: str
    person: str | None
    reason: str
    body: bytes


@dataclass(frozen=True, slots=True)
class Dead:
    """An instruction to move an inbox row to the dead letters."""

    id: int
    reason: str
    person: str | None = None


class SpoolDB:
    """Synchronous access to the spool file; use from one thread at a time."""

    def __init__(
        self,
        path: str | Path,
        *,
        max_pending: int = 1_000_000,
        dedupe_window_s: float = 7 * 86_400.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = Path(path)
        self.max_pending = max_pending
        self.dedupe_window_s = dedupe_window_s
        self.clock = clock
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # isolation_level=None: we issue BEGIN/COMMIT ourselves, to group writes.
            self.db = sqlite3.connect(
                self.path, isolation_level=None, check_same_thread=False, timeout=10.0
            )
            self.db.execute("PRAGMA journal_mode=WAL")
            # FULL: a commit survives power loss, which is what a 202 promises.
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.executescript(_SCHEMA)
            self.pending = self.count_pending()
        except (OSError, sqlite3.Error) as exc:
            raise SpoolError(f"cannot open the spool {self.path}: {exc}") from exc
        self._puts_since_prune = 0

    def close(self) -> None:
        """Close the file; a WAL checkpoint folds the log back in."""
        self.db.close()

    def _tx(self, work: Callable[[sqlite3.Connection], T]) -> T:
        try:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                result = work(self.db)
                self.db.execute("COMMIT")
            except BaseException:
                if self.db.in_transaction:
                    self.db.execute("ROLLBACK")
                raise
        except sqlite3.OperationalError as exc:
            if "full" in str(exc).lower():
                raise SpoolFull(f"the spool's disk is full ({self.path})") from exc
            raise SpoolError(f"the spool {self.path} cannot be written: {exc}") from exc
        except sqlite3.Error as exc:
            raise SpoolError(f"the spool {self.path} failed: {exc}") from exc
        return result

    @contextlib.contextmanager
    def _reading(self, what: str) -> Iterator[None]:
        try:
            yield
        except sqlite3.Error as exc:
            raise SpoolError(f"cannot read {what} from the spool {self.path}: {exc}") from exc

    # -- intake -------------------------------------------------------------------------------

    def put_many(self, items: Sequence[tuple[str | None, str, bytes]]) -> list[bool | SpoolError]:
        """Store webhooks in one transaction: True stored, False duplicate, SpoolFull no room."""
        now = self.clock()
        room = self.max_pending - self.pending

        def work(db: sqlite3.Connection) -> tuple[list[bool | SpoolError], int]:
            results: list[bool | SpoolError] = []
            stored = 0
            for key, kind, body in items:
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
                if stored >= room:
                    if key is not None:
                        db.execute("DELETE FROM seen WHERE key = ?", (key,))
                    results.append(SpoolFull(f"the spool holds {self.max_pending} updates"))
                    continue
                db.execute(
                    "INSERT INTO inbox(received_at, type, body) VALUES (?, ?, ?)", (now, kind, body)
                )
                stored += 1
                results.append(True)
            return results, stored

        results, stored = self._tx(work)
        self.pending += stored
        self._puts_since_prune += len(items)
        if self._puts_since_prune >= 10_000:
            self._puts_since_prune = 0
            try:
                self.prune_seen()
            except SpoolError as exc:
                # The rows above are committed: a failed clean-up must not turn 202s into 503s.
                log.warning("could not prune old delivery keys (will retry later): %s", exc)
        return results

    def prune_seen(self) -> None:
        """Forget delivery keys older than the dedupe window, so the table stays bounded."""
        cutoff = self.clock() - self.dedupe_window_s
        self._tx(lambda db: db.execute("DELETE FROM seen WHERE at < ?", (cutoff,)))

    # -- delivery -----------------------------------------------------------------------------

    def fetch(self, after_id: int, limit: int) -> list[Pending]:
        """The oldest pending webhooks with an id above `after_id`."""
        with self._reading("pending webhooks"):
            rows = self.db.execute(
                "SELECT id, received_at, type, body FROM inbox WHERE id > ? ORDER BY id LIMIT ?",
                (after_id, limit),
            ).fetchall()
        return [Pending(*row) for row in rows]

    def applied_times(self, persons: Iterable[str]) -> dict[tuple[str, str], float]:
        """The last applied choice time per (person, target), for the given persons."""
        persons = list(set(persons))
        out: dict[tuple[str, str], float] = {}
        with self._reading("applied times"):
            for start in range(0, len(persons), 500):  # SQLite caps bound parameters
                chunk = persons[start : start + 500]
                marks = ",".join("?" * len(chunk))
                for person, target, at in self.db.execute(
                    f"SELECT person, target, at FROM applied WHERE person IN ({marks})",  # noqa: S608 - only placeholders are interpolated
                    chunk,
                ):
                    out[(person, target)] = at
        return out

    def ack(
        self,
        done: Sequence[int],
        applied: Sequence[tuple[str, str, float]] = (),
        dead: Sequence[Dead] = (),
    ) -> None:
        """In one transaction: drop delivered rows, record applied times, move refused rows."""
        now = self.clock()

        def work(db: sqlite3.Connection) -> int:
            for item in dead:
                db.execute(
                    "INSERT INTO dead_letters(created_at, received_at, type, body, person, reason)"
                    " SELECT ?, received_at, type, body, ?, ? FROM inbox WHERE id = ?",
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
            return removed

        removed = self._tx(work)
        self.pending = max(0, self.pending - removed)

    def recount(self) -> tuple[int, int]:
        """Re-read (pending, dead) from the file, since another process may have replayed.

        Runs on the spool thread, between writes, so no put or ack is lost to the reset.
        """
        self.pending = self.count_pending()
        return self.pending, self.count_dead()

    def count_pending(self) -> int:
        """Rows waiting in the inbox (read from the file: another process may have replayed)."""
        with self._reading("the pending count"):
            return int(self.db.execute("SELECT count(*) FROM inbox").fetchone()[0])

    def count_dead(self) -> int:
        """Rows in the dead letters."""
        with self._reading("the dead-letter count"):
            return int(self.db.execute("SELECT count(*) FROM dead_letters").fetchone()[0])

    # -- dead letters -------------------------------------------------------------------------

    def dead_letters(self, ids: Sequence[int] | None = None) -> list[DeadLetter]:
        """Every dead letter, or the ones named, oldest first."""
        with self._reading("the dead letters"):
            rows = self.db.execute(
                "SELECT id, created_at, received_at, type, person, reason, body FROM dead_letters"
                " ORDER BY id"
            ).fetchall()
        wanted = set(ids) if ids is not None else None
        return [DeadLetter(*row) for row in rows if wanted is None or row[0] in wanted]

    def replay(self, ids: Sequence[int] | None = None) -> int:
        """Move dead letters back into the inbox, as if just received; returns how many."""
        now = self.clock()

        def work(db: sqlite3.Connection) -> int:
            where, params = _which(ids)
            moved = db.execute(
                f"INSERT INTO inbox(received_at, type, body) SELECT ?, type, body"  # noqa: S608 - only placeholders are interpolated
                f" FROM dead_letters {where} ORDER BY id",
                (now, *params),
            ).rowcount
            db.execute(f"DELETE FROM dead_letters {where}", params)  # noqa: S608 - only placeholders are interpolated
            return moved

        moved = self._tx(work)
        self.pending += moved
        return moved

    def purge(self, ids: Sequence[int] | None = None) -> int:
        """Delete dead letters for good; returns how many."""
        where, params = _which(ids)
        return self._tx(
            lambda db: db.execute(f"DELETE FROM dead_letters {where}", params).rowcount  # noqa: S608 - only placeholders are interpolated
        )


def _which(ids: Sequence[int] | None) -> tuple[str, tuple[int, ...]]:
    if ids is None:
        return "", ()
    return f"WHERE id IN ({','.join('?' * len(ids))})", tuple(ids)


class Spool:
    """Asyncio access to a SpoolDB: one worker thread, concurrent puts grouped per transaction."""

    def __init__(self, db: SpoolDB) -> None:
        self.db = db
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="spool")
        self._queue: list[tuple[tuple[str | None, str, bytes], asyncio.Future[bool]]] = []
        self._writer: asyncio.Task[None] | None = None
        # The last failed intake commit (monotonic time, reason), cleared by the next success.
        self.write_error: tuple[float, str] | None = None

    @property
    def pending(self) -> int:
        """Webhooks stored and not yet acknowledged by Braze (as this process counts them)."""
        return self.db.pending

    async def run(self, fn: Callable[..., T], *args: object) -> T:
        """Run one SpoolDB call on the spool thread."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def put(self, key: str | None, kind: str, body: bytes) -> bool:
        """Store one webhook durably: True once committed, False if it is a duplicate."""
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._queue.append(((key, kind, body), future))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write())
        return await future

    async def _write(self) -> None:
        # Whatever queued up while the last transaction ran goes into the next one.
        while self._queue:
            batch, self._queue = self._queue, []
            try:
                results = await self.run(self.db.put_many, [item for item, _ in batch])
            except SpoolError as exc:
                self.write_error = (time.monotonic(), str(exc))
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            except BaseException as exc:
                for _, future in batch:
                    if not future.done():
                        future.set_exception(SpoolError(f"the spool failed: {exc!r}"))
                raise
            self.write_error = None
            for (_, future), result in zip(batch, results, strict=True):
                if future.done():
                    continue  # the request was cancelled; the row is stored all the same
                if isinstance(result, SpoolError):
                    future.set_exception(result)
                else:
                    future.set_result(result)

    async def close(self) -> None:
        """Finish queued writes, then close the file and the thread."""
        if self._writer is not None:
            await self._writer
        await self.run(self.db.close)
        self._executor.shutdown(wait=True)
