"""What both delivery directions do the same way: the loops, partitions, outcomes and gauges.

`start` runs the main loop and the gauges' loop; `wake` cuts the main loop's sleep short; `stop`
cancels the loops (they hold nothing a restart does not redo), gives the in-flight tasks
`grace_s`, then cancels the rest: what did not finish stays in the spool and goes after the next
start. A direction fills in its hooks: `_step` (one turn of the main loop), `_read_page`,
`_waiting`, `_moved` (partitions changed) and `_read_gauges`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine, Iterable, Sequence
from typing import Any, ClassVar, Generic, TypeVar

from gateway.delivery.health import DeliveryHealth
from gateway.delivery.outcome import Answer
from gateway.delivery.ports import Flow, Outcomes
from gateway.delivery.retry import Action, Decision
from gateway.errors import SpoolError
from gateway.words import Direction

# How often an idle loop looks for rows another process wrote (a CLI replay, another replica's
# intake): its own intake wakes it at once, the others are found this long after at most.
IDLE_POLL_S = 0.5
RECOUNT_S = 5.0  # how often the gauges are read again from the spool (the CLI may replay)
LOOP_PAUSE_S = 1.0  # after an unexpected failure of the loop, before it tries again

S = TypeVar("S", bound=Outcomes)


class Worker(Generic[S]):
    """A delivery loop with its gauges' loop and in-flight tasks; subclasses fill in the hooks."""

    LOOPS: ClassVar[tuple[str, str]]  # the task names of the main loop and the gauges' loop
    LOOP_FAILED: ClassVar[str]  # what the log says when the main loop fails

    def __init__(
        self,
        spool: S,
        flow: Flow,
        health: DeliveryHealth,
        *,
        direction: Direction,
        log: logging.Logger,
        clock: Callable[[], float],
    ) -> None:
        self.spool = spool
        self.flow = flow
        self.health = health
        self.direction: Direction = direction
        self.log = log  # the direction's own: logger names are part of the operator contract
        self.clock = clock
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()  # work in flight, given a grace at stop
        self._running: list[asyncio.Task[None]] = []
        self._cursor = 0  # the spool id up to which rows have been read
        self._generation = spool.generation  # of the spool's partitions, as last seen
        self._reading = 0  # pages being read and handled: fetched rows not yet in the backlog
        self._last_recount = 0.0  # monotonic: when the pending rows were last counted in the spool

    # -- hooks --------------------------------------------------------------------------------

    async def _step(self) -> None:
        """One turn of the main loop: read, start work, or wait for it."""
        raise NotImplementedError

    async def _read_page(self) -> None:
        """Fetch the next page of rows into the backlog (acknowledging those that need nothing)."""
        raise NotImplementedError

    def _waiting(self) -> bool:
        """Whether fetched rows wait in the backlog."""
        raise NotImplementedError

    def _moved(self, owned: frozenset[int] | None) -> None:
        """This replica's partitions changed to `owned`: forget the backlog of the others."""
        raise NotImplementedError

    async def _read_gauges(self) -> None:
        """Read the gauges the main loop cannot keep (it is what waits during a stall)."""
        raise NotImplementedError

    # -- life cycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Begin in the background."""
        # The gauges have their own loop: during a stall the main loop is what waits.
        main, gauges = self.LOOPS
        loops = {main: self._run(), gauges: self._gauges()}
        self._running = [asyncio.create_task(c, name=n) for n, c in loops.items()]

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

    def degraded_reason(self) -> str | None:
        """Why delivery is blocked or being retried, if it is; intake works meanwhile."""
        return self.health.degraded_reason()

    @property
    def idle(self) -> bool:
        """Nothing fetched is waiting and nothing is in flight."""
        return not self._waiting() and not self._tasks and not self._reading

    async def _run(self) -> None:
        while not self.stopping:
            try:
                # Cleared before looking, not before sleeping: a wake-up that comes while we
                # look must cut the next sleep short, not be lost to it.
                self._wake.clear()
                await self._step()
            except Exception:
                # One bad moment (a spool error, a bug) must not stop delivery for good.
                self.log.exception(self.LOOP_FAILED)
                # Not `_sleep`: each stored webhook would cut it short, and a failure that
                # persists would be retried, and logged, once per request.
                await self._pause(LOOP_PAUSE_S)

    async def _gauges(self) -> None:
        while not self.stopping:
            try:
                await self._read_gauges()
            except Exception:
                # As the main loop: one bad read (a bug) must not freeze the gauges for good,
                # the oldest pending age above all, which is what alerts during an outage.
                self.log.exception("reading the delivery gauges failed; trying again")
            await self._pause(RECOUNT_S)

    def _count_pending(self) -> None:
        """Set the pending gauge from this process's count of the direction's rows."""
        self.flow.pending.set(self.spool.pending_of(self.direction))

    def _recount(self, *, busy: bool) -> None:
        """Set the pending gauge, recounted in the spool (with the dead letters) every few
        seconds while not `busy` with a backlog or on a shared spool; else this process's count."""
        now = time.monotonic()
        # Counting rows scans the inbox on the spool thread, delaying intake commits: only do
        # it when caught up (a CLI replay is then the only way the count could be off). On a
        # shared spool the other replicas' intake and acks move it too: every few seconds.
        busy = busy and self.spool.owned is None
        if busy or now - self._last_recount < RECOUNT_S:
            self._count_pending()
            return
        self._last_recount = now
        self._spawn(self._recount_from_file())

    async def _recount_from_file(self) -> None:
        try:
            pending, dead = await self.spool.recount(self.direction)
        except SpoolError as exc:
            self.log.warning("could not recount the spool (will retry): %s", exc)
            return
        self.flow.pending.set(pending)
        self.flow.dead_letters.set(dead)

    def _set_age(self, oldest: float | None) -> None:
        """Set the oldest pending row's age from when it arrived (None: nothing pending)."""
        self.flow.oldest_age.set(0.0 if oldest is None else max(0.0, self.clock() - oldest))

    # -- reading ------------------------------------------------------------------------------

    async def _refill(self) -> None:
        """`_read_page`, counted: until its rows are in the backlog or acknowledged (and their
        outcomes counted), the worker is not idle, so nobody takes it for finished meanwhile."""
        self._reading += 1
        try:
            await self._read_page()
        finally:
            self._reading -= 1

    def _follow_partitions(self) -> None:
        """On PostgreSQL, after this replica's partitions changed: forget the backlog of those
        it gave up, and read from the start again for those it took (older rows included)."""
        owned = self.spool.owned
        generation = self.spool.generation
        if generation == self._generation:
            return
        self._generation = generation
        self._cursor = 0
        self._moved(owned)

    def _owns(self, parts: Iterable[int]) -> bool:
        """Whether every one of `parts` is a partition this replica delivers now."""
        owned = self.spool.owned
        return owned is None or all(part in owned for part in parts)

    # -- outcomes -----------------------------------------------------------------------------

    async def _write_outcome(
        self,
        done: Sequence[int],
        applied: Sequence[tuple[str, str, float]],
        dead: Sequence[Any],
        *,
        audit: Sequence[Any],
        sent: Sequence[tuple[str, str, str, float]] = (),
        erase: Sequence[str] = (),
    ) -> None:
        """Write an outcome to the spool, retrying while it cannot be written."""
        await self.spool.ack(
            done,
            applied,
            dead,
            direction=self.direction,
            audit=audit,
            sent=sent,
            erase=erase,
            stopping=lambda: self.stopping,
        )

    def _dead_lettered(self, reason: str, updates: int, rows: int) -> None:
        """Count `updates` that failed for `reason`, whose `rows` went to the dead letters."""
        self.flow.failed(reason, updates)
        self.flow.dead_letters.inc(rows)

    async def _retry_later(self, decision: Decision, answer: Answer) -> None:
        """A try failed but may succeed later: count it, say it in health, wait its delay."""
        self.flow.retried(decision.reason)
        if decision.action is Action.HOLD:
            self.health.block(answer)
        else:
            self.health.retrying(answer)
        await self._pause(decision.delay_s)

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
