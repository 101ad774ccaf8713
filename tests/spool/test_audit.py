"""The audit trail, `gateway trace`, retention and erasure scrubbing, on a real spool file.

Most tests run the real app in-process with the fake Braze (`start_gateway` of test_end_to_end)
and read the spool file afterwards, as an operator's `gateway trace` would.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest.mock import patch

import msgspec
import pytest

from gateway.app.retention import Retention
from gateway.app.server import SPOOL
from gateway.cli import trace
from gateway.cli.main import main
from gateway.config.settings import Config, RetentionConfig
from gateway.errors import SpoolError
from gateway.metrics import Metrics
from gateway.spool import erasure
from gateway.spool.audit import Record, person_hash
from gateway.spool.face import Spool
from gateway.spool.sqlite import Dead, SpoolDB
from gateway.testing.braze import FakeBraze
from tests.conftest import MakeConfig, choice, recent
from tests.system.test_end_to_end import StartGateway, fixture, start_gateway  # noqa: F401 - a fixture
from tests.system.test_reliability import fill, small_disk  # noqa: F401 - a fixture

WITHDRAWAL_ID = "3c9d1e4f-7a2b-4c5d-8e6f-0a1b2c3d4e5f"  # consent_withdrawn.json's event id
DAY = 86_400.0


def traced(config: Config, person: str | None, **options: Any) -> list[dict[str, Any]]:
    """What `gateway trace --json` prints, parsed."""
    out = io.StringIO()
    assert trace.command(config, person, as_json=True, out=out, **options) == 0
    return [json.loads(line) for line in out.getvalue().splitlines()]


def webhook(kind: str, entity: dict[str, Any]) -> bytes:
    return json.dumps({"type": kind, "parameters": {"entity": entity}}).encode()


async def test_a_withdrawal_is_traced_end_to_end_with_its_braze_status(
    start_gateway: StartGateway,  # noqa: F811 - the imported fixture
    fake: FakeBraze,
    auth_headers: dict[str, str],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A consent then its withdrawal are traced newest first, with event, rule and Braze status."""
    gw = await start_gateway()
    assert await gw.post(fixture("consent_given.json"), auth_headers) == 202
    await gw.settle()
    assert await gw.post(fixture("consent_withdrawn.json"), auth_headers) == 202
    await gw.settle()
    records = traced(gw.config, "user-123")
    newest = [r for r in records if r["event"]["id"] == WITHDRAWAL_ID]
    email = next(r for r in newest if r["target"] == "email_subscribe")
    assert email["state"] == "unsubscribed"
    assert email["endpoint"] == "/users/track"
    assert email["status"] == 201
    assert email["outcome"] == "delivered"
    assert email["direction"] == "to_braze"
    assert email["event"]["type"] == "event.created"
    assert email["rule"].endswith("email.toml:7")
    assert records[0]["event"]["id"] == WITHDRAWAL_ID  # newest first
    assert any(r["state"] == "opted_in" for r in records[len(newest) :])
    # One event's records, and the text form through the command line.
    assert {r["event"]["id"] for r in traced(gw.config, None, event_id=WITHDRAWAL_ID)} == {
        WITHDRAWAL_ID
    }
    assert traced(gw.config, "user-123", since="2999-01-01") == []
    assert main(["trace", "user-123", "--config", str(tmp_path / "gateway.toml")]) == 0
    text = capsys.readouterr().out
    assert "/users/track email_subscribe=unsubscribed" in text
    assert "201 delivered" in text
    # `-` reads the person from standard input, out of the shell history and `ps`.
    monkeypatch.setattr("sys.stdin", io.StringIO("user-123\n"))
    assert main(["trace", "-", "--config", str(tmp_path / "gateway.toml")]) == 0
    assert capsys.readouterr().out == text
    # The file stores the person only as their keyed hash.
    db = gw.app[SPOOL].db
    people = {row[0] for row in db.db.execute("SELECT person FROM audit")}
    assert people == {person_hash(db.person_key, "user-123")}


