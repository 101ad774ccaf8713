"""The delivery engine against a fake Braze on loopback: batching, retries, limits, dead letters."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest

from gateway.config.settings import BrazeConfig, Config, DeliveryConfig
from gateway.delivery import worker
from gateway.forward.dispatcher import Dispatcher
from gateway.metrics import Metrics
from gateway.peers.braze import open_client
from gateway.rules.mappings import Options, load_rules
from gateway.spool.face import Spool
from gateway.spool.sqlite import SpoolDB
from gateway.testing.braze import FakeBraze
from tests.conftest import BRAZE_API_KEY, free_port
from tests.conftest import choice as event

ROOT = Path(__file__).resolve().parents[2]
NEWS = "3b0a6f8e-5c1d-4e2f-9a7b-0c1d2e3f4a5b"
OFFERS = "7c1e2d3f-4a5b-4c6d-8e9f-0a1b2c3d4e5f"
KEY = BRAZE_API_KEY


class Harness:
    """A spool, a dispatcher and a fake Braze wired together for one test."""

    def __init__(
        self, tmp_path: Path, fake: FakeBraze, options: Options | None = None, **overrides: Any
    ) -> None:
        braze = {"server": fake.url, "api_key": KEY, "flush_interval_ms": 20, "timeout_s": 2.0}
        delivery = {"spool": str(tmp_path / "spool.db"), "retry_initial_ms": 10, "retry_max_ms": 80}
        for key, value in overrides.items():
            section, name = key.split("__")
            {"braze": braze, "delivery": delivery}[section][name] = value
        self.config = Config(braze=BrazeConfig(**braze), delivery=DeliveryConfig(**delivery))
        self.fake = fake
        self.metrics = Metrics()
        self.rules = load_rules(ROOT / "mappings", options)
        self.spool = Spool(SpoolDB(self.config.delivery.spool))
        self.dispatcher: Dispatcher | None = None

    async def put(self, *bodies: bytes) -> None:
        from gateway.shapes.webhooks import decode

        for body in bodies:
            webhook = decode(body)
            await self.spool.put(webhook.dedupe_key(), webhook.type, body)
        if self.dispatcher:
            self.dispatcher.wake()

    async def put_backlog(self, *bodies: bytes) -> None:
        """Store the bodies in one transaction, as a backlog the dispatcher finds all at once
        (after an outage, say), however fast this machine is at storing them one by one."""
        from gateway.shapes.webhooks import decode

        items = [(decode(body).dedupe_key(), decode(body).type, body) for body in bodies]
        assert all(r is True for r in await self.spool.run(self.spool.db.put_many, items))
        if self.spool.handoff is not None:
            # Stored behind intake's back, as another process would: delivery reads them from
            # the file at once, as it does a backlog found at start.
            (last,) = self.spool.db.db.execute("SELECT max(id) FROM inbox").fetchone()
            self.spool.handoff.gap(last)
        if self.dispatcher:
            self.dispatcher.wake()

    async def settle(self, timeout: float = 20.0) -> None:
        """Wait until the spool is empty and nothing is in flight."""
        assert self.dispatcher is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.spool.db.count_pending() == 0 and self.dispatcher.idle:
                return
            await asyncio.sleep(0.02)
        raise AssertionError(f"not settled: {self.spool.db.count_pending()} pending")

    def sample(self, name: str, **labels: str) -> float:
        value = self.metrics.registry.get_sample_value(name, labels or None)
        return value or 0.0


@pytest.fixture
def harness(tmp_path: Path) -> Callable[..., Any]:
    """Build a harness and run its dispatcher for the duration of an `async with`."""
    created: list[Harness] = []

    class Running:
        def __init__(
            self, fake: FakeBraze, options: Options | None = None, **overrides: Any
        ) -> None:
            self.h = Harness(tmp_path, fake, options, **overrides)
            created.append(self.h)

        async def __aenter__(self) -> Harness:
            h = self.h
            self._client = open_client(h.config.braze, h.metrics)
            client = await self._client.__aenter__()
            h.dispatcher = Dispatcher(h.config, h.spool, lambda: h.rules, client, h.metrics)
            await h.dispatcher.start()
            return h

        async def __aexit__(self, *exc: object) -> None:
            assert self.h.dispatcher is not None
            await self.h.dispatcher.stop(grace_s=2.0)
            await self._client.__aexit__(None, None, None)
            await self.h.spool.close()

    return Running


async def test_delivers_and_removes_from_spool(fake: FakeBraze, harness: Any) -> None:
    """Each person's choice reaches Braze, and the spool is empty once Braze acknowledged."""
    async with harness(fake) as h:
        await h.put(event("alice", True, topics="product_news"), event("bob", False))
        await h.settle()
    assert fake.users["alice"].email_subscribe == "opted_in"
    assert fake.users["alice"].subscription_groups == {NEWS: "subscribed", OFFERS: "unsubscribed"}
    assert fake.users["bob"].email_subscribe == "unsubscribed"
    assert all(o["_update_existing_only"] is True for o in fake.objects_sent())
    assert h.sample("gateway_updates_delivered_total", direction="to_braze") == 2
    assert h.sample("gateway_delivery_latency_seconds_count", direction="to_braze") == 2


