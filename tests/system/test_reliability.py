"""Reliability: crashes, Braze outages, a wrong key, a slow Braze and a full or unwritable spool,
each ending with nothing lost.

Traffic stays on 127.0.0.1. The crash and key-rotation tests run `python -m gateway run` as a
subprocess (the fake Braze lives in the test process); the others serve `create_app` with the
same delivery context in-process, where faults can be injected precisely.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from prometheus_client.parser import text_string_to_metric_families

from gateway.app.reload import LiveRules
from gateway.app.server import DISPATCHER, SPOOL, Context, create_app, delivery
from gateway.config.settings import Config
from gateway.metrics import Metrics
from gateway.spool.sqlite import SpoolDB
from gateway.testing.braze import FakeBraze
from tests.conftest import BRAZE_API_KEY, MakeConfig, choice, free_port, recent, write_config

Client = TestClient[web.Request, web.Application]
JSON = {"Content-Type": "application/json"}
STATES = {True: "opted_in", False: "unsubscribed"}


# ---------------------------------------------------------------------------
# Helpers shared with test_security.py


def at(minute: int) -> str:
    """A Didomi timestamp, `minute` minutes into a recent day: younger than any retention
    floor, so a prune pass of the restarted gateway never refuses it (`conftest.DAY`)."""
    return recent(minute)


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse_metrics(text: str) -> Samples:
    """Every sample of a Prometheus exposition, keyed by name and label set."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def metric(samples: Samples, name: str, **labels: str) -> float:
    """One sample's value; 0 when the series is absent."""
    return samples.get((name, frozenset(labels.items())), 0.0)


def spool_counts(path: str | Path) -> tuple[int, int]:
    """(pending, dead letters) read from the spool file by a separate connection."""
    db = SpoolDB(path)
    try:
        return db.count_pending(), db.count_dead()
    finally:
        db.close()


