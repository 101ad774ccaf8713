"""The dispatcher: spooled webhooks -> mapped -> batched per person -> Braze -> ack.

It wires three parts that know nothing of each other: the `Batcher` (backlog, per-person order,
who is in flight), the retry policy (`retry.decide`: Braze answer -> ack, split, retry, hold or
dead-letter) and `DeliveryHealth` (what readiness and the metrics report). One loop fetches and
forms batches; each batch is delivered by its own task, at most `max_in_flight` at once.

A row leaves the spool only once Braze has acknowledged it or it is moved to the dead letters
with the reason. Every failure between fetching and acknowledging gives the rows back: a page
that cannot be mapped is fetched again, and a batch whose delivery fails returns its unsettled
rows to the backlog and frees its people, so delivery never stalls until a restart.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Sequence
from typing import TYPE_CHECKING, Any

from gateway.delivery.health import DeliveryHealth
from gateway.delivery.outcome import Answer, Verdict
from gateway.delivery.retry import Action, backoff, decide
from gateway.delivery.worker import IDLE_POLL_S, Worker
from gateway.errors import SpoolError
from gateway.forward.batcher import Batch, Batcher, Entry, Item
from gateway.peers.braze import BrazeClient
from gateway.peers.braze_bodies import MAX_DELETE_IDS, track_object
from gateway.rules.mappings import ERASED, ON_USER_DELETED, Mapped, RuleSet, braze_side
from gateway.shapes.webhooks import Webhook, WebhookError, decode
from gateway.spool import lane
from gateway.spool.audit import Change, Record, state_text
from gateway.spool.face import Spool
from gateway.spool.prune import OLDER_THAN_RETENTION
from gateway.spool.store import Dead, Pending

if TYPE_CHECKING:
    from gateway.config.settings import Config
    from gateway.metrics import Metrics

log = logging.getLogger("gateway.dispatcher")

FETCH_LIMIT = 1000
RECOUNT_S = 5.0  # how often gauges are re-read from the spool file (the CLI may replay)
LOOP_PAUSE_S = 1.0  # after an unexpected failure of the loop, before it tries again
MAP_ATTEMPTS = 3  # a row whose mapping raises this often is dead-lettered, not retried forever
LANE_PAUSE_S = 0.05  # between two looks at the backfill lane while its share is spent


class Dispatcher(Worker):
    """Moves spooled webhooks to Braze as fast as Braze allows, losing none."""

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
        super().__init__()
        self.config = config  # replaced on reload; read afresh for every batch
        self.spool = spool
        self.rules = rules
        self.client = client
        self.metrics = metrics
        self.clock = clock
        self.batcher = Batcher()
        self.flow = metrics.flow("to_braze")
        self.health = DeliveryHealth(self.flow, metrics.braze_auth_ok)
        self._slots = asyncio.Semaphore(config.braze.max_in_flight)
        self._generation = spool.generation
        self._read_at = -math.inf  # when the spool was last read (the hand-off aside)
        self._map_failures: Counter[int] = Counter()
        self._last_recount = 0.0
        # The backfill lane (`lane`): its own cursor, and its share of Braze's rate in objects.
        self._lane_cursor = 0
        self._lane_more = False  # the lane has rows this loop could not take yet
        self._lane_read_at = -math.inf  # monotonic: when the lane was last read
        braze = config.braze
        share = config.backfill.share * braze.requests_per_second * braze.batch_size
        self._lane_budget = lane.Budget(share, time.monotonic)

    # -- life cycle ---------------------------------------------------------------------------

    def _loops(self) -> dict[str, Coroutine[Any, Any, None]]:
        # The age has its own loop: during a stall the main loop is what waits.
        return {"gateway-dispatcher": self._run(), "gateway-spool-age": self._watch_age()}

    def degraded_reason(self) -> str | None:
        """Why delivery is blocked or being retried, if it is; intake works meanwhile."""
        return self.health.degraded_reason()

    @property
    def idle(self) -> bool:
        """Nothing fetched is waiting and nothing is in flight."""
        return not self.batcher and not self._tasks and not self._reading

    # -- forming batches ----------------------------------------------------------------------

    async def _run(self) -> None:
        while not self.stopping:
            try:
                await self._step()
            except Exception:
                # One bad moment (a spool error, a bug) must not stop delivery for good.
                log.exception("the dispatcher loop failed; resuming in a second")
                await self._sleep(LOOP_PAUSE_S)

    async def _step(self) -> None:
        """Form one batch and start delivering it, or wait for work."""
        # Cleared before looking, not before sleeping: a wake-up that comes while we look
        # must cut the next sleep short, not be lost to it.
        self._wake.clear()
        await self._refill()
        self._recount()
        if not self.batcher:
            await self._sleep(LANE_PAUSE_S if self._lane_more else IDLE_POLL_S)
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
        self._spawn(self._deliver(batch))

    async def _read_page(self) -> None:
        """Fetch and map more rows; rows that change nothing are acknowledged at once.

        The cursor moves past a page only once all of it is mapped and its no-op rows are
        acknowledged: a failure anywhere before leaves the page to be fetched again.
        """
        braze = self.config.braze
        self._follow_partitions()
        if len(self.batcher) >= braze.batch_size * braze.max_in_flight * 4:
            return
        rows, cursor = await self._next_page()
        backfill = False
        if not rows:
            self._cursor = cursor
            # Live webhooks are caught up: the backfill lane may use its share.
            rows, cursor = await self._lane_page()
            if not rows:
                self._lane_cursor = cursor
                return
            backfill = True
        rules = self.rules()  # each row is mapped by exactly one rule set, even across a reload
        entries: list[Entry] = []
        skipped: list[int] = []
        reasons: Counter[str] = Counter()
        unmappable: list[Dead] = []
        trail: list[Record] = []
        for row in rows:
            try:
                result = self._map(rules, row, trail)
            except Exception as exc:
                self._map_failures[row.id] += 1
                if self._map_failures[row.id] < MAP_ATTEMPTS:
                    raise  # the whole page is fetched again after a pause
                log.exception(
                    "spooled row %d cannot be mapped; moving it to the dead letters", row.id
                )
                unmappable.append(Dead(row.id, f"unmappable: {type(exc).__name__}: {exc}"))
                continue
            if isinstance(result, Mapped):
                entries.append(Entry(row, result))
            else:
                skipped.append(row.id)
                reasons[result] += 1
        if skipped or unmappable:
            await self._write_outcome(skipped, [], unmappable, audit=trail)
        for row in rows:
            self._map_failures.pop(row.id, None)
        if backfill:
            self._lane_cursor = cursor
            if skipped:
                self.metrics.backfill_users.labels("skipped").inc(len(skipped))
        else:
            self._cursor = cursor
        self.batcher.add(entries)
        for reason, count in reasons.items():
            self.flow.skipped(reason, count)
        if clamped := sum(1 for entry in entries if entry.mapped.clamped):
            self.metrics.event_dates_clamped.inc(clamped)
            log.warning("%d choice(s) dated in the future were dated at their arrival", clamped)
        if unmappable:
            self.flow.failed("unmappable", len(unmappable))
            self.flow.dead_letters.inc(len(unmappable))

    async def _next_page(self) -> tuple[list[Pending], int]:
        """The rows after the cursor, and the cursor once they are mapped.

        From intake's hand-off when it holds them all; else read from the spool: at start,
        after another process wrote rows (a CLI's replay: found within `IDLE_POLL_S` when
        idle), and every few seconds when nothing else arrives.
        """
        handoff = self.spool.handoff
        complete = 0
        if handoff is not None:
            rows = handoff.take(self._cursor, FETCH_LIMIT)
            if rows:
                return rows, rows[-1].id
            # Idle, a replay from the CLI is what there is to find: looked for at once, by a
            # pragma that costs less than the read it saves.
            if (
                rows is not None
                and time.monotonic() - self._read_at < RECOUNT_S
                and not (
                    not self.batcher and not self._tasks and await self.spool.written_elsewhere()
                )
            ):
                return [], self._cursor
            complete = handoff.complete_after
        held = set(self.batcher.ids)  # before reading: what is acked meanwhile left the inbox
        generation = self.spool.generation
        rows = await self.spool.fetch(self._cursor, FETCH_LIMIT)
        self._read_at = time.monotonic()
        if self.spool.generation != generation:
            return [], self._cursor  # partitions changed during the read: read again
        cursor = rows[-1].id if rows else self._cursor
        if len(rows) < FETCH_LIMIT:
            # Caught up: every row up to `complete` has been read, the hand-off has the rest.
            cursor = max(cursor, complete)
        return [row for row in rows if row.id not in held], cursor

    async def _lane_page(self) -> tuple[list[Pending], int]:
        """Backfilled rows after the lane's cursor, as many as its share allows now.

        Only while the backlog is short, so a live webhook arriving meanwhile waits behind at
        most one round of requests; an empty lane is read again when `_watch_age` counts rows.
        """
        braze = self.config.braze
        now = time.monotonic()
        if not self._lane_more and now - self._lane_read_at < RECOUNT_S:
            return [], self._lane_cursor  # empty when last read: `_watch_age` says when not
        # Enough for every request slot, no more: a live row arriving waits one round at most.
        if len(self.batcher) >= braze.batch_size * braze.max_in_flight:
            return [], self._lane_cursor
        self._lane_read_at = now
        self._lane_more = False
        allowed = self._lane_budget.take(FETCH_LIMIT)
        if allowed <= 0:
            self._lane_more = True  # unknown: looked at again once the share refills
            return [], self._lane_cursor
        held = set(self.batcher.ids)
        generation = self.spool.generation
        rows = await self.spool.fetch_backfill(self._lane_cursor, allowed)
        self._lane_budget.refund(allowed - len(rows))
        if self.spool.generation != generation:
            return [], self._lane_cursor
        self._lane_more = bool(rows)  # the command may still be storing: read again soon
        cursor = rows[-1].id if rows else self._lane_cursor
        return [row for row in rows if row.id not in held], cursor

    def _follow_partitions(self) -> None:
        """On PostgreSQL, after this replica's partitions changed: forget the backlog of those
        it gave up, and read from the start again for those it took (older rows included)."""
        owned = self.spool.owned
        moved = self._partitions_moved(self.spool.generation)
        if moved:
            self._lane_cursor = 0
        if moved and owned is not None:
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
        return any(key.partition(":")[2] == person for key in self.batcher.in_flight)

    def _ours(self, item: Item) -> bool:
        """Whether every row of `item` is of a partition this replica delivers now."""
        owned = self.spool.owned
        return owned is None or all(row.part in owned for row in item.rows)

    def busy_partitions(self) -> set[int]:
        """The partitions with updates in flight to Braze or still in the backlog (not to be
        given up yet: the backlog forgets them at the next refill)."""
        return self.batcher.parts_held

    def _map(self, rules: RuleSet, row: Pending, trail: list[Record]) -> Mapped | str:
        """What the row asks of Braze, or the reason it asks nothing (then audited in `trail`
        when it names a person)."""
        try:
            # Decoded by intake when it came through the hand-off; it passed this same decoder.
            webhook = row.decoded if isinstance(row.decoded, Webhook) else decode(row.body)
        except WebhookError:
            # It passed the same decoder at intake; a failure now means a damaged row.
            log.error("spooled row %d no longer decodes; dropping it", row.id)
            return "ignored"
        result = rules.apply(webhook, received_at=row.received_at)
        if isinstance(result, Mapped):
            return result
        person = rules.person(webhook) if webhook.known else None
        if person:
            entity = webhook.subject
            event_id = entity.id if entity is not None else None
            trail.append(
                Record(
                    person,
                    "to_braze",
                    f"skipped:{result.reason}",
                    self.clock(),
                    event_id=event_id,
                    event_type=row.type,
                )
            )
        return result.reason

    def _recount(self) -> None:
        now = time.monotonic()
        # Counting rows scans the inbox on the spool thread, delaying intake commits: only do
        # it when caught up (a CLI replay is then the only way the count could be off). On a
        # shared spool the other replicas' intake and acks move it too: every few seconds.
        busy = bool(self.batcher) and self.spool.owned is None
        if busy or now - self._last_recount < RECOUNT_S:
            self.flow.pending.set(self.spool.pending_of("to_braze"))
            return
        self._last_recount = now
        self._spawn(self._recount_from_file())

    async def _recount_from_file(self) -> None:
        try:
            pending, dead = await self.spool.recount()
        except SpoolError as exc:
            log.warning("could not recount the spool (will retry): %s", exc)
            return
        self.flow.pending.set(pending)
        self.flow.dead_letters.set(dead)

    async def _watch_age(self) -> None:
        """Refresh the oldest pending age every few seconds, whatever the loop is waiting on.

        A stall is exactly when the loop is stuck (a full backlog, no free slot), so this
        runs beside it; one indexed row per read, so it costs intake nothing.
        """
        while not self.stopping:
            try:
                oldest = await self.spool.oldest_pending_at()
            except SpoolError as exc:
                log.warning("could not read the oldest pending update (will retry): %s", exc)
            else:
                age = 0.0 if oldest is None else max(0.0, self.clock() - oldest)
                self.flow.oldest_age.set(age)
            try:
                waiting = await self.spool.recount_backfill()  # kept out of to_braze's pending
            except SpoolError as exc:
                log.warning("could not count the backfilled users waiting (will retry): %s", exc)
            else:
                self.metrics.backfill_pending.set(waiting)
                self._lane_more = self._lane_more or waiting > 0
            await self._pause(RECOUNT_S)

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

    async def _deliver(self, batch: Batch) -> None:
        try:
            await self._drop_stale(batch.items)
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
            self._slots.release()
            self._wake.set()

    async def _drop_stale(self, items: list[Item]) -> None:
        """Drop changes older than what was applied to that person and target, or their erasure.

        An erasure is never stale: it is lifted above the last choice applied, so it wins. The
        retention's floors count as applied to everyone (`retention`).
        """
        applied = await self.spool.applied_times([item.person for item in items])
        floors = self.spool.floors
        if not applied and not floors:
            return
        by_person: dict[str, dict[str, float]] = {}
        for (person, target), at in applied.items():
            by_person.setdefault(person, {})[target] = at
        expired_people = 0
        for item in items:
            times = by_person.get(item.person, {})
            if not times and not floors:
                continue
            latest = max(times.values(), default=-math.inf)
            if item.erased_at is not None:
                item.erased_at = max(item.erased_at, latest)
            stale, expired = [], []
            for target, change in item.changes.items():
                if change.erasure:
                    change.at = max(change.at, latest)
                    continue
                # Older than the last choice applied either way (a Braze-side change written
                # back to Didomi counts too), or than the person's erasure: stale. Else older
                # than what retention pruned of those: refused as too old to tell, except a
                # backfilled snapshot, refused only by what is known of this person: the
                # floors are everyone's, and a status unchanged for years must still reach
                # Braze (DESIGN.md section 10).
                keys = (target, braze_side(target), ERASED)
                if change.at < max(times.get(key, -math.inf) for key in keys):
                    stale.append(target)
                elif change.at < max(floors.get(key, -math.inf) for key in keys) and not (
                    change.entry is not None and change.entry.row.backfill
                ):
                    expired.append(target)
            for target in (*stale, *expired):
                item.stale[target] = item.changes.pop(target)
            item.expired.update(expired)
            if stale:
                self.flow.skipped("stale")  # once per person, not target
                if not item.changes and all(row.backfill for row in item.rows):
                    self.metrics.backfill_users.labels("stale").inc()
            if expired:
                self.flow.skipped(OLDER_THAN_RETENTION)
                expired_people += 1
        if expired_people:
            log.warning(
                "%d person(s) had a choice older than the retention floor (retention.applied_days"
                " pruned the applied times it would be checked against): not sent",
                expired_people,
            )

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
            self.flow.retried(decision.reason)
            if action is Action.HOLD:
                self.health.block(answer)
            else:
                self.health.retrying(answer)
            if self.stopping:
                return  # rows stay in the spool for the next start
            await self._pause(decision.delay_s)
            if self.stopping:
                return

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
        endpoint = _endpoint(delete) if answer is not None else None
        delivered = lane_delivered = 0
        for index, item in enumerate(items):
            error = errors.get(index)
            if error is not None:
                reason = f"Braze refused the object: {error}"
                dead.extend(Dead(row.id, reason, item.person) for row in item.rows)
                trail.extend(_trail(item, "dead-lettered", sent_at, endpoint, status, reason))
                continue
            trail.extend(_trail(item, "delivered", sent_at, endpoint, status))
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

    async def _write_outcome(
        self,
        done: Sequence[int],
        applied: Sequence[tuple[str, str, float]],
        dead: Sequence[Dead],
        *,
        audit: Sequence[Record],
        sent: Sequence[tuple[str, str, str, float]] = (),
        erase: Sequence[str] = (),
    ) -> None:
        """Write an outcome to the spool, retrying while it cannot be written."""
        await self.spool.ack(
            done, applied, dead, audit=audit, sent=sent, erase=erase, stopping=lambda: self.stopping
        )

    async def _dead(
        self, items: Sequence[Item], reason: str, answer: Answer, sent_at: float, *, delete: bool
    ) -> None:
        detail = f"{reason}: {answer.reason}"
        dead = [Dead(row.id, detail, item.person) for item in items for row in item.rows]
        endpoint = _endpoint(delete)
        trail = [
            record
            for item in items
            for record in _trail(item, "dead-lettered", sent_at, endpoint, answer.status, detail)
        ]
        await self._write_outcome([], [], dead, audit=trail)
        for item in items:
            item.settled = True
        self.flow.failed(reason, len(items))
        self.flow.dead_letters.inc(len(dead))
        if lanes := sum(1 for item in items if any(row.backfill for row in item.rows)):
            self.metrics.backfill_users.labels("dead_lettered").inc(lanes)
        self.flow.pending.set(self.spool.pending_of("to_braze"))
        log.warning("%d update(s) moved to the dead letters: %s", len(items), detail)


def _endpoint(delete: bool) -> str:
    return "/users/delete" if delete else "/users/track"


def _trail(
    item: Item,
    outcome: str,
    at: float,
    endpoint: str | None,
    status: int | None,
    detail: str | None = None,
) -> list[Record]:
    """The audit records of one settled item: each target's winning choice (or the deletion),
    what was dropped as stale, and the rows whose every choice a later one overrode; one record
    per row and outcome, its targets packed (`audit.write`)."""
    # (row id, outcome) -> the row's entry, whether it was sent, and its changes in order.
    groups: dict[tuple[int, str], tuple[Entry, bool, list[Change]]] = {}

    def add(entry: Entry, outcome: str, change: Change | None, sent: bool = True) -> None:
        found = groups.get((entry.row.id, outcome))
        if found is None:
            found = groups[(entry.row.id, outcome)] = (entry, sent, [])
        if change is not None:
            found[2].append(change)

    if item.delete:
        for entry in item.entries:
            add(entry, outcome, (ERASED, "deleted", ON_USER_DELETED))
    for target, change in item.changes.items():
        if change.entry is not None:
            rule = change.entry.mapped.origins.get(target)
            add(change.entry, outcome, (target, state_text(change.state), rule))
    for target, change in item.stale.items():
        if change.entry is not None:
            rule = change.entry.mapped.origins.get(target)
            why = OLDER_THAN_RETENTION if target in item.expired else "stale"
            add(change.entry, why, (target, state_text(change.state), rule), sent=False)
    used = {row for row, _ in groups}
    for entry in item.entries:
        if entry.row.id not in used:
            add(entry, "skipped:superseded", None, sent=False)
    return [
        Record(
            item.person,
            "to_braze",
            why,
            at,
            event_id=entry.mapped.event_id,
            event_type=entry.row.type,
            event_at=entry.mapped.at,
            endpoint=endpoint if sent else None,
            status=status if sent else None,
            detail=detail if sent else None,
            changes=tuple(changes),
        )
        for (_, why), (entry, sent, changes) in groups.items()
    ]
