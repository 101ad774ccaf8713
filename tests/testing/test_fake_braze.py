"""gateway.testing: the fake Braze answers as Braze's docs say, and its fault knobs work."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from gateway.testing.braze import FakeBraze
from gateway.testing.braze_access import UNLIMITED
from gateway.testing.braze_writes import EMAIL_OBJECTS_REQUIRED, INVALID_DATA

KEY = "test-braze-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
GROUP = "3b0a6f8e-5c1d-4e2f-9a7b-0c1d2e3f4a5b"
OTHER_GROUP = "9f8e7d6c-5b4a-4321-8fed-cba987654321"
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
async def make_fake() -> AsyncIterator[Callable[..., Any]]:
    started: list[FakeBraze] = []

    async def make(**kwargs: Any) -> FakeBraze:
        fake = FakeBraze(**kwargs)
        await fake.start()
        started.append(fake)
        return fake

    yield make
    for fake in started:
        await fake.stop()


@pytest.fixture
async def fake(make_fake: Callable[..., Any]) -> FakeBraze:
    made: FakeBraze = await make_fake()
    return made


async def track(
    http: aiohttp.ClientSession, fake: FakeBraze, body: Any, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, Any], Mapping[str, str]]:
    async with http.post(f"{fake.url}/users/track", json=body, headers=headers or AUTH) as resp:
        return resp.status, await resp.json(), resp.headers


def attrs(*objects: dict[str, Any]) -> dict[str, Any]:
    return {"attributes": list(objects)}


async def test_wrong_or_missing_key_is_401_and_applies_nothing(
    http: aiohttp.ClientSession, fake: FakeBraze
) -> None:
    """A missing or wrong Bearer key gets Braze's 401 JSON answer and changes no user."""
    body = attrs({"external_id": "u1", "email_subscribe": "opted_in"})
    for headers in ({"Authorization": "Bearer nope"}, {"X-Other": "1"}):
        status, answer, _ = await track(http, fake, body, headers)
        assert status == 401
        assert "message" in answer
    fake.api_key = "rotated"
    status, _, _ = await track(http, fake, body)
    assert status == 401
    assert fake.users == {}


async def test_success_applies_email_subscribe_groups_and_attributes(
    http: aiohttp.ClientSession, fake: FakeBraze
) -> None:
    """A valid object is applied: groups merge, other keys become attributes, null removes one."""
    first = {
        "external_id": "u1",
        "_update_existing_only": False,
        "email_subscribe": "opted_in",
        "subscription_groups": [
            {"subscription_group_id": GROUP, "subscription_state": "subscribed"}
        ],
        "consent_marketing": True,
        "email": "a@example.com",
    }
    status, answer, _ = await track(http, fake, attrs(first))
    assert (status, answer) == (201, {"message": "success", "attributes_processed": 1})
    second = {
        "external_id": "u1",
        "subscription_groups": [
            {"subscription_group_id": OTHER_GROUP, "subscription_state": "unsubscribed"}
        ],
        "consent_marketing": None,
    }
    await track(http, fake, attrs(second))
    user = fake.users["u1"]
    assert user.email_subscribe == "opted_in"
    assert user.subscription_groups == {GROUP: "subscribed", OTHER_GROUP: "unsubscribed"}
    assert user.attributes == {"email": "a@example.com"}
    assert fake.objects_sent() == [first, second]


async def test_email_alone_identifies_a_user(http: aiohttp.ClientSession, fake: FakeBraze) -> None:
    """Without a primary identifier, email names the user under the key "email:<address>"."""
    status, _, _ = await track(
        http, fake, attrs({"email": "b@example.com", "email_subscribe": "unsubscribed"})
    )
    assert status == 201
    assert fake.users["email:b@example.com"].email_subscribe == "unsubscribed"


async def test_more_than_75_objects_is_400_and_applies_nothing(
    http: aiohttp.ClientSession, fake: FakeBraze
) -> None:
    """Attributes, events and purchases count together: 75 attributes plus one event is a 400."""
    body = attrs(*({"external_id": f"u{i}", "email_subscribe": "opted_in"} for i in range(75)))
    body["events"] = [{"external_id": "u0", "name": "e", "time": "2024-01-01T00:00:00Z"}]
    status, answer, _ = await track(http, fake, body)
    assert status == 400
    assert answer == {"message": "Max Input Length Exceeded"}
    assert fake.users == {}
    assert fake.requests[-1].object_count == 76
    del body["events"]
    status, _, _ = await track(http, fake, body)
    assert status == 201
    assert len(fake.users) == 75


