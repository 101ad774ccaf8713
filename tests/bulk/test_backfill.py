"""gateway backfill: users read, mapped, stored once in the spool lane, delivered behind live."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import io
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec
import pytest
from aiohttp import web

from gateway.bulk.backfill import run
from gateway.config.settings import Config
from gateway.forward.dispatcher import Dispatcher
from gateway.metrics import Metrics
from gateway.peers.braze import open_client
from gateway.rules.mappings import load_rules, options_of
from gateway.spool.backend import open_store
from gateway.spool.face import Spool
from gateway.spool.store import Store
from gateway.testing.braze import FakeBraze
from gateway.testing.didomi import FakeDidomi
from tests.conftest import BRAZE_API_KEY, SECRETS, build_config, choice, write_config
from tests.system.test_reliability import eventually


def iso(when: datetime) -> str:
    """Didomi's date spelling."""
    return when.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def ago(**delta: float) -> str:
    """A date this long before now (fixtures never depend on a fixed calendar date)."""
    return iso(datetime.now(UTC) - timedelta(**delta))


def user(person: str | None, enabled: bool, updated_at: str) -> dict[str, Any]:
    """A Didomi user entity choosing `enabled` on marketing_email."""
    entity: dict[str, Any] = {
        "id": f"didomi-{person}",
        "updated_at": updated_at,
        "consents": {"purposes": [{"id": "marketing_email", "enabled": enabled}]},
    }
    if person is not None:
        entity["organization_user_id"] = person
    return entity


def export(users: list[dict[str, Any]]) -> bytes:
    """Batch-export lines: each user wrapped with its events."""
    return b"".join(msgspec.json.encode({"user": u, "events": []}) + b"\n" for u in users)


def configure(tmp_path: Path, spool_url: str, braze_url: str, **backfill: Any) -> Config:
    """A gateway.toml for these tests: the given spool and Braze, a quick flush."""
    return build_config(
        tmp_path,
        braze={"server": braze_url, "flush_interval_ms": 10},
        delivery={"spool": spool_url, "retry_initial_ms": 10, "retry_max_ms": 100},
        backfill=backfill or None,
    )


@contextlib.asynccontextmanager
async def delivering(config: Config, metrics: Metrics | None = None) -> AsyncIterator[Store]:
    """A dispatcher delivering the spool to Braze, as a running gateway does."""
    db = open_store(config.delivery, config.retention.person_key)
    spool = Spool(db)
    metrics = metrics or Metrics()
    rules = load_rules(config.mappings.dir, options_of(config))
    async with open_client(config.braze, metrics) as client:
        dispatcher = Dispatcher(config, spool, lambda: rules, client, metrics)
        await dispatcher.start()
        try:
            yield db
        finally:
            await dispatcher.stop()
            await spool.close()


async def drained(db: Store, timeout: float = 30.0) -> None:
    """Wait until no backfilled user is left in the spool."""

    async def empty() -> bool:
        return await asyncio.to_thread(db.count_backfill) == 0

    await eventually(empty, timeout, "the backfill lane to drain")


async def test_a_file_is_stored_once_and_delivered_with_counts(
    spool_url: str, tmp_path: Path, fake: FakeBraze
) -> None:
    """Users of an export file reach Braze; no identity and a malformed line are counted and
    skipped; reading the file again stores nobody twice."""
    config = configure(tmp_path, spool_url, fake.url)
    path = tmp_path / "users.json"
    good = [user(f"p{n}", n % 2 == 0, ago(days=3)) for n in range(20)]
    path.write_bytes(export(good[:10]) + b"{oops\n" + export([user(None, True, ago(days=1))]))
    path.write_bytes(path.read_bytes() + export(good[10:]))
    out = io.StringIO()
    assert await run(config, [str(path)], out=out) == 0
    text = out.getvalue()
    assert "22 users read, 20 stored" not in text  # the malformed line is not a user
    assert "21 users read, 20 stored" in text
    assert "1 skipped: no_identity" in text
    assert "users.json:11" in text
    again = io.StringIO()
    assert await run(config, [str(path)], out=again) == 0
    assert "0 stored" in again.getvalue()
    assert "20 already stored before" in again.getvalue()
    async with delivering(config) as db:
        await drained(db)
    sent = {obj["external_id"]: obj["email_subscribe"] for obj in fake.objects_sent()}
    assert sent == {f"p{n}": "opted_in" if n % 2 == 0 else "unsubscribed" for n in range(20)}


