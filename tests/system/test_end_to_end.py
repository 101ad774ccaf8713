"""Live operations through the real HTTP server and a fake Braze: the whole chain, end to end.

Didomi -> POST /webhooks/didomi -> spool -> mapping -> dispatcher -> fake Braze, with the
delivery context that `gateway run` uses (reloads included).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient

from gateway.app.reload import LiveRules
from gateway.app.server import DISPATCHER, RULES, SPOOL, WRITEBACK, create_app, delivery
from gateway.config.settings import Config
from gateway.metrics import Metrics
from gateway.testing.braze import FakeBraze
from tests.conftest import SECRETS, Elsewhere, MakeConfig, choice, free_port, recent, write_config

ROOT = Path(__file__).resolve().parents[2]
EVENTS = ROOT / "tests" / "events"
NEWS = "3b0a6f8e-5c1d-4e2f-9a7b-0c1d2e3f4a5b"
OFFERS = "7c1e2d3f-4a5b-4c6d-8e9f-0a1b2c3d4e5f"


def fixture(name: str) -> bytes:
    return (EVENTS / name).read_bytes()


class Gateway:
    """A running gateway app (with delivery) and the test client that talks to it."""

    def __init__(self, client: TestClient[Any, Any], config: Config, metrics: Metrics) -> None:
        self.client = client
        self.config = config
        self.metrics = metrics

    @property
    def app(self) -> Any:
        return self.client.app

    async def post(self, body: bytes, headers: dict[str, str]) -> int:
        response = await self.client.post("/webhooks/didomi", data=body, headers=headers)
        return response.status

    async def settle(self, timeout: float = 15.0) -> None:
        """Wait until the spool is empty and delivery (both ways, if on) has nothing in flight."""
        deadline = time.monotonic() + timeout
        spool, dispatcher = self.app[SPOOL], self.app[DISPATCHER]
        writeback = self.app.get(WRITEBACK)
        while time.monotonic() < deadline:
            idle = dispatcher.idle and (writeback is None or writeback.idle)
            if spool.db.count_pending() == 0 and idle:
                return
            await asyncio.sleep(0.02)
        raise AssertionError(f"not settled: {spool.db.count_pending()} pending")

    def sample(self, name: str, **labels: str) -> float:
        return self.metrics.registry.get_sample_value(name, labels or None) or 0.0


StartGateway = Callable[..., Awaitable[Gateway]]


@pytest.fixture
def start_gateway(
    aiohttp_client: Any,
    make_config: MakeConfig,
    tmp_path: Path,
    fake: FakeBraze,
    monkeypatch: pytest.MonkeyPatch,
    spool_url: str,
) -> StartGateway:
    """`await start_gateway(**sections)`: a gateway delivering to the fake Braze, once per
    spool backend (a SQLite file, a PostgreSQL database)."""
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)  # reloads read the environment, as `gateway run` does

    async def start(directory: Path | None = None, **sections: Any) -> Gateway:
        braze = {"server": fake.url, "flush_interval_ms": 20, **sections.pop("braze", {})}
        delivery_cfg = {
            "retry_initial_ms": 10,
            "retry_max_ms": 100,
            "spool": spool_url,
            **sections.pop("delivery", {}),
        }
        config = make_config(directory or tmp_path, braze=braze, delivery=delivery_cfg, **sections)
        metrics = Metrics()
        live = LiveRules.load(config, metrics, (directory or tmp_path) / "gateway.toml")
        app = create_app(config, metrics=metrics, contexts=[delivery(live)])
        return Gateway(await aiohttp_client(app), config, metrics)

    return start


async def test_a_choice_flows_from_didomi_to_braze(
    start_gateway: StartGateway, fake: FakeBraze, auth_headers: dict[str, str]
) -> None:
    """A consent given in Didomi ends as opted_in plus the chosen groups in Braze."""
    gw = await start_gateway()
    assert await gw.post(fixture("consent_given.json"), auth_headers) == 202
    await gw.settle()
    user = fake.users["user-123"]
    assert user.email_subscribe == "opted_in"
    assert user.subscription_groups == {NEWS: "subscribed", OFFERS: "subscribed"}
    assert user.attributes == {"consent_marketing": True}


async def test_double_opt_in_holds_until_confirmed(
    start_gateway: StartGateway, fake: FakeBraze, auth_headers: dict[str, str]
) -> None:
    """A pending_approval event is stored but not applied; the confirming event.updated is."""
    gw = await start_gateway()
    assert await gw.post(fixture("event_pending.json"), auth_headers) == 202
    await gw.settle()
    assert fake.requests == []
    assert (
        gw.sample("gateway_events_skipped_total", direction="to_braze", reason="not_confirmed") == 1
    )
    assert await gw.post(fixture("event_updated_confirmed.json"), auth_headers) == 202
    await gw.settle()
    assert fake.users["user-456"].email_subscribe == "opted_in"
    assert fake.users["user-456"].subscription_groups[NEWS] == "subscribed"


async def test_other_regulations_are_counted_and_ignored(
    start_gateway: StartGateway, fake: FakeBraze, auth_headers: dict[str, str]
) -> None:
    """With the default regulations (gdpr), a CPRA event changes nothing and is counted."""
    gw = await start_gateway()
    assert await gw.post(fixture("cpra_event.json"), auth_headers) == 202
    await gw.settle()
    assert fake.requests == []
    assert gw.sample("gateway_events_skipped_total", direction="to_braze", reason="regulation") == 1


async def test_listed_regulations_are_applied(
    start_gateway: StartGateway, fake: FakeBraze, auth_headers: dict[str, str]
) -> None:
    """Listing cpra in didomi.regulations applies CPRA events too."""
    gw = await start_gateway(didomi={"regulations": ["gdpr", "cpra"]})
    assert await gw.post(fixture("cpra_event.json"), auth_headers) == 202
    await gw.settle()
    assert fake.users["user-321"].email_subscribe == "opted_in"


async def test_shuffled_deliveries_end_in_each_persons_latest_choice(
    start_gateway: StartGateway, fake: FakeBraze, auth_headers: dict[str, str]
) -> None:
    """Didomi's out-of-order retries, shuffled, leave every person at their latest choice."""
    rng = random.Random(11)
    bodies, expected = [], {}
    for person in (f"p{i}" for i in range(15)):
        times = [recent(600 + m) for m in range(8)]
        picks = [rng.random() < 0.5 for _ in times]
        expected[person] = "opted_in" if picks[-1] else "unsubscribed"
        bodies += [choice(person, enabled, at) for at, enabled in zip(times, picks, strict=True)]
    rng.shuffle(bodies)
    gw = await start_gateway(braze={"batch_size": 5, "flush_interval_ms": 5})
    for body in bodies:
        assert await gw.post(body, auth_headers) == 202
        await asyncio.sleep(0.002)  # spread arrivals over several batches
    await gw.settle()
    assert {p: u.email_subscribe for p, u in fake.users.items()} == expected


