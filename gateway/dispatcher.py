"""The dispatcher: spooled webhooks -> mapped -> coalesced per person -> Braze batches -> ack.

One loop forms batches; each batch is delivered by its own task, at most `max_in_flight` at
once. A person with an object in flight gets no second one until the first is settled, so
updates of one person reach Braze in order. A row leaves the spool only once Braze has
acknowledged it (or it is moved to the dead letters with the reason).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .braze import MAX_DELETE_IDS, Answer, BrazeClient, Verdict, track_object
from .errors import SpoolError
from .mappings import Mapped, RuleSet, State
from .spool import Dead, Pending, Spool
from .webhooks import WebhookError, decode

if TYPE_CHECKING:
    from .config import Config
    from .metrics import Metrics

log = logging.getLogger("gateway.dispatcher")

FETCH_LIMIT = 1000
RECOUNT_S = 5.0  # how often gauges are re-read from the spool file (the CLI may replay)


@dataclass(slots=True)
class Change:
    """The winning state of one target for one person, with the choice's time."""

    state: State
    at: float


@dataclass(slots=True)
class Item:
    """One Braze object (or one deletion) under construction: a person and the rows behind it."""

    identity: str
    person: str
    delete: bool = False
    changes: dict[str, Change] = field(default_factory=dict)
    rows: list[Pending] = field(default_factory=list)

    def merge(self, mapped: Mapped, row: Pending) -> None:
        """Fold in another event of this person: later choice wins, ties to the later arrival."""
        self.rows.append(row)
        self.delete = mapped.delete
        for target, state in mapped.changes.items():
            current = self.changes.get(target)
            if current is None or mapped.at >= current.at:
                self.changes[target] = Change(state, mapped.at)


@dataclass(slots=True)
class Batch:
    """Objects sent together in one request."""

    items: list[Item]
    delete: bool = False


