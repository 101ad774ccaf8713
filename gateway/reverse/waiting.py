"""Whether a Braze report waits for a Didomi row of its person the forward path has not settled."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

from gateway.reverse.report import Report
from gateway.rules.mappings import RuleSet
from gateway.shapes.webhooks import Webhook, WebhookError, decode
from gateway.spool.face import Spool
from gateway.spool.store import Pending

# Unfetched Didomi rows read, per look, for one of a held report's person: SCAN_PAGES pages
# of SCAN_LIMIT; a report behind more than that waits for the dispatcher to fetch them.
SCAN_LIMIT = 400
SCAN_PAGES = 5
SCAN_KEPT_S = 0.2  # how long one reading serves every held report (rows only leave meanwhile)


class Forward(Protocol):
    """What the writeback asks of the dispatcher (the other direction) in this process."""

    @property
    def cursor(self) -> int: ...

    def unsettled(self, person: str, before: int) -> bool: ...


@dataclass(slots=True)
class Unfetched:
    """Who the Didomi rows the dispatcher has not fetched yet are about, as last read."""

    cursor: int  # the dispatcher's cursor the reading started from
    bound: int  # the last report id it was read for
    upto: int  # rows up to this id were read (`bound`: all of those before it)
    people: dict[str, int]  # each person's first unfetched row
    at: float  # time.monotonic() of the reading


class EarlierRows:
    """The Didomi rows stored before Braze's reports, as far as they hold those reports."""

    def __init__(self, spool: Spool, rules: Callable[[], RuleSet]) -> None:
        self.spool = spool
        self.rules = rules
        self._scan: Unfetched | None = None

    async def waits(self, forward: Forward, report: Report, backlog: Iterable[Report]) -> bool:
        """Whether a Didomi row of the report's person, stored before it, is not settled yet
        (`backlog`: the reports waiting, read for at once)."""
        if forward.unsettled(report.person, report.row.id):
            return True
        # Rows the dispatcher has not fetched yet may be about this person too; only theirs
        # hold the report, or a stalled forward path (a refused key, a long backlog) would
        # hold every person's.
        scan = self._scan
        if (
            scan is None
            or scan.cursor != forward.cursor
            or scan.bound < report.row.id
            or time.monotonic() - scan.at > SCAN_KEPT_S
        ):
            scan = self._scan = await self._read(forward.cursor, report.row.id, backlog)
        first = scan.people.get(report.person)
        if first is not None and first < report.row.id:
            return True
        return scan.upto < report.row.id - 1  # rows before it were left unread: they may be

    async def _read(self, cursor: int, before: int, backlog: Iterable[Report]) -> Unfetched:
        """Who the Didomi rows after the dispatcher's cursor are about, up to the last report
        waiting (a page at a time, at most SCAN_PAGES): read once for all held reports."""
        bound = max((r.row.id for r in backlog), default=before)
        bound = max(bound, before)
        scan = Unfetched(cursor, bound, cursor, {}, time.monotonic())
        rules = self.rules()
        for _ in range(SCAN_PAGES):
            rows = await self.spool.fetch(scan.upto, SCAN_LIMIT, "to_braze")
            for row in rows:
                if row.id >= bound:
                    scan.upto = bound
                    return scan
                if (person := _person(rules, row)) is not None:
                    scan.people.setdefault(person, row.id)
                scan.upto = row.id
            if len(rows) < SCAN_LIMIT:
                scan.upto = bound  # every Didomi row stored before the reports was read
                return scan
        return scan


def _person(rules: RuleSet, row: Pending) -> str | None:
    """Who a Didomi row is about, as the dispatcher's mapping names people."""
    try:
        webhook = row.decoded if isinstance(row.decoded, Webhook) else decode(row.body)
    except WebhookError:
        return None  # the dispatcher drops it unsent: it holds no one
    return rules.person(webhook)