async def test_invalid_object_is_refused_at_its_index_while_others_apply(
    http: aiohttp.ClientSession, fake: FakeBraze
) -> None:
    """An invalid email_subscribe is refused in a 201 "errors" entry naming its index."""
    body = attrs(
        {"external_id": "u0", "email_subscribe": "opted_in"},
        {"external_id": "u1", "email_subscribe": "yes please"},
        {"external_id": "u2", "email_subscribe": "unsubscribed"},
    )
    status, answer, _ = await track(http, fake, body)
    assert status == 201
    assert answer == {
        "message": "success",
        "attributes_processed": 2,
        "errors": [
            {"type": "BAD_EMAIL_SUBSCRIPTION_STATE", "input_array": "attributes", "index": 1}
        ],
    }
    assert set(fake.users) == {"u0", "u2"}


@pytest.mark.parametrize(
    ("obj", "error"),
    [
        ({"email_subscribe": "opted_in"}, "is required"),
        ({"external_id": "u", "braze_id": "b"}, "only one of"),
        ({"external_id": "u", "email": "not-an-email"}, "EMAIL_BAD_FORMAT"),
        ({"external_id": "u", "subscription_groups": {}}, "BAD_SUBSCRIPTION_GROUP_ARRAY"),
        ({"external_id": "u", "subscription_groups": [{"x": 1}]}, "BAD_SUBSCRIPTION_GROUP_HASH"),
        (
            {
                "external_id": "u",
                "subscription_groups": [
                    {"subscription_group_id": "grp", "subscription_state": "subscribed"}
                ],
            },
            "BAD_SUBSCRIPTION_GROUP_ID",
        ),
        (
            {
                "external_id": "u",
                "subscription_groups": [
                    {"subscription_group_id": GROUP, "subscription_state": "maybe"}
                ],
            },
            "BAD_SUBSCRIPTION_GROUP_STATE",
        ),
        ({"external_id": "u", "_update_existing_only": "yes"}, "_update_existing_only"),
        ({"external_id": "x" * 988}, "EXTERNAL_USER_ID_TOO_LARGE"),
    ],
)
async def test_each_object_rule_refuses_with_its_own_type(
    http: aiohttp.ClientSession, fake: FakeBraze, obj: dict[str, Any], error: str
) -> None:
    """Each per-object rule refuses its object with a recognisable error type."""
    status, answer, _ = await track(http, fake, attrs({"external_id": "ok"}, obj))
    assert status == 201
    [refused] = answer["errors"]
    assert error in refused["type"]
    assert (refused["input_array"], refused["index"]) == ("attributes", 1)
    assert set(fake.users) == {"ok"}


async def test_all_invalid_batch_is_a_400_listing_every_object(
    http: aiohttp.ClientSession, fake: FakeBraze
) -> None:
    """With no valid object at all Braze answers 400 "Valid data must be provided", errors kept."""
    body = attrs({"external_id": "u0", "email_subscribe": "no"}, {"email_subscribe": "opted_in"})
    status, answer, _ = await track(http, fake, body)
    assert status == 400
    assert answer["message"] == INVALID_DATA
    assert [e["index"] for e in answer["errors"]] == [0, 1]
    assert fake.users == {}
    assert fake.objects_sent() == []


async def test_bad_json_and_wrong_shapes_are_400(
    http: aiohttp.ClientSession, fake: FakeBraze
) -> None:
    """Unparseable JSON, a non-object body, a non-array field or an empty body are 400s."""
    headers = {**AUTH, "Content-Type": "application/json"}
    async with http.post(f"{fake.url}/users/track", data=b"{nope", headers=headers) as resp:
        assert resp.status == 400
        assert "parsing" in (await resp.json())["error"]
    for body in ([1, 2], {"attributes": {"external_id": "u"}}, {}):
        status, _, _ = await track(http, fake, body)
        assert status == 400
    async with http.post(f"{fake.url}/users/track", data=b"{}", headers=AUTH) as resp:
        assert resp.status == 415


