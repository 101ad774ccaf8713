"""Both directions through the real server: a Braze unsubscribe reaches Didomi once, and
neither side's echo of the other's change is ever sent back.

The gateway runs in-process with its delivery context, against the fake Braze and the fake
Didomi Consents API on 127.0.0.1. Each test unsubscribes (or changes a group) through one of
Braze's two shapes, checks the consent event the fake Didomi recorded, then feeds the webhook
Didomi would send for it back in and checks that Braze hears nothing.
"""

from __future__ import annotations

import asyncio
import io
import json
import random
import sqlite3
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from gateway.app.reload import LiveRules
from gateway.app.server import CONFIG, SPOOL, WRITEBACK, create_app, delivery
from gateway.cli import trace
from gateway.config.settings import Config
from gateway.errors import SpoolError
from gateway.metrics import Metrics
from gateway.reverse.waiting import SCAN_LIMIT
from gateway.reverse.writeback import WRITE_ATTEMPTS
from gateway.testing.braze import FakeBraze, FakeDidomi, User
from tests.conftest import DIDOMI_API_KEY, DIDOMI_API_SECRET, DIDOMI_ORG, MakeConfig, choice
from tests.system import test_end_to_end

NEWS = "3b0a6f8e-5c1d-4e2f-9a7b-0c1d2e3f4a5b"
OFFERS = "7c1e2d3f-4a5b-4c6d-8e9f-0a1b2c3d4e5f"
BRAZE_TOKEN = "test-braze-webhook-token-77aa"
BRAZE = {"Authorization": f"Bearer {BRAZE_TOKEN}", "Content-Type": "application/json"}
CURRENTS = {**BRAZE, "Braze-Currents-Version": "1"}


class Gateway(test_end_to_end.Gateway):
    """The app under test and its client; `post` takes any route, and answers with the body."""

    async def post(  # type: ignore[override]
        self, path: str, body: Any, headers: dict[str, str]
    ) -> tuple[int, Any]:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        response = await self.client.post(path, data=data, headers=headers)
        return response.status, await response.json()


StartGateway = Callable[..., Awaitable[Gateway]]


@pytest.fixture
def start_gateway(
    aiohttp_client: Any,
    make_config: MakeConfig,
    tmp_path: Path,
    fake: FakeBraze,
    fake_didomi: FakeDidomi,
) -> StartGateway:
    """`await start_gateway(**sections)`: a gateway on the fake Braze and the fake Didomi."""

    async def start(**sections: Any) -> Gateway:
        config: Config = make_config(
            tmp_path,
            braze={"server": fake.url, "flush_interval_ms": 10, **sections.pop("braze", {})},
            delivery={"retry_initial_ms": 10, "retry_max_ms": 50, **sections.pop("delivery", {})},
            braze_webhooks={"tokens": [BRAZE_TOKEN], **sections.pop("braze_webhooks", {})},
            didomi_api={
                "enabled": True,
                "base_url": fake_didomi.url + "/v1",
                "organization_id": DIDOMI_ORG,
                "key": DIDOMI_API_KEY,
                "secret": DIDOMI_API_SECRET,
                **sections.pop("didomi_api", {}),
            },
            **sections,
        )
        metrics = Metrics()
        live = LiveRules.load(config, metrics, tmp_path / "gateway.toml")
        app = create_app(config, metrics=metrics, contexts=[delivery(live)])
        return Gateway(await aiohttp_client(app), config, metrics)

    return start


def step(person: str, at: float, email: str = "", **groups: str) -> dict[str, Any]:
    """A webhook step's body as Braze's Liquid renders it."""
    return {
        "external_id": person,
        "email": f"{person}@example.com",
        "email_subscribe": email,
        "groups": {NEWS: groups.get("news", ""), OFFERS: groups.get("offers", "")},
        "time": str(int(at)),
    }


def currents(*events: dict[str, Any]) -> dict[str, Any]:
    return {"events": list(events)}


def group_change(event_id: str, person: str, group: str, status: str, at: float) -> dict[str, Any]:
    """A Currents subscription group StateChange event."""
    return {
        "event_type": "users.behaviors.subscriptiongroup.StateChange",
        "id": event_id,
        "time": int(at),
        "user": {"user_id": f"braze-{person}", "external_user_id": person},
        "properties": {
            "channel": "email",
            "subscription_group_id": group,
            "subscription_status": status,
            "state_change_source": "Preference Center",
        },
    }


def global_change(
    event_id: str, person: str, status: str, at: float, source: str = "Subscription Page"
) -> dict[str, Any]:
    """A Currents global email GlobalStateChange event."""
    return {
        "event_type": "users.behaviors.subscription.GlobalStateChange",
        "id": event_id,
        "time": int(at),
        "user": {"user_id": f"braze-{person}", "external_user_id": person},
        "properties": {
            "channel": "email",
            "subscription_status": status,
            "state_change_source": source,
        },
    }


def echo_of(event: dict[str, Any], kind: str = "event.created") -> dict[str, Any]:
    """The webhook Didomi sends its integrations for a consent event the gateway wrote."""
    entity = {
        "id": event["id"],
        "created_at": "2026-12-04T10:00:00Z",
        "updated_at": "2026-12-04T10:00:00Z",
        "status": "confirmed",
        "user": {"id": "didomi-1", "organization_user_id": event["user"]["organization_user_id"]},
        "consents": event["consents"],
        "metadata": event.get("metadata", {}),
    }
    if kind == "user.updated":
        user = {**entity, "organization_user_id": entity["user"]["organization_user_id"]}
        user.pop("metadata")
        params = {"source": {"id": event["id"], "type": "event"}, "new_entity": user}
        return {"type": kind, "parameters": {"old_entity": user, **params}}
    return {"type": kind, "parameters": {"entity": entity}}