async def test_a_dead_lettered_update_is_traced_with_its_reason(
    start_gateway: StartGateway,  # noqa: F811 - the imported fixture
    fake: FakeBraze,
    auth_headers: dict[str, str],
) -> None:
    """An update Braze refuses is traced as dead-lettered, with Braze's status and reason."""
    fake.reject_objects(
        lambda obj: "invalid_user" if obj.get("external_id") == "user-123" else None
    )
    gw = await start_gateway()
    assert await gw.post(fixture("consent_given.json"), auth_headers) == 202
    await gw.settle()
    records = traced(gw.config, "user-123")
    assert records
    assert {r["outcome"] for r in records} == {"dead-lettered"}
    # Braze refuses a request whose every object it refuses: a 400 naming the error type.
    assert all(r["status"] == 400 for r in records)
    assert all(r["detail"].startswith("bad_request:") for r in records)
    assert all("invalid_user" in r["detail"] for r in records)


async def test_a_stale_choice_is_traced_as_stale(
    start_gateway: StartGateway,  # noqa: F811 - the imported fixture
    fake: FakeBraze,
    auth_headers: dict[str, str],
) -> None:
    """A choice older than the one applied is traced as stale, with no request and no status."""
    gw = await start_gateway()
    assert await gw.post(choice("p-1", True, recent(600)), auth_headers) == 202
    await gw.settle()
    assert await gw.post(choice("p-1", False, recent(540)), auth_headers) == 202
    await gw.settle()
    newest = traced(gw.config, "p-1")[0]
    assert newest["outcome"] == "stale"
    assert newest["endpoint"] is None
    assert newest["status"] is None


def test_person_key_keeps_hashes_stable_across_spools(tmp_path: Path) -> None:
    """With [retention] person_key two spools hash a person alike; without, each has its own key."""
    keyed = [SpoolDB(tmp_path / f"k{n}.db", person_key="k3y") for n in range(2)]
    own = [SpoolDB(tmp_path / f"o{n}.db") for n in range(2)]
    assert person_hash(keyed[0].person_key, "x") == person_hash(keyed[1].person_key, "x")
    assert own[0].person_key != own[1].person_key
    again = SpoolDB(tmp_path / "o0.db")
    assert again.person_key == own[0].person_key  # kept in the spool's meta table
    for db in (*keyed, *own, again):
        db.close()


async def test_records_older_than_the_retention_are_pruned(tmp_path: Path) -> None:
    """Audit records, dead letters, applied and sent rows past [retention] go, counted per table."""
    now = [1000 * DAY]
    db = SpoolDB(tmp_path / "spool.db", clock=lambda: now[0])
    db.put_many([(None, "event.created", b"{}"), (None, "event.created", b"{}")])
    first, second = (row.id for row in db.fetch(0, 10))
    old = Record("p", "to_braze", "delivered", now[0] - 10 * DAY)
    sent = [("p", "email_subscribe", "opted_in", now[0] - 10 * DAY)]
    db.ack([first], [("p", "email_subscribe", now[0] - 10 * DAY)], audit=[old], sent=sent)
    db.ack([], dead=[Dead(second, "refused", "p")])
    fresh = Record("p", "to_braze", "delivered", now[0] + 5 * DAY)
    db.ack([], [("q", "email_subscribe", now[0] + 5 * DAY)], audit=[fresh])
    now[0] += 5 * DAY
    metrics = Metrics()
    spool = Spool(db)
    config = RetentionConfig(audit_days=1, bodies_days=1, applied_days=1, batch=1, pause_s=0)
    assert await Retention(spool, config, metrics).run_once() == 4
    assert [e.at for e in db.trail("p")] == [fresh.at]
    assert db.dead_letters() == []
    assert set(db.applied_times(["p", "q"])) == {("q", "email_subscribe")}
    assert db.sent_states(["p"]) == {}
    # The pruned row's time stays as the target's floor: an older choice is still stale.
    assert db.floors == {"email_subscribe": now[0] - 15 * DAY}
    for table in ("audit", "dead_letters", "applied", "sent"):
        value = metrics.registry.get_sample_value(
            "gateway_retention_pruned_total", {"table": table}
        )
        assert value == 1
    await spool.close()


