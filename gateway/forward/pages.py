"""The dispatcher's reading: pages of live webhooks and of the backfill lane, and their mapping."""

from __future__ import annotations

import logging
import math
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field

from gateway.delivery.worker import IDLE_POLL_S, RECOUNT_S
from gateway.forward.batcher import Batcher, Entry
from gateway.rules.mappings import Mapped, RuleSet
from gateway.shapes.webhooks import Webhook, WebhookError, decode
from gateway.spool import lane
from gateway.spool.audit import Record
from gateway.spool.face import Spool
from gateway.spool.store import Dead, Pending

log = logging.getLogger("gateway.dispatcher")  # the dispatcher's: logger names are a contract

FETCH_LIMIT = 1000
MAP_ATTEMPTS = 3  # a row whose mapping raises this often is dead-lettered, not retried forever


class Live:
    """Where live webhooks are read from: intake's hand-off, else the spool."""

    def __init__(self) -> None:
        self.read_at = -math.inf  # when the spool was last read (the hand-off aside)
        self.written_elsewhere = False  # another process wrote since the last look: a backfill?

    async def page(
        self, spool: Spool, cursor: int, batcher: Batcher, quiet: bool
    ) -> tuple[list[Pending], int]:
        """The rows after `cursor`, and the cursor once they are mapped.

        From intake's hand-off when it holds them all; else read from the spool: at start,
        after another process wrote rows (a CLI's replay: found within `IDLE_POLL_S` when
        `quiet`, nothing waiting or in flight), and every few seconds when nothing else arrives.
        """
        handoff = spool.handoff
        complete = 0
        if handoff is not None:
            rows = handoff.take(cursor, FETCH_LIMIT)
            if rows:
                return rows, rows[-1].id
            # Idle, a replay from the CLI is what there is to find: looked for at once, by a
            # pragma that costs less than the read it saves.
            elsewhere = quiet and await spool.written_elsewhere()
            self.written_elsewhere = self.written_elsewhere or elsewhere
            if rows is not None and time.monotonic() - self.read_at < RECOUNT_S and not elsewhere:
                return [], cursor
            complete = handoff.complete_after
        held = set(batcher.ids)  # before reading: what is acked meanwhile left the inbox
        generation = spool.generation
        rows = await spool.fetch(cursor, FETCH_LIMIT)
        self.read_at = time.monotonic()
        if spool.generation != generation:
            return [], cursor  # partitions changed during the read: read again
        after = rows[-1].id if rows else cursor
        if len(rows) < FETCH_LIMIT:
            # Caught up: every row up to `complete` has been read, the hand-off has the rest.
            after = max(after, complete)
        if handoff is not None:
            rows = handoff.swap_in(rows)  # this process's own rows come decoded
        return [row for row in rows if row.id not in held], after


class Lane:
    """The backfill lane (`lane`): its own cursor, its share of Braze's rate in objects, and
    the rows read and mapped that wait to join the backlog (`ready`)."""

    def __init__(self, rate: Callable[[], float]) -> None:
        self.cursor = 0
        self.more = False  # the lane has rows this loop could not take yet
        self.read_at = -math.inf  # monotonic: when the lane was last read
        self.budget = lane.Budget(rate, time.monotonic)
        # Read a page at a time (one spool trip, one stale-check read), handed to the backlog
        # a few requests' worth at a time: a live row arriving meanwhile goes before the rest,
        # and forming a batch, which looks through the whole backlog, stays cheap.
        self.ready: deque[Entry] = deque()

    def feed(self, batcher: Batcher, wanted: int) -> bool:
        """Move ready rows to the backlog until it holds `wanted`; whether any moved."""
        room = min(wanted - len(batcher), len(self.ready))
        if room <= 0:
            return False
        batcher.add(self.ready.popleft() for _ in range(room))
        return True

    def forget(self) -> None:
        """Drop the ready rows (the partitions changed: the lane is read again from its start)."""
        self.ready.clear()

    async def page(self, spool: Spool, batcher: Batcher, slots: int) -> tuple[list[Pending], int]:
        """Backfilled rows after the lane's cursor, as many as its share allows now.

        Only while fewer than `slots` rows are ready (enough for every request slot); an empty
        lane is read again after `IDLE_POLL_S` (one indexed read), or at once when the gauges
        count rows or another process wrote to the spool (`more`).
        """
        now = time.monotonic()
        if not self.more and now - self.read_at < IDLE_POLL_S:
            # Empty when last read: `gateway backfill` may be storing, found this long after.
            return [], self.cursor
        if len(self.ready) >= slots:
            return [], self.cursor
        self.read_at = now
        self.more = False
        allowed = self.budget.take(FETCH_LIMIT)
        if allowed <= 0:
            self.more = True  # unknown: looked at again once the share refills
            return [], self.cursor
        held = set(batcher.ids)
        generation = spool.generation
        try:
            rows = await spool.fetch_backfill(self.cursor, allowed)
        except BaseException:
            # Nothing was read: its share back, and read again at the loop's next turn rather
            # than once the gauges count rows again (RECOUNT_S later).
            self.budget.refund(allowed)
            self.more = True
            raise
        if spool.generation != generation:
            # Partitions changed during the read: its rows are discarded, so is their cost.
            self.budget.refund(allowed)
            self.more = True
            return [], self.cursor
        self.budget.refund(allowed - len(rows))
        self.more = bool(rows)  # the command may still be storing: read again soon
        cursor = rows[-1].id if rows else self.cursor
        return [row for row in rows if row.id not in held], cursor


@dataclass(slots=True)
class Page:
    """A page of rows mapped: what waits for Braze, and what is settled at once."""

    entries: list[Entry] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)  # rows that change nothing
    reasons: Counter[str] = field(default_factory=Counter)  # why, counted
    unmappable: list[Dead] = field(default_factory=list)
    trail: list[Record] = field(default_factory=list)  # the audit of the skipped


def map_page(
    rules: RuleSet, rows: list[Pending], failures: Counter[int], clock: Callable[[], float]
) -> Page:
    """Map every row by one rule set; a row whose mapping raised `MAP_ATTEMPTS` times (counted
    in `failures`) is dead-lettered, before that the exception leaves the page to be read again."""
    page = Page()
    for row in rows:
        try:
            result = map_row(rules, row, page.trail, clock)
        except Exception as exc:
            failures[row.id] += 1
            if failures[row.id] < MAP_ATTEMPTS:
                raise  # the whole page is fetched again after a pause
            log.exception("spooled row %d cannot be mapped; moving it to the dead letters", row.id)
            page.unmappable.append(Dead(row.id, f"unmappable: {type(exc).__name__}: {exc}"))
            continue
        if isinstance(result, Mapped):
            page.entries.append(Entry(row, result))
        else:
            page.skipped.append(row.id)
            page.reasons[result] += 1
    return page


def map_row(
    rules: RuleSet, row: Pending, trail: list[Record], clock: Callable[[], float]
) -> Mapped | str:
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
                clock(),
                event_id=event_id,
                event_type=row.type,
            )
        )
    return result.reason