async def test_applied_times_survive_a_restart(
    start_gateway: StartGateway, fake: FakeBraze, auth_headers: dict[str, str], tmp_path: Path
) -> None:
    """After a restart on the same spool, an older choice still loses to the one applied."""
    gw = await start_gateway()
    # Recent dates: the restarted gateway's prune pass must leave rex's applied time in place.
    assert await gw.post(choice("rex", False, recent(12 * 60)), auth_headers) == 202
    await gw.settle()
    await gw.client.close()
    again = await start_gateway()
    assert await again.post(choice("rex", True, recent(11 * 60)), auth_headers) == 202
    await again.settle()
    assert again.sample("gateway_events_skipped_total", direction="to_braze", reason="stale") == 1
    assert fake.users["rex"].email_subscribe == "unsubscribed"
    assert len(fake.objects_sent()) == 1


async def test_upsert_mode_creates_people_braze_does_not_know(
    start_gateway: StartGateway, fake: FakeBraze, auth_headers: dict[str, str]
) -> None:
    """update_existing_only = false sends _update_existing_only: false and creates the user."""
    fake.known_users = {"someone-else"}
    gw = await start_gateway(braze={"update_existing_only": False})
    assert await gw.post(fixture("consent_given.json"), auth_headers) == 202
    await gw.settle()
    assert fake.objects_sent()[0]["_update_existing_only"] is False
    assert fake.users["user-123"].email_subscribe == "opted_in"


