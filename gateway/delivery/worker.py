"""The life cycle both delivery directions share: loops in the background, work in flight,
and a stop that is bounded whatever they wait on.

`start` runs the loops `_loops()` names; `wake` cuts the main loop's sleep short; `stop` cancels
the loops (they hold nothing a restart does not redo), gives the in-flight tasks `grace_s`, then
cancels the rest: what did not finish stays in the spool and goes after the next start.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Coroutine
from typing import Any

# How often an idle loop looks for rows another process wrote (a CLI replay, another replica's
# intake): its own intake wakes it at once, the others are found this long after at most.
IDLE_POLL_S = 0.5


class Worker:
    """A delivery loop with its helper loops and in-flight tasks; subclasses name the loops."""

    def __init__(self) -> None:
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()  # work in flight, given a grace at stop
        self._running: list[asyncio.Task[None]] = []
        self._cursor = 0  # the spool id up to which rows have been read
        self._generation = 0  # of the spool's partitions (`Store.generation`), as last seen
        self._reading = 0  # pages being read and handled: fetched rows not yet in the backlog

    def _loops(self) -> dict[str, Coroutine[Any, Any, None]]:
        """The background loops, by task name."""
        raise NotImplementedError

    async def start(self) -> None:
        """Begin in the background."""
        self._running = [asyncio.create_task(c, name=n) for n, c in self._loops().items()]

    async def stop(self, grace_s: float = 10.0) -> None:
        """Stop the loops, give in-flight work `grace_s`, then cancel what remains."""
        deadline = time.monotonic() + grace_s
        self._stop.set()
        self._wake.set()
        for task in self._running:
            task.cancel()  # a loop may wait on a slot, a flush or a sleep; it holds nothing
        await asyncio.gather(*self._running, return_exceptions=True)
        if self._tasks:
            remaining = max(0.0, deadline - time.monotonic())
            _, pending = await asyncio.wait(self._tasks, timeout=remaining)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    async def _read_page(self) -> None:
        """Fetch the next page of rows into the backlog (acknowledging those that need nothing)."""
        raise NotImplementedError

    async def _refill(self) -> None:
        """`_read_page`, counted: until its rows are in the backlog or acknowledged (and their
        outcomes counted), the worker is not idle, so nobody takes it for finished meanwhile."""
        self._reading += 1
        try:
            await self._read_page()
        finally:
            self._reading -= 1

    def _partitions_moved(self, generation: int) -> bool:
        """Whether this replica's partitions changed since last seen (PostgreSQL); if so the
        cursor goes back to the start, since a partition taken brings its older rows."""
        if generation == self._generation:
            return False
        self._generation = generation
        self._cursor = 0
        return True

    @property
    def stopping(self) -> bool:
        """Whether stop() has begun."""
        return self._stop.is_set()

    def wake(self) -> None:
        """New work is in the spool."""
        self._wake.set()

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        """Run `work` as a task that stop() waits for."""
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _sleep(self, seconds: float) -> None:
        """Sleep, but wake at once when new work arrives."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout=seconds)

    async def _pause(self, seconds: float) -> None:
        """Sleep, but not past the start of a shutdown."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), timeout=seconds)