async def test_pruning_applied_rows_lets_no_stale_choice_through(
    start_gateway: StartGateway,  # noqa: F811 - the imported fixture
    fake: FakeBraze,
    auth_headers: dict[str, str],
) -> None:
    """Once an applied row is pruned, a late choice older than it is still refused."""
    gw = await start_gateway()
    given = choice("p-2", True, recent(600), topics="offers")  # sets every target
    assert await gw.post(given, auth_headers) == 202
    await gw.settle()
    spool = gw.app[SPOOL]
    config = RetentionConfig(applied_days=1, pause_s=0)
    await Retention(spool, config, gw.metrics).run_once()
    assert spool.db.applied_times(["p-2"]) == {}
    sent = len(fake.requests)
    assert await gw.post(choice("p-2", False, recent(540)), auth_headers) == 202
    await gw.settle()
    assert len(fake.requests) == sent
    assert fake.users["p-2"].email_subscribe == "opted_in"


async def test_erasure_leaves_no_byte_of_the_person_in_the_spool(
    start_gateway: StartGateway,  # noqa: F811 - the imported fixture
    fake: FakeBraze,
    auth_headers: dict[str, str],
) -> None:
    """After a delivered user.deleted, neither the email nor the external id is in the spool
    file or its WAL, the trail keeps only the erasure, and a late stale retry is refused."""
    person, email = "erase-me-4711", "erase.me@example.org"
    user = {"id": "didomi-u-1", "organization_user_id": person, "metadata": {"email": email}}

    def consent(n: int, enabled: bool) -> bytes:
        return webhook(
            "event.created",
            {
                # Padding first: the person lands on overflow pages, which a delete frees
                # unzeroed under secure_delete=FAST; the scrub must zero them.
                "notes": "x" * 9000,
                "id": f"ev-erase-{n}",
                "updated_at": recent(600 + n),
                "status": "confirmed",
                "user": user,
                "consents": {"purposes": [{"id": "marketing_email", "enabled": enabled}]},
            },
        )

    seen: list[str] = []

    def refuse_first(obj: dict[str, Any]) -> str | None:
        """Braze refuses their first object: a dead letter that names them."""
        if obj.get("external_id") != person:
            return None
        seen.append(person)
        return "invalid" if len(seen) == 1 else None

    fake.reject_objects(refuse_first)
    gw = await start_gateway(didomi={"on_user_deleted": "delete"})
    for n, enabled in ((1, True), (2, False), (3, True)):
        assert await gw.post(consent(n, enabled), auth_headers) == 202
        await gw.settle()
    spool = gw.app[SPOOL]
    assert spool.db.count_dead() == 1
    deleted = webhook(
        "user.deleted",
        {"id": "didomi-u-1", "organization_user_id": person, "metadata": {"email": email}},
    )
    assert await gw.post(deleted, auth_headers) == 202
    await gw.settle()
    assert fake.deleted == [person]
    if isinstance(spool.db, SpoolDB):
        path = spool.db.path
        for name in (path, path.with_name(path.name + "-wal")):
            if name.exists():
                data = name.read_bytes()
                assert person.encode() not in data, name
                assert email.encode() not in data, name
    else:
        # PostgreSQL: no live row of any table names them (old row versions are autovacuum's).
        for table in ("inbox", "dead_letters", "applied", "sent", "audit", "seen", "meta"):
            rows = repr(spool.db.db.execute(f"SELECT * FROM {table}").fetchall())  # noqa: S608
            assert person not in rows, table
            assert email not in rows, table
    assert spool.db.count_dead() == 0
    outcomes = {(r["event"]["type"], r["outcome"]) for r in traced(gw.config, person)}
    assert outcomes == {("user.deleted", "delivered")}
    # A late retry of an old choice is still refused: the erasure is kept under the hash.
    tracked = sum(1 for r in fake.requests if r.path == "/users/track")
    assert await gw.post(consent(4, True), auth_headers) == 202
    await gw.settle()
    assert sum(1 for r in fake.requests if r.path == "/users/track") == tracked
    assert traced(gw.config, person)[0]["outcome"] == "stale"