class Dispatcher:
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
        self.config = config
        self.spool = spool
        self.rules = rules
        self.client = client
        self.metrics = metrics
        self.clock = clock
        self._wake = asyncio.Event()
        self._slots = asyncio.Semaphore(config.braze.max_in_flight)
        self._backlog: deque[tuple[Pending, Mapped]] = deque()
        self._persons: Counter[str] = Counter()  # persons in the backlog, to know a batch is full
        self._cursor = 0
        self._busy: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop_task: asyncio.Task[None] | None = None
        self._stopping = False
        self._auth_problem: str | None = None
        self._failing: str | None = None
        self._last_recount = 0.0

    # -- life cycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Begin delivering in the background."""
        self._loop_task = asyncio.create_task(self._run(), name="gateway-dispatcher")

    async def stop(self, grace_s: float = 10.0) -> None:
        """Stop forming batches, let in-flight requests finish, then cancel what remains."""
        self._stopping = True
        self._wake.set()
        if self._loop_task is not None:
            await self._loop_task
        if self._tasks:
            _, pending = await asyncio.wait(self._tasks, timeout=grace_s)
            for task in pending:
                task.cancel()  # its rows stay in the spool and are sent after restart
            await asyncio.gather(*pending, return_exceptions=True)

    def wake(self) -> None:
        """New webhooks are in the spool."""
        self._wake.set()

    def not_ready_reason(self) -> str | None:
        """Why the gateway should not be called ready, as far as delivery is concerned."""
        return self._auth_problem

    def degraded_reason(self) -> str | None:
        """Why delivery is being retried right now, if it is; intake still works meanwhile.

        A Braze outage does not make the gateway unready: Didomi stops retrying after minutes,
        so refusing webhooks would turn a delay into a loss. Readiness reports it instead.
        """
        return self._failing

    @property
    def idle(self) -> bool:
        """Nothing fetched is waiting and nothing is in flight."""
        return not self._backlog and not self._tasks

    # -- forming batches ----------------------------------------------------------------------

    async def _run(self) -> None:
        while not self._stopping:
            try:
                await self._step()
            except Exception:
                # One bad moment (a spool error, a bug) must not stop delivery for good.
                log.exception("the dispatcher loop failed; resuming in a second")
                await self._sleep(1.0)

    async def _step(self) -> None:
        """Form one batch and start delivering it, or wait for work."""
        # Cleared before looking, not before sleeping: a wake-up that comes while we look
        # must cut the next sleep short, not be lost to it.
        self._wake.clear()
        await self._refill()
        self._recount()
        if not self._backlog:
            await self._sleep(RECOUNT_S)
            return
        batch = await self._form()
        if batch is None:
            # Everything waiting belongs to people already in flight.
            await self._sleep(self.config.braze.flush_interval_ms / 1000)
            return
        await self._slots.acquire()
        if self._stopping:
            self._slots.release()
            self._release(batch)
            return
        task = asyncio.create_task(self._deliver(batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout=seconds)

    async def _refill(self) -> None:
        """Fetch more rows and map them; rows that change nothing are acknowledged at once."""
        high_water = self.config.braze.batch_size * self.config.braze.max_in_flight * 4
        if len(self._backlog) >= high_water:
            return
        rows = await self.spool.run(self.spool.db.fetch, self._cursor, FETCH_LIMIT)
        if not rows:
            return
        self._cursor = rows[-1].id
        rules = self.rules()  # each row is mapped by exactly one rule set, even across a reload
        skipped: list[int] = []
        for row in rows:
            mapped = self._map(rules, row)
            if mapped is None:
                skipped.append(row.id)
            else:
                self._backlog.append((row, mapped))
                self._persons[f"{mapped.identity}:{mapped.person}"] += 1
        if skipped:
            await self._record(self.spool.db.ack, skipped)

    def _recount(self) -> None:
        now = time.monotonic()
        # Counting rows scans the inbox on the spool thread, delaying intake commits: only do
        # it when caught up (a CLI replay is then the only way the count could be off).
        if self._backlog or now - self._last_recount < RECOUNT_S:
            self.metrics.spool_pending.set(self.spool.pending)
            return
        self._last_recount = now
        task = asyncio.create_task(self._recount_from_file())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _recount_from_file(self) -> None:
        pending, dead = await self.spool.run(self.spool.db.recount)
        oldest = await self.spool.run(self.spool.db.oldest_pending_at)
        self.metrics.spool_pending.set(pending)
        self.metrics.dead_letters.set(dead)
        age = 0.0 if oldest is None else max(0.0, self.clock() - oldest)
        self.metrics.spool_oldest_pending_age.set(age)

    async def _form(self) -> Batch | None:
        """Take backlog rows into one batch, waiting up to the flush interval for it to fill."""
        size = self.config.braze.batch_size
        deadline = time.monotonic() + self.config.braze.flush_interval_ms / 1000
        while not self._stopping and len(self._persons) < size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            # Poll rather than wake per webhook: at high intake a wake per request costs more.
            await asyncio.sleep(min(0.01, remaining))
            await self._refill()
        items: dict[str, Item] = {}
        kept: deque[tuple[Pending, Mapped]] = deque()
        waiting: set[str] = set()  # people with a row kept back: their later rows wait too
        delete: bool | None = None
        while self._backlog:
            row, mapped = self._backlog.popleft()
            key = f"{mapped.identity}:{mapped.person}"
            item = items.get(key)
            if item is None:
                limit = MAX_DELETE_IDS if delete else size
                if key in self._busy or len(items) >= limit or delete not in (None, mapped.delete):
                    kept.append((row, mapped))
                    waiting.add(key)
                    continue
                item = items[key] = Item(mapped.identity, mapped.person)
                delete = mapped.delete
            elif key in waiting or item.delete != mapped.delete:
                # A deletion and an update of one person never share a request: the later one
                # waits for the next batch, and so does everything after it, to keep the order.
                kept.append((row, mapped))
                waiting.add(key)
                continue
            item.merge(mapped, row)
            self._persons[key] -= 1
            if not self._persons[key]:
                del self._persons[key]
        kept.extend(self._backlog)
        self._backlog = kept
        if not items:
            return None
        for key in items:
            self._busy.add(key)
        batch_items = await self._drop_stale(list(items.values()))
        return Batch(batch_items, delete=bool(delete))

    def _map(self, rules: RuleSet, row: Pending) -> Mapped | None:
        try:
            result = rules.apply(decode(row.body))
        except WebhookError:
            # It passed the same decoder at intake; a failure now means a damaged row.
            log.error("spooled row %d no longer decodes; dropping it", row.id)
            return None
        if isinstance(result, Mapped):
            return result
        self.metrics.events_skipped.labels(result.reason).inc()
        return None

    async def _drop_stale(self, items: list[Item]) -> list[Item]:
        """Remove changes older than what was already applied to that person and target."""
        applied = await self.spool.run(self.spool.db.applied_times, [item.person for item in items])
        if not applied:
            return items
        for item in items:
            stale = [
                target
                for target, change in item.changes.items()
                if change.at < applied.get((item.person, target), change.at)
            ]
            for target in stale:
                del item.changes[target]
            if stale:
                self.metrics.events_skipped.labels("stale").inc()  # once per person, not target
        return items

    # -- delivering ---------------------------------------------------------------------------

    async def _deliver(self, batch: Batch) -> None:
        try:
            await self._send(batch.items, batch.delete, attempt=0)
        except Exception:
            log.exception("delivering a batch failed; its rows stay in the spool")
        finally:
            self._release(batch)
            self._slots.release()
            self._wake.set()

    def _release(self, batch: Batch) -> None:
        for item in batch.items:
            self._busy.discard(f"{item.identity}:{item.person}")

    async def _send(self, items: list[Item], delete: bool, attempt: int) -> None:
        braze = self.config.braze
        delivery = self.config.delivery
        # A person whose every change was stale needs no request, only an ack.
        live = [item for item in items if item.changes or item.delete]
        if len(live) < len(items):
            await self._ack([item for item in items if not (item.changes or item.delete)], {})
        items = live
        while items:
            if delete:
                answer = await self.client.delete([item.person for item in items])
            else:
                objects = [
                    track_object(
                        item.identity,
                        item.person,
                        {t: c.state for t, c in item.changes.items()},
                        update_existing_only=braze.update_existing_only,
                    )
                    for item in items
                ]
                answer = await self.client.track(objects)
            verdict = answer.verdict
            if verdict is Verdict.OK:
                self._auth_ok()
                self._failing = None
                await self._ack(items, answer.errors)
                return
            if verdict is Verdict.SPLIT and len(items) > 1:
                half = len(items) // 2
                await self._send(items[:half], delete, attempt)
                await self._send(items[half:], delete, attempt)
                return
            if verdict in (Verdict.SPLIT, Verdict.REFUSED):
                reason = "too_large" if answer.status == 413 else "bad_request"
                await self._dead(items, reason, answer)
                return
            # Transient: wait, then send the same objects again.
            attempt += 1
            retry_reason = self._retry_reason(answer)
            self.metrics.retries.labels(retry_reason).inc()
            self._failing = f"retrying Braze ({answer.reason})"
            if verdict is Verdict.AUTH:
                self._auth_failed(answer)
            elif verdict is not Verdict.RATE_LIMITED:
                oldest = min(row.received_at for item in items for row in item.rows)
                if self.clock() - oldest > delivery.give_up_after_s:
                    await self._dead(items, "gave_up", answer)
                    return
            if self._stopping:
                return  # rows stay in the spool for the next start
            if verdict is not Verdict.RATE_LIMITED:
                await asyncio.sleep(self._backoff(attempt))
            # Rate limits: the limiter itself holds the next request until the window resets.

    def _backoff(self, attempt: int) -> float:
        delivery = self.config.delivery
        ceiling = min(delivery.retry_max_ms, delivery.retry_initial_ms * 2 ** min(attempt, 30))
        return random.uniform(ceiling / 2, ceiling) / 1000  # noqa: S311 - jitter, not secrecy

    @staticmethod
    def _retry_reason(answer: Answer) -> str:
        if answer.verdict is Verdict.AUTH:
            return "unauthorized"
        if answer.verdict is Verdict.RATE_LIMITED:
            return "rate_limited"
        if answer.status is None:
            return "timeout" if answer.reason == "timeout" else "connection"
        return "server_error"

    def _auth_failed(self, answer: Answer) -> None:
        if self._auth_problem is None:
            log.error("%s; updates are kept in the spool until this is fixed", answer.reason)
        self._auth_problem = answer.reason
        self.metrics.braze_auth_ok.set(0)

    def _auth_ok(self) -> None:
        if self._auth_problem is not None:
            log.info("Braze accepts the API key again")
        self._auth_problem = None
        self.metrics.braze_auth_ok.set(1)

    async def _ack(self, items: Sequence[Item], errors: dict[int, str]) -> None:
        now = self.clock()
        done: list[int] = []
        dead: list[Dead] = []
        applied: list[tuple[str, str, float]] = []
        delivered = 0
        for index, item in enumerate(items):
            error = errors.get(index)
            if error is not None:
                dead.extend(
                    Dead(row.id, f"Braze refused the object: {error}", item.person)
                    for row in item.rows
                )
                continue
            done.extend(row.id for row in item.rows)
            applied.extend((item.person, t, c.at) for t, c in item.changes.items())
            if item.changes or item.delete:
                delivered += 1
            for row in item.rows:
                self.metrics.delivery_latency.observe(max(0.0, now - row.received_at))
        await self._record(self.spool.db.ack, done, applied, dead)
        self.metrics.updates_delivered.inc(delivered)
        log.debug(
            "Braze acknowledged %d object(s)",
            delivered,
            extra={"objects": delivered, "webhooks": len(done), "outcome": "delivered"},
        )
        if dead:
            self.metrics.updates_failed.labels("rejected").inc(len({d.person for d in dead}))
            self.metrics.dead_letters.inc(len(dead))
            log.warning("Braze refused %d object(s); moved to the dead letters", len(errors))
        self.metrics.spool_pending.set(self.spool.pending)

    async def _record(self, write: Callable[..., None], *args: object) -> None:
        """Write an outcome to the spool, retrying while it cannot be written.

        Braze already has these updates, and the cursor has moved past their rows: giving up
        here would leave them in the spool unseen until a restart (then sent twice).
        """
        attempt = 0
        while True:
            try:
                await self.spool.run(write, *args)
                return
            except SpoolError as exc:
                attempt += 1
                if attempt == 1:
                    log.error("cannot record delivery outcomes in the spool, retrying: %s", exc)
                if self._stopping and attempt >= 3:
                    raise  # the rows stay pending and are sent again after the restart
                # A local disk, not Braze: retry often, so delivery resumes as soon as it can.
                await asyncio.sleep(min(1.0, 0.05 * 2**attempt))

    async def _dead(self, items: Sequence[Item], reason: str, answer: Answer) -> None:
        detail = f"{reason}: {answer.reason}"
        dead = [Dead(row.id, detail, item.person) for item in items for row in item.rows]
        await self._record(self.spool.db.ack, [], [], dead)
        self.metrics.updates_failed.labels(reason).inc(len(items))
        self.metrics.dead_letters.inc(len(dead))
        self.metrics.spool_pending.set(self.spool.pending)
        log.warning("%d update(s) moved to the dead letters: %s", len(items), detail)
