"""One stored Braze report as the writeback holds it: its row, decoded changes and person."""

from __future__ import annotations

from dataclasses import dataclass, field

from gateway.reverse.braze_webhooks import BrazeChange, decode_currents_event, decode_step
from gateway.spool.store import Pending


@dataclass(slots=True)
class Report:
    """One stored Braze report: its row, its changes, and the person they are about."""

    row: Pending
    changes: list[BrazeChange]
    person: str
    dropped: list[tuple[BrazeChange, str]] = field(default_factory=list)  # and why, for the audit
    event_id: str | None = None  # the id of the consent event last sent to Didomi for it
    not_before: float = 0.0  # time.monotonic() before which it waits (held)
    clamped: bool = False  # its date was clamped to its arrival (and counted)
    newer_since: float | None = None  # since when it waits for a newer Didomi change's webhook
    hold_s: float = 0.0  # how long it waited when last held (backing off)
    warned: bool = False  # its change older than the retention floor was logged (once)


def decode_changes(row: Pending) -> list[BrazeChange]:
    """The changes a stored Braze row reports (a webhook step's or a Currents event's)."""
    if row.type == "braze.step":
        return decode_step(row.body)
    return decode_currents_event(row.body)