async def test_reject_objects_refuses_what_the_predicate_names(
    http: aiohttp.ClientSession, fake: FakeBraze
) -> None:
    """reject_objects turns a predicate's answer into a per-object error while others apply."""
    fake.reject_objects(
        lambda o: "BLACKLISTED_EXTERNAL_USER_ID" if o["external_id"] == "bad" else None
    )
    status, answer, _ = await track(
        http, fake, attrs({"external_id": "bad"}, {"external_id": "good"})
    )
    assert status == 201
    assert answer["errors"] == [
        {"type": "BLACKLISTED_EXTERNAL_USER_ID", "input_array": "attributes", "index": 0}
    ]
    assert set(fake.users) == {"good"}


async def test_fail_next_answers_instead_then_recovers(
    http: aiohttp.ClientSession, fake: FakeBraze
) -> None:
    """fail_next answers the next requests with its status, body and headers, applying nothing."""
    fake.fail_next(503, count=2)
    fake.fail_next(429, headers={"X-Ratelimit-Retry-After": "1"}, body={"message": "slow down"})
    body = attrs({"external_id": "u1", "email_subscribe": "opted_in"})
    seen = [await track(http, fake, body) for _ in range(4)]
    assert [s for s, _, _ in seen] == [503, 503, 429, 201]
    assert seen[0][1] == {"message": "Service Unavailable"}
    assert seen[2][1] == {"message": "slow down"}
    assert seen[2][2]["X-Ratelimit-Retry-After"] == "1"
    assert [r.status for r in fake.requests] == [503, 503, 429, 201]
    assert fake.objects_sent() == body["attributes"]


async def test_fail_next_answers_a_redirect_and_heal_drops_the_faults_left(
    http: aiohttp.ClientSession, fake: FakeBraze
) -> None:
    """fail_next can answer a redirect with its Location, and heal() answers normally at once."""
    fake.fail_next(307, count=5, headers={"Location": "http://127.0.0.1:1/users/track"})
    body = attrs({"external_id": "u1", "email_subscribe": "opted_in"})
    async with http.post(
        f"{fake.url}/users/track", json=body, headers=AUTH, allow_redirects=False
    ) as resp:
        assert resp.status == 307
        assert resp.headers["Location"] == "http://127.0.0.1:1/users/track"
    fake.heal()
    assert (await track(http, fake, body))[0] == 201
    assert [r.status for r in fake.requests] == [307, 201]


async def test_latency_lets_the_client_timeout_fire(
    http: aiohttp.ClientSession, make_fake: Callable[..., Any]
) -> None:
    """latency_s delays the answer past a client timeout, though the update is already applied."""
    fake: FakeBraze = await make_fake(latency_s=0.5)
    timeout = aiohttp.ClientTimeout(total=0.1)
    body = attrs({"external_id": "u1", "email_subscribe": "opted_in"})
    with pytest.raises(asyncio.TimeoutError):
        async with http.post(f"{fake.url}/users/track", json=body, headers=AUTH, timeout=timeout):
            pass
    assert fake.users["u1"].email_subscribe == "opted_in"
    fake.latency_s = 0.0
    started = time.monotonic()
    status, _, _ = await track(http, fake, body)
    assert status == 201
    assert time.monotonic() - started < 0.4


async def test_rate_limit_headers_and_429_in_epoch_style(
    http: aiohttp.ClientSession, make_fake: Callable[..., Any]
) -> None:
    """Every answer carries the three headers, Reset in epoch seconds; past the limit, a 429."""
    fake: FakeBraze = await make_fake(rate_limit=2, rate_window_s=3.0)
    body = attrs({"external_id": "u1"})
    answers = [await track(http, fake, body) for _ in range(3)]
    assert [s for s, _, _ in answers] == [201, 201, 429]
    assert [h["x-ratelimit-remaining"] for _, _, h in answers] == ["1", "0", "0"]
    for _, _, headers in answers:
        assert headers["X-RateLimit-Limit"] == "2"
        assert 0 <= int(headers["X-RateLimit-Reset"]) - time.time() <= 4
    assert fake.objects_sent() == body["attributes"] * 2