async def eventually(
    probe: Callable[[], Awaitable[bool]],
    timeout: float,
    what: str | Callable[[], str],
    every: float = 0.05,
) -> None:
    """Await `probe()` until it is true, failing with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not await probe():
        if time.monotonic() > deadline:
            said = what if isinstance(what, str) else what()
            raise AssertionError(f"timed out after {timeout} s waiting for {said}")
        await asyncio.sleep(every)


class GatewayProcess:
    """`python -m gateway run` on `directory/gateway.toml`, JSON logs appended to a file."""

    def __init__(
        self, directory: Path, port: int, env: dict[str, str], *, log_level: str = "INFO"
    ) -> None:
        self.config_path = directory / "gateway.toml"
        self.base = f"http://127.0.0.1:{port}"
        self.env = {**os.environ, **env}
        self.log_path = directory / "gateway.log"
        self.log_level = log_level
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self, timeout: float = 20.0) -> None:
        """Start the process and wait until /readyz answers (200 or 503: it serves)."""
        with self.log_path.open("ab") as log:
            self.proc = await asyncio.create_subprocess_exec(
                *(sys.executable, "-m", "gateway", "run", "--config", str(self.config_path)),
                *("--log-format", "json", "--log-level", self.log_level),
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                cwd=self.config_path.parent,
            )
        proc = self.proc

        async def serving() -> bool:
            assert proc.returncode is None, f"the gateway exited early:\n{self.log()}"
            try:
                status, _ = await self.readyz()
            except (aiohttp.ClientError, OSError):
                return False
            return status == 200

        await eventually(serving, timeout, "the gateway to become ready")

    async def get(self, path: str) -> tuple[int, str]:
        timeout = aiohttp.ClientTimeout(total=5)
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.get(self.base + path) as resp,
        ):
            return resp.status, await resp.text()

    async def readyz(self) -> tuple[int, dict[str, Any]]:
        status, text = await self.get("/readyz")
        return status, json.loads(text)

    async def metrics(self) -> Samples:
        status, text = await self.get("/metrics")
        assert status == 200
        return parse_metrics(text)

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    async def kill(self) -> int:
        """`kill -9`: no drain, no flush, no goodbye."""
        assert self.proc is not None
        self.proc.kill()
        return await asyncio.wait_for(self.proc.wait(), timeout=10)

    async def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM, then the exit status once it drained."""
        assert self.proc is not None
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
        return await asyncio.wait_for(self.proc.wait(), timeout=timeout)

    def cleanup(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")


class Gateway:
    """An in-process gateway (spool, dispatcher, reloads) behind a loopback test client."""

    def __init__(self, client: Client, config: Config, metrics: Metrics) -> None:
        self.client = client
        self.config = config
        self.metrics = metrics

    @property
    def app(self) -> web.Application:
        return self.client.app

    async def post(self, body: bytes, headers: dict[str, str]) -> int:
        resp = await self.client.post("/webhooks/didomi", data=body, headers=headers)
        return resp.status

    async def readyz(self) -> tuple[int, dict[str, Any]]:
        resp = await self.client.get("/readyz")
        return resp.status, await resp.json()

    async def scrape(self) -> Samples:
        resp = await self.client.get("/metrics")
        assert resp.status == 200
        return parse_metrics(await resp.text())

    def sample(self, name: str, **labels: str) -> float:
        return self.metrics.registry.get_sample_value(name, labels or None) or 0.0

    def pending(self) -> int:
        return self.app[SPOOL].db.count_pending()

    def dead(self) -> int:
        return self.app[SPOOL].db.count_dead()

    async def settle(self, timeout: float = 20.0) -> None:
        """Wait until the spool is empty and the dispatcher has nothing in flight."""

        async def settled() -> bool:
            return self.pending() == 0 and self.app[DISPATCHER].idle

        await eventually(settled, timeout, lambda: f"the spool to drain ({self.pending()} pending)")


StartGateway = Callable[..., Awaitable[Gateway]]


@pytest.fixture
def start_gateway(
    aiohttp_client: Callable[[web.Application], Awaitable[Client]],
    make_config: MakeConfig,
    tmp_path: Path,
) -> StartGateway:
    """`await start_gateway(braze_url, before=[...], **sections)`: a gateway delivering there.

    `before` are contexts that run after the spool opens and before delivery starts.
    """

    async def start(
        braze_url: str, before: list[Context] | None = None, **sections: Any
    ) -> Gateway:
        braze = {"server": braze_url, "flush_interval_ms": 10, **sections.pop("braze", {})}
        deliver = {"retry_initial_ms": 10, "retry_max_ms": 100, **sections.pop("delivery", {})}
        config = make_config(tmp_path, braze=braze, delivery=deliver, **sections)
        metrics = Metrics()
        live = LiveRules.load(config, metrics, tmp_path / "gateway.toml")
        contexts = [*(before or []), delivery(live)]
        app = create_app(config, metrics=metrics, contexts=contexts)
        return Gateway(await aiohttp_client(app), config, metrics)

    return start


async def post_all(
    gw: Gateway, bodies: list[bytes], headers: dict[str, str], concurrency: int = 16
) -> list[int]:
    """POST every body concurrently (at most `concurrency` at once); their statuses, in order."""
    gate = asyncio.Semaphore(concurrency)

    async def one(body: bytes) -> int:
        async with gate:
            return await gw.post(body, headers)

    return list(await asyncio.wait_for(asyncio.gather(*(one(b) for b in bodies)), timeout=30))


def event_id(body: bytes) -> str:
    return str(json.loads(body)["parameters"]["entity"]["id"])


def person_of(body: bytes) -> str:
    return str(json.loads(body)["parameters"]["entity"]["user"]["organization_user_id"])


# ---------------------------------------------------------------------------
# Crash


@pytest.mark.slow
async def test_kill_9_under_load_loses_no_accepted_webhook(
    tmp_path: Path,
    secrets_env: dict[str, str],
    auth_headers: dict[str, str],
    processes: list[GatewayProcess],
) -> None:
    """`kill -9` while webhooks arrive and batches are in flight to Braze, then a restart on the
    same spool: every webhook answered 202 reaches Braze and each person ends at their latest
    choice (what Didomi had not seen acknowledged, it sends again)."""
    fake = FakeBraze(api_key=BRAZE_API_KEY, latency_s=0.1)  # slow: a backlog at the kill
    await fake.start()
    try:
        port = free_port()
        write_config(
            tmp_path,
            server={"port": port},
            braze={
                "server": fake.url,
                "batch_size": 5,
                "flush_interval_ms": 10,
                "max_in_flight": 2,
            },
            delivery={"retry_initial_ms": 20, "retry_max_ms": 200},
        )
        spool = tmp_path / "var" / "gateway.db"
        rng = random.Random(7)
        bodies: dict[str, bytes] = {}
        expected: dict[str, bool] = {}
        solos = [f"solo-{n}" for n in range(80)]  # one event each: Braze shows each one arrived
        for n, person in enumerate(solos):
            enabled = rng.random() < 0.5
            bodies[f"s{n}"] = choice(person, enabled, at(n), event_id=f"s{n}")
            expected[person] = enabled
        for n in range(20):  # eight choices each, delivered in any order: the latest must win
            person = f"multi-{n}"
            for minute in range(8):
                enabled = rng.random() < 0.5
                bodies[f"m{n}-{minute}"] = choice(
                    person, enabled, at(600 + minute), event_id=f"m{n}-{minute}"
                )
            expected[person] = enabled
        order = list(bodies)
        rng.shuffle(order)

        gw = GatewayProcess(tmp_path, port, secrets_env)
        processes.append(gw)
        await gw.start()
        acknowledged: set[str] = set()
        kill_at = len(order) // 3
        killed: list[int] = []
        gate = asyncio.Semaphore(16)
        timeout = aiohttp.ClientTimeout(total=10)

        async with aiohttp.ClientSession(timeout=timeout) as session:

            async def send(eid: str) -> None:
                async with gate:
                    try:
                        async with session.post(
                            f"{gw.base}/webhooks/didomi", data=bodies[eid], headers=auth_headers
                        ) as resp:
                            assert resp.status == 202, await resp.text()
                            acknowledged.add(eid)
                    except (aiohttp.ClientError, TimeoutError):
                        return  # cut off or refused by the crash: Didomi will retry it
                    if len(acknowledged) >= kill_at and not killed:
                        assert gw.proc is not None
                        gw.proc.kill()  # SIGKILL with up to 15 requests still in flight
                        killed.append(len(acknowledged))

            await asyncio.wait_for(asyncio.gather(*(send(eid) for eid in order)), timeout=60)
        assert killed, "the gateway was never killed"
        assert await asyncio.wait_for(gw.proc.wait(), timeout=10) == -signal.SIGKILL  # type: ignore[union-attr]
        first_round = set(acknowledged)
        assert kill_at <= len(first_round) < len(order)

        # What survived the crash: every 202 is on disk, or Braze already has it.
        db = SpoolDB(spool)
        try:
            on_disk = {event_id(row.body) for row in db.fetch(0, 10_000)}
        finally:
            db.close()
        delivered = {obj["external_id"] for obj in fake.objects_sent()}
        assert on_disk, "nothing was waiting for Braze at the kill: the test proves less"
        for eid in first_round:
            assert eid in on_disk or person_of(bodies[eid]) in delivered, eid
        solo_first = {person_of(bodies[e]) for e in first_round if e.startswith("s")}
        missing_solo = solo_first - delivered - {person_of(bodies[e]) for e in on_disk}
        assert not missing_solo

        # Restart on the same spool; Didomi re-sends what it never saw acknowledged.
        fake.latency_s = 0.01
        again = GatewayProcess(tmp_path, port, secrets_env)
        processes.append(again)
        await again.start()
        async with aiohttp.ClientSession(timeout=timeout) as session:
            for eid in order:
                if eid in acknowledged:
                    continue
                async with session.post(
                    f"{again.base}/webhooks/didomi", data=bodies[eid], headers=auth_headers
                ) as resp:
                    # 200 duplicate: stored before the crash, its 202 lost on the way back.
                    assert resp.status in (200, 202), await resp.text()
                    acknowledged.add(eid)

        async def drained() -> bool:
            return spool_counts(spool) == (0, 0)

        await eventually(drained, 30, "the spool to drain after the restart")
        # The restart's prune pass raised no floor above these choices: they are recent.
        skipped = metric(
            await again.metrics(),
            "gateway_events_skipped_total",
            direction="to_braze",
            reason="older_than_retention",
        )
        assert skipped == 0
        assert await again.stop() == 0, again.log()
    finally:
        await fake.stop()

    delivered = {obj["external_id"] for obj in fake.objects_sent()}
    assert {person_of(bodies[eid]) for eid in first_round if eid.startswith("s")} <= delivered
    assert set(solos) <= delivered
    assert spool_counts(spool) == (0, 0)  # nothing pending, nothing dead-lettered
    final = {p: fake.users[p].email_subscribe for p in expected}
    assert final == {p: STATES[enabled] for p, enabled in expected.items()}
    attributes = {p: fake.users[p].attributes.get("consent_marketing") for p in expected}
    assert attributes == expected


# ---------------------------------------------------------------------------
# Braze outage


async def test_braze_outage_then_503s_drains_with_nothing_lost(
    start_gateway: StartGateway, auth_headers: dict[str, str]
) -> None:
    """While Braze refuses connections and then answers 503, the spool grows, /readyz stays 200
    and says "degraded", retries and pending show in /metrics; afterwards all drains, no loss."""
    port = free_port()
    fake = FakeBraze(api_key=BRAZE_API_KEY)  # not started: connections are refused
    gw = await start_gateway(f"http://127.0.0.1:{port}")
    expected = {f"out-{n}": n % 3 != 0 for n in range(30)}
    bodies = [choice(p, enabled, at(1)) for p, enabled in expected.items()]
    try:
        assert await post_all(gw, bodies[:20], auth_headers) == [202] * 20

        async def refused_twice() -> bool:
            return (
                gw.sample("gateway_retries_total", direction="to_braze", reason="connection") >= 2
            )

        await eventually(refused_twice, 10, "connection retries")
        status, ready = await gw.readyz()
        assert status == 200
        assert "connection" in ready["degraded"]
        samples = await gw.scrape()
        assert metric(samples, "gateway_spool_pending", direction="to_braze") == 20
        assert (
            metric(samples, "gateway_retries_total", direction="to_braze", reason="connection") >= 2
        )
        assert await post_all(gw, bodies[20:], auth_headers) == [202] * 10  # intake goes on
        assert metric(await gw.scrape(), "gateway_spool_pending", direction="to_braze") == 30

        fake.fail_next(503, count=25)
        await fake.start(port=port)
        seen_503 = False

        async def answered_503s() -> bool:
            nonlocal seen_503
            status, ready = await gw.readyz()
            assert status == 200, ready  # an outage never makes the gateway refuse intake
            seen_503 |= "503" in ready.get("degraded", "")
            return (
                gw.sample("gateway_retries_total", direction="to_braze", reason="server_error")
                >= 25
            )

        await eventually(answered_503s, 15, "503 retries", every=0.01)
        assert seen_503, "readiness never said Braze answers 503"
        samples = await gw.scrape()
        assert (
            metric(samples, "gateway_retries_total", direction="to_braze", reason="server_error")
            >= 25
        )
        await gw.settle()
        assert await gw.readyz() == (200, {"status": "ready"})
        samples = await gw.scrape()
        assert metric(samples, "gateway_spool_pending", direction="to_braze") == 0
        assert metric(samples, "gateway_dead_letters", direction="to_braze") == 0
        assert metric(samples, "gateway_updates_delivered_total", direction="to_braze") >= 30
        assert gw.dead() == 0
        assert {p: fake.users[p].email_subscribe for p in expected} == {
            p: STATES[e] for p, e in expected.items()
        }
    finally:
        await fake.stop()


@pytest.mark.slow
async def test_the_oldest_pending_age_shows_a_stall_and_falls_back_to_zero(
    start_gateway: StartGateway, tmp_path: Path
) -> None:
    """While Braze refuses connections, gateway_spool_oldest_pending_age_seconds shows how long the
    oldest stored update has waited; once Braze drains the spool it is 0 again."""
    received = time.time() - 3600
    db = SpoolDB(tmp_path / "var" / "gateway.db", clock=lambda: received)
    db.put_many([(None, "event.created", choice("waiting-1", True, at(1)))])
    db.close()
    port = free_port()
    fake = FakeBraze(api_key=BRAZE_API_KEY)  # not started: connections are refused
    gw = await start_gateway(f"http://127.0.0.1:{port}")
    age = "gateway_spool_oldest_pending_age_seconds"
    try:

        async def an_hour_old() -> bool:
            return gw.sample(age, direction="to_braze") >= 3600

        await eventually(an_hour_old, 10, "the age of the waiting update")
        await fake.start(port=port)
        await gw.settle()

        async def zero() -> bool:
            return gw.sample(age, direction="to_braze") == 0

        await eventually(zero, 10, "the age to fall back to 0 once the spool is empty")
    finally:
        await fake.stop()
    assert fake.users["waiting-1"].email_subscribe == "opted_in"


# ---------------------------------------------------------------------------
# Wrong Braze key, fixed by SIGHUP


@pytest.mark.slow
async def test_wrong_braze_key_waits_for_a_sighup_reload_and_loses_nothing(
    tmp_path: Path,
    fake: FakeBraze,
    secrets_env: dict[str, str],
    auth_headers: dict[str, str],
    processes: list[GatewayProcess],
) -> None:
    """With a key Braze answers 401 to, updates stay in the spool (none dead-lettered), webhooks
    are still taken and /readyz is 200 with the reason in "degraded"; rewriting gateway.toml and
    `kill -HUP` delivers them all."""
    port = free_port()
    path = write_config(
        tmp_path,
        server={"port": port},
        braze={"server": fake.url, "flush_interval_ms": 10},
        delivery={"retry_initial_ms": 20, "retry_max_ms": 200},
    )
    wrong = "the-revoked-braze-key-9d1c"
    gw = GatewayProcess(tmp_path, port, {**secrets_env, "BRAZE_API_KEY": wrong})
    processes.append(gw)
    await gw.start()
    expected = {f"key-{n}": n % 2 == 0 for n in range(15)}
    bodies = [choice(p, e, at(5)) for p, e in expected.items()]
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(timeout=timeout) as session:

        async def post(body: bytes) -> int:
            async with session.post(
                f"{gw.base}/webhooks/didomi", data=body, headers=auth_headers
            ) as resp:
                return resp.status

        assert [await post(b) for b in bodies[:10]] == [202] * 10

        async def degraded() -> bool:
            return "degraded" in (await gw.readyz())[1]

        await eventually(degraded, 10, "/readyz to report the refused key")
        status, body = await gw.readyz()
        assert status == 200  # a load balancer keeps sending webhooks
        assert "401" in body["degraded"]
        assert "braze.server" in body["degraded"]  # a 401 often means the wrong instance
        assert [await post(b) for b in bodies[10:]] == [202] * 5  # blocked, still storing
        samples = await gw.metrics()
        assert (
            metric(samples, "gateway_retries_total", direction="to_braze", reason="unauthorized")
            >= 1
        )
        assert metric(samples, "gateway_braze_auth_ok") == 0
        assert metric(samples, "gateway_delivery_blocked", direction="to_braze", reason="401") == 1
        assert metric(samples, "gateway_ready") == 1
        assert metric(samples, "gateway_dead_letters", direction="to_braze") == 0
        assert spool_counts(tmp_path / "var" / "gateway.db") == (15, 0)
        assert fake.users == {}

    path.write_text(path.read_text().replace('"${BRAZE_API_KEY}"', f'"{BRAZE_API_KEY}"'))
    gw.signal(signal.SIGHUP)

    async def delivered() -> bool:
        return spool_counts(tmp_path / "var" / "gateway.db") == (0, 0)

    await eventually(delivered, 15, "delivery after the reload")
    assert await gw.readyz() == (200, {"status": "ready"})
    samples = await gw.metrics()
    assert metric(samples, "gateway_config_reloads_total", outcome="success") == 1
    assert metric(samples, "gateway_braze_auth_ok") == 1
    assert metric(samples, "gateway_delivery_blocked", direction="to_braze", reason="401") == 0
    assert (
        metric(samples, "gateway_updates_failed_total", direction="to_braze", reason="rejected")
        == 0
    )
    assert await gw.stop() == 0
    assert {p: fake.users[p].email_subscribe for p in expected} == {
        p: STATES[e] for p, e in expected.items()
    }
    output = gw.log()
    assert wrong not in output
    assert BRAZE_API_KEY not in output


# ---------------------------------------------------------------------------
# Slow Braze


async def test_slow_braze_times_out_retries_and_ends_right(
    start_gateway: StartGateway, fake: FakeBraze, auth_headers: dict[str, str]
) -> None:
    """Answers slower than braze.timeout_s are retried (Braze applied them anyway); shuffled
    choices of the same people still end at each person's latest, with no dead letter."""
    fake.latency_s = 0.6
    gw = await start_gateway(fake.url, braze={"timeout_s": 0.2, "batch_size": 4})
    rng = random.Random(5)
    bodies, expected = [], {}
    for person in (f"slow-{n}" for n in range(8)):
        for minute in range(5):
            enabled = rng.random() < 0.5
            bodies.append(choice(person, enabled, at(minute)))
        expected[person] = enabled
    rng.shuffle(bodies)
    for body in bodies:  # one by one: several batches and several timeouts per person
        assert await gw.post(body, auth_headers) == 202

    async def timed_out() -> bool:
        return gw.sample("gateway_retries_total", direction="to_braze", reason="timeout") >= 3

    await eventually(timed_out, 15, "timeouts")
    status, ready = await gw.readyz()
    assert status == 200
    assert "timeout" in ready["degraded"]
    fake.latency_s = 0.02  # within the timeout again
    await gw.settle(timeout=30)
    assert gw.dead() == 0
    assert {p: fake.users[p].email_subscribe for p in expected} == {
        p: STATES[e] for p, e in expected.items()
    }
    assert {p: fake.users[p].attributes["consent_marketing"] for p in expected} == expected


# ---------------------------------------------------------------------------
# Spool full, spool unwritable


async def test_full_spool_refuses_with_503_and_recovers_as_braze_drains_it(
    start_gateway: StartGateway, auth_headers: dict[str, str]
) -> None:
    """At delivery.max_pending the answer is 503 and nothing refused is stored; once Braze drains
    the spool, readiness returns and the retried webhooks are accepted and delivered."""
    port = free_port()
    fake = FakeBraze(api_key=BRAZE_API_KEY)
    gw = await start_gateway(f"http://127.0.0.1:{port}", delivery={"max_pending": 5})
    expected = {f"full-{n}": n % 2 == 1 for n in range(9)}
    bodies = {p: choice(p, e, at(2)) for p, e in expected.items()}
    try:
        statuses = await post_all(gw, list(bodies.values()), auth_headers)
        assert sorted(statuses) == [202] * 5 + [503] * 4
        accepted = {p for p, s in zip(bodies, statuses, strict=True) if s == 202}
        spool = gw.app[SPOOL]
        stored = {person_of(row.body) for row in await spool.run(spool.db.fetch, 0, 100)}
        assert stored == accepted  # never a 2xx for an unstored event, never a 503 for a stored one
        status, body = await gw.readyz()
        assert status == 503
        assert "spool is full" in body["detail"]

        await fake.start(port=port)  # Braze is back: the spool drains and room returns
        await gw.settle()
        assert (await gw.readyz())[0] == 200
        refused = [bodies[p] for p in bodies if p not in accepted]
        assert await post_all(gw, refused, auth_headers) == [202] * 4  # not "duplicate"
        await gw.settle()
    finally:
        await fake.stop()
    assert gw.dead() == 0
    assert {p: fake.users[p].email_subscribe for p in expected} == {
        p: STATES[e] for p, e in expected.items()
    }


async def test_unwritable_spool_never_answers_2xx_for_what_it_did_not_store(
    start_gateway: StartGateway, auth_headers: dict[str, str]
) -> None:
    """While the spool cannot be written (flipped read-only between commits under concurrent
    load) each webhook is 202 exactly when it is stored; its 503s are accepted once writable."""
    gw = await start_gateway("http://127.0.0.1:1")  # nothing delivered: the spool keeps all
    spool = gw.app[SPOOL]

    def writable(on: bool) -> Any:
        return spool.run(spool.db.db.execute, f"PRAGMA query_only = {'OFF' if on else 'ON'}")

    await writable(False)
    first = [choice(f"ro-{n}", True, at(3)) for n in range(10)]
    assert await post_all(gw, first, auth_headers) == [503] * 10
    assert spool.db.count_pending() == 0

    stop = asyncio.Event()

    async def flip() -> None:
        on = True
        while not stop.is_set():
            await writable(on)
            on = not on
            await asyncio.sleep(0.003)

    flipper = asyncio.create_task(flip())
    bodies = [choice(f"flip-{n}", n % 2 == 0, at(4)) for n in range(120)]
    try:
        statuses = await post_all(gw, bodies, auth_headers, concurrency=12)
    finally:
        stop.set()
        await flipper
    await writable(True)
    assert set(statuses) <= {202, 503}
    assert 202 in statuses
    assert 503 in statuses, "the spool was never unwritable during the load: the test proves less"
    accepted = {person_of(b) for b, s in zip(bodies, statuses, strict=True) if s == 202}
    stored = {person_of(row.body) for row in await spool.run(spool.db.fetch, 0, 1000)}
    assert stored == accepted

    refused = [b for b, s in zip(bodies, statuses, strict=True) if s == 503] + first
    assert await post_all(gw, refused, auth_headers) == [202] * len(refused)
    stored = {person_of(row.body) for row in await spool.run(spool.db.fetch, 0, 1000)}
    assert stored == {person_of(b) for b in bodies + first}
    assert gw.sample("gateway_spool_pending", direction="to_braze") == len(stored)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 6 MB tmpfs to put a spool on, unmounted at teardown (skips where mounting is refused)."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs for the full-disk tests needs root and mount(8)")
    mount = tmp_path / "small-disk"
    mount.mkdir()
    run = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mount)],  # noqa: S607 - the system's mount
        capture_output=True,
        text=True,
        check=False,
    )
    if run.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {run.stderr.strip() or run.returncode}")
    try:
        yield mount
    finally:
        # Lazy when busy: a spool still open by a failed test must not leave the mount behind.
        umount = ["umount", str(mount)]  # the system's umount, from PATH as mount is
        if subprocess.run(umount, capture_output=True, check=False).returncode:
            subprocess.run([*umount, "-l"], check=True)


