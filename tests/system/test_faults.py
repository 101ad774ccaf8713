"""Delivery stays correct under faults: spool errors, poisoned dates, erasure order and dating,
Braze refusing the key or the URL, and a shutdown while delivery waits.

Each test goes through the real HTTP server and delivery context (in-process, or a real
`gateway run` process where the behaviour crosses processes) against the fake Braze on
127.0.0.1, and each failed on the main branch before the fix it covers.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sqlite3
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest

from gateway.app.server import DISPATCHER, SPOOL
from gateway.rules.mappings import RuleSet
from gateway.spool.sqlite import SpoolDB
from gateway.testing.braze import FakeBraze, FakeDidomi
from tests.conftest import (
    BRAZE_API_KEY,
    DIDOMI_API_KEY,
    DIDOMI_API_SECRET,
    DIDOMI_ORG,
    choice,
    free_port,
    recent,
    write_config,
)
from tests.system import test_end_to_end
from tests.system.test_reliability import GatewayProcess, eventually, spool_counts

BRAZE_WEBHOOK_TOKEN = "faults-braze-webhook-token-3b7d"
start_gateway = test_end_to_end.start_gateway  # the same fixture: a gateway on the fake Braze
StartGateway = test_end_to_end.StartGateway


def user_deleted(person: str, at: str | None = recent(843 + 55 / 60), n: int = 0) -> bytes:
    """A Didomi user.deleted body for `person`, dated `at` (or undated)."""
    entity: dict[str, Any] = {"id": f"didomi-{person}-{n}", "organization_user_id": person}
    if at is not None:
        entity["created_at"] = entity["updated_at"] = at
    return msgspec.json.encode({"type": "user.deleted", "parameters": {"entity": entity}})


def now_iso(offset_s: float = 0.0) -> str:
    """The current UTC time as Didomi writes it, shifted by `offset_s`."""
    return datetime.fromtimestamp(time.time() + offset_s, tz=UTC).isoformat()


def seed(spool_url: str, *bodies: bytes) -> None:
    """Store webhooks in the spool before the gateway starts, so they form one backlog."""
    from gateway.config.settings import DeliveryConfig
    from gateway.shapes.webhooks import decode
    from gateway.spool.backend import open_store

    db = open_store(DeliveryConfig(spool=spool_url))
    try:
        for body in bodies:
            webhook = decode(body)
            subject = webhook.subject
            user = subject.user if subject is not None else None
            person = user.organization_user_id if user is not None else None
            db.put_many([(webhook.dedupe_key(), webhook.type, body, person)])
    finally:
        db.close()


# ---------------------------------------------------------------------------
# Spool errors and failures between fetching and acknowledging


async def test_a_spool_error_reading_applied_times_strands_no_one(
    start_gateway: StartGateway,
    fake: FakeBraze,
    auth_headers: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """When looking up applied times fails, the batch's rows go back and its people are freed:
    everything is delivered without a restart."""
    gw = await start_gateway()
    db = gw.app[SPOOL].db
    real = db.applied_times
    failures = {"left": 2}

    def flaky(persons: Any) -> Any:
        if failures["left"]:
            failures["left"] -= 1
            raise sqlite3.OperationalError("disk I/O error")
        return real(persons)

    monkeypatch.setattr(db, "applied_times", flaky)
    people = {f"ap-{n}": n % 2 == 0 for n in range(6)}
    for person, enabled in people.items():
        assert await gw.post(choice(person, enabled), auth_headers) == 202
    await gw.settle()
    assert failures["left"] == 0
    assert gw.app[DISPATCHER].batcher.in_flight == set()
    assert {p: fake.users[p].email_subscribe for p in people} == {
        p: "opted_in" if e else "unsubscribed" for p, e in people.items()
    }


async def test_an_exception_while_mapping_a_page_is_retried_and_a_poisoned_row_dead_lettered(
    start_gateway: StartGateway,
    fake: FakeBraze,
    auth_headers: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A mapping that raises once costs a retry of the page, not its rows; a row whose mapping
    always raises goes to the dead letters and stops nobody else."""
    real = RuleSet.apply
    calls = {"flaky": 0}

    def apply(self: RuleSet, webhook: Any, received_at: float | None = None) -> Any:
        person = webhook.subject.user.organization_user_id
        if person == "map-flaky" and calls["flaky"] == 0:
            calls["flaky"] += 1
            raise RuntimeError("a rule bug that the next try does not meet")
        if person == "map-poison":
            raise RuntimeError("a rule bug this row always meets")
        return real(self, webhook, received_at)

    monkeypatch.setattr(RuleSet, "apply", apply)
    gw = await start_gateway()
    for person in ("map-1", "map-flaky", "map-poison", "map-2"):
        assert await gw.post(choice(person, True), auth_headers) == 202
    await gw.settle(timeout=20)
    assert set(fake.users) == {"map-1", "map-flaky", "map-2"}
    letters = gw.app[SPOOL].db.dead_letters()
    assert len(letters) == 1
    assert letters[0].reason.startswith("unmappable: RuntimeError")
    assert gw.sample("gateway_updates_failed_total", direction="to_braze", reason="unmappable") == 1