async def test_update_existing_only_leaves_unknown_people_alone(
    start_gateway: StartGateway, fake: FakeBraze, auth_headers: dict[str, str]
) -> None:
    """The default update_existing_only = true never creates a person Braze does not know."""
    fake.known_users = {"someone-else"}
    gw = await start_gateway()
    assert await gw.post(fixture("consent_given.json"), auth_headers) == 202
    await gw.settle()
    assert fake.objects_sent()[0]["_update_existing_only"] is True
    assert "user-123" not in fake.users


async def test_erasure_deletes_the_braze_user_once(
    start_gateway: StartGateway, fake: FakeBraze, auth_headers: dict[str, str]
) -> None:
    """on_user_deleted = "delete": a user.deleted (even delivered twice) deletes them once."""
    gw = await start_gateway(didomi={"on_user_deleted": "delete"})
    assert await gw.post(fixture("user_created.json"), auth_headers) == 202
    await gw.settle()
    assert await gw.post(fixture("user_deleted.json"), auth_headers) == 202
    assert await gw.post(fixture("user_deleted.json"), auth_headers) == 200  # duplicate
    await gw.settle()
    assert fake.deleted == ["user-789"]
    assert [r.body for r in fake.requests if r.path == "/users/delete"] == [
        {"external_ids": ["user-789"]}
    ]


async def test_erasure_unsubscribe_mode(
    start_gateway: StartGateway, fake: FakeBraze, auth_headers: dict[str, str]
) -> None:
    """on_user_deleted = "unsubscribe": the person keeps a profile but gets no more email."""
    gw = await start_gateway(didomi={"on_user_deleted": "unsubscribe"})
    assert await gw.post(fixture("user_created.json"), auth_headers) == 202
    assert await gw.post(fixture("user_deleted.json"), auth_headers) == 202
    await gw.settle()
    user = fake.users["user-789"]
    assert user.email_subscribe == "unsubscribed"
    assert set(user.subscription_groups.values()) == {"unsubscribed"}
    assert fake.deleted == []


ATTRIBUTE_RULE = '\n[[map]]\nto = "attribute:newsletter_ok"\npurpose = "marketing_email"\n'


async def test_reload_swaps_rules_and_a_bad_edit_keeps_the_last_good(
    start_gateway: StartGateway, fake: FakeBraze, auth_headers: dict[str, str], tmp_path: Path
) -> None:
    """A good edit is applied on reload; a bad one is refused, counted, and the old rules run."""
    gw = await start_gateway()
    live: LiveRules = gw.app[RULES]
    mapping = tmp_path / "mappings" / "email.toml"
    mapping.write_text(mapping.read_text() + ATTRIBUTE_RULE)
    assert await live.reload_async() is True
    assert gw.sample("gateway_config_reloads_total", outcome="success") == 1
    assert await gw.post(choice("sam", True, recent(540)), auth_headers) == 202
    await gw.settle()
    assert fake.users["sam"].attributes["newsletter_ok"] is True

    good = live.current()
    mapping.write_text(mapping.read_text() + '\n[[map]]\nto = "SOMETIMES"\npurpose = "x"\n')
    assert await live.reload_async() is False
    assert live.current() is good
    assert gw.sample("gateway_config_reloads_total", outcome="error") == 1
    assert await gw.post(choice("tia", True, recent(540)), auth_headers) == 202
    await gw.settle()
    assert fake.users["tia"].attributes["newsletter_ok"] is True


async def test_watch_reloads_when_a_mapping_file_changes(
    start_gateway: StartGateway, fake: FakeBraze, auth_headers: dict[str, str], tmp_path: Path
) -> None:
    """With mappings.watch = true, saving a mapping file reloads the rules without a signal."""
    gw = await start_gateway(mappings={"watch": True})
    mapping = tmp_path / "mappings" / "email.toml"
    mapping.write_text(mapping.read_text() + ATTRIBUTE_RULE)
    deadline = time.monotonic() + 10
    while gw.sample("gateway_config_reloads_total", outcome="success") < 1:
        assert time.monotonic() < deadline, "the watcher did not reload"
        await asyncio.sleep(0.1)
    assert await gw.post(choice("uma", True, recent(540)), auth_headers) == 202
    await gw.settle()
    assert fake.users["uma"].attributes["newsletter_ok"] is True