async def test_folder_gzip_and_stdin_sources(
    spool_url: str, tmp_path: Path, fake: FakeBraze
) -> None:
    """A folder of .json.gz files laid out as Didomi's batch export and standard input are read
    as Didomi export lines; standard input read again (it has no position to resume from)
    stores nobody twice."""
    config = configure(tmp_path, spool_url, fake.url)
    folder = tmp_path / "export" / "export-id=e1" / f"date={ago()[:10]}" / "users"
    folder.mkdir(parents=True)
    (folder / "_SUCCESS").write_bytes(b"")
    (folder / "a.json.gz").write_bytes(gzip.compress(export([user("g1", True, ago(days=2))])))
    (folder / "b.json.gz").write_bytes(gzip.compress(export([user("g2", True, ago(days=2))])))
    piped = export([user("s1", False, ago(days=2))])
    stdin = io.BytesIO(piped)
    out = io.StringIO()
    assert await run(config, [str(tmp_path / "export"), "-"], out=out, stdin=stdin) == 0
    assert "3 users read, 3 stored" in out.getvalue()
    assert "no _SUCCESS marker" not in out.getvalue()
    again = io.StringIO()
    assert await run(config, ["-"], out=again, stdin=io.BytesIO(piped)) == 0
    assert "1 users read, 0 stored" in again.getvalue()
    assert "1 already stored before" in again.getvalue()


async def test_api_source_reads_every_page(
    spool_url: str, tmp_path: Path, fake: FakeBraze, fake_didomi: FakeDidomi
) -> None:
    """didomi-api reads every user of the organization, page after page."""
    for n in range(230):
        fake_didomi.seed_user(
            f"a{n}", [{"id": "marketing_email", "enabled": True}], updated_at=ago(days=9)
        )
    config = build_config(
        tmp_path,
        braze={"server": fake.url},
        delivery={"spool": spool_url},
        didomi_api={
            "enabled": True,
            "base_url": fake_didomi.url + "/v1",
            "organization_id": fake_didomi.organization_id,
            "key": fake_didomi.key,
            "secret": fake_didomi.secret,
        },
    )
    fake_didomi.fail_next(503, path="/consents/users")
    out = io.StringIO()
    assert await run(config, ["didomi-api"], out=out) == 0
    assert "230 users read, 230 stored" in out.getvalue()