# ---------------------------------------------------------------------------
# Dates from outside


async def test_a_choice_dated_in_the_future_does_not_freeze_a_person(
    start_gateway: StartGateway, fake: FakeBraze, auth_headers: dict[str, str]
) -> None:
    """An opt-in dated 2096 is dated at its arrival (counted); the real withdrawal that
    follows, even within the default five minutes of tolerance, is applied instead of being
    dropped as stale for seventy years."""
    gw = await start_gateway()
    poisoned = choice("fut", True, "2096-01-01T00:00:00Z", event_id="from-the-future")
    assert await gw.post(poisoned, auth_headers) == 202
    await gw.settle()
    assert fake.users["fut"].email_subscribe == "opted_in"
    assert gw.sample("gateway_event_dates_clamped_total") == 1
    await asyncio.sleep(0.05)  # the withdrawal happens later than the poisoned arrival
    assert await gw.post(choice("fut", False, now_iso()), auth_headers) == 202
    await gw.settle()
    assert fake.users["fut"].email_subscribe == "unsubscribed"
    assert gw.sample("gateway_events_skipped_total", direction="to_braze", reason="stale") == 0


async def test_a_withdrawal_within_the_clock_skew_is_not_clamped(
    start_gateway: StartGateway, fake: FakeBraze, auth_headers: dict[str, str]
) -> None:
    """A sender clock a minute ahead is within the default tolerance: nothing is clamped."""
    gw = await start_gateway()
    assert await gw.post(choice("ahead", False, now_iso(60)), auth_headers) == 202
    await gw.settle()
    assert fake.users["ahead"].email_subscribe == "unsubscribed"
    assert gw.sample("gateway_event_dates_clamped_total") == 0


# ---------------------------------------------------------------------------
# Erasure: order and dating


async def test_a_deletion_never_overtakes_the_same_persons_older_update(
    start_gateway: StartGateway, fake: FakeBraze, tmp_path: Path, spool_url: str
) -> None:
    """Backlog [Q delete, P update@T1, P delete@T2] in upsert mode: P's update reaches Braze
    before P's deletion, so the erased profile is not re-created."""
    write_config(tmp_path)  # the folder the spool lives in
    seed(
        spool_url,
        user_deleted("quinn"),
        choice("pat", True, recent(840)),
        user_deleted("pat", recent(845)),
    )
    gw = await start_gateway(
        didomi={"on_user_deleted": "delete"},
        braze={"update_existing_only": False, "flush_interval_ms": 200},
    )
    await gw.settle()
    pat = [
        r.path
        for r in fake.requests
        if "pat" in json.dumps(r.body) and r.path in ("/users/track", "/users/delete")
    ]
    assert pat == ["/users/track", "/users/delete"]
    assert "pat" not in fake.users
    assert sorted(fake.deleted) == ["pat", "quinn"]