def test_trace_without_records_says_the_key_may_differ(
    tmp_path: Path, make_config: MakeConfig, capsys: pytest.CaptureFixture[str]
) -> None:
    """An empty trace on a spool's own key warns that a server's person_key would hash apart."""
    config = make_config(tmp_path)
    SpoolDB(config.delivery.spool).close()  # a spool a gateway made, with nobody's records
    assert trace.command(config, "nobody") == 0
    captured = capsys.readouterr()
    assert "0 record(s)" in captured.out
    assert "retention.person_key" in captured.err
    assert "nobody" not in captured.err


def test_a_spool_with_braze_reports_from_before_the_direction_column_keeps_them_for_didomi(
    tmp_path: Path,
) -> None:
    """Braze reports stored before the migration are still fetched for Didomi, never to Braze."""
    path = tmp_path / "old.db"
    old = sqlite3.connect(path)
    old.executescript(
        "CREATE TABLE inbox (id INTEGER PRIMARY KEY AUTOINCREMENT, received_at REAL NOT NULL,"
        " type TEXT NOT NULL, body BLOB NOT NULL);"
        "INSERT INTO inbox(received_at, type, body) VALUES (1.0, 'braze.step', x'7b7d');"
    )
    old.commit()
    old.close()
    db = SpoolDB(path)
    try:
        assert [r.type for r in db.fetch(0, 10, "to_didomi")] == ["braze.step"]
        assert db.fetch(0, 10) == []
    finally:
        db.close()


def test_an_erasure_scrubs_only_rows_that_name_the_person(tmp_path: Path) -> None:
    """Erasing external id 42 leaves another person's report whose body merely contains "42";
    an email is matched without case."""
    db = SpoolDB(tmp_path / "s.db")
    try:
        other = msgspec.json.encode({"external_id": "u-9", "groups": {}, "time": "42"})
        mine = msgspec.json.encode({"external_id": "42", "time": "1"})
        shouty = msgspec.json.encode({"email": "Alice@Example.com", "time": "1"})
        db.put_many([(None, "braze.step", body) for body in (other, mine, shouty)])
        db.ack([], [("42", "erased", 1.0)], erase=["42", "alice@example.com"])
        assert [r.body for r in db.fetch(0, 10, "to_didomi")] == [other]
    finally:
        db.close()


def test_zeroing_goes_on_in_bounded_steps_and_the_wal_after_a_reader(tmp_path: Path) -> None:
    """Freed pages are zeroed a chunk at a time and the WAL truncated once a reader has gone:
    then no byte of the erased person is left in the file or its WAL."""
    path = tmp_path / "s.db"
    db = SpoolDB(path)
    try:
        person = "erase-me-4711"
        db.put_many(
            [(None, "braze.step", msgspec.json.encode({"external_id": person, "time": "1"}))]
        )
        padded = [(None, "event.created", person.encode() + b"x" * 50_000) for _ in range(20)]
        db.put_many(padded)
        db.ack([r.id for r in db.fetch(0, 100)], [])  # freed under FAST: pages keep old bytes
        reader = sqlite3.connect(path)  # a `gateway trace` mid-read
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM audit").fetchone()
        with patch.object(erasure, "FILL_PAGES", 16):
            db.ack([], [], erase=[person])
            assert not db.finish_erasures()  # a reader holds the WAL; zeroing not done either
            reader.rollback()
            reader.close()
            for _ in range(100):
                if db.finish_erasures():
                    break
            else:
                raise AssertionError("the erasure never finished")
        for name in (path, path.with_name(path.name + "-wal")):
            if name.exists():
                assert person.encode() not in name.read_bytes(), name
    finally:
        db.close()


def test_a_spool_refuses_another_person_key_than_it_was_written_with(tmp_path: Path) -> None:
    """Under a new key, erased persons' hashed rows would be unreachable: the spool says so."""
    path = tmp_path / "s.db"
    SpoolDB(path).close()  # hashed with its own random key
    with pytest.raises(SpoolError, match="person_key"):
        SpoolDB(path, person_key="configured-later")
    SpoolDB(path).close()  # still fine without it


EMILE = "\u00c9mile-42"  # an external id with a capital outside ASCII
OZTURK = "\u00f6zt\u00fcrk-7@ex\u00e4mple.org"  # an email address, erased in lower case
OZTURK_SPELLINGS = (
    "\u00d6ZT\u00dcRK-7@EX\u00c4MPLE.ORG",
    "\u00d6zt\u00fcrk-7@Ex\u00e4mple.org",
    "\u00d6ZT\u00dcRK-7@ex\u00e4mple.org",
    OZTURK,
)