def padded(person: str, n: int, size: int = 16_000) -> bytes:
    """A webhook opting `person` in, padded to about `size` bytes with a field Didomi may add."""
    data = json.loads(choice(person, True, at(n % 1440), event_id=f"pad-{person}"))
    data["parameters"]["entity"]["padding"] = "x" * size  # unknown fields are ignored
    return json.dumps(data).encode()


def fill(directory: Path) -> Path:
    """Write a file in `directory` until its filesystem has no byte left, as another program may."""
    ballast = directory / "ballast"
    with ballast.open("wb", buffering=0) as out:
        try:
            while True:
                out.write(b"\0" * 65_536)
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
    return ballast


@pytest.mark.slow
async def test_a_full_disk_delivers_every_accepted_webhook_and_accepts_again(
    small_disk: Path,  # first: unmounted only after the gateway has closed the spool
    start_gateway: StartGateway,
    auth_headers: dict[str, str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """With the spool on a 6 MB disk and Braze down, intake fills it until it answers 503; once
    Braze is back every 202 is delivered without one acknowledgement failing for lack of room,
    /readyz returns to 200 and the refused webhooks are accepted."""
    port = free_port()
    fake = FakeBraze(api_key=BRAZE_API_KEY)  # not started: connections are refused
    gw = await start_gateway(
        f"http://127.0.0.1:{port}",
        delivery={"spool": str(small_disk / "gateway.db"), "min_free_bytes": 1_500_000},
    )
    bodies = {f"disk-{n}": padded(f"disk-{n}", n) for n in range(600)}  # 9.6 MB: more than fits
    statuses: dict[str, int] = {}
    try:
        people = list(bodies)
        for start in range(0, len(people), 40):
            wave = people[start : start + 40]
            statuses.update(
                zip(wave, await post_all(gw, [bodies[p] for p in wave], auth_headers), strict=True)
            )
            if 202 not in (statuses[p] for p in wave):
                break  # the disk refuses whole waves now
        assert set(statuses.values()) <= {202, 503}
        accepted = {p for p, s in statuses.items() if s == 202}
        refused = [p for p, s in statuses.items() if s == 503]
        assert accepted, "nothing was accepted: the test proves less"
        assert refused, "the disk never filled: the test proves less"
        spool = gw.app[SPOOL]
        stored = {person_of(row.body) for row in await spool.run(spool.db.fetch, 0, 10_000)}
        assert stored == accepted  # every 202 is on disk, and no 503 is
        status, body = await gw.readyz()
        assert status == 503
        assert "min_free_bytes" in body["detail"]

        await fake.start(port=port)
        await gw.settle()
        assert accepted <= set(fake.users)

        async def ready() -> bool:
            return (await gw.readyz())[0] == 200

        await eventually(ready, 10, "/readyz to say ready once the spool drained")
        retried: set[str] = set()

        async def all_accepted() -> bool:
            waiting = [p for p in refused if p not in retried]
            answers = await post_all(gw, [bodies[p] for p in waiting], auth_headers)
            assert set(answers) <= {202, 503}  # never 200: a refused webhook was never kept
            retried.update(p for p, s in zip(waiting, answers, strict=True) if s == 202)
            return len(retried) == len(refused)

        await eventually(all_accepted, 15, "the refused webhooks to be accepted")
        await gw.settle()
    finally:
        await fake.stop()
    assert {p: fake.users[p].email_subscribe for p in statuses} == dict.fromkeys(
        statuses, "opted_in"
    )
    assert gw.dead() == 0
    failed_acks = [r for r in caplog.records if "cannot record delivery outcomes" in r.message]
    assert failed_acks == []  # the reserve left room for every acknowledgement


@pytest.mark.slow
async def test_after_a_full_disk_drains_intake_takes_webhooks_again_without_anyone_acting(
    small_disk: Path,  # first: unmounted only after the gateway has closed the spool
    start_gateway: StartGateway,
    auth_headers: dict[str, str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Small webhooks fill a 6 MB spool disk while Braze is down; draining them writes more
    audit records, applied times and dedupe keys than their bodies freed. Consent comes before
    records: the oldest audit records are shed (counted, and warned about), and intake answers
    202 again by itself, with nothing refused for good and nothing dead-lettered."""
    port = free_port()
    fake = FakeBraze(api_key=BRAZE_API_KEY)  # not started: connections are refused
    gw = await start_gateway(
        f"http://127.0.0.1:{port}",
        delivery={"spool": str(small_disk / "gateway.db"), "min_free_bytes": 1_500_000},
    )
    accepted: list[str] = []
    try:
        for wave in range(100):
            people = [f"small-{wave}-{n}" for n in range(200)]
            answers = await post_all(gw, [choice(p, True, at(wave)) for p in people], auth_headers)
            assert set(answers) <= {202, 503}
            accepted += [p for p, s in zip(people, answers, strict=True) if s == 202]
            if 202 not in answers:
                break  # the disk refuses whole waves now
        assert accepted, "nothing was accepted: the test proves less"
        assert (await gw.readyz())[0] == 503, "the disk never filled: the test proves less"

        await fake.start(port=port)
        await gw.settle(timeout=60)
        later = iter(range(10**6))

        async def taken() -> bool:
            return await gw.post(choice(f"later-{next(later)}", True, at(1)), auth_headers) == 202

        await eventually(taken, 20, "intake to take a webhook again after the drain", every=0.2)
        assert (await gw.readyz())[0] == 200
        await gw.settle()
    finally:
        await fake.stop()
    assert set(accepted) <= set(fake.users)
    assert gw.dead() == 0
    assert gw.sample("gateway_audit_shed_total") > 0
    shed = [r for r in caplog.records if r.levelname == "WARNING" and "audit record" in r.message]
    assert shed, "shedding audit records is logged as a warning"


async def test_an_acknowledgement_waits_out_a_disk_another_program_filled(
    small_disk: Path, start_gateway: StartGateway, fake: FakeBraze, auth_headers: dict[str, str]
) -> None:
    """When another program fills the spool's disk while a batch is at Braze, /readyz and intake
    answer 503, the acknowledgement is retried, and freeing the space drains the spool."""
    fake.latency_s = 0.5  # the request is in flight while the disk fills
    gw = await start_gateway(
        fake.url, delivery={"spool": str(small_disk / "gateway.db"), "min_free_bytes": 1_048_576}
    )
    assert await gw.post(choice("fill-1", True, at(1)), auth_headers) == 202

    async def sent() -> bool:
        return len(fake.requests) >= 1

    await eventually(sent, 5, "the request to Braze")
    ballast = fill(small_disk)
    try:

        async def unready() -> bool:
            return (await gw.readyz())[0] == 503

        await eventually(unready, 5, "/readyz to report the full disk")
        assert "full" in (await gw.readyz())[1]["detail"]
        assert gw.sample("gateway_braze_requests_total", endpoint="/users/track", status="201") == 1
        assert await gw.post(choice("fill-2", True, at(2)), auth_headers) == 503
        assert gw.pending() == 1  # fill-1 waits for its acknowledgement
    finally:
        ballast.unlink()
    fake.latency_s = 0.0

    async def ready() -> bool:
        return (await gw.readyz())[0] == 200

    await eventually(ready, 10, "/readyz to say ready once the space is back")
    assert await gw.post(choice("fill-2", True, at(2)), auth_headers) == 202
    await gw.settle()
    assert {p: fake.users[p].email_subscribe for p in ("fill-1", "fill-2")} == {
        "fill-1": "opted_in",
        "fill-2": "opted_in",
    }
    assert gw.dead() == 0


def read_only_until(release: asyncio.Event) -> Context:
    """A context that makes the spool read-only before delivery starts, writable on `release`."""

    async def context(app: web.Application) -> AsyncIterator[None]:
        spool = app[SPOOL]
        await spool.run(spool.db.db.execute, "PRAGMA query_only = ON")

        async def restore() -> None:
            await release.wait()
            await spool.run(spool.db.db.execute, "PRAGMA query_only = OFF")

        task = asyncio.create_task(restore())
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    return context


async def test_a_failed_acknowledgement_is_retried_once_the_spool_is_writable(
    start_gateway: StartGateway, fake: FakeBraze, auth_headers: dict[str, str]
) -> None:
    """If the spool cannot record Braze's acknowledgement (disk full), the rows are acknowledged
    once it can again: the spool drains without a restart."""
    fake.latency_s = 0.5  # the request is in flight while the spool turns read-only
    gw = await start_gateway(fake.url)
    spool = gw.app[SPOOL]
    assert await gw.post(choice("ack-1", True, at(1)), auth_headers) == 202

    async def sent() -> bool:
        return len(fake.requests) >= 1

    await eventually(sent, 5, "the request to Braze")
    await spool.run(spool.db.db.execute, "PRAGMA query_only = ON")

    async def answered() -> bool:
        return gw.sample("gateway_braze_requests_total", endpoint="/users/track", status="201") >= 1

    await eventually(answered, 5, "Braze's answer")
    await asyncio.sleep(0.1)  # the acknowledgement fails now
    await spool.run(spool.db.db.execute, "PRAGMA query_only = OFF")
    fake.latency_s = 0.0
    assert await gw.post(choice("ack-2", True, at(1)), auth_headers) == 202
    await gw.settle(timeout=3)
    assert fake.users["ack-1"].email_subscribe == "opted_in"
    assert gw.sample("gateway_spool_pending", direction="to_braze") == 0


async def test_delivery_survives_a_spool_error_while_skipping_rows(
    start_gateway: StartGateway,
    fake: FakeBraze,
    auth_headers: dict[str, str],
    tmp_path: Path,
) -> None:
    """A read-only spool when the dispatcher acknowledges a row that changes nothing (here an
    event.deleted) delays delivery; it does not stop it once the spool is writable again."""
    db = SpoolDB(tmp_path / "var" / "gateway.db")
    deleted = msgspec.json.encode(
        {"type": "event.deleted", "parameters": {"entity": {"id": "gone", "updated_at": at(0)}}}
    )
    db.put_many([("deleted|gone", "event.deleted", deleted)])
    db.close()
    release = asyncio.Event()
    gw = await start_gateway(fake.url, before=[read_only_until(release)])
    await asyncio.sleep(0.3)  # the dispatcher has fetched the row and failed to acknowledge it
    release.set()
    await asyncio.sleep(0.05)
    assert await gw.post(choice("after-ro", True, at(2)), auth_headers) == 202

    async def delivered() -> bool:
        return "after-ro" in fake.users

    await eventually(delivered, 3, "delivery after the spool is writable again")
    assert fake.users["after-ro"].email_subscribe == "opted_in"


def test_a_backfill_never_stores_into_the_reserve(small_disk: Path) -> None:
    """On a nearly full disk the backfill lane refuses a batch (SpoolFull, nothing stored, its
    progress unchanged) rather than eat the room acknowledgements need."""
    from gateway.errors import SpoolFull
    from gateway.spool.sqlite import SpoolDB

    db = SpoolDB(small_disk / "s.db", min_free_bytes=1024 * 1024)
    try:
        ballast = fill(small_disk)
        os.truncate(ballast, ballast.stat().st_size - 1_500_000)  # 1.5 MB: the reserve and a bit
        rows = [(f"k{n}", b"x" * 2_000, f"p{n}") for n in range(400)]  # 0.8 MB and more
        with pytest.raises(SpoolFull):
            db.put_backfill(rows, "file:x", "400", {})
        assert db.count_backfill() == 0
        assert db.backfill_progress("file:x") is None
        assert db.put_backfill(rows[:10], "file:x", "10", {}) == 10  # a small batch still fits
    finally:
        db.close()