async def test_erasure_in_unsubscribe_mode_wins_over_a_choice_dated_after_the_profile(
    start_gateway: StartGateway, fake: FakeBraze, auth_headers: dict[str, str]
) -> None:
    """A user.deleted carries the profile's (older) date; it is dated at its arrival, so its
    withdrawals beat the choice applied before it."""
    gw = await start_gateway(didomi={"on_user_deleted": "unsubscribe"})
    assert (
        await gw.post(choice("una", True, recent(2040), topics="product_news"), auth_headers) == 202
    )
    await gw.settle()
    assert fake.users["una"].email_subscribe == "opted_in"
    assert await gw.post(user_deleted("una", recent(843 + 55 / 60)), auth_headers) == 202
    await gw.settle()
    user = fake.users["una"]
    assert user.email_subscribe == "unsubscribed"
    assert set(user.subscription_groups.values()) == {"unsubscribed"}
    assert gw.sample("gateway_events_skipped_total", direction="to_braze", reason="stale") == 0


async def test_an_undated_erasure_still_unsubscribes(
    start_gateway: StartGateway, fake: FakeBraze, auth_headers: dict[str, str]
) -> None:
    """A user.deleted without any date is dated at its arrival, not at 1970."""
    gw = await start_gateway(didomi={"on_user_deleted": "unsubscribe"})
    assert await gw.post(choice("undated", True, recent(2040)), auth_headers) == 202
    await gw.settle()
    assert await gw.post(user_deleted("undated", None), auth_headers) == 202
    await gw.settle()
    assert fake.users["undated"].email_subscribe == "unsubscribed"


async def test_a_late_retry_of_an_older_choice_never_recreates_an_erased_person(
    start_gateway: StartGateway, fake: FakeBraze, auth_headers: dict[str, str]
) -> None:
    """In upsert mode, a choice dated before the erasure arrived, delivered after it, is stale:
    Braze never sees the erased person again."""
    gw = await start_gateway(
        didomi={"on_user_deleted": "delete"}, braze={"update_existing_only": False}
    )
    assert await gw.post(choice("eve", True, now_iso(-120)), auth_headers) == 202
    await gw.settle()
    assert await gw.post(user_deleted("eve", now_iso(-3600)), auth_headers) == 202
    await gw.settle()
    assert fake.deleted == ["eve"]
    late = choice("eve", False, now_iso(-60), event_id="late-retry")  # after T1, before erasure
    assert await gw.post(late, auth_headers) == 202
    await gw.settle()
    assert "eve" not in fake.users
    assert [r.path for r in fake.requests] == ["/users/track", "/users/delete"]
    assert gw.sample("gateway_events_skipped_total", direction="to_braze", reason="stale") == 1


# ---------------------------------------------------------------------------
# Braze refusing the key or the URL: held, reported, never a reason to refuse webhooks


@pytest.mark.parametrize("status", [401, 403])
async def test_a_refused_key_keeps_every_update_and_readiness_stays_200(
    start_gateway: StartGateway, fake: FakeBraze, auth_headers: dict[str, str], status: int
) -> None:
    """401 and 403 hold updates in the spool (none dead-lettered), /readyz stays 200 naming
    the status, gateway_delivery_blocked says it, and delivery resumes once Braze accepts."""
    fake.fail_next(status, count=1000)
    gw = await start_gateway()
    assert await gw.post(choice("held-1", True), auth_headers) == 202

    async def blocked() -> bool:
        return gw.sample("gateway_delivery_blocked", direction="to_braze", reason=str(status)) == 1

    await eventually(blocked, 10, f"delivery to be reported blocked by {status}")
    response = await gw.client.get("/readyz")
    body = await response.json()
    assert response.status == 200
    assert str(status) in body["degraded"]
    assert await gw.post(choice("held-2", False), auth_headers) == 202  # still taking webhooks
    assert gw.app[SPOOL].db.count_pending() == 2
    assert gw.app[SPOOL].db.count_dead() == 0
    assert gw.sample("gateway_ready") == 1
    fake.heal()  # Braze takes the key again
    await gw.settle()
    assert gw.sample("gateway_delivery_blocked", direction="to_braze", reason=str(status)) == 0
    assert await (await gw.client.get("/readyz")).json() == {"status": "ready"}
    assert fake.users["held-2"].email_subscribe == "unsubscribed"
    assert gw.app[SPOOL].db.count_dead() == 0


# ---------------------------------------------------------------------------
# Shutdown while delivery waits


