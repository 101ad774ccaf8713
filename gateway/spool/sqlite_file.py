"""The SQLite spool file: its transactions, its errors, and the disk room it keeps.

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
import os
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TypeVar

from gateway.errors import SpoolError, SpoolFull
from gateway.spool import erasure
from gateway.spool.store import SpoolBase

T = TypeVar("T")
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
# One audit record with its two index entries, and each change packed in it (bench/ack_cost.py).
AUDIT_RECORD_BYTES = 320
AUDIT_CHANGE_BYTES = 70
SHED_BATCHES = 64  # at most this many shedding transactions per write: the rest at the next
SHED_LOG_S = 60.0
_SHED = "DELETE FROM audit WHERE id IN (SELECT id FROM audit ORDER BY id LIMIT ?)"  # oldest first


def _row_cost(key: str | None, body: bytes) -> int:
    """Bytes one stored webhook takes, with page and WAL frame headers (about 1/32) on top."""
    size = len(body) + len(key or "")
    return size + size // 32 + ROW_OVERHEAD_BYTES


class SqliteFile(SpoolBase):
    """What `SpoolDB` does to its file below the records: transactions, errors, disk room."""

    path: Path
    db: sqlite3.Connection
    min_free_bytes: int
    low_on_disk: str | None
    committed_at: float
    writers: AbstractContextManager[object]  # several writing processes: `lock.WriteTurns`
    on_shed: Callable[[int], None]
    _shed_logged_at: float
    _shed_unlogged: int
    _page_size: int

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

    def _plenty(self, needed: int) -> bool:
        """Whether `needed` more bytes surely fit above the reserve, seen from the disk's free
        space and the WAL's size alone: no more than the WAL holds can the next checkpoint add
        to the file, and free pages only add room. Far from the reserve this spares `_room`'s
        two PRAGMAs on every write; near it, the exact figures decide."""
        try:
            disk = os.statvfs(self.path.parent)
            wal = os.stat(f"{self.path}-wal").st_size
        except OSError:
            return False  # `_room` says what is wrong
        return disk.f_bavail * disk.f_frsize - wal - self.min_free_bytes >= needed

    def _shed_for(self, needed: int, *, ack: bool = False) -> None:
        """Shed audit records when `needed` more bytes would not fit above the reserve (for an
        acknowledgement: nor in the file's free pages, so it would grow the file into it)."""
        if self._plenty(needed):
            return
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
        if self.low_on_disk is None and self._plenty(1):
            return
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
