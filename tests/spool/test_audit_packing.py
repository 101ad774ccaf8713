"""One audit record per object and event, its changes packed, read back one line per change.

On both backends: what `ack` stores, what `trail` (and so `gateway trace`) reads back, records
written before the packed column existed, erasure, pruning and shedding of packed records.
"""

from __future__ import annotations

import dataclasses
import io
import json
import sqlite3
from pathlib import Path
from typing import Any
from unittest.mock import patch

from gateway.app.server import SPOOL
from gateway.cli import trace
from gateway.config.settings import is_postgresql
from gateway.spool import postgres, postgres_schema, sqlite_file
from gateway.spool.audit import Record, StoredRecord, person_hash
from gateway.spool.sqlite import SpoolDB
from gateway.testing.braze import FakeBraze
from tests.system.test_end_to_end import StartGateway, fixture, start_gateway  # noqa: F401 - a fixture

TARGETS = ("email_subscribe", "subscription_group:news", "subscription_group:offers", "attr")
SENT = {"endpoint": "/users/track", "status": 201}


def _store(spool_url: str) -> Any:
    if is_postgresql(spool_url):
        return postgres.PgSpoolDB(spool_url)
    return SpoolDB(spool_url)


def _rows(db: Any, person: str) -> int:
    """Stored audit rows of one person (by their hash)."""
    hashed = person_hash(db.person_key, person)
    return int(
        db.db.execute("SELECT count(*) FROM audit WHERE person = ?", (hashed,)).fetchone()[0]
    )


def _lines(records: list[StoredRecord]) -> list[tuple[Any, ...]]:
    return [(r.event_id, r.target, r.state, r.rule, r.outcome, r.status) for r in records]


def _per_target(person: str, event: str, outcome: str = "delivered") -> list[Record]:
    return [
        Record(
            person,
            "to_braze",
            outcome,
            10.0,
            event_id=event,
            event_type="event.created",
            event_at=5.0,
            target=target,
            state="opted_in",
            rule=f"mappings/m.toml:{n + 1}",
            **SENT,  # type: ignore[arg-type]
        )
        for n, target in enumerate(TARGETS)
    ]


def test_an_object_is_one_audit_record_read_back_one_line_per_change(spool_url: str) -> None:
    """Four targets of one object and event, handed over one record each or packed, are one
    stored row; `trail` gives one line per change, in the order the per-target rows gave them,
    and a row without a change (superseded) stays a record of its own."""
    db = _store(spool_url)
    try:
        packed = Record(
            "p-2",
            "to_braze",
            "delivered",
            10.0,
            event_id="ev-2",
            event_type="event.created",
            event_at=5.0,
            changes=tuple(
                (t, "opted_in", f"mappings/m.toml:{n + 1}") for n, t in enumerate(TARGETS)
            ),
            **SENT,  # type: ignore[arg-type]
        )
        superseded = Record("p-1", "to_braze", "skipped:superseded", 10.0, event_id="ev-0")
        db.ack([], audit=[*_per_target("p-1", "ev-1"), superseded, packed])
        assert _rows(db, "p-1") == 2
        assert _rows(db, "p-2") == 1
        lines = [("ev-0", None, None, None, "skipped:superseded", None)]
        lines += [
            ("ev-1", t, "opted_in", f"mappings/m.toml:{n + 1}", "delivered", 201)
            for n, t in reversed(list(enumerate(TARGETS)))
        ]
        assert _lines(db.trail("p-1")) == lines
        assert _lines(db.trail("p-2")) == [(("ev-2", *line[1:])) for line in lines[1:]]
        assert [r.target for r in db.trail(None, event_id="ev-2")] == list(reversed(TARGETS))
        # Other outcomes of the same object and event are records of their own.
        stale = _per_target("p-3", "ev-3", "stale")[:2]
        db.ack([], audit=[*_per_target("p-3", "ev-3")[2:], *stale])
        assert _rows(db, "p-3") == 2
        assert [(r.target, r.outcome) for r in db.trail("p-3")] == [
            (TARGETS[1], "stale"),
            (TARGETS[0], "stale"),
            (TARGETS[3], "delivered"),
            (TARGETS[2], "delivered"),
        ]
    finally:
        db.close()


def _old_record(db: Any, person: str) -> None:
    """An audit row as gateways before packing wrote it: one change in target, state, rule."""
    db.db.execute(
        "INSERT INTO audit(at, person, direction, event_id, event_type, endpoint, target, state,"
        " rule, status, outcome) VALUES (1.0, ?, 'to_braze', 'ev-old', 'event.created',"
        " '/users/track', 'email_subscribe', 'opted_in', 'email.toml:7', 201, 'delivered')",
        (person_hash(db.person_key, person),),
    )


