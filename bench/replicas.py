"""What `run.py --replicas` watches: a fake Braze it can read, the PostgreSQL spool, the rate.

The fake Braze of this phase runs inside run.py, on an event loop thread of its own, so that
every request it got can be read with its arrival time (`Recorded.at`, the monotonic clock)
and every user with the state it ended at: the standalone `python -m gateway.testing` only
counts. It costs run.py's process CPU, which the table shows as such.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

from procs import HOST

from gateway.testing.braze import FakeBraze

T = TypeVar("T")
SCHEMA = "didomi_braze_gateway"


class BrazeThread:
    """A `FakeBraze` served from a thread of this process; `read` runs code on its loop."""

    def __init__(self, **options: Any) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="fake-braze")
        self.thread.start()
        self.fake = FakeBraze(**options)
        self.url = self._call(self.fake.start(HOST, 0))

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=30)

    def read(self, look: Callable[[FakeBraze], T]) -> T:
        """`look(fake)`, run between two requests (nothing changes while it reads)."""

        async def run() -> T:
            return look(self.fake)

        return self._call(run())  # type: ignore[no-any-return]

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self._call(self.fake.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()


def query(url: str, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    """One read of the spool database, on a connection of its own."""
    import psycopg  # only this phase needs it (the gateway's `postgresql` extra)

    with psycopg.connect(url, autocommit=True, connect_timeout=5) as conn:
        conn.execute(f"SET search_path TO {SCHEMA}".encode())
        return conn.execute(sql.encode(), params or None).fetchall()


def leases(url: str) -> dict[int, str | None]:
    """Who holds each partition's lease now (None: nobody, or it ran out)."""
    rows = query(
        url,
        "SELECT part, CASE WHEN until > extract(epoch from clock_timestamp()) THEN owner END"
        " FROM leases",
    )
    # Owners are "replica/token" (a token per process): the replica's name is before the slash.
    return {int(part): owner.split("/")[0] if owner else None for part, owner in rows}


def pending(url: str) -> tuple[int, int]:
    """(rows waiting in the inbox, dead letters), every replica's."""
    inbox = query(url, "SELECT count(*) FROM inbox")[0][0]
    dead = query(url, "SELECT count(*) FROM dead_letters")[0][0]
    return int(inbox), int(dead)


class Takeover:
    """Polls `leases` every 50 ms from a thread until `survivor` holds every partition."""

    def __init__(self, url: str, survivor: str, timeout_s: float) -> None:
        self.started = time.monotonic()
        self.at: float | None = None
        self._url, self._survivor, self._timeout_s = url, survivor, timeout_s
        self._thread = threading.Thread(target=self._watch, name="takeover", daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while time.monotonic() < self.started + self._timeout_s:
            with contextlib.suppress(Exception):  # a failed poll is tried again
                if set(leases(self._url).values()) == {self._survivor}:
                    self.at = time.monotonic()
                    return
            time.sleep(0.05)

    def wait(self) -> float | None:
        """When the survivor held them all (monotonic), or None if not within the timeout."""
        self._thread.join()
        return self.at


def _stat(pid: int | str) -> list[str]:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def postgres_ticks(data: Path) -> int:
    """CPU ticks of a PostgreSQL server: the postmaster, its live children, and the children
    it has reaped (their ticks are in its cutime and cstime)."""
    postmaster = int((data / "postmaster.pid").read_text().split()[0])
    fields = _stat(postmaster)
    ticks = sum(int(v) for v in fields[11:15])
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            child = _stat(entry.name)
            if int(child[1]) == postmaster:
                ticks += int(child[11]) + int(child[12])
    return ticks


def most_in_window(times: Iterable[float], width: float = 1.0) -> int:
    """The most of `times` in any window `width` long (both ends open a new window)."""
    ordered = sorted(times)
    most = start = 0
    for end, t in enumerate(ordered):
        while t - ordered[start] >= width:
            start += 1
        most = max(most, end - start + 1)
    return most


def log_problems(*paths: Path) -> list[str]:
    """The warning, error and traceback lines of some logs."""
    found = []
    for path in paths:
        for line in path.read_text(errors="replace").splitlines():
            if any(word in line for word in ("WARNING", "ERROR", "CRITICAL", "Traceback")):
                found.append(line)
    return found
