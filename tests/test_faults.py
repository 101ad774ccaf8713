"""Delivery stays correct under faults: spool errors, poisoned dates, erasure order and dating,
Braze refusing the key or the URL, and a shutdown while delivery waits.

Each test goes through the real HTTP server and delivery context (in-process, or a real
`gateway run` process where the behaviour crosses processes) against the fake Braze on
127.0.0.1, and each failed on the main branch before the fix it covers.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest
import test_end_to_end
from conftest import BRAZE_API_KEY, choice, free_port, write_config
from test_reliability import GatewayProcess, eventually, spool_counts

from gateway.mappings import RuleSet
from gateway.server import DISPATCHER, SPOOL
from gateway.spool import SpoolDB
from gateway.testing import FakeBraze

start_gateway = test_end_to_end.start_gateway  # the same fixture: a gateway on the fake Braze
StartGateway = test_end_to_end.StartGateway


def user_deleted(person: str, at: str | None = "2025-06-12T14:03:55Z", n: int = 0) -> bytes:
    """A Didomi user.deleted body for `person`, dated `at` (or undated)."""
    entity: dict[str, Any] = {"id": f"didomi-{person}-{n}", "organization_user_id": person}
    if at is not None:
        entity["created_at"] = entity["updated_at"] = at
    return msgspec.json.encode({"type": "user.deleted", "parameters": {"entity": entity}})


def now_iso(offset_s: float = 0.0) -> str:
    """The current UTC time as Didomi writes it, shifted by `offset_s`."""
    return datetime.fromtimestamp(time.time() + offset_s, tz=UTC).isoformat()


def seed(directory: Path, *bodies: bytes) -> None:
    """Store webhooks in the spool before the gateway starts, so they form one backlog."""
    from gateway.webhooks import decode

    db = SpoolDB(directory / "var" / "gateway.db")
    try:
        for body in bodies:
            webhook = decode(body)
            db.put_many([(webhook.dedupe_key(), webhook.type, body)])
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
    start_gateway: StartGateway, fake: FakeBraze, tmp_path: Path
) -> None:
    """Backlog [Q delete, P update@T1, P delete@T2] in upsert mode: P's update reaches Braze
    before P's deletion, so the erased profile is not re-created."""
    write_config(tmp_path)  # the folder the spool lives in
    seed(
        tmp_path,
        user_deleted("quinn"),
        choice("pat", True, "2025-06-12T14:00:00Z"),
        user_deleted("pat", "2025-06-12T14:05:00Z"),
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
        await gw.post(
            choice("una", True, "2025-06-13T10:00:00Z", topics="product_news"), auth_headers
        )
        == 202
    )
    await gw.settle()
    assert fake.users["una"].email_subscribe == "opted_in"
    assert await gw.post(user_deleted("una", "2025-06-12T14:03:55Z"), auth_headers) == 202
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
    assert await gw.post(choice("undated", True, "2025-06-13T10:00:00Z"), auth_headers) == 202
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
