"""`<spool>.lock`: the file lock that lets one `gateway run` own a SQLite spool."""

from __future__ import annotations

import fcntl
import os
import threading
from pathlib import Path

from gateway.errors import SpoolError, SpoolLocked


class SpoolLock:
    """`<spool>.lock`, locked (flock) by the one `gateway run` that owns the spool file.

    SQLite would let two servers share the file, but each dispatcher would send every pending
    row to Braze, and each would count pending rows and dead letters for itself. The CLI takes
    no lock: listing and replaying dead letters beside the server is what WAL mode allows.
    The kernel drops the lock when its process ends, even by `kill -9`, so it is never stale.
    The file itself is left in place: deleting it would let one process lock a new file while
    another still holds the old one.
    """

    def __init__(self, spool: str | Path) -> None:
        self.spool = Path(spool)
        self.path = self.spool.with_name(self.spool.name + ".lock")
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock, or raise SpoolLocked at once if another process holds it."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise SpoolError(f"cannot create the spool lock {self.path}: {exc}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _pid_in(fd)
            os.close(fd)
            raise SpoolLocked(self.spool, holder) from None
        except OSError as exc:
            os.close(fd)
            raise SpoolError(f"cannot lock the spool with {self.path}: {exc}") from exc
        # Which process owns the spool, for the operator and for a refused second gateway.
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        """Let another gateway own the spool (closing the file drops the lock)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _pid_in(fd: int) -> int | None:
    try:
        return int(os.pread(fd, 32, 0).decode().strip())
    except (OSError, ValueError):  # written a moment after the lock is taken
        return None


class WriteTurns:
    """`<spool>.writers`: an flock each writing process holds around its write transactions.

    With intake in several processes (`server.intake_processes`) their commits meet on the
    file's one write lock, and SQLite's busy handler sleeps 1 to 100 ms between tries: a
    writer would stand idle while the file is free. Queued on an flock, it is woken the
    moment the other commits. A process that does not take it (the CLI) is still kept out by
    SQLite's own lock, and waits as before.

    The wait is bounded by `timeout_s` (the SQLite busy timeout, which this queue stands in
    for): a process wedged while holding the lock must not stop every writer for good. The
    kernel has no timed flock, so a helper thread blocks in it; a writer that gives up
    gets a SpoolError (intake answers 503, delivery retries) and the helper, once it gets
    the lock nobody wants any more, lets it go at once.
    """

    def __init__(self, spool: str | Path, timeout_s: float) -> None:
        self.path = Path(spool).with_name(Path(spool).name + ".writers")
        self.timeout_s = timeout_s
        self._turn = threading.Condition()
        self._waiting = False  # the helper thread is blocked in flock
        self._wanted = False  # a writer waits for the helper's lock
        self._granted = False  # the helper got the lock for the writer waiting
        self._closed = False
        try:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise SpoolError(f"cannot create the spool's write lock {self.path}: {exc}") from exc

    def __enter__(self) -> None:
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            pass  # another process writes: queue behind it
        with self._turn:
            self._wanted, self._granted = True, False
            if not self._waiting:  # else the last writer's helper is still queued: take it over
                self._waiting = True
                threading.Thread(target=self._queue, name="spool-turns", daemon=True).start()
            granted = self._turn.wait_for(lambda: self._granted, timeout=self.timeout_s)
            self._wanted = self._granted = False
        if not granted:
            raise SpoolError(
                f"waited {self.timeout_s:g} s for the spool's write lock {self.path}: another"
                " gateway process holds it and commits nothing; restart the one that is stuck"
            )

    def _queue(self) -> None:
        """Block in flock on the helper thread; hand the lock to the writer, or drop it."""
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX)
        except OSError:  # the file was closed: nobody writes any more
            with self._turn:
                self._waiting = False
            return
        with self._turn:
            self._waiting = False
            if self._closed:  # the descriptor is gone (or another file's): the lock went with it
                return
            if self._wanted:
                self._granted = True
                self._turn.notify_all()
            else:  # the writer gave up: holding it would stop the others for nothing
                fcntl.flock(self._fd, fcntl.LOCK_UN)

    def __exit__(self, *exc: object) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_UN)

    def close(self) -> None:
        """Close the file (dropping the lock if held)."""
        with self._turn:
            self._closed = True
            os.close(self._fd)
