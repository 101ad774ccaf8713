"""Braze Currents through the real server, as Braze really sends it: its own sample events,
ids shared across event types, and versions the gateway has not met.

The gateway runs in-process with its delivery context against the fake Braze and the fake
Didomi on 127.0.0.1 (the `start_gateway` of `test_bidirectional`).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from gateway.app.server import SPOOL
from gateway.testing.braze import FakeDidomi
from tests.system.test_bidirectional import (
    CURRENTS,
    NEWS,
    OFFERS,
    StartGateway,
    currents,
    global_change,
    group_change,
    start_gateway,
)

__all__ = ["start_gateway"]  # the fixture, imported so pytest finds it here

SAMPLES = Path(__file__).parents[1] / "events" / "braze" / "samples"
SAMPLE_GROUP = "f47ac10b-58cc-4372-a567-0e02b2c3d479"  # the group id of Braze's sample event
SAMPLE_PERSON = "external_user_id"  # the sample's external_user_id, verbatim


def sample(name: str) -> dict[str, Any]:
    """One of Braze's own Currents sample events (`tests/events/README.md` says where from)."""
    parsed: dict[str, Any] = json.loads((SAMPLES / name).read_text(encoding="utf-8"))
    return parsed


async def test_events_sharing_an_id_across_types_are_each_stored_in_a_batch_and_across_requests(
    start_gateway: StartGateway, fake_didomi: FakeDidomi
) -> None:
    """A GlobalStateChange and a group StateChange with one `id` are two events, whether they
    come in one batch or in two requests; the same event twice is still one."""
    gw = await start_gateway()
    now = time.time()
    both = currents(
        global_change("shared-1", "ann", "Unsubscribed", now),
        group_change("shared-1", "ann", NEWS, "Unsubscribed", now),
    )
    status, answer = await gw.post("/webhooks/braze/currents", both, CURRENTS)
    assert (status, answer["stored"], answer["duplicates"]) == (202, 2, 0)
    first = currents(global_change("shared-2", "bob", "Unsubscribed", now))
    second = currents(group_change("shared-2", "bob", OFFERS, "Unsubscribed", now))
    assert (await gw.post("/webhooks/braze/currents", first, CURRENTS))[1]["stored"] == 1
    status, answer = await gw.post("/webhooks/braze/currents", second, CURRENTS)
    assert (status, answer["stored"], answer["duplicates"]) == (202, 1, 0)
    status, answer = await gw.post("/webhooks/braze/currents", second, CURRENTS)  # Braze retries
    assert (status, answer["stored"], answer["duplicates"]) == (200, 0, 1)


async def test_an_unknown_currents_version_is_decoded_and_counted(
    start_gateway: StartGateway, fake_didomi: FakeDidomi
) -> None:
    """A batch under a `Braze-Currents-Version` the gateway has not met is stored and written
    back like version 1, and the versions seen are counted in bounded labels."""
    fake_didomi.seed_user("cy", [{"id": "marketing_email", "enabled": True}])
    gw = await start_gateway()
    batch = currents(global_change("v2-1", "cy", "Unsubscribed", time.time()))
    v2 = {**CURRENTS, "Braze-Currents-Version": "2"}
    status, answer = await gw.post("/webhooks/braze/currents", batch, v2)
    assert (status, answer["stored"]) == (202, 1)
    await gw.settle()
    [event] = fake_didomi.events
    assert event.body["consents"]["purposes"] == [{"id": "marketing_email", "enabled": False}]
    odd = {**CURRENTS, "Braze-Currents-Version": "user@example.com"}
    assert (await gw.post("/webhooks/braze/currents", currents(), odd))[0] == 200
    assert (await gw.post("/webhooks/braze/currents", currents(), CURRENTS))[0] == 200
    versions = "gateway_braze_currents_batches_total"
    assert gw.sample(versions, version="2") == 1
    assert gw.sample(versions, version="other") == 1
    assert gw.sample(versions, version="1") == 1


async def test_brazes_own_currents_samples_through_the_gateway(
    start_gateway: StartGateway, fake_didomi: FakeDidomi, tmp_path: Path
) -> None:
    """Braze's three sample events, verbatim in one batch: the group StateChange ("Subscribed",
    capital S) is written to Didomi, the GlobalStateChange "Subscribed" asks nothing (Braze's
    neutral default), the email Unsubscribe is audited as ignored with why; their 2034 date
    is clamped to arrival by didomi.max_clock_skew_s."""
    (tmp_path / "mappings").mkdir(exist_ok=True)
    (tmp_path / "mappings" / "samples.toml").write_text(
        f'[[map]]\nto = "{SAMPLE_GROUP}"\npurpose = "marketing_email"\n'
        'preference = "topics"\nvalue = "samples"\n'
    )
    gw = await start_gateway()
    names = ("GlobalStateChange.json", "StateChange.json", "Unsubscribe.json")
    events = [sample(name) for name in names]
    arrival = time.time()
    status, answer = await gw.post("/webhooks/braze/currents", currents(*events), CURRENTS)
    assert (status, answer["stored"], answer["ignored"], answer["invalid"]) == (202, 2, 1, 0)
    await gw.settle()
    [written] = fake_didomi.events
    assert written.body["user"]["organization_user_id"] == SAMPLE_PERSON
    [purpose] = written.body["consents"]["purposes"]
    assert (purpose["id"], purpose["enabled"]) == ("marketing_email", True)
    assert purpose["values"]["topics"]["value"] == "samples"
    trail = gw.app[SPOOL].db.trail(SAMPLE_PERSON)
    [ignored] = [e for e in trail if e.outcome == "ignored"]
    assert ignored.event_type == "users.messages.email.Unsubscribe"
    assert "not a subscription state change" in (ignored.detail or "")
    [delivered] = [e for e in trail if e.outcome == "delivered"]
    assert (delivered.target, delivered.state) == (f"group:{SAMPLE_GROUP}", "subscribed")
    # Dated no later than arrival plus the skew, whatever year the suite runs in.
    skew = gw.config.didomi.max_clock_skew_s
    assert (delivered.event_at or math.inf) <= time.time() + skew
    future = sum(1 for e in events[:2] if e["time"] > arrival + skew)
    assert gw.sample("gateway_event_dates_clamped_total") == future