async def test_reload_fixes_a_wrong_braze_key_without_dead_letters(
    start_gateway: StartGateway, fake: FakeBraze, auth_headers: dict[str, str], tmp_path: Path
) -> None:
    """While Braze refuses the key, updates wait and readiness (still 200) says why; a reload
    fixes it."""
    gw = await start_gateway(braze={"api_key": "the-wrong-key"})
    assert await gw.post(fixture("consent_given.json"), auth_headers) == 202
    deadline = time.monotonic() + 10
    while "degraded" not in (body := await (await gw.client.get("/readyz")).json()):
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    assert "401" in body["degraded"]
    assert await gw.post(fixture("consent_withdrawn.json"), auth_headers) == 202
    config_path = tmp_path / "gateway.toml"
    config_path.write_text(config_path.read_text().replace("the-wrong-key", "${BRAZE_API_KEY}"))
    assert await gw.app[RULES].reload_async() is True
    await gw.settle()
    assert await (await gw.client.get("/readyz")).json() == {"status": "ready"}
    assert fake.users["user-123"].email_subscribe == "unsubscribed"  # the later withdrawal
    assert gw.app[SPOOL].db.count_dead() == 0


@pytest.mark.parametrize("status", [404, 405, 301, 307, 308])
async def test_a_wrong_braze_server_holds_every_update_and_follows_no_redirect(
    status: int,
    start_gateway: StartGateway,
    fake: FakeBraze,
    elsewhere: Elsewhere,
    auth_headers: dict[str, str],
) -> None:
    """A 404, 405 or redirect from Braze keeps every update in the spool, dead-letters none and
    calls no redirect target; once Braze answers normally again, everything is delivered."""
    fake.fail_next(status, count=10_000, headers={"Location": elsewhere.url("/users/track")})
    gw = await start_gateway()
    people = {"wes": True, "xia": False, "yul": True}
    for person, enabled in people.items():
        assert await gw.post(choice(person, enabled, recent(540)), auth_headers) == 202

    spool = gw.app[SPOOL].db
    deadline = time.monotonic() + 10
    while sum(r.status == status for r in fake.requests) < 3:  # retried, not given up on
        assert spool.count_dead() == 0, f"a {status} dead-lettered updates"
        assert elsewhere.hits == [], f"the {status} was followed"
        assert time.monotonic() < deadline, f"Braze was not asked again after a {status}"
        await asyncio.sleep(0.02)
    assert (spool.count_pending(), spool.count_dead()) == (3, 0)
    assert elsewhere.hits == []
    assert fake.users == {}

    fake.heal()
    await gw.settle()
    assert spool.count_dead() == 0
    assert {p: fake.users[p].email_subscribe for p in people} == {
        p: "opted_in" if enabled else "unsubscribed" for p, enabled in people.items()
    }
    assert elsewhere.hits == []


@pytest.mark.slow
def test_sighup_reloads_a_running_gateway(tmp_path: Path, secrets_env: dict[str, str]) -> None:
    """`kill -HUP` makes `gateway run` reload its mappings, which /metrics then counts."""
    port = free_port()
    path = write_config(tmp_path, server={"host": "127.0.0.1", "port": port})
    env = {**os.environ, **secrets_env}
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "run", "--config", str(path), "--log-format", "json"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )

    async def metric() -> float:
        async with aiohttp.ClientSession() as session:
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                try:
                    async with session.get(f"http://127.0.0.1:{port}/metrics") as response:
                        text = await response.text()
                    for line in text.splitlines():
                        name = 'gateway_config_reloads_total{outcome="success"}'
                        if line.startswith(name) and float(line.split()[-1]) >= 1:
                            return 1.0
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.1)
        return 0.0

    async def ready() -> None:
        async with aiohttp.ClientSession() as session:
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                try:
                    async with session.get(f"http://127.0.0.1:{port}/readyz") as response:
                        if response.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.1)
            raise AssertionError("the gateway never became ready")

    try:
        asyncio.run(ready())
        proc.send_signal(signal.SIGHUP)
        assert asyncio.run(metric()) == 1.0
    finally:
        proc.terminate()
        _, stderr = proc.communicate(timeout=15)
    assert proc.returncode == 0
    assert b"reloaded" in stderr