async def test_a_webhook_step_unsubscribe_reaches_didomi_once_and_its_echo_stays_put(
    start_gateway: StartGateway,
    fake: FakeBraze,
    fake_didomi: FakeDidomi,
    auth_headers: dict[str, str],
) -> None:
    """A global unsubscribe from a webhook step, sent twice by Braze and met by a Didomi 503,
    is one consent event refusing marketing_email; Didomi's webhook for it reaches no Braze."""
    fake_didomi.seed_user(
        "ann",
        [{"id": "marketing_email", "enabled": True, "values": {"topics": {"value": "offers"}}}],
    )
    fake_didomi.fail_next(503, path="/consents/events")
    gw = await start_gateway()
    body = step("ann", time.time(), email="unsubscribed", offers="subscribed")
    assert await gw.post("/webhooks/braze", body, BRAZE) == (202, {"status": "accepted"})
    assert await gw.post("/webhooks/braze", body, BRAZE) == (200, {"status": "duplicate"})
    await gw.settle()
    assert len(fake_didomi.events) == 1
    event = fake_didomi.events[0].body
    assert event["user"] == {"organization_user_id": "ann"}
    assert event["consents"]["purposes"] == [{"id": "marketing_email", "enabled": False}]
    assert event["metadata"] == {"source": "didomi-braze-gateway"}
    assert gw.sample("gateway_retries_total", direction="to_didomi", reason="server_error") == 1
    assert gw.sample("gateway_updates_delivered_total", direction="to_didomi") == 1
    assert fake_didomi.user("ann")["consents"]["purposes"][0]["enabled"] is False  # type: ignore[index]

    status, _ = await gw.post("/webhooks/didomi", echo_of(event), auth_headers)
    assert status == 202
    await gw.settle()
    assert fake.requests == []
    assert gw.sample("gateway_events_skipped_total", direction="to_braze", reason="echo") == 1


async def test_a_currents_group_unsubscribe_keeps_the_other_values_and_its_echo_stays_put(
    start_gateway: StartGateway,
    fake: FakeBraze,
    fake_didomi: FakeDidomi,
    auth_headers: dict[str, str],
) -> None:
    """A group unsubscribe from Currents, in a batch with an event of another type and a broken
    one, retried by Braze and met by a Didomi 429, removes that one value and keeps the person's
    others; Didomi's user.updated for it reaches no Braze."""
    fake_didomi.seed_user(
        "bea",
        [
            {
                "id": "marketing_email",
                "enabled": True,
                "values": {"topics": {"value": "product_news,offers"}},
            }
        ],
    )
    fake_didomi.fail_next(429, path="/consents/events", headers={"Retry-After": "0.2"})
    gw = await start_gateway()
    batch = currents(
        group_change("cur-1", "bea", OFFERS, "Unsubscribed", time.time()),
        {"event_type": "users.messages.email.Open", "id": "open-1", "time": 1},
        {"event_type": "users.behaviors.subscriptiongroup.StateChange", "id": "broken"},
    )
    status, answer = await gw.post("/webhooks/braze/currents", batch, CURRENTS)
    assert (status, answer["stored"], answer["ignored"], answer["invalid"]) == (202, 1, 1, 1)
    status, answer = await gw.post("/webhooks/braze/currents", batch, CURRENTS)  # Braze retries
    assert (status, answer["stored"], answer["duplicates"]) == (200, 0, 1)
    await gw.settle()
    assert len(fake_didomi.events) == 1
    event = fake_didomi.events[0].body
    assert event["consents"]["purposes"] == [
        {"id": "marketing_email", "values": {"topics": {"value": "product_news"}}}
    ]
    assert gw.sample("gateway_retries_total", direction="to_didomi", reason="rate_limited") == 1

    status, _ = await gw.post("/webhooks/didomi", echo_of(event, "user.updated"), auth_headers)
    assert status == 202
    await gw.settle()
    assert fake.requests == []


async def test_braze_echoing_the_gateways_own_write_is_not_sent_to_didomi(
    start_gateway: StartGateway,
    fake: FakeBraze,
    fake_didomi: FakeDidomi,
    auth_headers: dict[str, str],
) -> None:
    """A Didomi opt-in sent to Braze comes back from Currents as a REST API change of the same
    state: it is dropped as an echo; a later unsubscribe by the person is written back."""
    gw = await start_gateway()
    assert await gw.post("/webhooks/didomi", json.loads(choice("cal", True)), auth_headers) == (
        202,
        {"status": "accepted"},
    )
    await gw.settle()
    assert fake.users["cal"].email_subscribe == "opted_in"
    echo = global_change("cur-echo", "cal", "Opted In", time.time(), source="REST API")
    status, _ = await gw.post("/webhooks/braze/currents", currents(echo), CURRENTS)
    assert status == 202
    await gw.settle()
    assert fake_didomi.events == []
    assert gw.sample("gateway_events_skipped_total", direction="to_didomi", reason="echo") == 1

    real = global_change("cur-real", "cal", "Unsubscribed", time.time() + 1)
    assert (await gw.post("/webhooks/braze/currents", currents(real), CURRENTS))[0] == 202
    await gw.settle()
    assert [e.body["consents"]["purposes"] for e in fake_didomi.events] == [
        [{"id": "marketing_email", "enabled": False}]
    ]


async def test_a_braze_change_older_than_the_last_didomi_choice_is_stale(
    start_gateway: StartGateway, fake_didomi: FakeDidomi, auth_headers: dict[str, str]
) -> None:
    """A Braze unsubscribe dated before the Didomi opt-in already applied is not written back:
    it would undo a newer choice."""
    gw = await start_gateway()
    opted_in = choice("dee", True, "2026-12-04T10:00:00Z")
    assert (await gw.post("/webhooks/didomi", json.loads(opted_in), auth_headers))[0] == 202
    await gw.settle()
    older = step("dee", 1_700_000_000, email="unsubscribed")  # November 2023
    assert (await gw.post("/webhooks/braze", older, BRAZE))[0] == 202
    await gw.settle()
    assert fake_didomi.events == []
    assert gw.sample("gateway_events_skipped_total", direction="to_didomi", reason="stale") == 1