def _store(spool_url: str) -> Any:
    from gateway.config.settings import is_postgresql
    from gateway.spool.postgres import PgSpoolDB

    return PgSpoolDB(spool_url) if is_postgresql(spool_url) else SpoolDB(spool_url)


def _left(db: Any, needles: list[bytes]) -> list[bytes]:
    """The needles still found in the spool: its file and WAL, or every table's values."""
    if isinstance(db, SpoolDB):
        path = db.path
        data = b"".join(
            name.read_bytes()
            for name in (path, path.with_name(path.name + "-wal"))
            if name.exists()
        )
    else:
        tables = ("inbox", "dead_letters", "applied", "sent", "audit", "seen", "meta")
        values = [
            value
            for table in tables
            for row in db.db.execute(f"SELECT * FROM {table}").fetchall()  # noqa: S608
            for value in row
        ]
        data = b"\0".join(v if isinstance(v, bytes) else str(v).encode() for v in values)
    return [needle for needle in needles if needle in data]


def test_an_erasure_scrubs_every_spelling_the_gateway_matches_outside_ascii(
    spool_url: str,
) -> None:
    """Erasing "Émile-42" and "öztürk-7@exämple.org" scrubs their pending Braze reports (raw
    UTF-8 or JSON escapes), Didomi webhooks received before, dead letters, applied and sent
    rows and audit, under every case of the email; "émile-42", another external id, stays."""
    db = _store(spool_url)
    try:
        step = msgspec.json.encode({"external_id": EMILE, "time": "1"})  # raw UTF-8
        currents = json.dumps({"user": {"external_user_id": EMILE}}).encode()  # \u00c9mile
        other = json.dumps({"external_id": EMILE.lower(), "time": "1"}, ensure_ascii=False)
        shouty = json.dumps({"email": OZTURK_SPELLINGS[0], "time": "1"}, ensure_ascii=False)
        didomi = webhook(
            "event.created",
            {"id": "ev-1", "user": {"organization_user_id": EMILE}, "status": "confirmed"},
        )
        metadata = {"organization_user_id": "u-7", "metadata": {"email": OZTURK_SPELLINGS[1]}}
        pending = webhook("event.created", {"id": "ev-2", "user": metadata})
        db.put_many(
            [
                (None, "braze.step", step),
                (None, "braze.currents", currents),
                (None, "braze.step", other.encode()),
                (None, "braze.step", shouty.encode()),
                (None, "event.created", didomi),
            ]
        )
        db.put_many([(None, "event.created", pending)])
        db.put_many([(None, "user.deleted", webhook("user.deleted", {"id": "u-del"}))])
        rows = db.fetch(0, 10)
        letter, erasure_row = rows[0].id, rows[-1].id
        assert [r.body for r in rows] == [didomi, pending, rows[-1].body]
        db.ack([], dead=[Dead(letter, "refused", EMILE)])
        spelled = OZTURK_SPELLINGS[2]
        db.ack(
            [],
            [(spelled, "email_subscribe", 1.0)],
            sent=[(spelled, "email_subscribe", "opted_in", 1.0)],
            audit=[Record(spelled, "to_braze", "delivered", 1.0)],
        )
        db.ack([erasure_row], [(OZTURK, "erased", 2.0)], erase=[EMILE, OZTURK])
        if isinstance(db, SpoolDB):
            for _ in range(100):
                if db.finish_erasures():
                    break
            else:
                raise AssertionError("the erasure never finished")
        assert [r.body for r in db.fetch(0, 10, "to_didomi")] == [other.encode()]
        assert db.fetch(0, 10) == []
        assert db.count_dead() == 0
        needles = [s.encode() for s in (EMILE, *OZTURK_SPELLINGS)] + [
            json.dumps(s).encode()[1:-1] for s in (EMILE, *OZTURK_SPELLINGS)
        ]
        assert _left(db, needles) == []
        assert db.trail(spelled) == []
        # Kept under the spelling's hash: a late retry under that spelling is still stale.
        assert db.applied_times([spelled]) == {(spelled, "email_subscribe"): 1.0}
    finally:
        db.close()


