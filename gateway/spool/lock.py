"""`<spool>.lock`: the file lock that lets one `gateway run` own a SQLite spool."""

from __future__ import annotations

import fcntl
import os
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
    """

    def __init__(self, spool: str | Path) -> None:
        self.path = Path(spool).with_name(Path(spool).name + ".writers")
        try:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise SpoolError(f"cannot create the spool's write lock {self.path}: {exc}") from exc

    def __enter__(self) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_EX)

    def __exit__(self, *exc: object) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_UN)

    def close(self) -> None:
        """Close the file (dropping the lock if held)."""
        os.close(self._fd)
