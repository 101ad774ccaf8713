"""The writeback's filter: which of a Braze report's changes are echoes, stale, or too old."""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from gateway.peers.didomi import ConsentsApiUser
from gateway.reverse.braze_webhooks import BrazeChange
from gateway.reverse.report import Report
from gateway.reverse.rules import ConsentEdit
from gateway.rules.mappings import ERASED, braze_side
from gateway.spool.prune import OLDER_THAN_RETENTION

if TYPE_CHECKING:
    from gateway.config.settings import Config

log = logging.getLogger("gateway.writeback")  # the writeback's: logger names are a contract

REST_API = "REST API"  # Currents' state_change_source for a change made through Braze's API
OWN_WRITES_KEPT = 100_000  # persons whose last own Didomi write is remembered
# How long a report waits for Didomi's webhook of a newer change Didomi's user shows; after
# it, the change is taken for one that did not touch the report's targets (another purpose).
DIDOMI_NEWER_WAIT_S = 10.0
# Didomi's user `updated_at` and the `created_at` of the event that set it may differ a little.
OWN_WRITE_SLACK_S = 1.0


def live_changes(
    report: Report,
    applied: dict[tuple[str, str], float],
    known: dict[tuple[str, str], dict[str, float]],
    *,
    config: Config,
    floors: dict[str, float],
    now: float,
    on_clamped: Callable[[], None],
) -> tuple[list[BrazeChange], str | None]:
    """The changes to write back, and why the others were dropped.

    `known` holds, per target, every state Braze was given with Didomi agreeing (sent
    there by the forward path, or written back from Braze) and when it last was. Braze
    reports each of the gateway's writes through Currents, in any order: any of those
    states within `echo_window_s`, from the REST API (or a step), dated no later than its
    write (plus the clock skew allowed), is an `echo`. A report of
    the last state is `unchanged`: a webhook step renders every target, changed or not.
    A report older than the last state sent is `stale`: Braze has held that later state
    since, so the report is a snapshot from before it (a step) or an act it replaced.
    What retention pruned (`floors`) counts as applied to everyone; `on_clamped` counts a
    report whose date was clamped to its arrival.
    """
    person = report.person
    hooks = config.braze_webhooks
    window = hooks.echo_window_s if hooks is not None else 0.0
    skew = config.didomi.max_clock_skew_s
    bound = report.row.received_at + skew
    live: list[BrazeChange] = []
    reason: str | None = None
    report.dropped = []
    for change in report.changes:
        if change.at > bound:
            # Braze's clock (or a `time` rendered in milliseconds) must not freeze the
            # person's later Didomi choices: dated at arrival, as forward.
            change = dataclasses.replace(change, at=report.row.received_at)
            if not report.clamped:  # filtered again before every try: counted once
                report.clamped = True
                on_clamped()
        target = change.target
        states = known.get((person, target), {})
        sent_at = states.get(change.state)
        last = max(states.items(), key=lambda item: item[1]) if states else None
        # An echo's act is Braze applying the write: never later than it (give or take the
        # clocks). A later act of that state is someone else's (a CRM through the REST API).
        echo = (
            sent_at is not None
            and change.source in (None, REST_API)
            and now - sent_at <= window
            and change.at <= sent_at + skew
        )
        if sent_at is not None and (echo or (last is not None and last[0] == change.state)):
            why = "echo" if echo else "unchanged"
            reason = reason or why
            report.dropped.append((change, f"skipped:{why}"))
            continue
        if last is not None and change.at < last[1]:
            reason = "stale"
            report.dropped.append((change, "stale"))
            continue
        # As forward: below the person's own applied times (or erasure) is stale; below
        # only what retention pruned of them is too old to tell, said apart.
        keys = (target, braze_side(target), ERASED)
        if change.at < max(applied.get((person, key), -math.inf) for key in keys):
            reason = "stale"
            report.dropped.append((change, "stale"))
            continue
        if change.at < max(floors.get(key, -math.inf) for key in keys):
            reason = reason if reason == "stale" else OLDER_THAN_RETENTION
            report.dropped.append((change, OLDER_THAN_RETENTION))
            if not report.warned:  # filtered again before every try: said once
                report.warned = True
                log.warning(
                    "a Braze change older than the retention floor (retention.applied_days"
                    " pruned the applied times it would be checked against): not written back"
                )
            continue
        live.append(change)
    return live, reason


class OwnWrites:
    """Per person, the `created_at` (Didomi's clock) of the last event the gateway wrote:
    Didomi's user `updated_at` up to it is the gateway's own doing."""

    def __init__(self) -> None:
        self._own: dict[str, float] = {}

    def wrote(self, person: str, created_at: float) -> None:
        """Remember Didomi's date of the gateway's own write (its user's `updated_at` then)."""
        if len(self._own) >= OWN_WRITES_KEPT:
            self._own.clear()  # forgetting costs at most a wait; it is never wrong
        self._own[person] = max(created_at, self._own.get(person, created_at))

    def newer_in_didomi(self, report: Report, edit: ConsentEdit, user: ConsentsApiUser) -> bool:
        """Whether Didomi's user changed after the report's act, not by the gateway's hand,
        and the report should still wait for that change's webhook."""
        if user.updated_at is None:
            return False
        updated = user.updated_at.timestamp()
        own = self._own.get(report.person, -math.inf)
        if updated <= edit.at or updated <= own + OWN_WRITE_SLACK_S:
            report.newer_since = None
            return False
        now = time.monotonic()
        if report.newer_since is None:
            report.newer_since = now
        if now - report.newer_since < DIDOMI_NEWER_WAIT_S:
            return True
        # No webhook made it stale meanwhile: the change touched none of its targets.
        log.info("Didomi changed after a Braze report without touching its targets; writing it")
        return False