async def test_reading_didomi_api_needs_its_credentials_and_no_other_secret(
    tmp_path: Path, fake_didomi: FakeDidomi, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`gateway backfill didomi-api` needs [didomi_api]'s key and secret (1, naming the missing
    one), never Braze's key nor the webhook routes' secret: it only reads Didomi and stores."""
    from gateway.cli.main import main

    for n in range(3):
        fake_didomi.seed_user(f"b{n}", [{"id": "marketing_email", "enabled": True}])
    api = {
        "base_url": fake_didomi.url + "/v1",
        "organization_id": fake_didomi.organization_id,
        "key": "${DIDOMI_API_KEY}",
        "secret": fake_didomi.secret,
    }
    path = write_config(tmp_path, didomi_api=api)
    for name in ("DIDOMI_CLIENT_SECRET", "BRAZE_API_KEY", "DIDOMI_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    command = ["backfill", "--config", str(path), "didomi-api"]
    assert await asyncio.to_thread(main, command) == 1
    monkeypatch.setenv("DIDOMI_API_KEY", fake_didomi.key)
    assert await asyncio.to_thread(main, command) == 0
    assert fake_didomi.sessions >= 1


async def test_dry_run_stores_nothing_and_says_what_would_change(tmp_path: Path) -> None:
    """--dry-run prints the changes per Braze target and state, and writes no spool."""
    config = configure(tmp_path, str(tmp_path / "spool.db"), "http://127.0.0.1:1")
    path = tmp_path / "u.json"
    path.write_bytes(export([user("d1", True, ago(days=1)), user("d2", False, ago(days=1))]))
    out = io.StringIO()
    assert await run(config, [str(path)], dry_run=True, out=out) == 0
    text = out.getvalue()
    assert "2 would be stored" in text
    # The progress line says so too: nothing it prints may claim a row was stored.
    said = [line.replace("would be stored", "") for line in text.splitlines()]
    claims = [line for line in said if " stored" in line]
    assert claims == []
    assert "email_subscribe: opted_in -> 1" in text
    assert "email_subscribe: unsubscribed -> 1" in text
    assert not (tmp_path / "spool.db").exists()


async def test_a_source_with_no_user_in_any_line_is_an_error(tmp_path: Path) -> None:
    """A file whose every line is malformed (gateway.toml given by mistake) exits 1 saying it
    holds no Didomi user, instead of 0 as if a backfill of nobody had succeeded."""
    config = configure(tmp_path, str(tmp_path / "spool.db"), "http://127.0.0.1:1")
    wrong = tmp_path / "gateway.toml"
    for dry_run in (True, False):
        out = io.StringIO()
        assert await run(config, [str(wrong)], dry_run=dry_run, out=out) == 1
        assert "no line of the source is a Didomi user" in out.getvalue()
    good = tmp_path / "u.json"
    good.write_bytes(export([user("d1", True, ago(days=1))]) + b"{not json\n")
    assert await run(config, [str(good)], dry_run=True, out=io.StringIO()) == 0


async def test_a_three_year_old_status_passes_the_retention_floor(
    spool_url: str, tmp_path: Path, fake: FakeBraze
) -> None:
    """A snapshot three years old reaches Braze although the retention floor (pruned applied
    times) refuses a live choice that old, since nothing newer is known of that person."""
    config = configure(tmp_path, spool_url, fake.url)
    db = open_store(config.delivery, config.retention.person_key)
    floor = (datetime.now(UTC) - timedelta(days=30)).timestamp()
    db._tx(  # type: ignore[attr-defined]
        lambda c: c.execute(
            "INSERT INTO floors(target, at) VALUES (?, ?), (?, ?)",
            ("email_subscribe", floor, "attr:consent_marketing", floor),
        )
    )
    old = ago(days=3 * 365)
    db.put_many([(None, "event.created", choice("live-old", True, old), "live-old")])
    db.close()
    path = tmp_path / "u.json"
    path.write_bytes(export([user("old-person", True, old)]))
    assert await run(config, [str(path)], out=io.StringIO()) == 0
    async with delivering(config) as db:
        await drained(db)
        await eventually(lambda: _true(db.count_pending() == 0), 20, "the live row to settle")
    sent = {obj["external_id"] for obj in fake.objects_sent()}
    assert "old-person" in sent
    assert "live-old" not in sent  # the floor still refuses an old live choice


async def _true(value: bool) -> bool:
    return value


@pytest.mark.parametrize("live_first", [True, False])
async def test_a_newer_live_choice_wins_whichever_arrives_first(
    spool_url: str, tmp_path: Path, fake: FakeBraze, live_first: bool
) -> None:
    """A live webhook newer than the snapshot decides Braze's state, whether it is delivered
    before the backfilled user or after it."""
    config = configure(tmp_path, spool_url, fake.url)
    path = tmp_path / "u.json"
    path.write_bytes(export([user("racer", True, ago(days=10))]))
    live = choice("racer", False, ago(days=1))
    if live_first:
        db = open_store(config.delivery, config.retention.person_key)
        db.put_many([(None, "event.created", live, "racer")])
        db.close()
        async with delivering(config) as db:
            await eventually(lambda: _true(db.count_pending() == 0), 20, "the live choice")
        assert await run(config, [str(path)], out=io.StringIO()) == 0
        async with delivering(config) as db:
            await drained(db)
    else:
        assert await run(config, [str(path)], out=io.StringIO()) == 0
        async with delivering(config) as db:
            await drained(db)
            db.put_many([(None, "event.created", live, "racer")])
            await eventually(lambda: _true(db.count_pending() == 0), 20, "the live choice")
    assert fake.user_state("racer")["email_subscribe"] == "unsubscribed"  # type: ignore[index]


def _cli(config_path: Path, *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "gateway", "backfill", *args, "--config", str(config_path)],
        env={**os.environ, **SECRETS},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        cwd=config_path.parent,
    )


async def test_kill_9_of_the_command_then_rerun_stores_everyone_exactly_once(
    spool_url: str, tmp_path: Path
) -> None:
    """After kill -9 of `gateway backfill` mid-file, the same command goes on where it stopped:
    every user stored once, and the counts equal those of one uninterrupted run."""
    total = 30_000
    config = configure(
        tmp_path, spool_url, "http://127.0.0.1:1", users_per_transaction=500, max_pending=1_000_000
    )
    path = tmp_path / "users.json.gz"
    path.write_bytes(
        gzip.compress(export([user(f"k{n}", True, ago(days=5)) for n in range(total)]))
    )
    db = open_store(config.delivery, config.retention.person_key)
    try:
        proc = _cli(tmp_path / "gateway.toml", str(path))

        async def some() -> bool:
            return db.count_backfill() >= 2_000

        await eventually(some, 60, "the first batches to be stored", every=0.01)
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=10)
        assert db.count_backfill() < total  # it was stopped mid-file
        again = _cli(tmp_path / "gateway.toml", str(path))
        output = again.communicate(timeout=120)[0].decode()
        assert again.returncode == 0, output
        assert "going on after" in output
        assert f"{total:,} users read, {total:,} stored" in output
        assert db.count_backfill() == total
        bodies = [row.body for row in db.fetch_backfill(0, total + 10)]
        persons = [
            msgspec.json.decode(b)["parameters"]["new_entity"]["organization_user_id"]
            for b in bodies
        ]
        assert len(set(persons)) == len(persons) == total
    finally:
        db.close()


async def test_wait_exits_2_when_no_gateway_delivers(tmp_path: Path) -> None:
    """--wait gives up with exit 2 when the lane does not move and no gateway holds the spool."""
    config = configure(tmp_path, str(tmp_path / "spool.db"), "http://127.0.0.1:1")
    path = tmp_path / "u.json"
    path.write_bytes(export([user("w1", True, ago(days=1))]))
    out = io.StringIO()
    assert await run(config, [str(path)], wait=True, out=out, stall_s=0.5) == 2
    assert "no gateway delivers" in out.getvalue()


async def test_kill_9_of_the_gateway_mid_backfill_loses_nobody(
    tmp_path: Path, fake: FakeBraze, processes: list[Any]
) -> None:
    """A gateway killed with kill -9 while it delivers the lane delivers the rest after its
    restart: every backfilled user reaches Braze and the lane ends empty."""
    from tests.conftest import free_port
    from tests.system.test_reliability import GatewayProcess

    braze = fake
    braze.latency_s = 0.05
    if True:
        port = free_port()
        config = build_config(
            tmp_path,
            server={"host": "127.0.0.1", "port": port},
            braze={"server": braze.url, "flush_interval_ms": 10, "batch_size": 10},
            delivery={"spool": str(tmp_path / "spool.db")},
        )
        total = 600
        path = tmp_path / "u.json"
        path.write_bytes(export([user(f"g{n}", True, ago(days=4)) for n in range(total)]))
        assert await run(config, [str(path)], out=io.StringIO()) == 0
        gateway = GatewayProcess(tmp_path, port, SECRETS)
        processes.append(gateway)
        try:
            await gateway.start()
            await eventually(
                lambda: _true(len(braze.objects_sent()) >= 50), 30, "some users delivered"
            )
            await gateway.kill()
            db = open_store(config.delivery, config.retention.person_key)
            assert db.count_backfill() > 0  # killed mid-lane
            db.close()
            await gateway.start()
            db = open_store(config.delivery, config.retention.person_key)
            try:
                await drained(db, timeout=60)
            finally:
                db.close()
        finally:
            if gateway.proc is not None and gateway.proc.returncode is None:
                await gateway.stop()
    assert {obj["external_id"] for obj in braze.objects_sent()} == {f"g{n}" for n in range(total)}


async def test_the_lane_has_its_own_metrics_and_stays_out_of_live_pending(
    spool_url: str, tmp_path: Path, fake: FakeBraze
) -> None:
    """Backfilled users count in gateway_backfill_pending, not in the live backlog (whose alert
    must not fire for a backfill), and gateway_backfill_users_total counts them delivered."""
    config = configure(tmp_path, spool_url, fake.url)
    path = tmp_path / "u.json"
    path.write_bytes(export([user(f"m{n}", True, ago(days=2)) for n in range(30)]))
    assert await run(config, [str(path)], out=io.StringIO()) == 0
    db = open_store(config.delivery, config.retention.person_key)
    assert db.pending_of("to_braze") == 0
    assert db.count_backfill() == 30
    db.close()
    metrics = Metrics()
    async with delivering(config, metrics) as db:
        await drained(db)

        async def counted() -> bool:
            done = metrics.registry.get_sample_value(
                "gateway_backfill_users_total", {"outcome": "delivered"}
            )
            return done == 30

        await eventually(counted, 20, "30 backfilled users counted as delivered")


def _lane_row(person: str, updated_at: str) -> tuple[str, bytes, str]:
    """One lane row as the command stores it: (dedupe key, body, person)."""
    body = msgspec.json.encode(
        {"type": "user.updated", "parameters": {"new_entity": user(person, True, updated_at)}}
    )
    return f"backfill|{person}|{updated_at}", body, person


def test_an_erasure_scrubs_the_persons_backfilled_snapshot(tmp_path: Path, spool_url: str) -> None:
    """A backfilled snapshot of a person waiting in the lane is deleted with the rest of their
    data when their erasure is acknowledged: no byte of them waits for delivery."""
    config = configure(tmp_path, spool_url, "http://127.0.0.1:9")
    store = open_store(config.delivery, config.retention.person_key)
    try:
        store.put_backfill(
            [_lane_row("erase-me-77", ago(days=900)), _lane_row("keep-me-78", ago(days=900))],
            "file:x",
            "1",
            {},
        )
        deletion = msgspec.json.encode(
            {"type": "user.deleted", "parameters": {"entity": user("erase-me-77", False, ago())}}
        )
        store.put_many([(None, "user.deleted", deletion)])
        live = store.fetch(0, 10)
        store.ack([r.id for r in live], [("erase-me-77", "erased", 1.0)], erase=["erase-me-77"])
        left = store.fetch_backfill(0, 10)
        assert [b"erase-me-77" in row.body for row in left] == [False]
        assert b"keep-me-78" in left[0].body
    finally:
        store.close()


def test_a_replayed_backfilled_user_goes_back_to_its_lane(tmp_path: Path, spool_url: str) -> None:
    """A backfilled user dead-lettered (after a long outage, say) and replayed returns to the
    backfill lane, where the retention floor does not refuse an old snapshot, not to live."""
    from gateway.spool.store import Dead

    config = configure(tmp_path, spool_url, "http://127.0.0.1:9")
    store = open_store(config.delivery, config.retention.person_key)
    try:
        store.put_backfill([_lane_row("old-79", ago(days=1100))], "file:x", "1", {})
        (row,) = store.fetch_backfill(0, 10)
        store.ack([], dead=[Dead(row.id, "gave_up: an outage", "old-79")])
        assert store.fetch_backfill(0, 10) == []
        assert store.replay() == 1
        assert store.fetch(0, 10) == []
        (back,) = store.fetch_backfill(0, 10)
        assert back.backfill
        assert back.body == row.body
        assert back.received_at == row.received_at
    finally:
        store.close()


async def test_a_spool_error_reading_the_lane_loses_no_backfilled_user(
    spool_url: str, tmp_path: Path, fake: FakeBraze, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Reading the lane fails twice (a spool error): its users stay in the spool, none is held
    in memory, and every one reaches Braze once the spool reads again."""
    from gateway.errors import SpoolError

    config = configure(tmp_path, spool_url, fake.url)
    path = tmp_path / "users.json"
    path.write_bytes(export([user(f"q{n}", True, ago(days=3)) for n in range(30)]))
    assert await run(config, [str(path)], out=io.StringIO()) == 0
    failures = 2
    async with delivering(config) as db:
        real = db.fetch_backfill

        def flaky(after_id: int, limit: int) -> Any:
            nonlocal failures
            if failures:
                failures -= 1
                raise SpoolError("the lane cannot be read (injected)")
            return real(after_id, limit)

        monkeypatch.setattr(db, "fetch_backfill", flaky)
        await drained(db)
    assert failures == 0
    assert {obj["external_id"] for obj in fake.objects_sent()} == {f"q{n}" for n in range(30)}


