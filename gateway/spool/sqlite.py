"""The durable spool: accepted webhooks, what was applied, and the dead letters, in one SQLite file.

`SpoolDB` is the synchronous core (the CLI uses it directly, even while a server runs, since
SQLite in WAL mode lets several processes share the file). `Spool` is the asyncio face the
server and dispatcher use: every call runs on one dedicated thread, and concurrent `put`s are
grouped into one transaction so that N requests cost one fsync, not N. `spool.lock.SpoolLock`
keeps a second server off a spool file that one already delivers from.

A full disk must never wedge the spool: acknowledging a delivery deletes rows, which still
writes WAL frames, and the checkpoint that folds intake's frames into the file needs room of its
own. So intake stops (`SpoolFull`, a 503) while taking a webhook would leave less than
`min_free_bytes` free on the spool's filesystem, counting the file growth the next checkpoint
owes and crediting the free pages inserts reuse. Acknowledgements ignore that reserve. While
intake is short of room, writes also run a truncating checkpoint, which hands the WAL's space
back to the disk, and `low_on_disk` keeps readiness at 503 until there is room again.

The file never shrinks, so what acknowledgements write (audit records, applied times, dedupe
keys) would hold the reserve for ever after a full disk. Free pages of the file count towards
the reserve (acknowledgements fill them before the file grows), up to half of it: the other
half stays free disk, for the WAL frames every write needs. And consent comes before records:
under disk pressure the oldest audit records are shed (`shed_audit`), before a webhook is
refused and before an acknowledgement grows the file into the reserve.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, TypeVar

from gateway.errors import SpoolError, SpoolFull
from gateway.shapes.webhooks import Direction, direction_of
from gateway.spool import audit as trail
from gateway.spool import erasure, lane
from gateway.spool import prune as retention
from gateway.spool.store import CODES, TO_DIDOMI, Dead, Pending, SpoolBase, StoredItem

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

T = TypeVar("T")
# Dead letters of Braze's reports (the reverse path) are told apart by their type.
_DIRECTION_INDEX = "CREATE INDEX IF NOT EXISTS inbox_direction ON inbox(direction, id)"
log = logging.getLogger("gateway.spool")

DEFAULT_MIN_FREE_BYTES = 64 * 1024 * 1024
BUSY_TIMEOUT_S = 10.0  # how long a write waits for another process's (the CLI's) lock
# Primary result codes (sqlite3 exceptions carry the extended code in `sqlite_errorcode`).
SQLITE_IOERR = 10
SQLITE_FULL = 13
# What a stored row costs beyond its bytes: its cell, its key in `seen` and the index on it.
ROW_OVERHEAD_BYTES = 512
WAL_FRAME_HEADER = 24  # bytes a WAL frame adds to its page
# What an acknowledgement writes per audit record, applied time or state sent, with indexes.
RECORD_BYTES = 320
AUDIT_RECORD_BYTES = 300  # one audit record with its two index entries (bench/spool_size.py)
SHED_BATCHES = 64  # at most this many shedding transactions per write: the rest at the next
SHED_LOG_S = 60.0
_SHED = "DELETE FROM audit WHERE id IN (SELECT id FROM audit ORDER BY id LIMIT ?)"  # oldest first


def _sent_history(db: sqlite3.Connection) -> None:
    """Rebuild an older spool's `sent` (one state per target) keyed by its state too."""
    db.execute("ALTER TABLE sent RENAME TO sent_one_state")
    db.execute(_SENT)
    db.execute("INSERT INTO sent SELECT person, target, state, at FROM sent_one_state")
    db.execute("DROP TABLE sent_one_state")


def _row_cost(key: str | None, body: bytes) -> int:
    """Bytes one stored webhook takes, with page and WAL frame headers (about 1/32) on top."""
    size = len(body) + len(key or "")
    return size + size // 32 + ROW_OVERHEAD_BYTES