@pytest.mark.slow
@pytest.mark.parametrize("wait", ["slow_braze", "rate_limit_reset", "backoff"])
async def test_sigterm_returns_within_the_shutdown_timeout_whatever_delivery_waits_on(
    tmp_path: Path, secrets_env: dict[str, str], auth_headers: dict[str, str], wait: str
) -> None:
    """With Braze taking 60 s to answer, a rate-limit reset an hour away or a 30 s backoff, and
    the next batch waiting for the one in-flight slot, SIGTERM ends the process within
    server.shutdown_timeout_s plus a second, and the updates stay in the spool."""
    fake = FakeBraze(api_key=BRAZE_API_KEY)
    await fake.start()
    try:
        if wait == "slow_braze":
            fake.latency_s = 60.0
        elif wait == "rate_limit_reset":
            fake.fail_next(429, count=1, headers={"X-Ratelimit-Retry-After": "3600"})
        else:
            fake.fail_next(500, count=1000)
        port = free_port()
        write_config(
            tmp_path,
            server={"port": port, "shutdown_timeout_s": 2},
            braze={
                "server": fake.url,
                "flush_interval_ms": 10,
                "timeout_s": 120,
                "max_in_flight": 1,
                "batch_size": 1,
            },
            delivery={"retry_initial_ms": 30_000, "retry_max_ms": 60_000},
        )
        gw = GatewayProcess(tmp_path, port, secrets_env)
        await gw.start()
        try:
            async with aiohttp.ClientSession() as session:
                for n in range(3):
                    async with session.post(
                        f"{gw.base}/webhooks/didomi",
                        data=choice(f"bye-{n}", True),
                        headers=auth_headers,
                    ) as resp:
                        assert resp.status == 202

            async def waiting() -> bool:
                return len(fake.requests) >= 1

            await eventually(waiting, 10, "a request to reach Braze")
            await asyncio.sleep(0.3)  # delivery is now in the wait under test
            started = time.monotonic()
            assert await gw.stop(timeout=20) == 0  # one SIGTERM, as an init system sends
            took = time.monotonic() - started
        finally:
            gw.cleanup()
        assert took < 2 + 1 + 0.5, f"SIGTERM took {took:.1f} s"  # 0.5 s: interpreter exit
        assert spool_counts(tmp_path / "var" / "gateway.db") == (3, 0)
    finally:
        await fake.stop()


@pytest.mark.slow
async def test_a_second_sigterm_during_the_drain_stops_at_once_with_status_1_keeping_the_rows(
    tmp_path: Path, secrets_env: dict[str, str], auth_headers: dict[str, str]
) -> None:
    """A second SIGTERM while the gateway drains means "stop now": it exits with status 1
    without waiting out server.shutdown_timeout_s, and the update in flight stays in the
    spool (as it did before intake processes: aiohttp's own handling)."""
    fake = FakeBraze(api_key=BRAZE_API_KEY)
    await fake.start()
    try:
        fake.latency_s = 60.0
        port = free_port()
        write_config(
            tmp_path,
            server={"port": port, "shutdown_timeout_s": 30},
            braze={"server": fake.url, "flush_interval_ms": 10, "timeout_s": 120},
        )
        gw = GatewayProcess(tmp_path, port, secrets_env)
        await gw.start()
        try:
            async with (
                aiohttp.ClientSession() as session,
                session.post(
                    f"{gw.base}/webhooks/didomi", data=choice("bye", True), headers=auth_headers
                ) as resp,
            ):
                assert resp.status == 202

            async def waiting() -> bool:
                return len(fake.requests) >= 1

            await eventually(waiting, 10, "a request to reach Braze")
            started = time.monotonic()
            gw.signal(signal.SIGTERM)
            await asyncio.sleep(0.5)  # draining: delivery waits on Braze for up to 30 s
            gw.signal(signal.SIGTERM)
            assert await gw.stop(timeout=60) == 1
            took = time.monotonic() - started
        finally:
            gw.cleanup()
        assert took < 30, f"the second SIGTERM waited {took:.1f} s"  # the drain's bound
        assert spool_counts(tmp_path / "var" / "gateway.db") == (1, 0)
    finally:
        await fake.stop()