async def test_rate_limit_seconds_style_and_window_reset(
    http: aiohttp.ClientSession, make_fake: Callable[..., Any]
) -> None:
    """Reset counts seconds left, a 429 bears only X-Ratelimit-Retry-After, a new window admits."""
    fake: FakeBraze = await make_fake(rate_limit=1, rate_window_s=0.5, reset_style="seconds")
    body = attrs({"external_id": "u1"})
    status, _, headers = await track(http, fake, body)
    assert status == 201
    assert headers["X-RateLimit-Reset"] in {"0", "1"}
    status, _, headers = await track(http, fake, body)
    assert status == 429
    assert headers["X-Ratelimit-Retry-After"] in {"0", "1"}
    assert "X-RateLimit-Remaining" not in headers
    await asyncio.sleep(0.55)
    status, _, _ = await track(http, fake, body)
    assert status == 201


async def test_no_rate_limit_still_sends_large_limit_headers(
    http: aiohttp.ClientSession, fake: FakeBraze
) -> None:
    """Without a configured limit the headers still come, with Braze's large default."""
    _, _, headers = await track(http, fake, attrs({"external_id": "u1"}))
    assert headers["X-RateLimit-Limit"] == "250000"
    assert int(headers["X-RateLimit-Reset"]) > 10**9


async def test_known_users_update_only_ignores_unknown_and_upsert_creates(
    http: aiohttp.ClientSession, make_fake: Callable[..., Any]
) -> None:
    """With known_users, update-only objects for strangers are ignored silently; upserts create."""
    known = {"old"}
    fake: FakeBraze = await make_fake(known_users=known)
    stranger = {"external_id": "new", "_update_existing_only": True, "email_subscribe": "opted_in"}
    existing = {"external_id": "old", "_update_existing_only": True, "email_subscribe": "opted_in"}
    status, answer, _ = await track(http, fake, attrs(stranger, existing))
    # Braze only queues the objects: it cannot say synchronously that a user is unknown.
    assert (status, answer) == (201, {"message": "success", "attributes_processed": 2})
    assert set(fake.users) == {"old"}
    assert fake.ignored == [stranger]
    upsert = {**stranger, "_update_existing_only": False}
    await track(http, fake, attrs(upsert))
    assert fake.users["new"].email_subscribe == "opted_in"
    assert known == {"old", "new"}


async def test_an_update_only_object_that_sets_nothing_shows_no_profile(
    http: aiohttp.ClientSession, fake: FakeBraze
) -> None:
    """`gateway check --online`'s probe (a random external_id, update-only, nothing set) is
    accepted, and the demo's /fake/users lists no profile for it, as Braze creates none."""
    probe = {"external_id": "gateway-check-0123", "_update_existing_only": True}
    status, answer, _ = await track(http, fake, attrs(probe))
    assert (status, answer) == (201, {"message": "success", "attributes_processed": 1})
    assert "gateway-check-0123" not in fake.users
    async with http.get(f"{fake.url}/fake/users") as resp:
        assert (await resp.json())["users"] == []


async def test_update_existing_only_defaults_follow_braze(
    http: aiohttp.ClientSession, make_fake: Callable[..., Any]
) -> None:
    """Omitted, _update_existing_only creates users by external_id but not by user_alias."""
    fake: FakeBraze = await make_fake(known_users=set())
    alias = {"user_alias": {"alias_name": "n", "alias_label": "l"}, "email_subscribe": "opted_in"}
    await track(http, fake, attrs({"external_id": "u1"}, alias))
    assert set(fake.users) == {"u1"}
    assert fake.ignored == [alias]


async def test_users_delete_removes_users(http: aiohttp.ClientSession, fake: FakeBraze) -> None:
    """/users/delete answers 201 with the count, removes the users and records the ids."""
    await track(http, fake, attrs({"external_id": "u1"}, {"external_id": "u2"}))
    url = f"{fake.url}/users/delete"
    async with http.post(url, json={"external_ids": ["u1", "ghost"]}, headers=AUTH) as resp:
        assert resp.status == 201
        assert await resp.json() == {"deleted": 2, "message": "success"}
    assert set(fake.users) == {"u2"}
    assert fake.deleted == ["u1", "ghost"]
    too_many = {"external_ids": [f"u{i}" for i in range(51)]}
    async with http.post(url, json=too_many, headers=AUTH) as resp:
        assert resp.status == 400
    async with http.post(url, json={"external_ids": ["u2"]}) as resp:
        assert resp.status == 401
    assert set(fake.users) == {"u2"}