class SpoolDB(SpoolBase):
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
        self.writers: AbstractContextManager[object] = contextlib.nullcontext()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # isolation_level=None: we issue BEGIN/COMMIT ourselves, to group writes.
            self.db = sqlite3.connect(
                self.path, isolation_level=None, check_same_thread=False, timeout=BUSY_TIMEOUT_S
            )
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
        keyed = [row[1] for row in self.db.execute("PRAGMA table_info(sent)") if row[5]]
        if "state" not in keyed:
            # A key of (person, target) kept one state per target: rebuilt with the state in it.
            self._tx(_sent_history)

    def close(self) -> None:
        """Close the file; a WAL checkpoint folds the log back in."""
        self.db.close()

    def _tx(self, work: Callable[[sqlite3.Connection], T]) -> T:
        try:
            with self.writers:  # several writing processes: `lock.WriteTurns`
                self.db.execute("BEGIN IMMEDIATE")
                try:
                    result = work(self.db)
                    self.db.execute("COMMIT")
                    self.committed_at = time.monotonic()
                except BaseException:
                    self._rollback()
                    raise
        except sqlite3.Error as exc:
            raise self._write_error(exc) from exc
        return result

    def _rollback(self) -> None:
        if not self.db.in_transaction:
            return
        try:
            self.db.execute("ROLLBACK")
        except sqlite3.Error as exc:
            # After a full disk or an I/O error SQLite may have rolled back already; the error
            # that caused it is the one to report, and nothing of the transaction is committed.
            log.debug("rollback failed after an error: %s", exc)

    def _write_error(self, exc: sqlite3.Error) -> SpoolError:
        """The gateway's error for a failed write: SpoolFull when the disk has no room left."""
        code = getattr(exc, "sqlite_errorcode", 0) & 0xFF
        if code == SQLITE_FULL or "disk is full" in str(exc):
            self.low_on_disk = f"the disk of the spool {self.path} is full; free space on it"
            self._give_back()
            return SpoolFull(
                f"the disk of the spool {self.path} is full ({exc}); free space on it,"
                " the spool resumes by itself"
            )
        if code == SQLITE_IOERR:
            # ENOSPC may surface as an I/O error (growing the WAL index, say): look at the disk.
            with contextlib.suppress(SpoolError, sqlite3.Error):
                if self._above_reserve(*self._room()) <= 0:
                    self.low_on_disk = self._short_of_room()
                    self._give_back()
                    return SpoolFull(f"{self.low_on_disk} ({exc})")
            return SpoolError(
                f"disk I/O error on the spool {self.path} ({exc}); check the disk and its log"
            )
        if isinstance(exc, sqlite3.OperationalError):
            return SpoolError(f"the spool {self.path} cannot be written: {exc}")
        return SpoolError(f"the spool {self.path} failed: {exc}")

    @contextlib.contextmanager
    def _reading(self, what: str) -> Iterator[sqlite3.Connection]:
        try:
            yield self.db
        except sqlite3.Error as exc:
            raise SpoolError(f"cannot read {what} from the spool {self.path}: {exc}") from exc

    # -- disk room ----------------------------------------------------------------------------

    def _room(self) -> tuple[int, int]:
        """(free disk once the next checkpoint is done, bytes of free pages inserts reuse)."""
        try:
            disk = os.statvfs(self.path.parent)
            size = self.path.stat().st_size
        except OSError as exc:
            raise SpoolError(f"cannot see the free space of the spool {self.path}: {exc}") from exc
        pages = int(self.db.execute("PRAGMA page_count").fetchone()[0])
        free_pages = int(self.db.execute("PRAGMA freelist_count").fetchone()[0])
        # Pages so far only in the WAL: the next checkpoint grows the file by this much.
        owed = max(0, pages * self._page_size - size)
        free = disk.f_bavail * disk.f_frsize
        return free - owed, free_pages * self._page_size

    def _above_reserve(self, disk: int, reusable: int) -> int:
        """Bytes intake may still add: `min_free_bytes` stays for acknowledgements, as free
        disk or free pages of the file (which their records fill first), half at least as disk
        (their WAL frames need it until the checkpoint)."""
        reserve = self.min_free_bytes
        return min(disk - reserve // 2, disk + reusable - reserve)

    def shed_audit(self, needed: int) -> int:
        """Delete the oldest audit records until `needed` bytes more fit above the reserve, or
        the file's free pages cover them; returns how many went (consent before records)."""
        shed = 0
        # Small transactions: each deleted record touches a page of each of the two indexes,
        # and those WAL frames must fit in the disk the reserve keeps.
        batch = max(16, self.min_free_bytes // (16 * self._page_size))
        enough = needed + self.min_free_bytes // 8  # not again at the very next write
        try:
            for _ in range(SHED_BATCHES):
                disk, reusable = self._room()
                # Free pages help only up to half the reserve: past that, shedding cannot help.
                if self._above_reserve(disk, reusable) >= enough or reusable >= enough:
                    break
                deleted = self._tx(lambda db: db.execute(_SHED, (batch,)).rowcount)
                if not deleted:
                    break
                shed += deleted
                self._give_back()  # the WAL frames of the delete, back to the disk
        except (SpoolError, sqlite3.Error) as exc:
            log.warning("could not shed audit records to make room: %s", exc)
        if shed:
            self.on_shed(shed)
            self._shed_unlogged += shed
        now = time.monotonic()
        if self._shed_unlogged and now - self._shed_logged_at >= SHED_LOG_S:
            log.warning(
                "the disk of the spool %s is short of room: deleted the %d oldest audit record(s)"
                " so consent can still be taken and delivered (make the disk larger, or lower"
                " retention.audit_days)",
                self.path,
                self._shed_unlogged,
                extra={"audit_shed": self._shed_unlogged},
            )
            self._shed_logged_at, self._shed_unlogged = now, 0
        return shed

    def _short_of_room(self) -> str:
        return (
            f"the disk of the spool {self.path} is nearly full: delivery.min_free_bytes"
            f" ({self.min_free_bytes}) is kept free for deliveries; free disk space"
        )

    def _give_back(self) -> None:
        """Fold the WAL into the file and truncate it, so the WAL's space returns to the disk."""
        try:
            # A reader in another process would make TRUNCATE wait for it, holding up intake
            # and acks on the spool thread; giving up at once is fine, the next write retries.
            self.db.execute("PRAGMA busy_timeout = 0")
            try:
                self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
            finally:
                self.db.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
        except sqlite3.Error as exc:  # no room to grow the file, say
            log.debug("could not checkpoint the spool: %s", exc)

    def _truncate_after_erasure(self) -> None:
        """Empty the WAL that held an erased person's frames; if a reader blocks it, mark it
        so `finish_erasures` tries again."""
        self.db.execute("PRAGMA busy_timeout = 0")
        try:
            busy = self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
        except sqlite3.Error:
            busy = 1
        finally:
            self.db.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
        mark = "INSERT OR IGNORE INTO meta(key, value) VALUES ('erasure-wal', 1)"
        clear = "DELETE FROM meta WHERE key = 'erasure-wal'"
        try:
            self.db.execute(mark if busy else clear)  # autocommit: its own small write
        except sqlite3.Error as exc:
            log.warning("could not record the erasure's WAL state: %s", exc)

    def finish_erasures(self) -> bool:
        """Go on zeroing free pages and truncating the WAL after an erasure; True when done."""
        with self._reading("the erasure state"):
            if not erasure.pending(self.db):
                return True
        # A step writes its pages to the WAL (truncated after it), so it takes at most the
        # room above half the reserve: acknowledgements keep the other half, whatever happens.
        with self._reading("the spool's free space"):
            room = self._room()[0] - self.min_free_bytes // 2  # disk above half the reserve
        pages = min(erasure.FILL_PAGES, room // (self._page_size + WAL_FRAME_HEADER))
        if pages <= 0:
            return False  # no room now; the background tries again
        done = self._tx(lambda db: erasure.zero_free_pages(db, pages))
        self._truncate_after_erasure()
        with self._reading("the erasure state"):
            return done and not erasure.pending(self.db)

    def _shed_for(self, needed: int, *, ack: bool = False) -> None:
        """Shed audit records when `needed` more bytes would not fit above the reserve (for an
        acknowledgement: nor in the file's free pages, so it would grow the file into it)."""
        try:
            disk, reusable = self._room()
        except (SpoolError, sqlite3.Error):
            return  # the write reports it
        short = self._above_reserve(disk, reusable) < needed
        if short and (not ack or reusable < needed) and disk > needed:
            self.shed_audit(needed)

    def _watch_room(self) -> None:
        """After an acknowledgement: short of room, hand the WAL back (its frames would grow up
        to the next automatic checkpoint, eating the reserve), and refuse intake until there is
        room again."""
        try:
            room = self._above_reserve(*self._room())
            if room <= 0 or self.low_on_disk is not None:
                self._give_back()
                room = self._above_reserve(*self._room())
        except (SpoolError, sqlite3.Error) as exc:
            log.debug("could not measure the spool's free space: %s", exc)
            return
        self.low_on_disk = self._short_of_room() if room <= 0 else None

    def _refresh_room(self) -> None:
        """While intake is short of room: give the WAL back, and see whether room returned."""
        self._give_back()
        try:
            room = self._room()
        except (SpoolError, sqlite3.Error) as exc:
            log.debug("could not measure the spool's free space: %s", exc)
            return
        if self._above_reserve(*room) > 0:
            self.low_on_disk = None

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
        self._shed_for((len(audit) + len(applied) + len(sent)) * RECORD_BYTES, ack=True)

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
        """Store backfilled (key, body, person) rows and the source's progress, atomically;
        SpoolFull (nothing stored) while they would eat the reserve acknowledgements need."""
        now = self.clock()
        cost = sum(_row_cost(key, body) for key, body, _ in rows)
        if self.low_on_disk is not None:
            self._give_back()
        self._shed_for(cost)

        def work(db: sqlite3.Connection) -> int:
            # As intake: the rows' WAL frames, then the pages the checkpoint adds where no
            # free page is left, must leave `min_free_bytes` to acknowledgements.
            disk, reusable = self._room()
            needed = cost + max(0, cost - reusable)
            if self._above_reserve(disk - needed, max(0, reusable - cost)) < 0:
                raise SpoolFull(self._short_of_room())
            stored = lane.store(db, rows, now, self.dedupe_window_s, None)
            total = {**counts, "stored": counts.get("stored", 0) + stored}
            lane.save(db, source, position, total, now, finished)
            return stored

        stored = self._tx(work)
        self._stored(stored, 0, len(rows))
        return stored

    def backfill_progress(self, source: str) -> lane.Progress | None:
        """What the last backfill of `source` committed."""
        with self._reading("the backfill progress"):
            return lane.load(self.db, source)

    def fetch_backfill(self, after_id: int, limit: int) -> list[Pending]:
        """The oldest backfilled rows after `after_id`."""
        with self._reading("backfilled users"):
            return lane.fetch(self.db, after_id, limit, None, with_part=False)

    def count_backfill(self) -> int:
        """Backfilled users waiting for delivery."""
        with self._reading("the backfill count"):
            return lane.count(self.db)


def _code(kind: str) -> int:
    return CODES[direction_of(kind)]


def _which(ids: Sequence[int] | None) -> tuple[str, tuple[int, ...]]:
    if ids is None:
        return "", ()
    return f"WHERE id IN ({','.join('?' * len(ids))})", tuple(ids)
