"""The dispatcher's audit records: what became of each settled item, one record per row."""

from __future__ import annotations

from gateway.forward.batcher import Entry, Item
from gateway.rules.mappings import ERASED, ON_USER_DELETED
from gateway.spool.audit import Change, Record, state_text
from gateway.spool.prune import OLDER_THAN_RETENTION


def endpoint_of(delete: bool) -> str:
    """The Braze endpoint an item went to."""
    return "/users/delete" if delete else "/users/track"


def records_of(
    item: Item,
    outcome: str,
    at: float,
    endpoint: str | None,
    status: int | None,
    detail: str | None = None,
) -> list[Record]:
    """The audit records of one settled item (`records_of_rows`), the common case built directly:
    one row, whose every change was sent (a third of the dispatcher's per-object Python)."""
    entries = item.entries
    if len(entries) != 1 or item.delete or item.stale or not item.changes:
        return records_of_rows(item, outcome, at, endpoint, status, detail)
    entry = entries[0]
    mapped = entry.mapped
    origins = mapped.origins
    changes = []
    for target, change in item.changes.items():
        if change.entry is not entry:
            return records_of_rows(item, outcome, at, endpoint, status, detail)
        changes.append((target, state_text(change.state), origins.get(target)))
    record = Record(
        item.person,
        "to_braze",
        outcome,
        at,
        event_id=mapped.event_id,
        event_type=entry.row.type,
        event_at=mapped.at,
        endpoint=endpoint,
        status=status,
        detail=detail,
        changes=tuple(changes),
    )
    return [record]


def records_of_rows(
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