class HoldingBraze(FakeBraze):
    """A fake Braze that holds the first request naming `person` until `release` is set."""

    def __init__(self, person: str) -> None:
        super().__init__(api_key=BRAZE_API_KEY)
        self.person = person.encode()
        self.release = asyncio.Event()
        self.held = asyncio.Event()

    async def _serve(self, apply: Any, request: web.Request) -> web.Response:
        raw = await request.read()  # aiohttp keeps it: the fake reads it again
        if b'"%s"' % self.person in raw and not self.held.is_set():
            self.held.set()
            await self.release.wait()
        return await super()._serve(apply, request)


def _lane_count(metrics: Metrics, outcome: str) -> float:
    return (
        metrics.registry.get_sample_value("gateway_backfill_users_total", {"outcome": outcome})
        or 0.0
    )


async def test_a_live_choice_acknowledged_after_the_lanes_stale_read_still_wins(
    spool_url: str, tmp_path: Path
) -> None:
    """The lane's page reads its persons' applied times ahead; a newer live choice of one of
    them acknowledged after that read (its request was at Braze) still makes the backfilled
    snapshot stale: the read-ahead is not used for a person acked since."""
    braze = HoldingBraze("racer")
    await braze.start()
    try:
        config = build_config(
            tmp_path,
            braze={"server": braze.url, "flush_interval_ms": 10, "timeout_s": 60},
            delivery={"spool": spool_url, "retry_initial_ms": 10, "retry_max_ms": 100},
        )
        path = tmp_path / "u.json"
        others = [user(f"o{n}", True, ago(days=5)) for n in range(10)]
        path.write_bytes(export([user("racer", True, ago(days=10)), *others]))
        metrics = Metrics()
        async with delivering(config, metrics) as db:
            db.put_many([(None, "event.created", choice("racer", False, ago(days=1)), "racer")])
            await asyncio.wait_for(braze.held.wait(), 20)  # the live choice is at Braze
            assert await run(config, [str(path)], out=io.StringIO()) == 0

            async def others_sent() -> bool:
                sent = {obj["external_id"] for obj in braze.objects_sent()}
                return {f"o{n}" for n in range(10)} <= sent

            # The lane's page (racer with it) was read, and its applied times with it.
            await eventually(others_sent, 20, "the other backfilled users at Braze")
            braze.release.set()
            await drained(db)
            await eventually(lambda: _true(db.count_pending() == 0), 20, "the live choice")
        assert braze.user_state("racer")["email_subscribe"] == "unsubscribed"  # type: ignore[index]
        assert _lane_count(metrics, "stale") == 1
        assert [o["external_id"] for o in braze.objects_sent()].count("racer") == 1
    finally:
        await braze.stop()


