"""The writeback: Braze's spooled subscription changes -> the rules read backwards -> Didomi.

The reverse of the dispatcher, one stored Braze report at a time: Didomi's Consents API takes
one consent event per request, so there is nothing to batch. Per person, reports leave in spool
order (one in flight per person); before every try each is filtered, then written with an id
derived from the row and what is written, so a retry is recorded once however often it is sent:

0. a report waits while a Didomi row of its person stored before it is not settled (sent to
   Braze or dead-lettered): until Braze has that choice, the gateway cannot tell whether the
   report already reflects it (a webhook step's snapshot never does);
1. a date past arrival plus `didomi.max_clock_skew_s` is replaced by the arrival (counted);
2. a state the gateway itself sent to Braze is dropped: any state sent within
   `echo_window_s` is `echo` when the REST API (or a step) reports it dated no later than the
   write plus `didomi.max_clock_skew_s`, since Currents reports each of the gateway's writes,
   in any order (a later act of that state is another system's); a state equal to the last
   one sent is `unchanged` (a webhook step renders every target, changed or not);
3. stale changes dropped: older than the last choice applied to that target either way, than
   the person's erasure, or than the gateway's last write of that target to Braze (Braze has
   held a later state since: a step's snapshot, or an act the Didomi choice sent after it
   replaced, must not win in Didomi only);
4. the rest read backwards (`reverse.ReverseRules`) against the person's current Didomi
   choices, read first, so the values a person chose for other groups are kept. If Didomi's
   user was updated after the report's time by someone other than the gateway, the report
   waits (up to `DIDOMI_NEWER_WAIT_S`) for Didomi's webhook of that change, then is filtered
   again: a Braze act is never written over a newer Didomi choice.

Which source wins: the newest act, by the time each system gives it; where the gateway cannot
date an act (a step's snapshot, a Braze state it overwrote since), the Didomi choice already
received wins, because Braze will hold that choice once it is sent and both then agree.

The same retry policy as the Braze direction applies (`retry.decide`): `5xx`, timeouts and
`429` retried, a refused key or URL held, other `4xx` and `give_up_after_s` dead-lettered.
Step 0 is `waiting`, steps 1 to 3 and Didomi's newer change are `filter`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import time
from collections import Counter, deque
from collections.abc import Callable
from typing import TYPE_CHECKING

import msgspec

from gateway.delivery.health import DeliveryHealth
from gateway.delivery.outcome import Answer, Verdict
from gateway.delivery.retry import Action, backoff, decide
from gateway.delivery.worker import IDLE_POLL_S, LOOP_PAUSE_S, Worker
from gateway.errors import SpoolError
from gateway.peers.didomi import DidomiClient
from gateway.reverse.braze_webhooks import BrazeChange, BrazeWebhookError
from gateway.reverse.filter import OwnWrites, live_changes
from gateway.reverse.report import Report, decode_changes
from gateway.reverse.rules import ConsentEdit, ReverseRules
from gateway.reverse.waiting import EarlierRows, Forward
from gateway.rules.mappings import RuleSet, braze_side
from gateway.shapes.webhooks import gateway_event_id
from gateway.spool.audit import Record, state_text
from gateway.spool.face import Spool
from gateway.spool.store import Dead

_encode = msgspec.json.Encoder().encode

if TYPE_CHECKING:
    from gateway.config.settings import Config
    from gateway.metrics import Metrics

log = logging.getLogger("gateway.writeback")

FETCH_LIMIT = 500
# Didomi's pace is set by didomi_api.requests_per_second; this bounds waiting. Each report
# takes two round trips, so 4 left reports queueing behind slow answers under load.
MAX_IN_FLIGHT = 16
WRITE_ATTEMPTS = 3  # a report whose writing raises this often is dead-lettered
HOLD_POLL_S = 0.05  # how soon a held report first looks again; doubled per look, to HOLD_MAX_S
HOLD_MAX_S = 1.0


class Writeback(Worker[Spool]):
    """Moves Braze's subscription changes to Didomi's Consents API, losing none."""

    LOOPS = ("gateway-writeback", "gateway-writeback-gauges")
    LOOP_FAILED = "the writeback loop failed; resuming in a second"

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
        flow = metrics.flow("to_didomi")
        health = DeliveryHealth(flow, peer="Didomi")
        super().__init__(spool, flow, health, direction="to_didomi", log=log, clock=clock)
        self.config = config  # replaced on reload; read afresh for every report
        self.rules = rules
        self.client = client
        self.metrics = metrics
        self._backlog: deque[Report] = deque()
        self._failures: Counter[int] = Counter()
        self._in_flight: set[str] = set()
        self._flying: dict[int, int] = {}  # reports being written: row id -> partition
        self._reverse: tuple[RuleSet, ReverseRules] | None = None
        # Set by the server: the dispatcher, whose unsettled rows hold Braze's later reports.
        self.forward: Forward | None = None
        self._earlier = EarlierRows(spool, rules)
        self._own = OwnWrites()

    # -- the loop -----------------------------------------------------------------------------

    def _waiting(self) -> bool:
        return bool(self._backlog)

    async def _step(self) -> None:
        """Read more reports, start those whose turn it is, and sleep until the next one's."""
        await self._refill()
        self._start_ready()
        await self._sleep(self._nap())

    async def _read_page(self) -> None:
        """Fetch and decode more reports; the cursor moves only once the page is handled."""
        self._follow_partitions()
        if len(self._backlog) >= FETCH_LIMIT:
            return
        # Taken before fetching: a report acknowledged meanwhile has left the inbox.
        held = {report.row.id for report in self._backlog} | set(self._flying)
        generation = self.spool.generation
        rows = await self.spool.fetch(self._cursor, FETCH_LIMIT, "to_didomi")
        if not rows or self.spool.generation != generation:
            return  # partitions changed during the read: read again under the new ones
        cursor = rows[-1].id
        rows = [row for row in rows if row.id not in held]
        reverse = self._reverse_rules()
        reports: list[Report] = []
        skipped: list[int] = []
        dead: list[Dead] = []
        for row in rows:
            try:
                changes = decode_changes(row)
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
            await self._write_outcome(skipped, [], dead, audit=())
        self._cursor = cursor
        self._backlog.extend(reports)
        if skipped:
            self.flow.skipped("no_identity", len(skipped))
        if dead:
            self._dead_lettered("unmappable", len(dead), len(dead))

    def _nap(self) -> float:
        """How long the loop may sleep: until the first held report's turn, at most."""
        if not self._backlog:
            return IDLE_POLL_S  # a replay from the CLI is seen within this
        now = time.monotonic()
        soonest = min(report.not_before for report in self._backlog)
        return min(LOOP_PAUSE_S, max(0.0, soonest - now)) if soonest > now else LOOP_PAUSE_S

    def _moved(self, owned: frozenset[int] | None) -> None:
        if owned is not None:
            self._backlog = deque(r for r in self._backlog if r.row.part in owned)

    def busy_partitions(self) -> set[int]:
        """The partitions with a report being written to Didomi or waiting in the backlog."""
        return set(self._flying.values()) | {report.row.part for report in self._backlog}

    def _start_ready(self) -> None:
        """Start a task for each report whose person has nothing in flight or waiting before it."""
        kept: deque[Report] = deque()
        held: set[str] = set()
        now = time.monotonic()
        for report in self._backlog:
            if not self._ours(report):
                continue  # another replica's now (given back after its lease ran out, say)
            person = report.person
            busy = person in self._in_flight or person in held or report.not_before > now
            if busy or len(self._tasks) >= MAX_IN_FLIGHT:
                held.add(person)
                kept.append(report)
                continue
            self._in_flight.add(person)
            self._flying[report.row.id] = report.row.part
            self._spawn(self._deliver(report))
        self._backlog = kept

    def _ours(self, report: Report) -> bool:
        """Whether the report's partition is one this replica delivers now."""
        return self._owns((report.row.part,))

    def _reverse_rules(self) -> ReverseRules:
        rules = self.rules()
        if self._reverse is None or self._reverse[0] is not rules:
            self._reverse = (rules, ReverseRules.from_ruleset(rules))
        return self._reverse[1]

    async def _read_gauges(self) -> None:
        """Pending count, dead letters and the oldest report's age."""
        try:
            oldest = await self.spool.oldest_pending_at("to_didomi")
            dead = await self.spool.count_dead("to_didomi")
        except SpoolError as exc:
            log.warning("could not read the writeback's gauges (will retry): %s", exc)
        else:
            self._set_age(oldest)
            self.flow.dead_letters.set(dead)
            self._count_pending()

    # -- one report ---------------------------------------------------------------------------

    async def _deliver(self, report: Report) -> None:
        try:
            await self._write(report)
        except asyncio.CancelledError:
            raise  # stopping: the row stays in the spool for the next start
        except Exception as exc:
            # A spool that cannot be read is nobody's report's fault: every report waits for
            # it, as the dispatcher's rows do; only what else raises counts towards a bug.
            if not isinstance(exc, SpoolError):
                self._failures[report.row.id] += 1
            if self._failures[report.row.id] >= WRITE_ATTEMPTS:
                # A report that always raises (a bug) must not hold its person for ever.
                log.exception("a Braze report keeps failing; moving it to the dead letters")
                with contextlib.suppress(Exception):
                    detail = f"unmappable: {type(exc).__name__}: {exc}"
                    await self._dead(report, "unmappable", detail)
                    return
            log.exception("writing a Braze report back failed; it goes back to the backlog")
            # Back where it was, in spool order, so the person's later reports still wait.
            self._backlog = deque(sorted((*self._backlog, report), key=lambda r: r.row.id))
            await self._pause(backoff(1, self.config.delivery))
        finally:
            self._in_flight.discard(report.person)
            self._flying.pop(report.row.id, None)
            self._wake.set()

    async def _write(self, report: Report) -> None:
        attempt = 0
        while True:
            if not self._ours(report):
                # Its lease is running out: back to the backlog, ahead of the person's later
                # reports, which are forgotten with it unless the partition comes back.
                self._backlog = deque(sorted((*self._backlog, report), key=lambda r: r.row.id))
                return
            if self.forward is not None and await self._earlier.waits(
                self.forward, report, self._backlog
            ):
                self._hold(report)
                return
            # Filtered afresh before every try: a Didomi choice applied while this one waited
            # may have made it stale.
            edit, live, dropped = await self._prepare(report)
            if edit is None:
                await self._settle(report, [], skipped=dropped or "no_rule", unwritten=live)
                return
            written = [c for c in live if c.target in edit.targets]
            unwritten = [c for c in live if c.target not in edit.targets]
            sent_at = self.clock()
            answer = await self._send(report, edit)
            if answer is _HOLD:
                self._hold(report)
                return
            if answer is _AGAIN:
                continue  # a Didomi choice was applied meanwhile: filter again
            if answer is None:  # Didomi already holds these choices: nothing to write
                self.health.ok()
                await self._settle(report, written, skipped="unchanged", unwritten=unwritten)
                return
            if answer.verdict not in (Verdict.OK, Verdict.MOVED):
                attempt += 1
            decision = decide(
                answer,
                attempt=attempt,
                oldest_age_s=self.clock() - report.row.queued_at,
                can_split=False,
                delivery=self.config.delivery,
            )
            if decision.action is Action.ACK:
                self.health.ok()
                await self._settle(
                    report, written, unwritten=unwritten, answer=answer, sent_at=sent_at
                )
                return
            if decision.action is Action.GIVE_BACK:
                continue  # the loop's first step hands it to the partition's new owner
            if decision.action is Action.DEAD_LETTER:
                self.health.failing = None  # nothing is retrying any more
                detail = f"{decision.reason}: {answer.reason}"
                await self._dead(report, decision.reason, detail, sent_at, live, answer.status)
                return
            await self._retry_later(decision, answer)
            if self.stopping:
                return  # the row stays in the spool for the next start

    async def _prepare(
        self, report: Report
    ) -> tuple[ConsentEdit | None, list[BrazeChange], str | None]:
        """The edit to write now, the changes it holds, and why the others were dropped."""
        applied = await self.spool.applied_times([report.person])
        known = await self.spool.sent_states([report.person])
        live, dropped = live_changes(
            report,
            applied,
            known,
            config=self.config,
            floors=self.spool.floors,  # what the retention pruned counts as applied to everyone
            now=self.clock(),
            on_clamped=self.metrics.event_dates_clamped.inc,
        )
        edit = self._reverse_rules().edit(live) if live else None
        return edit, live, dropped

    def _hold(self, report: Report) -> None:
        """Back to the backlog, in spool order, to be tried again in a moment."""
        # Backing off: a long hold (the forward path stalled) must not read the spool in a loop.
        report.hold_s = min(HOLD_MAX_S, report.hold_s * 2) if report.hold_s else HOLD_POLL_S
        report.not_before = time.monotonic() + report.hold_s
        self._backlog = deque(sorted((*self._backlog, report), key=lambda r: r.row.id))

    async def _send(self, report: Report, edit: ConsentEdit) -> Answer | None:
        """Read the person's current choices, then write the edit against them (None: no
        need, Didomi already holds them; `_HOLD`: wait; `_AGAIN`: filter again)."""
        api = self.config.didomi_api
        answer, user = await self.client.current_user(report.person, regulation=api.regulation)
        if answer.verdict is not Verdict.OK:
            return answer
        # Dates, not only values: a Didomi choice newer than the act must never be overwritten.
        if user is not None and self._own.newer_in_didomi(report, edit, user):
            return _HOLD
        # Reading may have waited: a Didomi choice applied meanwhile may have made it stale.
        again, _, _ = await self._prepare(report)
        if again is None or again.targets != edit.targets:
            return _AGAIN
        current = list(user.purposes.values()) if user is not None else None
        purposes = edit.apply(current)
        if not purposes:
            return None
        # From the row and what is written: a retry of the same write, even after a restart,
        # carries the same id (recorded once), while a write whose content changed meanwhile
        # (the person chose again in Didomi) is a new event, not taken for a duplicate.
        digest = hashlib.sha256(report.row.body)
        digest.update(_encode(purposes))
        event_id = gateway_event_id(f"{report.row.type}|{digest.hexdigest()}")
        report.event_id = event_id
        if not self._ours(report):  # reading took long: it may be another replica's now
            return Answer(Verdict.MOVED, None, "its partition is another replica's now")
        return await self.client.write_event(
            event_id,
            report.person,
            purposes,
            api.regulation,
            on_created=functools.partial(self._own.wrote, report.person),
        )

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
        """Remove the row; for what Didomi now holds, record when it changed (for stale checks)
        and that Braze and Didomi agree on it (so Braze's echo of it is known), with the audit
        trail of every change of the report, in the same transaction."""
        applied = [(report.person, braze_side(c.target), c.at) for c in written]
        # A Currents event of an unchanged state is still the person's latest act in Braze:
        # dated, it keeps an older report (a dead letter replayed later) from undoing it. A
        # webhook step's unchanged targets are a snapshot, not an act: dating them would make
        # a Didomi withdrawal still on its way to Braze look older than it.
        applied += [
            (report.person, braze_side(c.target), c.at)
            for c, why in report.dropped
            if why == "skipped:unchanged" and c.source is not None
        ]
        now = self.clock()
        # Dated by the act, as the forward path's rows are by the sending of the request Braze
        # applied: the time from which Braze holds the state, so an older report is stale.
        known = [(report.person, str(c.target), c.state, c.at) for c in written]
        at = sent_at if sent_at is not None else now
        status = answer.status if answer is not None else None
        outcome = f"skipped:{skipped}" if skipped is not None else "delivered"
        trail = [self._trail(report, c, outcome, at, status) for c in written]
        trail += [
            self._trail(report, c, f"skipped:{skipped or 'no_rule'}", at) for c in unwritten or ()
        ]
        trail += [self._trail(report, c, why, at) for c, why in report.dropped]
        await self._write_outcome([report.row.id], applied, [], sent=known, audit=trail)
        self._failures.pop(report.row.id, None)
        if skipped is not None:
            self.flow.skipped(skipped)
            return
        self.flow.delivered.inc()
        self.flow.latency.observe(max(0.0, self.clock() - report.row.queued_at))
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
            event_id=report.event_id if sends else None,
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
        self,
        report: Report,
        reason: str,
        detail: str,
        at: float | None = None,
        live: list[BrazeChange] | None = None,
        status: int | None = None,
    ) -> None:
        when = at if at is not None else self.clock()
        trail = [self._trail(report, c, "dead-lettered", when, status, detail) for c in live or ()]
        trail += [self._trail(report, c, why, when) for c, why in report.dropped]
        await self._write_outcome([], [], [Dead(report.row.id, detail, report.person)], audit=trail)
        self._failures.pop(report.row.id, None)
        self._dead_lettered(reason, 1, 1)
        log.warning("a Braze report moved to the dead letters: %s", detail)


# What `_send` answers besides Didomi's answers: compared by identity.
_HOLD = Answer(Verdict.RETRY, None, "held: a newer Didomi change is on its way")
_AGAIN = Answer(Verdict.RETRY, None, "a Didomi choice was applied meanwhile")
