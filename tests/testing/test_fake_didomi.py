"""gateway.testing_didomi: the fake Consents API answers as Didomi says, and its knobs work."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import pytest

from gateway.testing.braze import FakeDidomi
from tests.conftest import DIDOMI_API_KEY, DIDOMI_API_SECRET, DIDOMI_ORG

LOGIN = {"type": "api-key", "key": DIDOMI_API_KEY, "secret": DIDOMI_API_SECRET}
ORG = {"organization_id": DIDOMI_ORG}


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """A bare ClientSession that speaks to the fake directly."""
    async with aiohttp.ClientSession() as session:
        yield session


async def login(http: aiohttp.ClientSession, fake: FakeDidomi) -> dict[str, str]:
    """Log in with the test key and return the Authorization header for its token."""
    async with http.post(f"{fake.url}/v1/sessions", json=LOGIN) as resp:
        assert resp.status == 200
        token = (await resp.json())["access_token"]
    return {"Authorization": f"Bearer {token}"}


async def post_event(
    http: aiohttp.ClientSession, fake: FakeDidomi, body: dict[str, Any], auth: dict[str, str]
) -> tuple[int, dict[str, Any]]:
    """POST one consent event for DIDOMI_ORG; the status and the decoded answer."""
    url = f"{fake.url}/v1/consents/events"
    async with http.post(url, params=ORG, json=body, headers=auth) as resp:
        return resp.status, await resp.json()


async def test_login_issues_a_jwt_whose_exp_is_its_ttl(
    http: aiohttp.ClientSession, fake_didomi: FakeDidomi
) -> None:
    """The right key and secret get a header.payload.sig token with exp; wrong ones get Didomi's
    400 "Invalid authentication information" (developers.didomi.io, "Authentication")."""
    auth = await login(http, fake_didomi)
    _, payload, _ = auth["Authorization"].removeprefix("Bearer ").split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    assert time.time() < claims["exp"] <= time.time() + fake_didomi.token_ttl_s
    wrong = {**LOGIN, "secret": "nope"}
    async with http.post(f"{fake_didomi.url}/v1/sessions", json=wrong) as resp:
        assert resp.status == 400
        body = await resp.json()
    assert body == {
        "code": 400,
        "name": "BadRequest",
        "message": "Invalid authentication information",
        "errors": {},
    }
    assert fake_didomi.sessions == 1


async def test_events_need_a_live_token_and_an_organization(
    http: aiohttp.ClientSession, fake_didomi: FakeDidomi
) -> None:
    """No token, an expired token, no organization_id or another organization are refused."""
    event = {"id": "e1", "user": {"organization_user_id": "u1"}, "consents": {"purposes": []}}
    assert (await post_event(http, fake_didomi, event, {}))[0] == 401
    auth = await login(http, fake_didomi)
    url = f"{fake_didomi.url}/v1/consents/events"
    async with http.post(url, json=event, headers=auth) as resp:
        assert resp.status == 400
    async with http.post(url, params={"organization_id": "x"}, json=event, headers=auth) as resp:
        assert resp.status == 403
    fake_didomi.expire_tokens()
    assert (await post_event(http, fake_didomi, event, auth))[0] == 401
    assert fake_didomi.events == []
    assert [r.status for r in fake_didomi.requests] == [401, 200, 400, 403, 401]


@pytest.mark.parametrize("duplicate_status", [409, 400])
async def test_an_event_id_seen_before_is_refused_and_changes_nothing(
    http: aiohttp.ClientSession, duplicate_status: Any
) -> None:
    """The second event with one id gets the duplicate answer and leaves the user as it was."""
    fake = FakeDidomi(
        key=DIDOMI_API_KEY,
        secret=DIDOMI_API_SECRET,
        organization_id=DIDOMI_ORG,
        duplicate_status=duplicate_status,
    )
    await fake.start()
    try:
        auth = await login(http, fake)
        first = {"id": "e1", "user": {"organization_user_id": "u1"}}
        first["consents"] = {"purposes": [{"id": "news", "enabled": True}]}
        assert (await post_event(http, fake, first, auth))[0] == 200
        again = {**first, "consents": {"purposes": [{"id": "news", "enabled": False}]}}
        status, body = await post_event(http, fake, again, auth)
        assert status == duplicate_status
        assert "already exists" in body["message"]
        assert len(fake.events) == 1
        user = fake.user("u1")
        assert user is not None
        assert user["consents"]["purposes"] == [{"id": "news", "enabled": True, "values": {}}]
    finally:
        await fake.stop()


def ago_iso(days: float) -> str:
    return (datetime.now(UTC) - timedelta(days=days)).isoformat().replace("+00:00", "Z")


def parse_iso(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


async def test_a_seeded_user_was_created_no_later_than_its_status_dates(
    fake_didomi: FakeDidomi,
) -> None:
    """A seeded user's `created_at` is not after its `updated_at` (the default's minute ago or
    a date given), as no user Didomi returns is updated before it was created."""
    fake_didomi.seed_user("u1", [{"id": "news", "enabled": True}])
    fake_didomi.seed_user("u2", [{"id": "news", "enabled": True}], updated_at=ago_iso(days=9))
    for person in ("u1", "u2"):
        user = fake_didomi.user(person)
        assert user is not None
        created, updated = (parse_iso(user[key]) for key in ("created_at", "updated_at"))
        assert created <= updated, (person, user["created_at"], user["updated_at"])


async def test_events_merge_into_the_user_and_the_query_returns_it(
    http: aiohttp.ClientSession, fake_didomi: FakeDidomi
) -> None:
    """Purposes merge by id (enabled and each value replaced when given); users come in a page."""
    fake_didomi.seed_user("u1", [{"id": "news", "enabled": True, "values": {"t": {"value": "a"}}}])
    auth = await login(http, fake_didomi)
    purposes = [
        {"id": "news", "enabled": None, "values": {"t": {"value": "a,b"}, "f": {"value": None}}},
        {"id": "sms", "enabled": False},
    ]
    event = {"user": {"organization_user_id": "u1"}, "consents": {"purposes": purposes}}
    url = f"{fake_didomi.url}/v1/consents/events"
    params = {**ORG, "$disable_integrations": "true"}
    async with http.post(url, params=params, json=event, headers=auth) as resp:
        assert resp.status == 200
        assert (await resp.json())["id"]  # generated when the caller gives none
    assert fake_didomi.events[0].disable_integrations is True
    query = {**ORG, "organization_user_id": "u1"}
    users_url = f"{fake_didomi.url}/v1/consents/users"
    async with http.get(users_url, params=query, headers=auth) as resp:
        page = await resp.json()
    assert (page["limit"], page["cursor"], len(page["data"])) == (100, None, 1)
    assert page["data"][0]["consents"]["purposes"] == [
        {"id": "news", "enabled": True, "values": {"t": {"value": "a,b"}}},
        {"id": "sms", "enabled": False, "values": {}},
    ]
    stranger = {**query, "organization_user_id": "nobody"}
    async with http.get(users_url, params=stranger, headers=auth) as resp:
        assert (await resp.json())["data"] == []


async def test_fail_next_answers_instead_on_its_path_then_recovers(
    http: aiohttp.ClientSession, fake_didomi: FakeDidomi
) -> None:
    """A fault for one path leaves the others alone; clear_faults forgets what is left."""
    fake_didomi.fail_next(503, count=2, path="/consents/events", headers={"Retry-After": "3"})
    auth = await login(http, fake_didomi)
    event = {"id": "e1", "user": {"organization_user_id": "u1"}}
    status, body = await post_event(http, fake_didomi, event, auth)
    assert (status, body["name"]) == (503, "Unavailable")
    fake_didomi.clear_faults()
    assert (await post_event(http, fake_didomi, event, auth))[0] == 200
    assert [(r.path, r.status) for r in fake_didomi.requests] == [
        ("/sessions", 200),
        ("/consents/events", 503),
        ("/consents/events", 200),
    ]