def test_an_erasures_acknowledgement_commits_on_a_disk_down_to_its_reserve(
    small_disk: Path,  # noqa: F811 - the imported fixture
) -> None:
    """With megabytes of unzeroed free pages and the disk filled to just above min_free_bytes,
    the erasure's acknowledgement commits, and the zeroing finishes in steps that fit the disk:
    then no byte of the person is left."""
    path = small_disk / "s.db"
    db = SpoolDB(path, min_free_bytes=1024 * 1024)
    person = "erase-me-on-a-full-disk"
    try:
        db.put_many(
            [(None, "braze.step", msgspec.json.encode({"external_id": person, "time": "1"}))]
        )
        for _ in range(12):  # 3.6 MB of their old bodies, the WAL emptied as it grows
            db.put_many([(None, "event.created", person.encode() + b"x" * 100_000)] * 3)
            db.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        db.ack([r.id for r in db.fetch(0, 100)], [])  # freed under FAST: pages keep old bytes
        db.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        assert db.db.execute("PRAGMA freelist_count").fetchone()[0] > 800
        ballast = fill(small_disk)
        os.truncate(ballast, ballast.stat().st_size - 1_300_000)  # 1.3 MB left: the reserve
        db.ack([], [(person, "erased", 1.0)], erase=[person])
        assert db.fetch(0, 10, "to_didomi") == []
        for _ in range(200):
            if db.finish_erasures():
                break
        else:
            raise AssertionError("the zeroing never finished on the nearly full disk")
        assert db.low_on_disk is None
        for name in (path, path.with_name(path.name + "-wal")):
            if name.exists():
                assert person.encode() not in name.read_bytes(), name
    finally:
        db.close()


@contextlib.contextmanager
def warnings_of(name: str) -> Iterator[list[str]]:
    """The WARNING (and above) messages logger `name` emits inside the block."""
    said: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            said.append(record.getMessage())

    logger = logging.getLogger(name)
    handler = Keep(logging.WARNING)
    logger.addHandler(handler)
    try:
        yield said
    finally:
        logger.removeHandler(handler)


async def test_a_choice_older_than_the_retention_floor_is_counted_apart_from_stale(
    start_gateway: StartGateway,  # noqa: F811 - the imported fixture
    fake: FakeBraze,
    auth_headers: dict[str, str],
) -> None:
    """A choice refused only because it is older than what retention pruned is counted under
    `older_than_retention` (metric, audit record, a warning), never folded into `stale`; one a
    person's own later choice beats is still `stale`."""
    gw = await start_gateway()
    assert await gw.post(choice("p-old", True, recent(600), topics="offers"), auth_headers) == 202
    await gw.settle()
    spool = gw.app[SPOOL]
    # applied_days=1: the choice of two days ago is pruned, its time the floor for everyone.
    await Retention(spool, RetentionConfig(applied_days=1, pause_s=0), gw.metrics).run_once()
    assert spool.db.applied_times(["p-old"]) == {}
    assert spool.db.floors
    sent = len(fake.requests)
    with warnings_of("gateway.dispatcher") as said:
        assert await gw.post(choice("p-late", False, recent(540)), auth_headers) == 202
        await gw.settle()
    assert len(fake.requests) == sent
    assert "p-late" not in fake.users

    def skipped(reason: str) -> float:
        return gw.sample("gateway_events_skipped_total", direction="to_braze", reason=reason)

    assert skipped("older_than_retention") == 1
    assert skipped("stale") == 0
    assert {r["outcome"] for r in traced(gw.config, "p-late")} == {"older_than_retention"}
    assert any("retention" in line for line in said), said

    # A person's own newer choice still makes an older one `stale`, above the floor as well.
    assert await gw.post(choice("p-own", True, recent(700)), auth_headers) == 202
    await gw.settle()
    assert await gw.post(choice("p-own", False, recent(650)), auth_headers) == 202
    await gw.settle()
    assert skipped("stale") == 1
    assert skipped("older_than_retention") == 1
    assert "stale" in {r["outcome"] for r in traced(gw.config, "p-own")}