async def test_a_refused_didomi_key_holds_braze_changes_and_readiness_stays_200(
    start_gateway: StartGateway, fake_didomi: FakeDidomi
) -> None:
    """A 403 from Didomi dead-letters nothing: the change waits, /readyz names the problem
    while taking webhooks, and it is written once Didomi accepts again."""
    fake_didomi.fail_next(403, count=1000, path="/consents/users")
    gw = await start_gateway()
    assert (await gw.post("/webhooks/braze", step("eli", time.time(), "unsubscribed"), BRAZE))[
        0
    ] == 202
    deadline = time.monotonic() + 10
    while gw.sample("gateway_delivery_blocked", direction="to_didomi", reason="403") != 1:
        assert time.monotonic() < deadline, "the 403 was never reported"
        await asyncio.sleep(0.02)
    response = await gw.client.get("/readyz")
    assert response.status == 200
    assert "Didomi" in (await response.json())["degraded"]
    assert gw.app[SPOOL].db.count_dead() == 0
    fake_didomi.clear_faults()
    await gw.settle()
    assert len(fake_didomi.events) == 1
    assert gw.sample("gateway_delivery_blocked", direction="to_didomi", reason="403") == 0


async def test_braze_routes_refuse_bad_tokens_and_bodies_and_are_absent_unless_configured(
    start_gateway: StartGateway, aiohttp_client: Any, make_config: MakeConfig, tmp_path: Path
) -> None:
    """No token is 401, a broken body 400 (an unknown Currents version is read, not refused);
    without [braze_webhooks] the routes are not there at all (404)."""
    gw = await start_gateway()
    assert (await gw.post("/webhooks/braze", step("fay", 1), {}))[0] == 401
    wrong = {**BRAZE, "Authorization": "Bearer nope"}
    assert (await gw.post("/webhooks/braze/currents", currents(), wrong))[0] == 401
    assert (await gw.post("/webhooks/braze", b"{not json", BRAZE))[0] == 400
    assert (await gw.post("/webhooks/braze", {"time": "1"}, BRAZE))[0] == 400
    v2 = {**CURRENTS, "Braze-Currents-Version": "2"}
    assert (await gw.post("/webhooks/braze/currents", currents(), v2))[0] == 200
    assert (await gw.post("/webhooks/braze/currents", {"nope": 1}, CURRENTS))[0] == 400
    (tmp_path / "plain").mkdir()
    plain = await aiohttp_client(create_app(make_config(tmp_path / "plain")))
    assert (await plain.post("/webhooks/braze", json=step("fay", 1))).status == 404
    assert (await plain.post("/webhooks/braze/currents", json=currents())).status == 404


def didomi_topics(person: str, topics: str, at: str, event_id: str) -> dict[str, Any]:
    """A Didomi event.created: `person` consents to marketing_email with these topics."""
    entity = {
        "id": event_id,
        "created_at": at,
        "updated_at": at,
        "status": "confirmed",
        "user": {"id": f"didomi-{person}", "organization_user_id": person},
        "consents": {
            "purposes": [
                {"id": "marketing_email", "enabled": True, "values": {"topics": {"value": topics}}}
            ]
        },
    }
    return {"type": "event.created", "parameters": {"entity": entity}}


def iso(at: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(at))


async def test_a_webhook_steps_unchanged_targets_never_undo_a_pending_didomi_withdrawal(
    start_gateway: StartGateway,
    fake: FakeBraze,
    fake_didomi: FakeDidomi,
    auth_headers: dict[str, str],
) -> None:
    """A step fired for a new Offers subscription also renders the old Product news state;
    that unchanged state must not re-subscribe a person whose Didomi withdrawal of it is still
    waiting for Braze, in either system: the step waits for the withdrawal, which Braze then
    holds, and both systems agree on it."""
    gw = await start_gateway(braze_webhooks={"echo_window_s": 0})  # no echo window to hide it
    now = time.time()
    opted = didomi_topics("ann", "product_news", iso(now - 60), "ev-1")
    assert (await gw.post("/webhooks/didomi", opted, auth_headers))[0] == 202
    await gw.settle()
    assert fake.users["ann"].subscription_groups[NEWS] == "subscribed"
    fake.fail_next(503, count=1000)  # Braze is down while Ann withdraws product news
    fake_didomi.seed_user(
        "ann", [{"id": "marketing_email", "enabled": True, "values": {"topics": {"value": ""}}}]
    )
    withdrawn = didomi_topics("ann", "", iso(now - 5), "ev-2")
    assert (await gw.post("/webhooks/didomi", withdrawn, auth_headers))[0] == 202
    await asyncio.sleep(0.3)
    body = step("ann", now, email="opted_in", news="subscribed", offers="subscribed")
    assert (await gw.post("/webhooks/braze", body, BRAZE))[0] == 202
    await asyncio.sleep(0.5)
    assert fake_didomi.events == []  # nothing written over the unsettled withdrawal (held or stale)
    fake.heal()
    await gw.settle()
    user = fake_didomi.user("ann")
    assert user is not None
    topics = user["consents"]["purposes"][0]["values"]["topics"]["value"]
    # The withdrawal (topics "", so Offers refused too) reached Braze after the step's
    # snapshot was rendered: Braze holds it since, and Didomi keeps it.
    assert topics == ""
    assert fake.users["ann"].subscription_groups[NEWS] == "unsubscribed"
    assert fake.users["ann"].subscription_groups[OFFERS] == "unsubscribed"
    assert gw.sample("gateway_events_skipped_total", direction="to_didomi", reason="echo") == 0


