"""The spool's asyncio face: every call on one thread, concurrent puts in one commit."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from gateway.errors import SpoolError
from gateway.shapes.webhooks import direction_of
from gateway.spool import audit as trail
from gateway.spool import prune as retention
from gateway.spool.handoff import Handoff
from gateway.spool.known import Known
from gateway.spool.store import Dead, Pending, SpoolBase, Store, StoredItem
from gateway.words import Direction

T = TypeVar("T")
log = logging.getLogger("gateway.spool")


@dataclasses.dataclass(frozen=True, slots=True)
class _Outcome:
    """What one delivery settles, as `Spool.ack` takes it (an erasure aside)."""

    direction: Direction
    done: Sequence[int]
    applied: Sequence[tuple[str, str, float]]
    dead: Sequence[Dead]
    sent: Sequence[tuple[str, str, str, float]]
    audit: Sequence[trail.Record]
    erase: Sequence[str] = ()


class Spool:
    """Asyncio access to a SpoolDB: one worker thread, concurrent puts grouped per transaction."""

    def __init__(self, db: Store, *, deliver: bool = True) -> None:
        self.db = db
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="spool")
        self._queue: list[tuple[StoredItem, asyncio.Future[bool], object]] = []
        # On SQLite this process writes every row (but for a CLI's replay): delivery to Braze
        # takes them from memory. On PostgreSQL every replica writes: it reads the database.
        # An intake-only process (`deliver=False`) hands nothing over: nobody delivers here.
        start = db.handoff_from() if deliver else None
        self.handoff = Handoff(start) if start is not None else None
        self._last_id = start or 0
        self._writer: asyncio.Task[None] | None = None
        # Delivery outcomes waiting for the next grouped acknowledgement, and who writes them.
        self._settling: list[tuple[_Outcome, asyncio.Future[None]]] = []
        self._settler: asyncio.Task[None] | None = None
        # The last failed intake commit (monotonic time, reason), cleared by the next success.
        self.write_error: tuple[float, str] | None = None
        # How well puts group: intake transactions committed, the rows in them, the largest.
        # Logged when the spool closes; `bench/RESULTS.md` reads them to size the grouping.
        self.commits = 0
        self.rows_committed = 0
        self.largest_commit = 0
        # The backfill lane's applied times read ahead, dropped by every ack that writes them.
        self.known = Known()

    @property
    def pending(self) -> int:
        """Webhooks stored and not yet acknowledged by Braze (as this process counts them)."""
        return self.db.pending

    async def run(self, fn: Callable[..., T], *args: object) -> T:
        """Run one SpoolDB call on the spool thread."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    # What delivery reads of the backend, so callers never reach through to `db`.

    @property
    def owned(self) -> frozenset[int] | None:
        """The partitions this process may deliver now; None: all of them (one owner)."""
        return self.db.owned

    @property
    def generation(self) -> int:
        """Bumped whenever `owned` changes, so delivery knows to look again."""
        return self.db.generation

    @property
    def floors(self) -> dict[str, float]:
        """What the retention pruned, per direction: counted as applied to everyone."""
        return self.db.floors

    def pending_of(self, direction: Direction) -> int:
        """Rows of one direction stored and not yet settled (as this process counts them)."""
        return self.db.pending_of(direction)

    async def fetch(
        self, after_id: int, limit: int, direction: Direction = "to_braze"
    ) -> list[Pending]:
        """Pending rows of one direction after `after_id`, in spool order."""
        return await self.run(self.db.fetch, after_id, limit, direction)

    async def fetch_backfill(self, after_id: int, limit: int) -> list[Pending]:
        """Pending backfill rows after `after_id`, in spool order."""
        return await self.run(self.db.fetch_backfill, after_id, limit)

    async def applied_times(self, persons: Iterable[str]) -> dict[tuple[str, str], float]:
        """When each (person, target) last had a change applied."""
        return await self.run(self.db.applied_times, persons)

    async def sent_states(self, persons: Iterable[str]) -> dict[tuple[str, str], dict[str, float]]:
        """Per (person, target), every state Braze was given with Didomi agreeing, and when."""
        return await self.run(self.db.sent_states, persons)

    async def count_dead(self, direction: Direction | None = None) -> int:
        """Dead letters of one direction (or of both)."""
        return await self.run(self.db.count_dead, direction)

    async def written_elsewhere(self) -> bool:
        """Whether another process may have written rows since last asked (a CLI replay)."""
        return await self.run(self.db.written_elsewhere)

    async def recount(self, direction: Direction = "to_braze") -> tuple[int, int]:
        """Pending and dead rows of one direction, counted in the database."""
        return await self.run(self.db.recount, direction)

    async def oldest_pending_at(self, direction: Direction = "to_braze") -> float | None:
        """When the oldest pending row of one direction arrived."""
        return await self.run(self.db.oldest_pending_at, direction)

    async def recount_backfill(self) -> int:
        """Count the backfill rows still waiting, and keep them out of to_braze's pending."""
        waiting = await self.run(self.db.count_backfill)
        self.db.pending_backfill = waiting
        return waiting

    def stored_elsewhere(self, to_braze: int, to_didomi: int) -> None:
        """Count rows this gateway's intake-only processes stored, as if stored here.

        Their acknowledgements are counted here, so without this the count would drift low.
        Counted on the spool thread, between puts and acks, so neither loses the update.
        """

        db = self.db
        if not isinstance(db, SpoolBase):
            return

        def count() -> None:
            db.pending += to_braze + to_didomi
            db.pending_to_didomi += to_didomi

        self._executor.submit(count)

    @property
    def max_pending(self) -> int:
        """How many pending rows the spool holds before intake refuses more."""
        return self.db.max_pending

    @property
    def committed_at(self) -> float:
        """When the backend last committed anything (monotonic time)."""
        return self.db.committed_at

    @property
    def low_on_disk(self) -> str | None:
        """Why the disk is too full to take more, or None."""
        return self.db.low_on_disk

    def clock(self) -> float:
        """The backend's wall clock, the one its stored times are in."""
        return self.db.clock()

    async def meta(self, key: str) -> bytes | None:
        """A value the gateway keeps in the spool's meta table, or None."""
        return await self.run(self.db.meta, key)

    async def finish_erasures(self) -> bool:
        """One bounded step of an erasure's zeroing; True once none is left."""
        return await self.run(self.db.finish_erasures)

    async def prune(
        self, table: str, cutoff: float, limit: int, after: retention.Cursor = None
    ) -> tuple[int, retention.Cursor]:
        """Delete up to `limit` rows of `table` older than `cutoff`, after a cursor."""
        return await self.run(self.db.prune, table, cutoff, limit, after)

    async def write_audit(self, records: Sequence[trail.Record], direction: Direction) -> None:
        """Store audit records that settle no row, once: a failure is the caller's to answer."""
        await self.run(functools.partial(self.db.ack, [], direction=direction, audit=records))

    async def ack(
        self,
        done: Sequence[int],
        applied: Sequence[tuple[str, str, float]] = (),
        dead: Sequence[Dead] = (),
        *,
        stopping: Callable[[], bool],
        sent: Sequence[tuple[str, str, str, float]] = (),
        direction: Direction = "to_braze",
        audit: Sequence[trail.Record] = (),
        erase: Sequence[str] = (),
    ) -> None:
        """Settle rows (done, applied, dead-lettered), retrying as `record` does.

        Outcomes settled while the spool thread is busy are written together, in one
        transaction (`_settle`): one commit for several Braze requests. An erasure goes alone,
        after the outcomes settled before it: its scrub reaches the rows received before those
        it settles, no further, and nothing acknowledged earlier writes the person back.
        """
        # The lane's read-ahead of these persons' applied times is no longer exact (`known`).
        with self.known.writing({person for person, _, _ in applied}.union(erase)):
            outcome = _Outcome(direction, done, applied, dead, sent, audit, erase)
            await self._retrying(lambda: self._settle(outcome), stopping)

    async def _settle(self, outcome: _Outcome) -> None:
        """Queue one outcome for the next grouped acknowledgement and wait until it commits."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._settling.append((outcome, future))
        if self._settler is None or self._settler.done():
            self._settler = asyncio.create_task(self._settle_queued())
        await future

    async def _settle_queued(self) -> None:
        queued: list[tuple[_Outcome, asyncio.Future[None]]] = []
        try:
            # Whatever queued up while the last acknowledgement ran goes into the next one.
            while self._settling:
                queued, self._settling = self._settling, []
                await self._settle_each(queued)
        except BaseException as exc:
            # Cancelled (shutdown) or broken: every outcome taken or still queued would wait
            # forever. Their callers get a SpoolError and retry (`_retrying`, which starts
            # another settler) or, stopping, leave their rows pending for the next start.
            error = SpoolError(f"the spool's acknowledgement stopped: {exc!r}")
            for _, future in [*queued, *self._settling]:
                if not future.done():
                    future.set_exception(error)
            self._settling = []
            raise

    async def _settle_each(self, queued: list[tuple[_Outcome, asyncio.Future[None]]]) -> None:
        """Write queued outcomes in call order, an erasure alone."""
        # An erasure is written alone and after what was settled before it, as each went
        # in call order before grouping: an outcome about the person written after the
        # scrub would keep their identifier (applied times, audit) in the spool.
        run: list[tuple[_Outcome, asyncio.Future[None]]] = []
        for entry in queued:
            if entry[0].erase:
                await self._settle_run(run)
                run = []
                await self._settle_group([entry])
            else:
                run.append(entry)
        await self._settle_run(run)

    async def _settle_run(self, run: list[tuple[_Outcome, asyncio.Future[None]]]) -> None:
        """Write outcomes without an erasure, one group per direction."""
        for direction in ("to_braze", "to_didomi"):
            group = [(o, f) for o, f in run if o.direction == direction]
            if group:
                await self._settle_group(group)

    async def _settle_group(self, group: list[tuple[_Outcome, asyncio.Future[None]]]) -> None:
        """Write a group in one transaction; if that fails, each alone, so one outcome the
        spool refuses never holds the others back (each caller retries its own)."""
        try:
            await self.run(self._ack_together, [outcome for outcome, _ in group])
        except Exception as exc:
            if len(group) > 1:
                for member in group:
                    await self._settle_group([member])
                return
            for _, future in group:
                if not future.done():
                    future.set_exception(exc)
            return
        for _, future in group:
            if not future.done():
                future.set_result(None)

    def _ack_together(self, outcomes: list[_Outcome]) -> None:
        """One `ack` of several outcomes of one direction (on the spool thread)."""
        if len(outcomes) == 1:
            one = outcomes[0]
            self.db.ack(
                one.done,
                one.applied,
                one.dead,
                sent=one.sent,
                direction=one.direction,
                audit=one.audit,
                erase=one.erase,
            )
            return
        self.db.ack(
            [i for o in outcomes for i in o.done],
            [a for o in outcomes for a in o.applied],
            [d for o in outcomes for d in o.dead],
            sent=[s for o in outcomes for s in o.sent],
            direction=outcomes[0].direction,
            audit=[r for o in outcomes for r in o.audit],
        )

    async def record(
        self, write: Callable[..., object], *args: object, stopping: Callable[[], bool]
    ) -> None:
        """Write a delivery outcome, retrying while the spool cannot be written.

        The other side may already have these updates: giving up here would leave their rows
        pending until a restart (then sent twice) and their people blocked. Only a shutdown
        stops the retries (after three tries): the rows then stay pending for the next start.
        """

        async def once() -> None:
            await self.run(write, *args)

        await self._retrying(once, stopping)

    async def _retrying(
        self, once: Callable[[], Awaitable[None]], stopping: Callable[[], bool]
    ) -> None:
        attempt = 0
        while True:
            try:
                await once()
                return
            except SpoolError as exc:
                attempt += 1
                if attempt == 1:
                    log.error("cannot record delivery outcomes in the spool, retrying: %s", exc)
                if stopping() and attempt >= 3:
                    raise
                # A local disk, not a remote API: retry often, so delivery resumes at once.
                await asyncio.sleep(min(1.0, 0.05 * 2**attempt))

    async def put(
        self,
        key: str | None,
        kind: str,
        body: bytes,
        person: str | None = None,
        decoded: object = None,
    ) -> bool:
        """Store one webhook durably: True once committed, False if it is a duplicate.

        `person` (who it is about) picks the partition on PostgreSQL, so that one replica at
        a time sends that person's updates; the SQLite spool has no use for it. `decoded`,
        the body as intake decoded it, goes to delivery with the row (`Handoff`).
        """
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._queue.append(((key, kind, body, person), future, decoded))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write())
        return await future

    async def _write(self) -> None:
        # Whatever queued up while the last transaction ran goes into the next one.
        while self._queue:
            batch, self._queue = self._queue, []
            stored: list[tuple[int, Pending]] = []
            try:
                items = [item for item, _, _ in batch]
                if self.handoff is not None:
                    results = await self.run(self.db.put_many, items, stored)
                else:
                    results = await self.run(self.db.put_many, items)
            except Exception as exc:
                if not isinstance(exc, SpoolError):
                    # A bug, not the disk: its puts are refused (503) as for a SpoolError, and
                    # the writer goes on with the puts queued meanwhile, which would otherwise
                    # wait for another request to start a writer.
                    log.exception("the spool's intake commit failed unexpectedly")
                    exc = SpoolError(f"the spool failed: {exc!r}")
                self.write_error = (time.monotonic(), str(exc))
                for _, future, _ in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            except BaseException as exc:
                # Cancelled: the puts taken and those queued behind them are all refused (503,
                # Didomi retries), none left waiting for a writer that no longer runs.
                error = SpoolError(f"the spool's intake stopped: {exc!r}")
                for _, future, _ in [*batch, *self._queue]:
                    if not future.done():
                        future.set_exception(error)
                self._queue = []
                raise
            self.write_error = None
            if stored:
                try:
                    self._hand_over(stored, batch)
                except Exception:
                    # A bug: the rows are committed all the same, so their puts are answered
                    # below; delivery reads them from the spool instead of skipping them.
                    log.exception("handing stored rows over to delivery failed")
                    assert self.handoff is not None
                    self._last_id = stored[-1][1].id
                    self.handoff.gap(self._last_id)
            self.commits += 1
            self.rows_committed += len(batch)
            self.largest_commit = max(self.largest_commit, len(batch))
            for (_, future, _), result in zip(batch, results, strict=True):
                if future.done():
                    continue  # the request was cancelled; the row is stored all the same
                if isinstance(result, Exception):
                    future.set_exception(result)
                else:
                    future.set_result(result)

    def _hand_over(
        self,
        stored: list[tuple[int, Pending]],
        batch: list[tuple[StoredItem, asyncio.Future[bool], object]],
    ) -> None:
        assert self.handoff is not None
        first = stored[0][1].id
        if first != self._last_id + 1:
            # Ids this process did not give out: a CLI replayed dead letters in between.
            self.handoff.gap(first - 1)
        self._last_id = stored[-1][1].id
        for index, row in stored:
            if direction_of(row.type) == "to_braze":
                # Built, not `dataclasses.replace`d: that costs a few µs a row on the loop.
                self.handoff.add(
                    Pending(
                        row.id,
                        row.received_at,
                        row.type,
                        row.body,
                        row.part,
                        row.replayed_at,
                        batch[index][2],
                        row.backfill,
                    )
                )

    async def close(self) -> None:
        """Finish queued writes, then close the file and the thread."""
        if self._writer is not None:
            # Cancelled or broken, it answered its puts with an error: no reason not to close.
            await asyncio.gather(self._writer, return_exceptions=True)
        if self._settler is not None:
            await asyncio.gather(self._settler, return_exceptions=True)
        await self.run(self.db.close)
        self._executor.shutdown(wait=True)