async def test_the_running_gateway_exposes_every_metric_the_dashboard_and_alerts_use(
    start_gateway: StartGateway, fake: FakeBraze, auth_headers: dict[str, str]
) -> None:
    """After a short real run, /metrics (parsed by prometheus-client) has every queried metric."""
    from prometheus_client.parser import text_string_to_metric_families

    from tests.system.test_deploy import (
        METRIC_NAME,
        alert_blocks,
        block_expr,
        dashboard_exprs,
        family_of,
    )

    gw = await start_gateway()
    assert await gw.post(fixture("consent_given.json"), auth_headers) == 202
    assert await gw.post(b"not json", auth_headers) == 400
    await gw.settle()
    response = await gw.client.get("/metrics")
    assert response.status == 200
    text = await response.text()
    exposed = {family_of(f.name) for f in text_string_to_metric_families(text)}
    queried = {
        family_of(name)
        for expr in [*dashboard_exprs(), *(block_expr(b) for b in alert_blocks().values())]
        for name in METRIC_NAME.findall(expr)
    }
    assert queried, "no metric found in the dashboard or the alerts"
    assert queried <= exposed, f"queried but not exposed: {sorted(queried - exposed)}"
    accepted = 'direction="to_braze",outcome="accepted",type="event.created"'
    assert f"gateway_webhooks_received_total{{{accepted}}} 1.0" in text
    assert 'gateway_updates_delivered_total{direction="to_braze"} 1.0' in text
    assert 'gateway_braze_requests_total{endpoint="/users/track",status="201"} 1.0' in text