async def test_a_braze_time_in_milliseconds_does_not_freeze_later_didomi_choices(
    start_gateway: StartGateway,
    fake: FakeBraze,
    fake_didomi: FakeDidomi,
    auth_headers: dict[str, str],
) -> None:
    """A step whose `time` is rendered in milliseconds is dated at its arrival (counted), so a
    later Didomi withdrawal still reaches Braze."""
    gw = await start_gateway()
    assert (await gw.post("/webhooks/braze", step("zed", time.time() * 1000, "opted_in"), BRAZE))[
        0
    ] == 202
    await gw.settle()
    assert len(fake_didomi.events) == 1
    assert gw.sample("gateway_event_dates_clamped_total") == 1
    await asyncio.sleep(0.05)
    withdrawn = json.loads(choice("zed", False, iso(time.time() + 1)))
    assert (await gw.post("/webhooks/didomi", withdrawn, auth_headers))[0] == 202
    await gw.settle()
    assert fake.users["zed"].email_subscribe == "unsubscribed"


async def test_a_late_didomi_retry_never_undoes_a_newer_braze_change_written_back(
    start_gateway: StartGateway,
    fake: FakeBraze,
    fake_didomi: FakeDidomi,
    auth_headers: dict[str, str],
) -> None:
    """A Braze unsubscribe written back to Didomi at T2 beats a Didomi opt-in dated T1 < T2
    that arrives later (a retry): Braze's email is not re-subscribed (the attribute, which
    Braze never reported, still follows Didomi)."""
    gw = await start_gateway()
    now = time.time()
    assert (await gw.post("/webhooks/braze", step("gil", now, "unsubscribed"), BRAZE))[0] == 202
    await gw.settle()
    assert len(fake_didomi.events) == 1
    late = json.loads(choice("gil", True, iso(now - 30)))
    assert (await gw.post("/webhooks/didomi", late, auth_headers))[0] == 202
    await gw.settle()
    assert [o.get("email_subscribe") for o in fake.objects_sent()] == [None]
    assert fake.users["gil"].attributes == {"consent_marketing": True}
    assert gw.sample("gateway_events_skipped_total", direction="to_braze", reason="stale") == 1


async def test_an_echo_is_only_an_echo_within_the_window_and_from_the_api(
    start_gateway: StartGateway,
    fake: FakeBraze,
    fake_didomi: FakeDidomi,
    auth_headers: dict[str, str],
) -> None:
    """A state Braze already holds is never written back; within the window and from the REST
    API it counts as an echo, from a person's own action as unchanged."""
    gw = await start_gateway()
    assert (await gw.post("/webhooks/didomi", json.loads(choice("hal", True)), auth_headers))[
        0
    ] == 202
    await gw.settle()
    own = global_change("c-own", "hal", "Opted In", time.time(), source="Subscription Page")
    api = global_change("c-api", "hal", "Opted In", time.time(), source="REST API")
    assert (await gw.post("/webhooks/braze/currents", currents(own, api), CURRENTS))[0] == 202
    await gw.settle()
    assert fake_didomi.events == []
    skipped = "gateway_events_skipped_total"
    assert gw.sample(skipped, direction="to_didomi", reason="unchanged") == 1
    assert gw.sample(skipped, direction="to_didomi", reason="echo") == 1


async def test_braze_reports_beyond_their_cap_get_503_and_leave_didomis_room(
    start_gateway: StartGateway, fake_didomi: FakeDidomi, auth_headers: dict[str, str]
) -> None:
    """With Didomi refusing the key, Braze's reports stop at braze_webhooks.max_pending (503,
    Braze retries) while Didomi's webhooks are still stored."""
    fake_didomi.fail_next(403, count=1000)
    gw = await start_gateway(braze_webhooks={"max_pending": 2})
    statuses = [
        (await gw.post("/webhooks/braze", step(f"cap-{n}", time.time(), "unsubscribed"), BRAZE))[0]
        for n in range(3)
    ]
    assert statuses == [202, 202, 503]
    assert (await gw.post("/webhooks/didomi", json.loads(choice("room", True)), auth_headers))[
        0
    ] == 202


async def test_a_braze_unsubscribe_is_traced_with_the_event_id_written_to_didomi(
    start_gateway: StartGateway, fake_didomi: FakeDidomi
) -> None:
    """A Braze change written back is traced to_didomi with the event id Didomi got, and status."""
    fake_didomi.seed_user("bea", [{"id": "marketing_email", "enabled": True}])
    gw = await start_gateway()
    body = step("bea", time.time(), email="unsubscribed")
    assert (await gw.post("/webhooks/braze", body, BRAZE))[0] == 202
    await gw.settle()
    written = fake_didomi.events[0].body["id"]
    out = io.StringIO()
    assert trace.command(gw.app[CONFIG], None, event_id=written, as_json=True, out=out) == 0
    records = [json.loads(line) for line in out.getvalue().splitlines()]
    record = next(r for r in records if r["target"] == "email_subscribe")
    assert record["direction"] == "to_didomi"
    assert record["event"] == {"id": written, "type": "braze.step", "at": record["event"]["at"]}
    assert record["endpoint"] == "/consents/events"
    assert record["state"] == "unsubscribed"
    assert record["outcome"] == "delivered"
    assert 200 <= record["status"] < 300
    assert record["rule"].endswith("email.toml:7")