OLD_AUDIT = """
CREATE TABLE audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at REAL NOT NULL,
    person TEXT NOT NULL,
    direction TEXT NOT NULL,
    event_id TEXT,
    event_type TEXT,
    event_at REAL,
    endpoint TEXT,
    target TEXT,
    state TEXT,
    rule TEXT,                         -- file:line of the rule that produced the state
    status INTEGER,                    -- the other side's HTTP status; NULL without a request
    outcome TEXT NOT NULL,             -- delivered | stale | dead-lettered | skipped:<reason>
    detail TEXT                        -- the dead-letter reason, say; never a person
)
"""


def test_records_written_before_packing_stay_readable_on_sqlite(tmp_path: Path) -> None:
    """A spool file whose audit table has no packed column gets it when opened, and its old
    per-change records read as they did, beside new packed ones."""
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as raw:
        raw.execute(OLD_AUDIT)
    with patch.object(SpoolDB, "_migrate", lambda self: None):
        db = SpoolDB(path)
    _old_record(db, "p-1")
    db.close()
    db = SpoolDB(path)
    try:
        db.ack([], audit=_per_target("p-1", "ev-new"))
        lines = _lines(db.trail("p-1"))
        assert lines[-1] == (
            "ev-old",
            "email_subscribe",
            "opted_in",
            "email.toml:7",
            "delivered",
            201,
        )
        assert [line[1] for line in lines[:-1]] == list(reversed(TARGETS))
    finally:
        db.close()


def test_records_written_before_packing_stay_readable_on_postgresql(pg_url: str) -> None:
    """A database at the schema version before packing is migrated by the next start, and its
    old per-change records read as they did, beside new packed ones."""
    before = postgres_schema.VERSION - 1
    with (
        patch.object(postgres_schema, "VERSION", before),
        patch.object(postgres_schema, "MIGRATIONS", postgres_schema.MIGRATIONS[:before]),
    ):
        db = postgres.PgSpoolDB(pg_url)
    _old_record(db, "p-1")
    db.close()
    db = postgres.PgSpoolDB(pg_url)
    try:
        db.ack([], audit=_per_target("p-1", "ev-new"))
        lines = _lines(db.trail("p-1"))
        assert lines[-1] == (
            "ev-old",
            "email_subscribe",
            "opted_in",
            "email.toml:7",
            "delivered",
            201,
        )
        assert [line[1] for line in lines[:-1]] == list(reversed(TARGETS))
    finally:
        db.close()


def test_packed_records_are_erased_pruned_and_shed_whole(spool_url: str) -> None:
    """An erasure drops a person's packed records but their erasure's; pruning and shedding
    take whole records, oldest first, and what is left still reads one line per change."""
    db = _store(spool_url)
    try:
        db.ack([], audit=_per_target("gone", "ev-1"))
        erased = Record(
            "gone", "to_braze", "delivered", 11.0, event_id="ev-2", event_type="user.deleted"
        )
        db.ack([], [("gone", "erased", 11.0)], audit=[erased], erase=["gone"])
        assert [r.event_type for r in db.trail("gone")] == ["user.deleted"]
        for n in range(3):
            db.ack([], audit=[_at(r, 20.0 + n) for r in _per_target("kept", f"ev-k{n}")])
        pruned, _ = db.prune("audit", 20.5, 100)
        assert pruned == 2  # the erasure's record and the first packed one: whole rows
        assert {r.event_id for r in db.trail("kept")} == {"ev-k1", "ev-k2"}
        assert len(db.trail("kept")) == 2 * len(TARGETS)
        if isinstance(db, SpoolDB):
            db.db.execute(sqlite_file._SHED, (1,))  # what `shed_audit` runs under disk pressure
            assert [r.event_id for r in db.trail("kept")] == ["ev-k2"] * len(TARGETS)
    finally:
        db.close()


def _at(record: Record, at: float) -> Record:
    return dataclasses.replace(record, at=at)


async def test_a_delivered_webhook_is_one_audit_record_per_object(
    start_gateway: StartGateway,  # noqa: F811 - the imported fixture
    fake: FakeBraze,
    auth_headers: dict[str, str],
) -> None:
    """A consent reaching four Braze targets is one stored audit record, and `gateway trace`
    still prints one line per target."""
    gw = await start_gateway()
    assert await gw.post(fixture("consent_given.json"), auth_headers) == 202
    await gw.settle()
    db = gw.app[SPOOL].db
    assert _rows(db, "user-123") == 1
    out = io.StringIO()
    assert trace.command(gw.config, "user-123", as_json=True, out=out) == 0
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert len(lines) == 4
    assert {line["outcome"] for line in lines} == {"delivered"}
    assert len({line["target"] for line in lines}) == 4