def reverse_config(tmp_path: Path, port: int, braze_url: str, didomi_url: str) -> None:
    """gateway.toml with both directions on: Braze's routes and the writeback to Didomi."""
    write_config(
        tmp_path,
        server={"port": port, "shutdown_timeout_s": 2},
        braze={"server": braze_url, "flush_interval_ms": 10},
        delivery={"retry_initial_ms": 20, "retry_max_ms": 200},
        braze_webhooks={"tokens": [BRAZE_WEBHOOK_TOKEN]},
        didomi_api={
            "enabled": True,
            "base_url": didomi_url + "/v1",
            "organization_id": DIDOMI_ORG,
            "key": DIDOMI_API_KEY,
            "secret": DIDOMI_API_SECRET,
            "timeout_s": 120,
        },
    )


async def post_steps(base: str, people: list[str]) -> None:
    """A Braze webhook step unsubscribing each person, each answered 202."""
    headers = {"Authorization": f"Bearer {BRAZE_WEBHOOK_TOKEN}", "Content-Type": "application/json"}
    async with aiohttp.ClientSession() as session:
        for person in people:
            # An hour ago: neither in the future (dated at arrival) nor below a retention floor.
            when = str(int(time.time()) - 3600)
            body = {"external_id": person, "email_subscribe": "unsubscribed", "time": when}
            async with session.post(f"{base}/webhooks/braze", json=body, headers=headers) as resp:
                assert resp.status == 202


@pytest.mark.slow
async def test_sigterm_is_bounded_while_didomi_takes_a_minute_and_the_reports_stay(
    tmp_path: Path, secrets_env: dict[str, str], fake: FakeBraze, fake_didomi: FakeDidomi
) -> None:
    """With Didomi's API taking 60 s to answer, SIGTERM still ends the process within
    server.shutdown_timeout_s plus a second, and Braze's reports stay in the spool."""
    fake_didomi.latency_s = 60.0
    port = free_port()
    reverse_config(tmp_path, port, fake.url, fake_didomi.url)
    gw = GatewayProcess(tmp_path, port, secrets_env)
    await gw.start()
    try:
        await post_steps(gw.base, ["rev-1", "rev-2"])
        await asyncio.sleep(0.5)  # the writeback now waits on Didomi
        started = time.monotonic()
        assert await gw.stop(timeout=20) == 0
        took = time.monotonic() - started
    finally:
        gw.cleanup()
    assert took < 2 + 1 + 0.5, f"SIGTERM took {took:.1f} s"
    db = SpoolDB(tmp_path / "var" / "gateway.db")
    try:
        assert db.count_pending("to_didomi") == 2
    finally:
        db.close()


@pytest.mark.slow
async def test_kill_9_while_writing_back_loses_no_braze_report(
    tmp_path: Path, secrets_env: dict[str, str], fake: FakeBraze, fake_didomi: FakeDidomi
) -> None:
    """Braze's reports accepted before a kill -9 are written to Didomi after the restart, each
    person once: the event id of a write the crash interrupted is the same the second time."""
    fake_didomi.latency_s = 0.3  # writes are in flight when the process dies
    port = free_port()
    reverse_config(tmp_path, port, fake.url, fake_didomi.url)
    people = [f"crash-{n}" for n in range(6)]
    gw = GatewayProcess(tmp_path, port, secrets_env)
    await gw.start()
    try:
        await post_steps(gw.base, people)
        await asyncio.sleep(0.4)
        assert await gw.kill() == -9
        again = GatewayProcess(tmp_path, port, secrets_env)
        await again.start()
        try:

            async def written() -> bool:
                db = SpoolDB(tmp_path / "var" / "gateway.db")
                try:
                    return db.count_pending("to_didomi") == 0
                finally:
                    db.close()

            await eventually(written, 20, "every report written to Didomi after the restart")
            assert await again.stop() == 0
        finally:
            again.cleanup()
    finally:
        gw.cleanup()
    persons = sorted(e.body["user"]["organization_user_id"] for e in fake_didomi.events)
    assert persons == sorted(people)
    assert all(
        e.body["consents"]["purposes"] == [{"id": "marketing_email", "enabled": False}]
        for e in fake_didomi.events
    )