async def test_a_spool_error_while_writing_back_strands_no_report_and_no_person(
    start_gateway: StartGateway, fake_didomi: FakeDidomi, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When reading the states sent to Braze fails between fetching a report and acknowledging
    it, the report goes back and its person is freed: it is written once the spool reads."""
    gw = await start_gateway()
    db = gw.app[SPOOL].db
    real = db.sent_states
    failures = {"left": 2}

    def flaky(persons: Any) -> Any:
        if failures["left"]:
            failures["left"] -= 1
            raise sqlite3.OperationalError("disk I/O error")
        return real(persons)

    monkeypatch.setattr(db, "sent_states", flaky)
    assert (await gw.post("/webhooks/braze", step("ivy", time.time(), "unsubscribed"), BRAZE))[
        0
    ] == 202
    await gw.settle(timeout=20)
    assert failures["left"] == 0
    assert [e.body["user"]["organization_user_id"] for e in fake_didomi.events] == ["ivy"]
    assert gw.app[WRITEBACK].idle


async def test_a_spool_that_fails_more_often_than_a_bug_may_dead_letters_no_report(
    start_gateway: StartGateway, fake_didomi: FakeDidomi, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A spool error (as the spool raises it) between fetching a report and acknowledging it is
    the spool's, not the report's: however often it repeats, the report goes back and is
    written once the spool reads, never moved to the dead letters as one that always raises."""
    gw = await start_gateway()
    db = gw.app[SPOOL].db
    real = db.sent_states
    failures = {"left": WRITE_ATTEMPTS + 2}

    def down(persons: Any) -> Any:
        if failures["left"]:
            failures["left"] -= 1
            raise SpoolError("cannot read the states sent from the spool: disk I/O error")
        return real(persons)

    monkeypatch.setattr(db, "sent_states", down)
    assert (await gw.post("/webhooks/braze", step("uma", time.time(), "unsubscribed"), BRAZE))[
        0
    ] == 202
    await gw.settle(timeout=30)
    assert failures["left"] == 0
    assert db.dead_letters() == []
    assert [e.body["user"]["organization_user_id"] for e in fake_didomi.events] == ["uma"]


async def test_a_report_whose_writing_always_raises_is_dead_lettered_not_retried_for_ever(
    start_gateway: StartGateway, fake_didomi: FakeDidomi, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A report that raises every time it is written goes to the dead letters after a few
    tries; the next report of another person is written meanwhile."""
    gw = await start_gateway()
    db = gw.app[SPOOL].db
    real = db.sent_states

    def poisoned(persons: Any) -> Any:
        if "jon" in list(persons):
            raise RuntimeError("a bug this report always meets")
        return real(persons)

    monkeypatch.setattr(db, "sent_states", poisoned)
    for person in ("jon", "kay"):
        body = step(person, time.time(), "unsubscribed")
        assert (await gw.post("/webhooks/braze", body, BRAZE))[0] == 202
    await gw.settle(timeout=20)
    assert [e.body["user"]["organization_user_id"] for e in fake_didomi.events] == ["kay"]
    letters = db.dead_letters()
    assert [(letter.person, letter.reason.split(":")[0]) for letter in letters] == [
        ("jon", "unmappable")
    ]


# ---------------------------------------------------------------------------
# Where the two directions meet (issue 20: items 1, 2 and 9), on both spool backends.


@pytest.fixture
def start_both(start_gateway: StartGateway, spool_url: str) -> StartGateway:
    """`start_gateway`, once per spool backend (a SQLite file, a PostgreSQL database)."""

    async def start(**sections: Any) -> Gateway:
        return await start_gateway(delivery={"spool": spool_url}, **sections)

    return start


@pytest.mark.parametrize("order", ["in order", "reversed"])
async def test_each_state_the_gateway_sent_comes_back_as_an_echo_in_any_order(
    start_both: StartGateway,
    fake: FakeBraze,
    fake_didomi: FakeDidomi,
    auth_headers: dict[str, str],
    order: str,
) -> None:
    """A Didomi opt-in then opt-out make two Braze writes; Currents reports both as REST API
    changes, in either order: neither is written to Didomi, and Braze stays unsubscribed."""
    gw = await start_both()
    now = time.time()
    for n, enabled in enumerate((True, False)):
        body = json.loads(choice("ola", enabled, iso(now - 20 + n)))
        assert (await gw.post("/webhooks/didomi", body, auth_headers))[0] == 202
        await gw.settle()
    assert [o["email_subscribe"] for o in fake.objects_sent()] == ["opted_in", "unsubscribed"]
    reports = [
        global_change("echo-in", "ola", "Opted In", time.time(), source="REST API"),
        global_change("echo-out", "ola", "Unsubscribed", time.time(), source="REST API"),
    ]
    if order == "reversed":
        reports.reverse()
    for report in reports:
        assert (await gw.post("/webhooks/braze/currents", currents(report), CURRENTS))[0] == 202
        await gw.settle()
    assert fake_didomi.events == []
    assert gw.sample("gateway_events_skipped_total", direction="to_didomi", reason="echo") == 2
    assert fake.users["ola"].email_subscribe == "unsubscribed"


async def test_a_step_snapshot_never_beats_an_earlier_didomi_withdrawal_still_pending(
    start_both: StartGateway,
    fake: FakeBraze,
    fake_didomi: FakeDidomi,
    auth_headers: dict[str, str],
) -> None:
    """A person who joined Product news through a Braze form (no state sent by the gateway)
    withdraws it in Didomi while Braze is down; a step rendered meanwhile still shows the group
    subscribed. It waits for the withdrawal, which then wins in both systems."""
    gw = await start_both(braze_webhooks={"echo_window_s": 0})
    fake_didomi.seed_user(
        "pia", [{"id": "marketing_email", "enabled": True, "values": {"topics": {"value": ""}}}]
    )
    fake.fail_next(503, count=1000)
    now = time.time()
    withdrawn = didomi_topics("pia", "", iso(now - 5), "ev-pia")
    assert (await gw.post("/webhooks/didomi", withdrawn, auth_headers))[0] == 202
    await asyncio.sleep(0.2)
    assert (await gw.post("/webhooks/braze", step("pia", now, news="subscribed"), BRAZE))[0] == 202
    await asyncio.sleep(0.5)
    assert fake_didomi.events == []
    fake.heal()
    await gw.settle()
    assert fake.users["pia"].subscription_groups[NEWS] == "unsubscribed"
    user = fake_didomi.user("pia")
    assert user is not None
    assert user["consents"]["purposes"][0]["values"]["topics"]["value"] == ""
    assert fake_didomi.events == []


async def test_a_braze_act_received_first_wins_over_an_older_didomi_choice_received_later(
    start_both: StartGateway,
    fake: FakeBraze,
    fake_didomi: FakeDidomi,
    auth_headers: dict[str, str],
) -> None:
    """The race the other way round: a Currents subscribe received before a Didomi withdrawal
    dated earlier is written to Didomi, and the late withdrawal is stale for Braze."""
    gw = await start_both()
    fake_didomi.seed_user(
        "quy", [{"id": "marketing_email", "enabled": True, "values": {"topics": {"value": ""}}}]
    )
    now = time.time()
    act = group_change("cur-quy", "quy", NEWS, "Subscribed", now - 1)
    assert (await gw.post("/webhooks/braze/currents", currents(act), CURRENTS))[0] == 202
    await gw.settle()
    late = didomi_topics("quy", "", iso(now - 5), "ev-quy")
    assert (await gw.post("/webhooks/didomi", late, auth_headers))[0] == 202
    await gw.settle()
    user = fake_didomi.user("quy")
    assert user is not None
    assert user["consents"]["purposes"][0]["values"]["topics"]["value"] == "product_news"
    assert NEWS not in fake.users["quy"].subscription_groups  # only the other targets went
    assert gw.sample("gateway_events_skipped_total", direction="to_braze", reason="stale") == 1


async def test_a_braze_act_is_never_written_over_a_newer_didomi_choice(
    start_both: StartGateway,
    fake: FakeBraze,
    fake_didomi: FakeDidomi,
    auth_headers: dict[str, str],
) -> None:
    """A Braze opt-out reported late, after the person opted in again in Didomi (whose webhook
    is slower still), is not written: Didomi's user is newer than the act, so the report waits
    for that webhook, which makes it stale; both systems end opted in."""
    gw = await start_both()
    fake_didomi.seed_user("rex", [{"id": "marketing_email", "enabled": False}])
    acted = time.time() - 2
    newer = fake_didomi.act("rex", [{"id": "marketing_email", "enabled": True}])
    late = global_change("cur-rex", "rex", "Unsubscribed", acted)
    late["time"] = acted
    assert (await gw.post("/webhooks/braze/currents", currents(late), CURRENTS))[0] == 202
    await asyncio.sleep(0.5)
    assert fake_didomi.events == []  # waiting for the newer change's webhook
    webhook = {"type": "event.created", "parameters": {"entity": newer}}
    assert (await gw.post("/webhooks/didomi", webhook, auth_headers))[0] == 202
    await gw.settle()
    assert fake_didomi.events == []
    assert fake_didomi.user("rex")["consents"]["purposes"][0]["enabled"] is True  # type: ignore[index]
    assert fake.users["rex"].email_subscribe == "opted_in"
    assert gw.sample("gateway_events_skipped_total", direction="to_didomi", reason="stale") == 1


async def test_a_spool_error_while_looking_for_earlier_didomi_rows_gives_the_report_back(
    start_gateway: StartGateway, fake_didomi: FakeDidomi, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When reading whether earlier Didomi rows wait fails, the report goes back and its person
    is freed: it is written once the spool reads again."""
    gw = await start_gateway()
    db = gw.app[SPOOL].db
    real = db.fetch
    failures = {"left": 2}

    def flaky(after: int, limit: int, direction: str = "to_braze") -> Any:
        if limit == SCAN_LIMIT and direction == "to_braze" and failures["left"]:
            failures["left"] -= 1
            raise sqlite3.OperationalError("disk I/O error")
        return real(after, limit, direction)  # type: ignore[arg-type]

    monkeypatch.setattr(db, "fetch", flaky)
    assert (await gw.post("/webhooks/braze", step("sol", time.time(), "unsubscribed"), BRAZE))[
        0
    ] == 202
    await gw.settle(timeout=20)
    assert failures["left"] == 0
    assert [e.body["user"]["organization_user_id"] for e in fake_didomi.events] == ["sol"]
    assert gw.app[WRITEBACK].idle


async def test_people_acting_in_both_systems_at_once_end_at_their_newest_act_without_a_loop(
    start_both: StartGateway,
    fake: FakeBraze,
    fake_didomi: FakeDidomi,
    auth_headers: dict[str, str],
) -> None:
    """Sixty people act three times each, a moment apart, at random in Didomi (its webhook) or
    in Braze (Currents); both fakes report every change back, the gateway's own writes too. At
    the end both systems hold each person's newest act, and the writes are bounded (no loop)."""
    gw = await start_both()
    rng = random.Random(20)
    tasks: set[asyncio.Task[None]] = set()
    braze_acts: dict[str, list[tuple[float, str]]] = {}  # person -> (time, state) acted in Braze

    async def post(path: str, body: Any, headers: dict[str, str]) -> None:
        for _ in range(50):  # a 503 (not ready, spool busy) is retried, as both senders do
            if (await gw.post(path, body, headers))[0] < 500:
                return
            await asyncio.sleep(0.1)
        raise AssertionError(f"{path} kept refusing")

    def report(event: dict[str, Any]) -> None:
        task = asyncio.get_running_loop().create_task(
            post("/webhooks/braze/currents", currents(event), CURRENTS)
        )
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    serial = iter(range(1_000_000))

    def braze_changed(key: str, group: str | None, state: str) -> None:
        # Braze reports the gateway's own /users/track writes, with their source.
        event = global_change(f"rest-{next(serial)}", key, state, time.time(), "REST API")
        event["time"] = time.time()
        report(event)

    async def didomi_webhook(body: dict[str, Any]) -> None:
        await post("/webhooks/didomi", body, auth_headers)

    fake.on_change = braze_changed
    fake_didomi.on_webhook = didomi_webhook
    people = [f"p{n:02d}" for n in range(60)]
    newest: dict[str, tuple[float, bool]] = {}
    didomi_at: list[tuple[float, str]] = []  # (time.monotonic(), person) of each Didomi act
    acts: list[tuple[float, str, bool, str]] = []  # (offset s, person, opt in?, where)
    for person in people:
        start = rng.uniform(0, 1.0)
        for n in range(3):
            acts.append((start + n * 0.8, person, rng.random() < 0.5, rng.choice("DB")))
    acts.sort()
    began = time.monotonic()
    for offset, person, opted, where in acts:
        await asyncio.sleep(max(0.0, began + offset - time.monotonic()))
        at = time.time()
        newest[person] = (at, opted)
        if where == "D":
            didomi_at.append((time.monotonic(), person))
            fake_didomi.act(person, [{"id": "marketing_email", "enabled": opted}])
            continue
        state = "opted_in" if opted else "unsubscribed"
        fake.users.setdefault(person, User()).email_subscribe = state  # the subscription page
        braze_acts.setdefault(person, []).append((at, state))
        event = global_change(f"page-{next(serial)}", person, state, at, "Subscription Page")
        event["time"] = at
        report(event)
    deadline = time.monotonic() + 60
    while True:
        await fake_didomi.reported()
        await asyncio.gather(*list(tasks), return_exceptions=True)
        await gw.settle(timeout=60)
        if not tasks and not fake_didomi._reporting:
            break
        assert time.monotonic() < deadline, "the two directions never settled"
    wrong = []
    for person, (_, opted) in newest.items():
        braze = fake.users[person].email_subscribe
        didomi = fake_didomi.user(person)
        enabled = didomi["consents"]["purposes"][0]["enabled"] if didomi else None
        if braze != ("opted_in" if opted else "unsubscribed") or enabled is not opted:
            wrong.append((person, opted, braze, enabled))
    assert wrong == []
    didomi_acts = sum(1 for _, _, _, where in acts if where == "D")
    written = [e for e in fake_didomi.events]
    assert len(written) <= len(acts) - didomi_acts  # at most one write per Braze act
    assert len(fake.objects_sent()) <= didomi_acts  # at most one object per Didomi act
    # Figures, not asserts: how long a Braze act took to reach Didomi.
    delays = sorted(
        event.at
        - max(
            at for at, _ in braze_acts[event.body["user"]["organization_user_id"]] if at <= event.at
        )
        for event in written
    )
    tracked = [
        (r.at, o["external_id"])
        for r in fake.requests
        if r.path == "/users/track" and isinstance(r.body, dict)
        for o in r.body.get("attributes") or []
    ]
    forward = sorted(
        min(sent for sent, who in tracked if who == person and sent >= acted) - acted
        for acted, person in didomi_at
        if any(who == person and sent >= acted for sent, who in tracked)
    )
    if delays and forward:
        print(
            f"\n{len(written)} Braze act(s) reached Didomi: median {delays[len(delays) // 2]:.3f}"
            f" s, max {delays[-1]:.3f} s; {len(forward)} Didomi act(s) reached Braze: median"
            f" {forward[len(forward) // 2]:.3f} s, max {forward[-1]:.3f} s"
        )


async def test_a_braze_change_older_than_the_retention_floor_is_counted_apart_from_stale(
    start_gateway: StartGateway, fake_didomi: FakeDidomi, auth_headers: dict[str, str]
) -> None:
    """A Braze change refused only because it is older than what retention pruned is counted
    under `older_than_retention` (metric, audit record, a warning), never folded into `stale`."""
    from gateway.app.retention import Retention
    from gateway.config.settings import RetentionConfig
    from tests.spool.test_audit import warnings_of

    gw = await start_gateway()
    floor = time.time() - 2 * 86_400
    opted_in = choice("fay", True, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(floor)))
    assert (await gw.post("/webhooks/didomi", json.loads(opted_in), auth_headers))[0] == 202
    await gw.settle()
    spool = gw.app[SPOOL]
    # applied_days=1: fay's choice of two days ago is pruned, its time the floor for everyone.
    await Retention(spool, RetentionConfig(applied_days=1, pause_s=0), gw.metrics).run_once()
    assert spool.db.applied_times(["fay"]) == {}
    with warnings_of("gateway.writeback") as said:
        older = step("gus", floor - 3600, email="unsubscribed")
        assert (await gw.post("/webhooks/braze", older, BRAZE))[0] == 202
        await gw.settle()
    assert fake_didomi.events == []

    def skipped(reason: str) -> float:
        return gw.sample("gateway_events_skipped_total", direction="to_didomi", reason=reason)

    assert skipped("older_than_retention") == 1
    assert skipped("stale") == 0
    records = [trace.as_dict(e) for e in spool.db.trail("gus")]
    assert {r["outcome"] for r in records} == {"older_than_retention"}
    assert any("retention" in line for line in said), said


async def test_a_stalled_forward_path_holds_only_the_reports_of_people_it_holds_rows_of(
    start_both: StartGateway,
    fake: FakeBraze,
    fake_didomi: FakeDidomi,
    auth_headers: dict[str, str],
) -> None:
    """While Braze refuses the key, Didomi rows of other people pile up unfetched: a Currents
    report of an unrelated person still reaches Didomi promptly, while a report of a person
    with an earlier Didomi row still pending waits for it."""
    gw = await start_both(braze={"batch_size": 1, "max_in_flight": 1})
    fake.fail_next(401, count=100_000)
    for n in range(20):
        body = json.loads(choice(f"other-{n}", True, iso(time.time() - 60)))
        assert (await gw.post("/webhooks/didomi", body, auth_headers))[0] == 202
    pending = json.loads(choice("uma", False, iso(time.time() - 30)))
    assert (await gw.post("/webhooks/didomi", pending, auth_headers))[0] == 202
    await asyncio.sleep(0.3)  # the forward path is held on its first batch
    now = time.time()
    held = global_change("cur-uma", "uma", "Opted In", now)
    free = global_change("cur-val", "val", "Unsubscribed", now)
    assert (await gw.post("/webhooks/braze/currents", currents(held, free), CURRENTS))[0] == 202
    deadline = time.monotonic() + 10
    while not fake_didomi.events and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.5)
    people = [e.body["user"]["organization_user_id"] for e in fake_didomi.events]
    assert people == ["val"]  # Uma's report waits for her Didomi withdrawal to reach Braze
    fake.heal()
    await gw.settle(timeout=30)
    # Braze took the withdrawal after Uma's act: it holds it since, so her act is stale.
    assert fake.users["uma"].email_subscribe == "unsubscribed"
    assert [e.body["user"]["organization_user_id"] for e in fake_didomi.events] == ["val"]
    assert gw.sample("gateway_events_skipped_total", direction="to_didomi", reason="stale") == 1


