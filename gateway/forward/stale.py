"""The stale check before every try: a change older than what a person already has is dropped.

The applied times it compares with are read just before the request leaves; for the backfill
lane they are read once per page ahead (`read_ahead`), and used while exact (`spool.known`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

from gateway.delivery.ports import Flow
from gateway.errors import SpoolError
from gateway.forward.batcher import Item
from gateway.rules.mappings import ERASED, braze_side
from gateway.spool.face import Spool
from gateway.spool.known import Times
from gateway.spool.prune import OLDER_THAN_RETENTION

log = logging.getLogger("gateway.dispatcher")  # the dispatcher's: logger names are a contract


async def read_ahead(spool: Spool, persons: set[str]) -> None:
    """Read a lane page's applied times in one trip, for the stale checks of its requests.

    Only a shortcut: when the read fails, each request reads its own as live ones do, so no
    row is held back by it.
    """
    generation = spool.generation  # the partitions may move during the read (`known`)
    with spool.known.reading():
        try:
            times = await spool.applied_times(persons)
        except SpoolError as exc:
            log.debug("the lane's applied times were not read ahead (read per request): %s", exc)
            return
        spool.known.keep(persons, times, generation=generation)


async def applied_for(spool: Spool, items: list[Item], ahead: bool) -> Times:
    """The applied times of the items' persons: read ahead (`ahead`, backfilled rows only,
    the retention floors do not apply to those) where still exact, else read now."""
    times: Times = {}
    ask = []
    for item in items:
        found = None
        if ahead and all(entry.row.backfill for entry in item.entries):
            found = spool.known.take(item.person, generation=spool.generation)
        if found is None:
            ask.append(item.person)
        else:
            times.update(found)
    if ask:
        times.update(await spool.applied_times(ask))
    return times


def drop_stale(
    items: list[Item],
    applied: dict[tuple[str, str], float],
    floors: dict[str, float],
    flow: Flow,
    on_lane_stale: Callable[[], None],
) -> None:
    """Drop changes older than what was `applied` to that person and target, or their erasure.

    An erasure is never stale: it is lifted above the last choice applied, so it wins. The
    retention's `floors` count as applied to everyone (`retention`). `on_lane_stale` counts a
    backfilled person whose every change was stale.
    """
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
            flow.skipped("stale")  # once per person, not target
            if not item.changes and all(row.backfill for row in item.rows):
                on_lane_stale()
        if expired:
            flow.skipped(OLDER_THAN_RETENTION)
            expired_people += 1
    if expired_people:
        log.warning(
            "%d person(s) had a choice older than the retention floor (retention.applied_days"
            " pruned the applied times it would be checked against): not sent",
            expired_people,
        )