async def test_dead_letters_replayed_from_the_cli_while_the_server_runs(
    start_gateway: StartGateway,
    fake: FakeBraze,
    auth_headers: dict[str, str],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The CLI lists and replays dead letters of a live spool; the running gateway sends them."""
    from gateway.cli.main import main

    refusing = True
    fake.reject_objects(
        lambda o: "invalid_user" if refusing and o.get("external_id") == "user-123" else None
    )
    gw = await start_gateway()
    assert await gw.post(fixture("consent_given.json"), auth_headers) == 202
    assert await gw.post(fixture("user_created.json"), auth_headers) == 202
    await gw.settle()
    assert "user-123" not in fake.users
    config = str(tmp_path / "gateway.toml")
    assert await asyncio.to_thread(main, ["dead-letters", "list", "--config", config]) == 0
    listing = capsys.readouterr().out
    assert "user-123" in listing
    assert "invalid_user" in listing
    refusing = False
    assert await asyncio.to_thread(main, ["dead-letters", "replay", "--config", config]) == 0
    assert "1 dead letter(s) moved back" in capsys.readouterr().out
    gw.app[DISPATCHER].wake()
    await gw.settle()
    assert fake.users["user-123"].email_subscribe == "opted_in"
    assert gw.app[SPOOL].db.count_dead() == 0


def dateless(person: str, enabled: bool, n: int, updated_at: str | None = None) -> bytes:
    """A choice of `person` with no date (or the one given), dated at arrival by the gateway."""
    entity: dict[str, Any] = {
        "id": f"ev-dateless-{person}-{n}",
        "status": "confirmed",
        "user": {"organization_user_id": person},
        "consents": {"purposes": [{"id": "marketing_email", "enabled": enabled}]},
    }
    if updated_at is not None:
        entity["updated_at"] = updated_at
    return json.dumps({"type": "event.created", "parameters": {"entity": entity}}).encode()


async def test_a_replayed_dead_letter_keeps_its_dating_and_never_beats_a_newer_choice(
    start_gateway: StartGateway, fake: FakeBraze, auth_headers: dict[str, str]
) -> None:
    """An undated (or clamped, future-dated) opt-in dead-lettered, then the person's newer
    opt-out delivered: replaying the old opt-in leaves Braze at the opt-out."""
    people = {"undated-1": None, "clamped-1": "2999-01-01T00:00:00Z"}
    refusing = True
    fake.reject_objects(lambda o: "invalid_user" if refusing else None)
    gw = await start_gateway()
    for n, (person, stamp) in enumerate(people.items()):
        assert await gw.post(dateless(person, True, n, stamp), auth_headers) == 202
    await gw.settle()
    spool = gw.app[SPOOL]
    assert spool.db.count_dead() == 2
    refusing = False
    for n, (person, stamp) in enumerate(people.items(), start=10):
        assert await gw.post(dateless(person, False, n, stamp), auth_headers) == 202
    await gw.settle()
    assert {p: fake.users[p].email_subscribe for p in people} == dict.fromkeys(
        people, "unsubscribed"
    )
    tracked = len(fake.objects_sent())
    assert await spool.run(spool.db.replay) == 2
    gw.app[DISPATCHER].wake()
    await gw.settle()
    assert {p: fake.users[p].email_subscribe for p in people} == dict.fromkeys(
        people, "unsubscribed"
    )
    assert len(fake.objects_sent()) == tracked  # refused as stale: nothing sent at all
    assert spool.db.count_dead() == 0


async def test_a_replayed_dead_letter_gets_its_full_give_up_after_s(
    start_gateway: StartGateway, fake: FakeBraze, auth_headers: dict[str, str]
) -> None:
    """A dead letter that first arrived longer than give_up_after_s ago, replayed while Braze
    answers 500s, is retried (its give-up clock starts at the replay) and delivered once Braze
    is back."""
    refusing = True
    fake.reject_objects(lambda o: "invalid_user" if refusing else None)
    gw = await start_gateway(delivery={"give_up_after_s": 3600.0})
    assert await gw.post(choice("late-1", True), auth_headers) == 202
    await gw.settle()
    spool = gw.app[SPOOL]
    assert spool.db.count_dead() == 1
    # The letter's first arrival two days ago: far older than give_up_after_s.
    await spool.run(
        spool.db.db.execute,
        "UPDATE dead_letters SET received_at = received_at - ?",
        (2 * 86_400.0,),
    )
    refusing = False
    fake.fail_next(500, count=3)
    assert await spool.run(spool.db.replay) == 1
    gw.app[DISPATCHER].wake()
    await gw.settle()
    assert fake.users["late-1"].email_subscribe == "opted_in"
    assert spool.db.count_dead() == 0
    assert sum(1 for r in fake.requests if r.status == 500) == 3


async def test_delivery_takes_intakes_rows_from_memory_not_from_the_spool(
    start_gateway: StartGateway,
    fake: FakeBraze,
    auth_headers: dict[str, str],
    make_event: Callable[..., bytes],
    monkeypatch: pytest.MonkeyPatch,
    spool_backend: str,
) -> None:
    """On SQLite, what intake stored reaches the dispatcher in memory: a burst of webhooks
    is delivered with a few reads of the spool at most, not one per batch."""
    gw = await start_gateway(braze={"batch_size": 5})
    spool = gw.app[SPOOL]
    reads: list[int] = []
    original = spool.db.fetch

    def counting(*args: Any) -> Any:
        reads.append(1)
        return original(*args)

    monkeypatch.setattr(spool.db, "fetch", counting)
    statuses = await asyncio.gather(*(gw.post(make_event(n), auth_headers) for n in range(100)))
    assert statuses == [202] * 100
    await gw.settle()
    sent = [o["external_id"] for o in fake.objects_sent()]
    assert sorted(sent) == sorted(f"user-{n}" for n in range(100))  # each once, none twice
    if spool_backend == "sqlite":
        assert len(reads) <= 3, len(reads)  # the idle re-reads every RECOUNT_S, no more
    else:
        assert reads  # PostgreSQL: every replica writes, so delivery reads the database