async def test_app_serves_under_aiohttp_client_fixture(
    aiohttp_client: Callable[[web.Application], Any],
) -> None:
    """The bare app works under pytest-aiohttp's fixtures; record=False keeps only counters."""
    fake = FakeBraze(api_key="k", record=False)
    client: TestClient[web.Request, web.Application] = await aiohttp_client(fake.app)
    resp = await client.post(
        "/users/track", json=attrs({"external_id": "u1"}), headers={"Authorization": "Bearer k"}
    )
    assert resp.status == 201
    stats = await (await client.get("/_stats")).json()
    assert stats["requests"] == 1
    assert stats["users"] == 1
    assert stats["objects"] == 1
    assert fake.requests == []


@pytest.mark.parametrize(("rate_limit", "said"), [("100", "100"), ("0", str(UNLIMITED))])
async def test_standalone_process_serves_until_sigterm(rate_limit: str, said: str) -> None:
    """`python -m gateway.testing` prints its URL, answers within its `--rate-limit` (`0` lifts
    it, as bench/README.md says), and exits 0 on SIGTERM."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway.testing",
        "--port",
        "0",
        "--api-key",
        "bench",
        "--latency-ms",
        "1",
        "--rate-limit",
        rate_limit,
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), timeout=15)).decode()
        assert line.startswith("fake braze listening on http://127.0.0.1:")
        url = line.rsplit(" ", 1)[1].strip()
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:
            body = attrs({"external_id": "u1", "email_subscribe": "opted_in"})
            headers = {"Authorization": "Bearer bench"}
            async with http.post(f"{url}/users/track", json=body, headers=headers) as resp:
                assert resp.status == 201
                assert resp.headers["X-RateLimit-Limit"] == said
            async with http.get(f"{url}/_stats") as resp:
                stats = await resp.json()
        assert (stats["requests"], stats["objects"], stats["users"]) == (1, 1, 1)
        proc.terminate()
        _, err = await asyncio.wait_for(proc.communicate(), timeout=10)
        assert proc.returncode == 0, err.decode()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_refuse_with_400_fails_the_whole_call(
    http: aiohttp.ClientSession, fake: FakeBraze
) -> None:
    """refuse_with_400 turns one matching object into a 400 for the call, applying nothing."""
    fake.refuse_with_400 = lambda o: o.get("external_id") == "bad"
    status, answer, _ = await track(
        http, fake, attrs({"external_id": "ok"}, {"external_id": "bad"})
    )
    assert status == 400
    assert answer["errors"] == [{"type": "refused", "input_array": "attributes", "index": 1}]
    assert fake.users == {}
    status, _, _ = await track(http, fake, attrs({"external_id": "ok"}))
    assert status == 201


async def test_users_delete_by_email_takes_objects_and_refuses_plain_strings(
    http: aiohttp.ClientSession, fake: FakeBraze
) -> None:
    """/users/delete by email takes `{"email", "prioritization"}` objects, as Braze documents;
    plain strings, or a prioritization Braze does not allow, are a 400 and delete nobody."""
    await track(http, fake, attrs({"email": "ann@example.com"}, {"email": "bob@example.com"}))
    url = f"{fake.url}/users/delete"
    plain = {"email_addresses": ["ann@example.com"]}
    async with http.post(url, json=plain, headers=AUTH) as resp:
        assert resp.status == 400
        assert await resp.json() == {"message": EMAIL_OBJECTS_REQUIRED}
    for bad in ([], ["identified", "unidentified"], ["newest"], "identified"):
        wrong = {"email_addresses": [{"email": "ann@example.com", "prioritization": bad}]}
        async with http.post(url, json=wrong, headers=AUTH) as resp:
            assert resp.status == 400, bad
    assert set(fake.users) == {"email:ann@example.com", "email:bob@example.com"}
    good = {
        "email_addresses": [
            {
                "email": "ann@example.com",
                "prioritization": ["unidentified", "most_recently_updated"],
            }
        ]
    }
    async with http.post(url, json=good, headers=AUTH) as resp:
        assert resp.status == 201
        assert await resp.json() == {"deleted": 1, "message": "success"}
    assert set(fake.users) == {"email:bob@example.com"}
    assert fake.deleted == ["email:ann@example.com"]