@pytest.mark.parametrize("read_ahead_fails", [False, True])
async def test_a_live_choice_acknowledged_before_the_lane_is_read_wins(
    spool_url: str,
    tmp_path: Path,
    fake: FakeBraze,
    read_ahead_fails: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A newer live choice delivered before `gateway backfill` stores the person's snapshot,
    to the same running gateway, makes the snapshot stale: through the page's read-ahead, or,
    when that read fails, through the read before the request (every user is still delivered)."""
    from gateway.errors import SpoolError

    config = configure(tmp_path, spool_url, fake.url)
    path = tmp_path / "u.json"
    others = [user(f"o{n}", True, ago(days=5)) for n in range(10)]
    path.write_bytes(export([user("racer", True, ago(days=10)), *others]))
    metrics = Metrics()
    async with delivering(config, metrics) as db:
        db.put_many([(None, "event.created", choice("racer", False, ago(days=1)), "racer")])
        await eventually(lambda: _true(db.count_pending() == 0), 20, "the live choice")
        if read_ahead_fails:
            real = db.applied_times
            failures = 1

            def flaky(persons: Any) -> Any:
                nonlocal failures
                persons = list(persons)
                if failures and len(persons) == 11:  # the lane's page: racer and the others
                    failures -= 1
                    raise SpoolError("the applied times cannot be read (injected)")
                return real(persons)

            monkeypatch.setattr(db, "applied_times", flaky)
        assert await run(config, [str(path)], out=io.StringIO()) == 0
        await drained(db)
        if read_ahead_fails:
            assert failures == 0
    assert fake.user_state("racer")["email_subscribe"] == "unsubscribed"  # type: ignore[index]
    assert _lane_count(metrics, "stale") == 1
    assert {o["external_id"] for o in fake.objects_sent()} >= {f"o{n}" for n in range(10)}


async def test_users_stored_while_the_gateway_runs_are_found_without_the_gauges(
    spool_url: str, tmp_path: Path, fake: FakeBraze, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An empty lane is looked at again within a second, not at the gauges' next recount:
    users `gateway backfill` stores beside a running gateway are delivered at once."""
    from gateway.delivery import worker
    from gateway.forward import pages

    monkeypatch.setattr(worker, "RECOUNT_S", 600.0)
    monkeypatch.setattr(pages, "RECOUNT_S", 600.0)
    config = configure(tmp_path, spool_url, fake.url)
    path = tmp_path / "u.json"
    path.write_bytes(export([user(f"n{n}", True, ago(days=2)) for n in range(20)]))
    async with delivering(config) as db:
        await asyncio.sleep(0.5)  # the lane was read once, empty
        assert await run(config, [str(path)], out=io.StringIO()) == 0
        await drained(db, timeout=30)


async def test_the_command_queues_its_commits_on_the_spools_write_turns(
    tmp_path: Path, fake: FakeBraze
) -> None:
    """`gateway backfill` takes the SQLite spool's write turns as the gateway does (woken when
    the other commits, not after SQLite's busy sleeps): while they are held it stores nobody,
    and it stores everyone once they are free."""
    from gateway.spool.lock import WriteTurns

    spool = tmp_path / "var" / "gateway.db"
    config = configure(tmp_path, str(spool), fake.url)
    open_store(config.delivery, config.retention.person_key).close()
    path = tmp_path / "u.json"
    path.write_bytes(export([user(f"t{n}", True, ago(days=2)) for n in range(20)]))
    turns = WriteTurns(spool, timeout_s=10.0)
    turns.__enter__()
    try:
        command = asyncio.create_task(run(config, [str(path)], out=io.StringIO()))
        await asyncio.sleep(1.0)
        assert not command.done()
    finally:
        turns.__exit__()
        turns.close()
    assert await asyncio.wait_for(command, 30) == 0
    db = open_store(config.delivery, config.retention.person_key)
    try:
        assert db.count_backfill() == 20
    finally:
        db.close()