async def test_a_braze_api_change_made_after_the_gateways_write_is_not_taken_for_its_echo(
    start_both: StartGateway,
    fake: FakeBraze,
    fake_didomi: FakeDidomi,
    auth_headers: dict[str, str],
) -> None:
    """The gateway sends opted_in then unsubscribed; later another system opts the person in
    through Braze's REST API: that act is dated after the gateway's write of that state (beyond
    the clock skew allowed), so it is no echo of it and reaches Didomi."""
    gw = await start_both(didomi={"max_clock_skew_s": 1})
    now = time.time()
    for n, enabled in enumerate((True, False)):
        body = json.loads(choice("kim", enabled, iso(now - 20 + n)))
        assert (await gw.post("/webhooks/didomi", body, auth_headers))[0] == 202
        await gw.settle()
    assert [o["email_subscribe"] for o in fake.objects_sent()] == ["opted_in", "unsubscribed"]
    await asyncio.sleep(2.5)  # the other system acts well after the gateway's writes
    crm = global_change("crm-kim", "kim", "Opted In", time.time(), source="REST API")
    assert (await gw.post("/webhooks/braze/currents", currents(crm), CURRENTS))[0] == 202
    await gw.settle()
    assert [e.body["user"]["organization_user_id"] for e in fake_didomi.events] == ["kim"]
    assert fake_didomi.user("kim")["consents"]["purposes"][0]["enabled"] is True  # type: ignore[index]
    assert gw.sample("gateway_events_skipped_total", direction="to_didomi", reason="echo") == 0