async def test_coalesces_one_person_into_one_object(fake: FakeBraze, harness: Any) -> None:
    """Several events of one person in one batch become one object carrying the latest choice."""
    async with harness(fake, braze__flush_interval_ms=300) as h:
        await h.put(
            event("carol", True, at="2025-03-14T09:00:00Z"),
            event("carol", False, at="2025-03-14T10:00:00Z"),
            event("carol", True, at="2025-03-14T09:30:00Z"),
        )
        await h.settle()
    sent = fake.objects_sent()
    assert len(sent) == 1
    assert sent[0]["email_subscribe"] == "unsubscribed"
    assert fake.users["carol"].email_subscribe == "unsubscribed"


async def test_ten_thousand_events_batch_well_and_end_correct(
    fake: FakeBraze, harness: Any
) -> None:
    """A backlog of 10,000 events through a 50 ms Braze averages over 60 objects a request,
    all states right. (Stored one by one while delivery runs, batches are as full as intake is
    fast: on a busy machine they leave half full at the flush interval, as they should.)"""
    fake.latency_s = 0.05
    rng = random.Random(7)
    persons = [f"user-{i}" for i in range(4000)]
    expected: dict[str, str] = {}
    bodies = []
    for n in range(10_000):
        person = rng.choice(persons)
        enabled = rng.random() < 0.5
        at = f"2025-03-14T09:{n // 600:02d}:{(n // 10) % 60:02d}.{n % 10}00Z"
        bodies.append(event(person, enabled, at=at))
        expected[person] = "opted_in" if enabled else "unsubscribed"
    async with harness(fake, braze__flush_interval_ms=100) as h:
        await h.put_backlog(*bodies)
        await h.settle(timeout=120)
    track = [r for r in fake.requests if r.path == "/users/track"]
    assert max(r.object_count for r in track) <= 75
    average = sum(r.object_count for r in track) / len(track)
    assert average > 60, f"average {average:.1f} objects per request"
    assert {p: u.email_subscribe for p, u in fake.users.items()} == expected


async def test_server_errors_retry_then_deliver(fake: FakeBraze, harness: Any) -> None:
    """5xx answers are retried with backoff until Braze takes the update."""
    fake.fail_next(503, count=3)
    async with harness(fake) as h:
        await h.put(event("dan", True))
        await h.settle()
        assert h.sample("gateway_retries_total", direction="to_braze", reason="server_error") == 3
        assert h.spool.db.count_dead() == 0
    assert fake.users["dan"].email_subscribe == "opted_in"


async def test_timeouts_retry_then_deliver(fake: FakeBraze, harness: Any) -> None:
    """A Braze slower than timeout_s is retried, and the update lands once it answers in time."""
    fake.latency_s = 1.0
    async with harness(fake, braze__timeout_s=0.2) as h:
        await h.put(event("erin", True))
        while h.sample("gateway_retries_total", direction="to_braze", reason="timeout") < 2:
            await asyncio.sleep(0.05)
        fake.latency_s = 0.0
        await h.settle()
    assert fake.users["erin"].email_subscribe == "opted_in"


