"""The dispatcher: spooled webhooks -> mapped -> batched per person -> Braze -> ack.

It wires three parts that know nothing of each other: the `Batcher` (backlog, per-person order,
who is in flight), the retry policy (`retry.decide`: Braze answer -> ack, split, retry, hold or
dead-letter) and `DeliveryHealth` (what readiness and the metrics report). One loop fetches and
forms batches; each batch is delivered by its own task, at most `max_in_flight` at once. Pages
are read and mapped in `pages`, the stale check is `stale`, the loops are `delivery.worker`'s.

A row leaves the spool only once Braze has acknowledged it or it is moved to the dead letters
with the reason. Every failure between fetching and acknowledging gives the rows back: a page
that cannot be mapped is fetched again, and a batch whose delivery fails returns its unsettled
rows to the backlog and frees its people, so delivery never stalls until a restart.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from gateway.delivery.health import DeliveryHealth
from gateway.delivery.outcome import Answer, Verdict
from gateway.delivery.retry import Action, backoff, decide
from gateway.delivery.worker import IDLE_POLL_S, RECOUNT_S, Worker
from gateway.errors import SpoolError
from gateway.forward.batcher import Batch, Batcher, Item
from gateway.forward.pages import Lane, Live, map_page
from gateway.forward.stale import applied_for, drop_stale, read_ahead
from gateway.forward.trail import endpoint_of, records_of
from gateway.peers.braze import BrazeClient
from gateway.peers.braze_bodies import MAX_DELETE_IDS, track_object
from gateway.rules.mappings import ERASED, RuleSet
from gateway.spool.audit import Record
from gateway.spool.face import Spool
from gateway.spool.lane import rate as lane_rate
from gateway.spool.store import Dead

if TYPE_CHECKING:
    from gateway.config.settings import Config
    from gateway.metrics import Metrics

log = logging.getLogger("gateway.dispatcher")

LANE_PAUSE_S = 0.05  # between two looks at the backfill lane while its share is spent
# The backfill lane's own requests in flight, per `braze.max_in_flight`, beside those: Braze
# limits the rate (the lane keeps to its share, `lane.Budget`), not concurrency, and a lane
# request spends most of its turn waiting, for Braze and then for its grouped acknowledgement.
LANE_SLOTS = 2
LANE_FEED = 2  # lane requests' worth of rows in the backlog at once (`Lane.feed`)


class Dispatcher(Worker[Spool]):
    """Moves spooled webhooks to Braze as fast as Braze allows, losing none."""

    LOOPS = ("gateway-dispatcher", "gateway-spool-age")
    LOOP_FAILED = "the dispatcher loop failed; resuming in a second"

    def __init__(
        self,
        config: Config,
        spool: Spool,
        rules: Callable[[], RuleSet],
        client: BrazeClient,
        metrics: Metrics,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        flow = metrics.flow("to_braze")
        health = DeliveryHealth(flow, metrics.braze_auth_ok)
        super().__init__(spool, flow, health, direction="to_braze", log=log, clock=clock)
        self.config = config  # replaced on reload; read afresh for every batch
        self.rules = rules
        self.client = client
        self.metrics = metrics
        self.batcher = Batcher()
        self._slots = asyncio.Semaphore(config.braze.max_in_flight)
        self._lane_slots = asyncio.Semaphore(config.braze.max_in_flight * LANE_SLOTS)
        self._map_failures: Counter[int] = Counter()
        self.live = Live()
        self.lane = Lane(self._lane_rate)

    def _lane_rate(self) -> float:
        # Per replica, by the partitions it owns: the replicas together keep to the share.
        braze = self.config.braze
        return lane_rate(
            self.config.backfill.share,
            braze.requests_per_second,
            braze.batch_size,
            self.spool.owned,
        )

    # -- forming batches ----------------------------------------------------------------------

    def _waiting(self) -> bool:
        return bool(self.batcher) or bool(self.lane.ready)

    async def _step(self) -> None:
        """Form one batch and start delivering it, or wait for work."""
        await self._refill()
        self._recount(busy=bool(self.batcher))
        if not self.batcher:
            await self._sleep(LANE_PAUSE_S if self.lane.more else IDLE_POLL_S)
            return
        await self._slots.acquire()
        try:
            batch = await self._form()
        except BaseException:
            self._slots.release()
            raise
        if batch is None:
            self._slots.release()
            # Everything waiting belongs to people already in flight.
            await self._sleep(self.config.braze.flush_interval_ms / 1000)
            return
        slot = self._slots
        if not self._lane_slots.locked() and all(
            entry.row.backfill for item in batch.items for entry in item.entries
        ):
            # Backfilled users only: on a lane slot, so the live slots stay free for live rows.
            await self._lane_slots.acquire()  # free: returns at once
            self._slots.release()
            slot = self._lane_slots
        self._spawn(self._deliver(batch, slot))

    async def _read_page(self) -> None:
        """Fetch and map more rows; rows that change nothing are acknowledged at once.

        The cursor moves past a page only once all of it is mapped and its no-op rows are
        acknowledged: a failure anywhere before leaves the page to be fetched again.
        """
        braze = self.config.braze
        self._follow_partitions()
        if len(self.batcher) >= braze.batch_size * braze.max_in_flight * 4:
            return
        quiet = not self._waiting() and not self._tasks
        rows, cursor = await self.live.page(self.spool, self._cursor, self.batcher, quiet)
        if self.live.written_elsewhere:
            self.live.written_elsewhere = False
            self.lane.more = True  # `gateway backfill` may have stored users: look at once
        backfill = False
        if not rows:
            self._cursor = cursor
            # Live webhooks are caught up: the backfill lane may use its share, a few requests
            # at a time in the backlog.
            if self.lane.feed(self.batcher, braze.batch_size * LANE_FEED):
                return
            slots = braze.batch_size * braze.max_in_flight
            rows, cursor = await self.lane.page(self.spool, self.batcher, slots)
            if not rows:
                self.lane.cursor = cursor
                return
            backfill = True
        # Each row is mapped by exactly one rule set, even across a reload.
        page = map_page(self.rules(), rows, self._map_failures, self.clock)
        if backfill and page.entries:
            # One stale-check read for the page rather than one per request (`stale`).
            await read_ahead(self.spool, {entry.mapped.person for entry in page.entries})
        if page.skipped or page.unmappable:
            await self._write_outcome(page.skipped, [], page.unmappable, audit=page.trail)
        for row in rows:
            self._map_failures.pop(row.id, None)
        if backfill:
            self.lane.cursor = cursor
            if page.skipped:
                self.metrics.backfill_users.labels("skipped").inc(len(page.skipped))
            self.lane.ready.extend(page.entries)
            self.lane.feed(self.batcher, braze.batch_size * LANE_FEED)
        else:
            self._cursor = cursor
            self.batcher.add(page.entries)
        for reason, count in page.reasons.items():
            self.flow.skipped(reason, count)
        if clamped := sum(1 for entry in page.entries if entry.mapped.clamped):
            self.metrics.event_dates_clamped.inc(clamped)
            log.warning("%d choice(s) dated in the future were dated at their arrival", clamped)
        if page.unmappable:
            self._dead_lettered("unmappable", len(page.unmappable), len(page.unmappable))

    def _moved(self, owned: frozenset[int] | None) -> None:
        self.lane.cursor = 0
        self.lane.forget()
        self.spool.known.forget_all()  # another replica may have acked those persons
        if owned is not None:
            dropped = self.batcher.drop(owned.__contains__)
            if dropped:
                log.info("%d fetched update(s) left to the replica that now owns them", dropped)

    @property
    def cursor(self) -> int:
        """The spool id up to which Didomi's rows have been fetched (or acknowledged unsent)."""
        return self._cursor

    def unsettled(self, person: str, before: int) -> bool:
        """Whether a fetched row about `person`, stored before row `before`, is not settled yet
        (the writeback holds Braze's reports of that person until Braze has it)."""
        if any(entry.mapped.person == person for entry in self.batcher.waiting(before)):
            return True
        if any(e.mapped.person == person and e.row.id < before for e in self.lane.ready):
            return True
        return any(key.partition(":")[2] == person for key in self.batcher.in_flight)

    def _ours(self, item: Item) -> bool:
        """Whether every row of `item` is of a partition this replica delivers now."""
        return self._owns(row.part for row in item.rows)

    def busy_partitions(self) -> set[int]:
        """The partitions with updates in flight to Braze or still in the backlog (not to be
        given up yet: the backlog forgets them at the next refill)."""
        return self.batcher.parts_held | {entry.row.part for entry in self.lane.ready}

    async def _read_gauges(self) -> None:
        """The oldest pending age and the backfilled users waiting: one indexed row and one
        count per read, so it costs intake nothing."""
        try:
            oldest = await self.spool.oldest_pending_at()
        except SpoolError as exc:
            log.warning("could not read the oldest pending update (will retry): %s", exc)
        else:
            self._set_age(oldest)
        try:
            waiting = await self.spool.recount_backfill()  # kept out of to_braze's pending
        except SpoolError as exc:
            log.warning("could not count the backfilled users waiting (will retry): %s", exc)
        else:
            self.metrics.backfill_pending.set(waiting)
            self.lane.more = self.lane.more or waiting > 0
        # `_step` sets the pending gauge, but waits while every in-flight slot is taken (Braze
        # down): meanwhile intake processes and, on PostgreSQL, other replicas store rows.
        if self.spool.owned is None:
            self._count_pending()  # this process counts theirs (`Spool.stored_elsewhere`)
        elif time.monotonic() - self._last_recount >= RECOUNT_S:
            self._last_recount = time.monotonic()  # on PostgreSQL only the database knows
            await self._recount_from_file()

    async def _form(self) -> Batch | None:
        """Take backlog rows into one batch, waiting up to the flush interval for it to fill."""
        braze = self.config.braze
        deadline = time.monotonic() + braze.flush_interval_ms / 1000
        while not self.stopping and self.batcher.people_waiting < braze.batch_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            # Poll rather than wake per webhook: at high intake a wake per request costs more.
            await asyncio.sleep(min(0.01, remaining))
            await self._refill()
        return self.batcher.take(braze.batch_size, MAX_DELETE_IDS, self.spool.owned)

    # -- delivering ---------------------------------------------------------------------------

    async def _deliver(self, batch: Batch, slot: asyncio.Semaphore) -> None:
        try:
            await self._drop_stale(batch.items, ahead=True)
            await self._send(batch.items, batch.delete, attempt=0)
        except asyncio.CancelledError:
            raise  # stopping: the rows stay in the spool for the next start
        except Exception:
            returned = self.batcher.give_back(batch)
            log.exception("delivering a batch failed; %d row(s) go back to the backlog", returned)
            # Held, with its slot, for a moment: a failure that repeats must not spin.
            await self._pause(backoff(1, self.config.delivery))
        finally:
            self.batcher.release(batch)
            slot.release()
            self._wake.set()

    async def _drop_stale(self, items: list[Item], *, ahead: bool = False) -> None:
        """Drop changes older than what was applied to that person and target (`stale`); on
        the first try, the lane's rows use their page's read-ahead while it is exact."""
        applied = await applied_for(self.spool, items, ahead)
        drop_stale(items, applied, self.spool.floors, self.flow, self._lane_stale)

    def _lane_stale(self) -> None:
        self.metrics.backfill_users.labels("stale").inc()

    async def _send(self, items: list[Item], delete: bool, attempt: int) -> None:
        retried = False
        while True:
            # A partition given up meanwhile (its lease about to run out) is another
            # replica's now: its rows stay in the spool for it, rather than leave from two.
            lost = [i for i in items if not self._ours(i)]
            if lost:
                # Back to the backlog, where the person's later rows wait behind them:
                # forgotten with those if the partition stays another replica's, sent
                # first if it comes back, never overtaken.
                self.batcher.give_back(Batch(lost, delete=delete))
                gone = {id(i) for i in lost}
                items = [i for i in items if id(i) not in gone]
                if not items:
                    return
            if retried:
                # While this batch waited, a Braze change may have been written back to Didomi
                # (or a newer choice applied): check again, rather than overwrite it with older.
                await self._drop_stale(items)
            # A person whose every change was stale needs no request, only an ack.
            idle = [item for item in items if not (item.changes or item.delete)]
            if idle:
                await self._ack(idle, {}, None, self.clock())
            items = [item for item in items if item.changes or item.delete]
            if not items:
                return
            retried = True
            config = self.config  # a reload applies from the next request on
            sent_at = self.clock()
            sending = items

            def allowed(sending: list[Item] = sending) -> bool:
                return all(self._ours(item) for item in sending)

            if delete:
                # One identifier kind per request: the batcher never mixes them.
                answer = await self.client.delete(
                    items[0].identity, [i.person for i in items], allowed
                )
            else:
                braze = config.braze
                answer = await self.client.track(
                    [
                        track_object(
                            item.identity,
                            item.person,
                            {t: c.state for t, c in item.changes.items()},
                            update_existing_only=braze.update_existing_only,
                        )
                        for item in items
                    ],
                    allowed,
                )
            if answer.verdict not in (Verdict.OK, Verdict.MOVED):
                attempt += 1
            oldest = min(row.queued_at for item in items for row in item.rows)
            decision = decide(
                answer,
                attempt=attempt,
                oldest_age_s=self.clock() - oldest,
                can_split=len(items) > 1,
                delivery=config.delivery,
            )
            action = decision.action
            if action is Action.ACK:
                self.health.ok()
                await self._ack(items, answer.errors, answer, sent_at, delete=delete)
                return
            if action is Action.SPLIT:
                half = len(items) // 2
                await self._send(items[:half], delete, attempt)
                await self._send(items[half:], delete, attempt)
                return
            if action is Action.DEAD_LETTER:
                await self._dead(items, decision.reason, answer, sent_at, delete=delete)
                return
            if action is Action.GIVE_BACK:
                continue  # the loop's first step gives the moved rows back, sends the rest
            await self._retry_later(decision, answer)  # returns at once once stopping
            if self.stopping:
                return  # rows stay in the spool for the next start

    async def _ack(
        self,
        items: Sequence[Item],
        errors: dict[int, str],
        answer: Answer | None,
        sent_at: float,
        *,
        delete: bool = False,
    ) -> None:
        now = self.clock()
        done: list[int] = []
        dead: list[Dead] = []
        applied: list[tuple[str, str, float]] = []
        trail: list[Record] = []
        erase: list[str] = []
        status = answer.status if answer is not None else None
        endpoint = endpoint_of(delete) if answer is not None else None
        delivered = lane_delivered = 0
        for index, item in enumerate(items):
            error = errors.get(index)
            if error is not None:
                reason = f"Braze refused the object: {error}"
                dead.extend(Dead(row.id, reason, item.person) for row in item.rows)
                trail.extend(records_of(item, "dead-lettered", sent_at, endpoint, status, reason))
                continue
            trail.extend(records_of(item, "delivered", sent_at, endpoint, status))
            if item.erased_at is not None and (item.changes or item.delete):
                erase.append(item.person)  # Braze has it: the spool may now forget them
            done.extend(row.id for row in item.rows)
            applied.extend((item.person, t, c.at) for t, c in item.changes.items())
            if item.erased_at is not None:
                applied.append((item.person, ERASED, item.erased_at))
            if item.changes or item.delete:
                delivered += 1
                if any(row.backfill for row in item.rows):
                    lane_delivered += 1
            for row in item.rows:
                self.flow.latency.observe(max(0.0, now - row.queued_at))
        # The states sent, only when Braze's changes come back (to tell our echoes apart).
        # Dated when the request that delivered them was sent, not answered: Braze may apply it
        # at once, and a person's act in Braze while the answer is on its way is later, not
        # stale (the writeback drops reports older than this).
        sent = (
            [
                (item.person, t, str(c.state), sent_at)
                for index, item in enumerate(items)
                if index not in errors
                for t, c in item.changes.items()
                if t.kind != "attribute"
            ]
            if self.config.braze_webhooks is not None
            else []
        )
        await self._write_outcome(done, applied, dead, sent=sent, audit=trail, erase=erase)
        for item in items:
            item.settled = True
        self.flow.delivered.inc(delivered)
        if lane_delivered:
            self.metrics.backfill_users.labels("delivered").inc(lane_delivered)
        log.debug(
            "Braze acknowledged %d object(s)",
            delivered,
            extra={"objects": delivered, "webhooks": len(done), "outcome": "delivered"},
        )
        if dead:
            self.flow.failed("rejected", len({d.person for d in dead}))
            self.flow.dead_letters.inc(len(dead))
            log.warning("Braze refused %d object(s); moved to the dead letters", len(errors))
        self.flow.pending.set(self.spool.pending_of("to_braze"))

    async def _dead(
        self, items: Sequence[Item], reason: str, answer: Answer, sent_at: float, *, delete: bool
    ) -> None:
        detail = f"{reason}: {answer.reason}"
        dead = [Dead(row.id, detail, item.person) for item in items for row in item.rows]
        endpoint = endpoint_of(delete)
        trail = [
            record
            for item in items
            for record in records_of(
                item, "dead-lettered", sent_at, endpoint, answer.status, detail
            )
        ]
        await self._write_outcome([], [], dead, audit=trail)
        for item in items:
            item.settled = True
        self._dead_lettered(reason, len(items), len(dead))
        if lanes := sum(1 for item in items if any(row.backfill for row in item.rows)):
            self.metrics.backfill_users.labels("dead_lettered").inc(lanes)
        self._count_pending()
        log.warning("%d update(s) moved to the dead letters: %s", len(items), detail)
