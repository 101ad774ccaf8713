"""`gateway trace PERSON | --event ID`: the audit trail, on the spool file, also beside a server.

Like `gateway dead-letters`, it opens the spool file without the server's lock (WAL mode lets
it read while the server writes) and only reads. PERSON is hashed with the spool's key, so the
identifier itself is never looked for in, nor written to, the file.
"""

from __future__ import annotations

import sys
from datetime import UTC, datetime
from typing import Any, TextIO

import msgspec

from gateway.config.settings import Config
from gateway.errors import GatewayError
from gateway.spool.audit import StoredRecord
from gateway.spool.backend import open_store


class TraceError(GatewayError, ValueError):
    """The command line of `gateway trace` is not usable (a bad date, no person)."""


def command(
    config: Config,
    person: str | None,
    *,
    event_id: str | None = None,
    since: str | None = None,
    as_json: bool = False,
    out: TextIO | None = None,
) -> int:
    """Print a person's (or one event's) history, newest first; returns the exit status."""
    out = out or sys.stdout
    if person is None and event_id is None:
        raise TraceError(
            "give a PERSON (their external id or email; `-` reads it from standard input)"
            " or --event ID"
        )
    if person is not None and event_id is not None:
        raise TraceError("give a PERSON or an --event ID, not both")
    if person is not None and not person.strip():
        raise TraceError("the PERSON is empty: give their external id or email")
    since_at = _parse_since(since) if since is not None else None
    db = open_store(config.delivery, config.retention.person_key, create=False)
    try:
        entries = db.trail(person, event_id=event_id, since=since_at)
    finally:
        db.close()
    for entry in entries:
        if as_json:
            print(msgspec.json.encode(as_dict(entry)).decode(), file=out)
        else:
            print(as_text(entry), file=out)
    if not as_json:
        print(f"{len(entries)} record(s)", file=out)
    if not entries and person is not None and not config.retention.person_key:
        # The hash depends on the key: a server run with one hashes differently from here.
        print(
            "gateway: no records; if the server runs with retention.person_key"
            " (GATEWAY_PERSON_KEY), set it for this command too",
            file=sys.stderr,
        )
    return 0


def _parse_since(text: str) -> float:
    try:
        stamp = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise TraceError(f"--since {text!r} is not an ISO date, e.g. 2025-03-14") from None
    if stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=UTC)  # as Didomi writes its dates: UTC
    return stamp.timestamp()


def _iso(at: float | None) -> str | None:
    if at is None:
        return None
    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def as_dict(entry: StoredRecord) -> dict[str, Any]:
    """One record as a JSON object: what was said, what was sent, what was answered, when."""
    return {
        "at": _iso(entry.at),
        "direction": entry.direction,
        "event": {"id": entry.event_id, "type": entry.event_type, "at": _iso(entry.event_at)},
        "endpoint": entry.endpoint,
        "target": entry.target,
        "state": entry.state,
        "rule": entry.rule,
        "status": entry.status,
        "outcome": entry.outcome,
        "detail": entry.detail,
    }


def as_text(entry: StoredRecord) -> str:
    """One record as one readable line."""
    said = f"{entry.event_type or '-'} {entry.event_id or '-'}"
    if entry.event_at is not None:
        said += f" (chosen {_iso(entry.event_at)})"
    change = f"{entry.target}={entry.state}" if entry.target is not None else "-"
    sent = f"{entry.endpoint} {change}" if entry.endpoint else f"(not sent) {change}"
    if entry.rule:
        sent += f" by {entry.rule}"
    answer = f"{entry.status} {entry.outcome}" if entry.status is not None else entry.outcome
    if entry.detail:
        answer += f": {entry.detail}"
    return f"{_iso(entry.at)}  {entry.direction}  {said}  ->  {sent}  ->  {answer}"
