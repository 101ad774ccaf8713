"""The writeback: Braze's spooled subscription changes -> the rules read backwards -> Didomi.

The reverse of the dispatcher, one stored Braze report at a time: Didomi's Consents API takes
one consent event per request, so there is nothing to batch. Per person, reports leave in spool
order (one in flight per person); each is filtered, then written with an id derived from the
row, so a retry is recorded once however often it is sent:

1. echoes dropped: a Braze state equal to the one the gateway last sent for that target, within
   `[braze_webhooks] echo_window_s`, reported as made by the REST API (or by a webhook step,
   which cannot say) and not older than a Braze-side change already written back;
2. stale changes dropped: older than the last choice applied to that target either way, or
   than the person's erasure;
3. the rest read backwards (`reverse.ReverseRules`) against the person's current Didomi
   choices, read first, so the values a person chose for other groups are kept.

The same retry policy as the Braze direction applies (`retry.decide`): `5xx`, timeouts and
`429` retried, a refused key or URL held, other `4xx` and `give_up_after_s` dead-lettered.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .audit import Record, state_text
from .braze import Answer, Verdict
from .braze_webhooks import BrazeChange, BrazeWebhookError, decode_currents_event, decode_step
from .didomi import DidomiClient
from .errors import SpoolError
from .health import DeliveryHealth
from .mappings import ERASED, RuleSet, braze_side
from .retry import Action, backoff, decide
from .reverse import ConsentEdit, ReverseRules
from .spool import Dead, Pending, Spool
from .webhooks import gateway_event_id

if TYPE_CHECKING:
    from .config import Config
    from .metrics import Metrics

log = logging.getLogger("gateway.writeback")

FETCH_LIMIT = 500
MAX_IN_FLIGHT = 4  # Didomi's pace is set by didomi_api.requests_per_second; this bounds waiting
RECOUNT_S = 5.0
LOOP_PAUSE_S = 1.0
REST_API = "REST API"  # Currents' state_change_source for a change made through Braze's API


@dataclass(slots=True)
class Report:
    """One stored Braze report: its row, its changes, and the person they are about."""

    row: Pending
    changes: list[BrazeChange]
    person: str
    dropped: list[tuple[BrazeChange, str]] = field(default_factory=list)  # and why, for the audit


class Writeback:
    """Moves Braze's subscription changes to Didomi's Consents API, losing none."""

    def __init__(
        self,
        config: Config,
        spool: Spool,
        rules: Callable[[], RuleSet],
        client: DidomiClient,
        metrics: Metrics,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config  # replaced on reload; read afresh for every report
        self.spool = spool
        self.rules = rules
        self.client = client
        self.clock = clock
        self.flow = metrics.flow("to_didomi")
        self.health = DeliveryHealth(self.flow, peer="Didomi")
        self._backlog: deque[Report] = deque()
        self._in_flight: set[str] = set()
        self._cursor = 0
        self._reverse: tuple[RuleSet, ReverseRules] | None = None
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop_task: asyncio.Task[None] | None = None
        self._gauge_task: asyncio.Task[None] | None = None

    # -- life cycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Begin writing back in the background."""
        self._loop_task = asyncio.create_task(self._run(), name="gateway-writeback")
        self._gauge_task = asyncio.create_task(self._gauges(), name="gateway-writeback-gauges")

    async def stop(self, grace_s: float = 10.0) -> None:
        """Stop taking reports, give in-flight ones `grace_s`, then cancel what remains."""
        deadline = time.monotonic() + grace_s
        self._stop.set()
        self._wake.set()
        for task in (self._loop_task, self._gauge_task):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        if self._tasks:
            remaining = max(0.0, deadline - time.monotonic())
            _, pending = await asyncio.wait(self._tasks, timeout=remaining)
            for task in pending:
                task.cancel()  # its row stays in the spool and is written after the restart
            await asyncio.gather(*pending, return_exceptions=True)

    @property
    def stopping(self) -> bool:
        """Whether stop() has begun."""
        return self._stop.is_set()

    def wake(self) -> None:
        """New Braze reports are in the spool."""
        self._wake.set()

    def degraded_reason(self) -> str | None:
        """Why writing back to Didomi is blocked or being retried, if it is."""
        return self.health.degraded_reason()

    @property
    def idle(self) -> bool:
        """Nothing fetched is waiting and nothing is in flight."""
        return not self._backlog and not self._tasks

    # -- the loop -----------------------------------------------------------------------------

    async def _run(self) -> None:
        while not self.stopping:
            try:
                self._wake.clear()
                await self._refill()
                self._start_ready()
                await self._sleep(RECOUNT_S if not self._backlog else LOOP_PAUSE_S)
            except Exception:
                log.exception("the writeback loop failed; resuming in a second")
                await self._sleep(LOOP_PAUSE_S)

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout=seconds)

    async def _pause(self, seconds: float) -> None:
        """Sleep, but not past the start of a shutdown."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), timeout=seconds)

    async def _refill(self) -> None:
        """Fetch and decode more reports; the cursor moves only once the page is handled."""
        if len(self._backlog) >= FETCH_LIMIT:
            return
        rows = await self.spool.run(self.spool.db.fetch, self._cursor, FETCH_LIMIT, "to_didomi")
        if not rows:
            return
        reverse = self._reverse_rules()
        reports: list[Report] = []
        skipped: list[int] = []
        dead: list[Dead] = []
        for row in rows:
            try:
                changes = _decode(row)
            except BrazeWebhookError as exc:
                # It passed the same decoder at intake; a failure now means a damaged row.
                dead.append(Dead(row.id, f"undecodable: {exc}"))
                continue
            person = reverse.person(changes)
            if person is None:
                skipped.append(row.id)
                continue
            reports.append(Report(row, changes, person))
        if skipped or dead:
            await self._record(self.spool.db.ack, skipped, [], dead)
        self._cursor = rows[-1].id
        self._backlog.extend(reports)
        if skipped:
            self.flow.skipped("no_identity", len(skipped))
        if dead:
            self.flow.failed("unmappable", len(dead))
            self.flow.dead_letters.inc(len(dead))

    def _start_ready(self) -> None:
        """Start a task for each report whose person has nothing in flight or waiting before it."""
        kept: deque[Report] = deque()
        held: set[str] = set()
        for report in self._backlog:
            person = report.person
            busy = person in self._in_flight or person in held
            if busy or len(self._tasks) >= MAX_IN_FLIGHT:
                held.add(person)
                kept.append(report)
                continue
            self._in_flight.add(person)
            task = asyncio.create_task(self._deliver(report))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        self._backlog = kept

    def _reverse_rules(self) -> ReverseRules:
        rules = self.rules()
        if self._reverse is None or self._reverse[0] is not rules:
            self._reverse = (rules, ReverseRules.from_ruleset(rules))
        return self._reverse[1]

    async def _gauges(self) -> None:
        """Pending count, dead letters and the oldest report's age, whatever the loop awaits."""
        db = self.spool.db
        while not self.stopping:
            try:
                oldest = await self.spool.run(db.oldest_pending_at, "to_didomi")
                dead = await self.spool.run(db.count_dead, "to_didomi")
            except SpoolError as exc:
                log.warning("could not read the writeback's gauges (will retry): %s", exc)
            else:
                self.flow.oldest_age.set(0.0 if oldest is None else max(0.0, self.clock() - oldest))
                self.flow.dead_letters.set(dead)
                self.flow.pending.set(db.pending_of("to_didomi"))
            await self._pause(RECOUNT_S)

    # -- one report ---------------------------------------------------------------------------

    async def _deliver(self, report: Report) -> None:
        try:
            await self._write(report)
        except asyncio.CancelledError:
            raise  # stopping: the row stays in the spool for the next start
        except Exception:
            log.exception("writing a Braze report back failed; it goes back to the backlog")
            # Back where it was, in spool order, so the person's later reports still wait.
            self._backlog = deque(sorted((*self._backlog, report), key=lambda r: r.row.id))
            await self._pause(backoff(1, self.config.delivery))
        finally:
            self._in_flight.discard(report.person)
            self._wake.set()

    async def _write(self, report: Report) -> None:
        person = report.person
        db = self.spool.db
        applied = await self.spool.run(db.applied_times, [person])
        sent = await self.spool.run(db.sent_states, [person])
        live, dropped = self._filter(report, applied, sent)
        edit = self._reverse_rules().edit(live) if live else None
        if edit is None:
            await self._settle(report, [], skipped=dropped or "no_rule", unwritten=live)
            return
        attempt = 0
        while True:
            sent_at = self.clock()
            answer = await self._send(report, edit)
            if answer is None:  # Didomi already holds these choices: nothing to write
                self.health.ok()
                await self._settle(report, [], skipped="unchanged", unwritten=live)
                return
            if answer.verdict is not Verdict.OK:
                attempt += 1
            decision = decide(
                answer,
                attempt=attempt,
                oldest_age_s=self.clock() - report.row.received_at,
                can_split=False,
                delivery=self.config.delivery,
            )
            if decision.action is Action.ACK:
                self.health.ok()
                await self._settle(report, live, answer=answer, sent_at=sent_at)
                return
            if decision.action is Action.DEAD_LETTER:
                await self._dead(report, decision.reason, answer, sent_at, live)
                return
            self.flow.retried(decision.reason)
            if decision.action is Action.HOLD:
                self.health.block(answer)
            else:
                self.health.retrying(answer)
            await self._pause(decision.delay_s)
            if self.stopping:
                return  # the row stays in the spool for the next start

    async def _send(self, report: Report, edit: ConsentEdit) -> Answer | None:
        """Read the person's current choices, then write the edit against them (None: no
        need, Didomi already holds them)."""
        api = self.config.didomi_api
        answer, user = await self.client.current_user(report.person, regulation=api.regulation)
        if answer.verdict is not Verdict.OK:
            return answer
        current = list(user.purposes.values()) if user is not None else None
        purposes = edit.apply(current)
        if not purposes:
            return None
        event_id = _event_id(report.row)
        return await self.client.write_event(event_id, report.person, purposes, api.regulation)

    def _filter(
        self,
        report: Report,
        applied: dict[tuple[str, str], float],
        sent: dict[tuple[str, str], tuple[str, float]],
    ) -> tuple[list[BrazeChange], str | None]:
        """The changes to write back, and why the others were dropped (`echo` or `stale`)."""
        person = report.person
        hooks = self.config.braze_webhooks
        window = hooks.echo_window_s if hooks is not None else 0.0
        now = self.clock()
        floors = self.spool.db.floors  # what the retention pruned counts as applied to everyone
        erased = max(applied.get((person, ERASED), -math.inf), floors.get(ERASED, -math.inf))
        live: list[BrazeChange] = []
        reason: str | None = None
        report.dropped = []
        for change in report.changes:
            target = change.target
            written_back = applied.get((person, braze_side(target)), -math.inf)
            last = sent.get((person, target))
            if (
                last is not None
                and last[0] == change.state
                and now - last[1] <= window
                and change.source in (None, REST_API)
                and last[1] >= written_back
            ):
                reason = reason or "echo"
                report.dropped.append((change, "skipped:echo"))
                continue
            floor = max(
                applied.get((person, target), -math.inf),
                floors.get(target, -math.inf),
                written_back,
                floors.get(braze_side(target), -math.inf),
                erased,
            )
            if change.at < floor:
                reason = "stale"
                report.dropped.append((change, "stale"))
                continue
            live.append(change)
        return live, reason

    # -- outcomes -----------------------------------------------------------------------------

    async def _settle(
        self,
        report: Report,
        written: list[BrazeChange],
        *,
        skipped: str | None = None,
        unwritten: list[BrazeChange] | None = None,
        answer: Answer | None = None,
        sent_at: float | None = None,
    ) -> None:
        """Remove the row, recording when each written change happened (for stale checks)."""
        applied = [(report.person, braze_side(c.target), c.at) for c in written]
        at = sent_at if sent_at is not None else self.clock()
        status = answer.status if answer is not None else None
        trail = [self._trail(report, c, "delivered", at, status) for c in written]
        trail += [self._trail(report, c, f"skipped:{skipped}", at) for c in unwritten or ()]
        trail += [self._trail(report, c, why, at) for c, why in report.dropped]
        write = functools.partial(self.spool.db.ack, audit=trail)
        await self._record(write, [report.row.id], applied, [])
        if skipped is not None:
            self.flow.skipped(skipped)
            return
        self.flow.delivered.inc()
        self.flow.latency.observe(max(0.0, self.clock() - report.row.received_at))
        log.info(
            "Braze change written back to Didomi",
            extra={"outcome": "delivered", "direction": "to_didomi", "targets": len(written)},
        )

    def _trail(
        self,
        report: Report,
        change: BrazeChange,
        outcome: str,
        at: float,
        status: int | None = None,
        detail: str | None = None,
    ) -> Record:
        """The audit record of one Braze change: the Didomi event id the gateway wrote for it."""
        sends = outcome in ("delivered", "dead-lettered")
        return Record(
            report.person,
            "to_didomi",
            outcome,
            at,
            event_id=_event_id(report.row),
            event_type=report.row.type,
            event_at=change.at,
            endpoint="/consents/events" if sends else None,
            target=change.target,
            state=state_text(change.state),
            rule=self._reverse_rules().origins.get(change.target),
            status=status,
            detail=detail,
        )

    async def _dead(
        self, report: Report, reason: str, answer: Answer, sent_at: float, live: list[BrazeChange]
    ) -> None:
        detail = f"{reason}: {answer.reason}"
        trail = [
            self._trail(report, c, "dead-lettered", sent_at, answer.status, detail) for c in live
        ]
        trail += [self._trail(report, c, why, sent_at) for c, why in report.dropped]
        write = functools.partial(self.spool.db.ack, audit=trail)
        await self._record(write, [], [], [Dead(report.row.id, detail, report.person)])
        self.flow.failed(reason)
        self.flow.dead_letters.inc()
        log.warning("a Braze report moved to the dead letters: %s", detail)

    async def _record(self, write: Callable[..., None], *args: object) -> None:
        bound = functools.partial(write, direction="to_didomi")
        await self.spool.record(bound, *args, stopping=lambda: self.stopping)


def _event_id(row: Pending) -> str:
    """The id of the consent event written for a row: from the row itself, so a retry, even
    after a restart, writes the same id."""
    return gateway_event_id(f"{row.type}|{hashlib.sha256(row.body).hexdigest()}")


def _decode(row: Pending) -> list[BrazeChange]:
    if row.type == "braze.step":
        return decode_step(row.body)
    return decode_currents_event(row.body)