async def test_a_braze_act_while_braze_answers_the_gateways_write_is_not_stale(
    start_both: StartGateway,
    fake: FakeBraze,
    fake_didomi: FakeDidomi,
    auth_headers: dict[str, str],
) -> None:
    """Braze applies the gateway's opt-in but answers late; the person unsubscribes in Braze
    meanwhile. The gateway's write is dated when it was sent, not answered, so the later act
    (Braze's final state) reaches Didomi rather than being dropped as stale."""
    gw = await start_both()
    fake.latency_s = 2.0
    body = json.loads(choice("lea", True, iso(time.time() - 10)))
    assert (await gw.post("/webhooks/didomi", body, auth_headers))[0] == 202
    deadline = time.monotonic() + 10
    while "lea" not in fake.users and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert fake.users["lea"].email_subscribe == "opted_in"  # applied; the answer is on its way
    await asyncio.sleep(0.3)
    act = global_change("cur-lea", "lea", "Unsubscribed", 0)
    act["time"] = time.time()
    assert (await gw.post("/webhooks/braze/currents", currents(act), CURRENTS))[0] == 202
    fake.latency_s = 0.0
    await gw.settle(timeout=30)
    assert [e.body["user"]["organization_user_id"] for e in fake_didomi.events] == ["lea"]
    assert fake_didomi.user("lea")["consents"]["purposes"][0]["enabled"] is False  # type: ignore[index]
    assert gw.sample("gateway_events_skipped_total", direction="to_didomi", reason="stale") == 0


async def test_a_braze_change_older_than_the_retention_floor_is_warned_of_once(
    start_gateway: StartGateway, fake_didomi: FakeDidomi, auth_headers: dict[str, str]
) -> None:
    """A report filtered several times (before each try, again after reading Didomi) whose
    change is older than the retention floor logs that warning once, not once per pass."""
    from gateway.app.retention import Retention
    from gateway.config.settings import RetentionConfig
    from tests.spool.test_audit import warnings_of

    gw = await start_gateway()
    floor = time.time() - 2 * 86_400
    opted_in = choice("fay", True, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(floor)))
    assert (await gw.post("/webhooks/didomi", json.loads(opted_in), auth_headers))[0] == 202
    await gw.settle()
    await Retention(
        gw.app[SPOOL], RetentionConfig(applied_days=1, pause_s=0), gw.metrics
    ).run_once()
    with warnings_of("gateway.writeback") as said:
        older = step("gus", floor - 3600, email="unsubscribed", news="subscribed")
        assert (await gw.post("/webhooks/braze", older, BRAZE))[0] == 202
        await gw.settle()
    assert len(fake_didomi.events) == 1  # the group, which no floor covers, is written
    assert sum("retention" in line for line in said) == 1, said