async def test_connection_refused_retries_until_braze_is_back(tmp_path: Path, harness: Any) -> None:
    """While nothing listens at the Braze address updates wait; when it comes up they land."""
    port = free_port()
    fake = FakeBraze(api_key=KEY)
    fake.url = f"http://127.0.0.1:{port}"
    async with harness(fake) as h:
        await h.put(event("fay", True))
        while h.sample("gateway_retries_total", direction="to_braze", reason="connection") < 2:
            await asyncio.sleep(0.05)
        assert h.spool.db.count_pending() == 1
        await fake.start(port=port)
        try:
            await h.settle()
        finally:
            await fake.stop()
    assert fake.users["fay"].email_subscribe == "opted_in"


async def test_a_failed_gauge_read_does_not_stop_the_gauges(
    tmp_path: Path, harness: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One unexpected error reading the gauges (not a SpoolError) is logged and the gauges'
    loop goes on: during a Braze outage the oldest pending age keeps being reported."""
    monkeypatch.setattr(worker, "RECOUNT_S", 0.05)
    port = free_port()
    fake = FakeBraze(api_key=KEY)
    fake.url = f"http://127.0.0.1:{port}"  # nothing listens: the row stays pending
    async with harness(fake) as h:
        read = h.spool.oldest_pending_at
        calls = 0

        async def oldest(direction: Any = "to_braze") -> float | None:
            nonlocal calls
            calls += 1
            if calls == 1:
                raise RuntimeError("a bug in the gauges' read")
            return await read(direction)

        monkeypatch.setattr(h.spool, "oldest_pending_at", oldest)
        await h.put(event("gus", True))
        deadline = time.monotonic() + 20
        while h.sample("gateway_spool_oldest_pending_age_seconds", direction="to_braze") <= 0:
            assert time.monotonic() < deadline, f"the age was never reported ({calls} reads)"
            await asyncio.sleep(0.05)
        assert calls >= 2


async def test_a_failing_loop_pauses_even_while_webhooks_keep_waking_it(
    fake: FakeBraze, harness: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While every turn of the loop fails, it tries again after its pause, not at each
    webhook's wake-up: a failure that persists is not retried (and logged) per request."""
    async with harness(fake) as h:
        dispatcher = h.dispatcher
        tries = 0

        async def broken() -> None:
            nonlocal tries
            tries += 1
            raise RuntimeError("a page that cannot be read")

        monkeypatch.setattr(dispatcher, "_read_page", broken)
        while not tries:
            await asyncio.sleep(0.01)
        seen, began = tries, time.monotonic()
        for _ in range(50):  # intake storing webhooks, each waking the loop
            dispatcher.wake()
            await asyncio.sleep(0.005)
        took = time.monotonic() - began
        allowed = took / worker.LOOP_PAUSE_S + 2  # however slow the machine is
        assert tries - seen <= allowed, f"{tries - seen} tries in {took:.2f} s"


async def test_429_waits_for_retry_after(fake: FakeBraze, harness: Any) -> None:
    """A 429 holds every request for the time Braze asks, then the update is sent again."""
    fake.fail_next(429, headers={"X-Ratelimit-Retry-After": "0.5"})
    async with harness(fake) as h:
        started = time.monotonic()
        await h.put(event("gus", True))
        await h.settle()
        elapsed = time.monotonic() - started
        assert h.sample("gateway_retries_total", direction="to_braze", reason="rate_limited") == 1
    assert fake.users["gus"].email_subscribe == "opted_in"
    assert elapsed >= 0.45


async def test_remaining_zero_waits_for_reset_so_no_429(harness: Any) -> None:
    """When X-RateLimit-Remaining reaches 0 the client waits for the reset, so no 429 comes."""
    fake = FakeBraze(api_key=KEY, rate_limit=2, rate_window_s=0.5, reset_style="seconds")
    await fake.start()
    try:
        async with harness(fake, braze__batch_size=5, braze__flush_interval_ms=5) as h:
            for i in range(6):
                await h.put(*(event(f"p{i}-{j}", True) for j in range(5)))
                await asyncio.sleep(0.02)
            await h.settle()
        assert len(fake.users) == 30
        assert all(r.status != 429 for r in fake.requests)
        assert h.sample("gateway_braze_rate_limit_remaining") >= 0
    finally:
        await fake.stop()


async def test_unauthorized_keeps_everything_until_the_key_works(
    fake: FakeBraze, harness: Any
) -> None:
    """A 401 never dead-letters: updates wait, delivery health says why, and they flow once
    fixed."""
    fake.api_key = "rotated-key"
    async with harness(fake) as h:
        await h.put(event("hal", True), event("ivy", False))
        while h.sample("gateway_retries_total", direction="to_braze", reason="unauthorized") < 2:
            await asyncio.sleep(0.05)
        assert h.dispatcher is not None
        reason = h.dispatcher.degraded_reason()
        assert reason is not None
        assert "401" in reason
        assert h.sample("gateway_braze_auth_ok") == 0
        assert h.sample("gateway_delivery_blocked", direction="to_braze", reason="401") == 1
        assert h.spool.db.count_pending() == 2
        fake.api_key = KEY
        await h.settle()
        assert h.dispatcher.degraded_reason() is None
        assert h.sample("gateway_braze_auth_ok") == 1
        assert h.sample("gateway_delivery_blocked", direction="to_braze", reason="401") == 0
        assert h.spool.db.count_dead() == 0
    assert fake.users["ivy"].email_subscribe == "unsubscribed"


async def test_400_splits_the_batch_and_dead_letters_only_the_bad_object(
    fake: FakeBraze, harness: Any
) -> None:
    """A 400 halves the batch until the one object Braze refuses is alone, then dead-letters it."""
    fake.refuse_with_400 = lambda o: o.get("external_id") == "bad-jim"  # type: ignore[attr-defined]
    async with harness(fake, braze__flush_interval_ms=200) as h:
        await h.put(*(event(f"ok-{i}", True) for i in range(7)), event("bad-jim", True))
        await h.settle()
        letters = h.spool.db.dead_letters()
        assert (
            h.sample("gateway_updates_failed_total", direction="to_braze", reason="bad_request")
            == 1
        )
    assert [letter.person for letter in letters] == ["bad-jim"]
    assert "400" in letters[0].reason
    assert len(fake.users) == 7


async def test_per_object_errors_dead_letter_just_those(fake: FakeBraze, harness: Any) -> None:
    """A 201 whose errors name some objects dead-letters those and acknowledges the rest."""
    fake.reject_objects(lambda o: "invalid_user" if o.get("external_id") == "kim" else None)
    async with harness(fake, braze__flush_interval_ms=200) as h:
        await h.put(event("kim", True), event("leo", True), event("max", False))
        await h.settle()
        letters = h.spool.db.dead_letters()
        assert (
            h.sample("gateway_updates_failed_total", direction="to_braze", reason="rejected") == 1
        )
        assert h.sample("gateway_updates_delivered_total", direction="to_braze") == 2
    assert [(letter.person, letter.type) for letter in letters] == [("kim", "event.created")]
    assert "invalid_user" in letters[0].reason
    assert set(fake.users) == {"leo", "max"}


async def test_gives_up_after_the_configured_time(fake: FakeBraze, harness: Any) -> None:
    """An update still failing after give_up_after_s goes to the dead letters with the reason."""
    fake.fail_next(500, count=1000)
    async with harness(fake, delivery__give_up_after_s=0.3) as h:
        await h.put(event("ned", True))
        await h.settle()
        letters = h.spool.db.dead_letters()
    assert len(letters) == 1
    assert letters[0].reason.startswith("gave_up")
    assert "500" in letters[0].reason


async def test_upsert_mode_creates_unknown_users(harness: Any) -> None:
    """With update_existing_only = false, objects say so and Braze creates the missing user."""
    fake = FakeBraze(api_key=KEY, known_users={"old"})
    await fake.start()
    try:
        async with harness(fake, braze__update_existing_only=False) as h:
            await h.put(event("new-person", True))
            await h.settle()
    finally:
        await fake.stop()
    assert fake.objects_sent()[0]["_update_existing_only"] is False
    assert fake.users["new-person"].email_subscribe == "opted_in"


async def test_stale_choice_is_dropped(fake: FakeBraze, harness: Any) -> None:
    """A choice older than one already applied to that person and target never overwrites it."""
    async with harness(fake) as h:
        await h.put(event("ola", False, at="2025-03-14T10:00:00Z"))
        await h.settle()
        await h.put(event("ola", True, at="2025-03-14T09:00:00Z"))
        await h.settle()
        assert h.sample("gateway_events_skipped_total", direction="to_braze", reason="stale") >= 1
    assert fake.users["ola"].email_subscribe == "unsubscribed"
    assert len(fake.objects_sent()) == 1


async def test_shuffled_events_end_in_the_latest_state(fake: FakeBraze, harness: Any) -> None:
    """Events of the same people delivered in random order leave each person's latest choice."""
    rng = random.Random(3)
    bodies, expected = [], {}
    for person in (f"s{i}" for i in range(20)):
        choices = [(f"2025-03-14T09:{m:02d}:00Z", rng.random() < 0.5) for m in range(10)]
        expected[person] = "opted_in" if choices[-1][1] else "unsubscribed"
        bodies.extend(event(person, enabled, at=at) for at, enabled in choices)
    rng.shuffle(bodies)
    async with harness(fake, braze__batch_size=7, braze__flush_interval_ms=5) as h:
        for body in bodies:
            await h.put(body)
        await h.settle()
    assert {p: u.email_subscribe for p, u in fake.users.items()} == expected


def user_deleted(person: str, at: str = "2025-06-12T14:03:55Z") -> bytes:
    """A Didomi user.deleted body for `person`."""
    return msgspec.json.encode(
        {
            "type": "user.deleted",
            "parameters": {
                "entity": {
                    "id": f"didomi-{person}",
                    "organization_user_id": person,
                    "created_at": at,
                    "updated_at": at,
                }
            },
        }
    )


async def test_user_deleted_delete_mode_calls_users_delete_once(
    fake: FakeBraze, harness: Any
) -> None:
    """With on_user_deleted = "delete", Braze's /users/delete is called once for the external id."""
    async with harness(fake, Options(on_user_deleted="delete")) as h:
        await h.put(event("zoe", True))
        await h.settle()
        await h.put(user_deleted("zoe"), user_deleted("zoe"))  # Didomi may deliver twice
        await h.settle()
    deletes = [r for r in fake.requests if r.path == "/users/delete"]
    assert [r.body for r in deletes] == [{"external_ids": ["zoe"]}]
    assert fake.deleted == ["zoe"]
    assert "zoe" not in fake.users


async def test_user_deleted_delete_mode_retries_like_track(fake: FakeBraze, harness: Any) -> None:
    """A failing /users/delete is retried with the same rules as /users/track."""
    fake.fail_next(502, count=2)
    async with harness(fake, Options(on_user_deleted="delete")) as h:
        await h.put(user_deleted("yan"))
        await h.settle()
        assert h.sample("gateway_retries_total", direction="to_braze", reason="server_error") == 2
    assert fake.deleted == ["yan"]


async def test_user_deleted_unsubscribe_mode(fake: FakeBraze, harness: Any) -> None:
    """With on_user_deleted = "unsubscribe", email and every mapped group are unsubscribed."""
    async with harness(fake, Options(on_user_deleted="unsubscribe")) as h:
        await h.put(event("xia", True, topics="product_news,offers"))
        await h.settle()
        await h.put(user_deleted("xia"))
        await h.settle()
    user = fake.users["xia"]
    assert user.email_subscribe == "unsubscribed"
    assert user.subscription_groups == {NEWS: "unsubscribed", OFFERS: "unsubscribed"}


async def test_user_deleted_is_ignored_by_default(fake: FakeBraze, harness: Any) -> None:
    """By default a user.deleted changes nothing in Braze and is counted."""
    async with harness(fake) as h:
        await h.put(user_deleted("wes"))
        await h.settle()
        assert h.sample("gateway_events_skipped_total", direction="to_braze", reason="deleted") == 1
    assert fake.requests == []


async def test_an_update_then_a_deletion_in_one_batch_are_sent_in_order(
    fake: FakeBraze, harness: Any
) -> None:
    """An update and a deletion of one person never share a request; both go, in their order."""
    async with harness(fake, Options(on_user_deleted="delete"), braze__flush_interval_ms=300) as h:
        await h.put(
            event("vic", True, at="2025-06-12T14:00:00Z"),
            event("wil", True, at="2025-06-12T14:00:00Z"),
            user_deleted("vic"),
            event("wil", False, at="2025-06-12T14:05:00Z"),
        )
        await h.settle()
    paths = [r.path for r in fake.requests]
    assert paths == ["/users/track", "/users/delete"]
    assert fake.deleted == ["vic"]
    assert "vic" not in fake.users
    assert fake.users["wil"].email_subscribe == "unsubscribed"


async def test_erasure_by_email_sends_email_addresses(
    fake: FakeBraze, harness: Any, tmp_path: Path
) -> None:
    """With an email identity, on_user_deleted = "delete" erases by email_addresses, each an
    object with the configured prioritization, which Braze (and the fake) accept."""
    folder = tmp_path / "email-mappings"
    folder.mkdir()
    (folder / "a.toml").write_text(
        '[identity]\nemail = "organization_user_id"\n\n[[map]]\nto = "OPTED_IN"\n'
        'purpose = "marketing_email"\n'
    )
    async with harness(fake, Options(on_user_deleted="delete")) as h:
        h.rules = load_rules(folder, Options(on_user_deleted="delete"))
        await h.put(event("ann@example.com", True))
        await h.settle()
        assert fake.users["email:ann@example.com"].email_subscribe == "opted_in"
        await h.put(user_deleted("ann@example.com"), user_deleted("bob@example.com"))
        await h.settle()
    deletes = [r.body for r in fake.requests if r.path == "/users/delete"]
    # Braze takes objects naming which profile an address means (fake Braze refuses strings).
    order = ["identified", "most_recently_updated"]  # braze.delete_prioritization's default
    assert deletes == [
        {
            "email_addresses": [
                {"email": "ann@example.com", "prioritization": order},
                {"email": "bob@example.com", "prioritization": order},
            ]
        }
    ]
    assert [r.status for r in fake.requests if r.path == "/users/delete"] == [201]
    assert "email:ann@example.com" not in fake.users


def test_the_one_row_trail_is_what_the_general_trail_writes() -> None:
    """`records_of` builds the record of a one-row item directly; for every kind of item (one row,
    several merged, some changes stale, a row overridden, none sent) the records are those
    `records_of_rows` writes."""
    from gateway.forward.batcher import Batcher, Change, Entry
    from gateway.forward.trail import records_of, records_of_rows
    from gateway.rules.mappings import Mapped
    from gateway.shapes.webhooks import decode
    from gateway.spool.store import Pending

    rules = load_rules(ROOT / "mappings")
    bodies = [
        event("ann", True, "2025-01-01T00:00:00Z", topics="news"),
        event("bob", False, "2025-01-01T00:00:00Z"),
        event("bob", True, "2025-01-02T00:00:00Z", topics="offers"),  # merged with bob's first
        event("cid", True, "2025-01-03T00:00:00Z"),
        event("cid", False, "2025-01-01T00:00:00Z"),  # older: every choice overridden
    ]
    entries = []
    for n, body in enumerate(bodies, start=1):
        webhook = decode(body)
        mapped = rules.apply(webhook, received_at=1000.0 + n)
        assert isinstance(mapped, Mapped)
        entries.append(Entry(Pending(n, 1000.0 + n, webhook.type, body, decoded=webhook), mapped))
    batcher = Batcher()
    batcher.add(entries)
    batch = batcher.take(75)
    assert batch is not None
    items = batch.items
    stale = Batcher()
    stale.add([entries[0]])
    taken = stale.take(75)
    assert taken is not None
    dropped = taken.items[0]
    target = next(iter(dropped.changes))
    dropped.stale[target] = dropped.changes.pop(target)  # as `drop_stale` leaves an item
    empty = Batcher()
    empty.add([entries[3]])
    idle = empty.take(75)
    assert idle is not None
    idle.items[0].changes.clear()
    alien = Batcher()
    alien.add([entries[1]])
    other = alien.take(75)
    assert other is not None
    first = next(iter(other.items[0].changes.values()))
    other.items[0].changes[target] = Change(first.state, first.at, entry=entries[2])
    for item in [*items, dropped, idle.items[0], other.items[0]]:
        for args in (("delivered", 5.0, "/users/track", 201), ("dead-lettered", 5.0, None, None)):
            assert records_of(item, *args, "why") == records_of_rows(item, *args, "why")
    assert any(len(item.entries) == 1 and item.changes for item in items)
