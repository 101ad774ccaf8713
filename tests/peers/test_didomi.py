"""gateway.didomi: login and renewal, reads, idempotent writes, and every answer classified."""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

import aiohttp
import msgspec
import pytest

from gateway.config.settings import DeliveryConfig, DidomiApiConfig
from gateway.delivery.outcome import Answer, Verdict
from gateway.delivery.pacing import RateLimiter
from gateway.delivery.retry import Action, decide
from gateway.peers.didomi import (
    EVENTS,
    SESSIONS,
    SOURCE,
    USERS,
    DidomiClient,
    open_didomi_client,
    token_expiry,
)
from gateway.testing.braze import FakeDidomi
from gateway.testing.didomi import didomi_error
from tests.conftest import DIDOMI_API_KEY, DIDOMI_API_SECRET, DIDOMI_ORG, free_port

OPT_IN = [{"id": "marketing_email", "enabled": True}]

MakeDidomi = Callable[..., Awaitable[FakeDidomi]]


def api_config(fake: FakeDidomi | None, **overrides: Any) -> DidomiApiConfig:
    """The [didomi_api] table pointing at `fake` (its /v1 base URL) with the test credentials."""
    settings: dict[str, Any] = {
        "enabled": True,
        "base_url": f"{fake.url}/v1" if fake is not None else "",
        "organization_id": DIDOMI_ORG,
        "key": DIDOMI_API_KEY,
        "secret": DIDOMI_API_SECRET,
        "requests_per_second": 1000.0,
        **overrides,
    }
    return DidomiApiConfig(**settings)


@pytest.fixture
async def make_didomi() -> AsyncIterator[MakeDidomi]:
    """`await make_didomi(**kwargs)`: a FakeDidomi with the test credentials, stopped after."""
    started: list[FakeDidomi] = []

    async def make(**kwargs: Any) -> FakeDidomi:
        fake = FakeDidomi(
            key=DIDOMI_API_KEY, secret=DIDOMI_API_SECRET, organization_id=DIDOMI_ORG, **kwargs
        )
        await fake.start()
        started.append(fake)
        return fake

    yield make
    for fake in started:
        await fake.stop()


@pytest.fixture
async def client(fake_didomi: FakeDidomi) -> AsyncIterator[DidomiClient]:
    """A client of the shared fake, as open_didomi_client builds it."""
    async with open_didomi_client(api_config(fake_didomi)) as made:
        yield made


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """A bare ClientSession for clients built by hand (an injected clock or limiter)."""
    async with aiohttp.ClientSession() as session:
        yield session


def statuses(fake: FakeDidomi, path: str) -> list[int]:
    """The statuses the fake answered on `path`, in order."""
    return [r.status for r in fake.requests if r.path == path]


class RecordingLimiter(RateLimiter):
    """A RateLimiter that keeps every wait its `observe` decided."""

    def __init__(self) -> None:
        super().__init__(1000.0)
        self.waits: list[float | None] = []

    def observe(
        self, status: int, headers: Mapping[str, str], number: int | None = None
    ) -> float | None:
        wait = super().observe(status, headers, number)
        self.waits.append(wait)
        return wait


# ---------------------------------------------------------------------------
# The token: one login, shared, renewed before expiry and after a 401.


async def test_logs_in_once_and_reuses_the_token(
    client: DidomiClient, fake_didomi: FakeDidomi
) -> None:
    """Three calls make one POST /sessions; every call carries the token it returned."""
    assert (await client.write_event("ev-1", "u1", OPT_IN)).verdict is Verdict.OK
    answer, _ = await client.current_user("u1")
    assert answer.verdict is Verdict.OK
    assert (await client.write_event("ev-2", "u1", OPT_IN)).verdict is Verdict.OK
    assert fake_didomi.sessions == 1
    assert [r.path for r in fake_didomi.requests] == [SESSIONS, EVENTS, USERS, EVENTS]
    assert {r.status for r in fake_didomi.requests} == {200}


async def test_concurrent_callers_share_one_login(
    client: DidomiClient, fake_didomi: FakeDidomi
) -> None:
    """Five calls started together on a fresh client wait for one login, not five."""
    answers = await asyncio.gather(*(client.current_user(f"u{n}") for n in range(5)))
    assert [a.verdict for a, _ in answers] == [Verdict.OK] * 5
    assert fake_didomi.sessions == 1


async def test_renews_the_token_before_it_expires(
    http: aiohttp.ClientSession, fake_didomi: FakeDidomi
) -> None:
    """Within the renewal margin of the JWT's exp the client logs in again before any 401."""
    now = [time.time()]
    client = DidomiClient(
        http,
        api_config(fake_didomi),
        limiter=RateLimiter(1000.0),
        clock=lambda: now[0],
        renew_margin_s=60.0,
    )
    await client.current_user("u1")
    now[0] += fake_didomi.token_ttl_s - 61  # one second before the margin: still fresh
    await client.current_user("u1")
    assert fake_didomi.sessions == 1
    now[0] += 2  # inside the margin: renewed, though the fake would still take the old token
    await client.current_user("u1")
    assert fake_didomi.sessions == 2
    assert statuses(fake_didomi, USERS) == [200, 200, 200]


async def test_a_401_on_an_expired_token_logs_in_again_and_the_call_succeeds(
    client: DidomiClient, fake_didomi: FakeDidomi
) -> None:
    """A token Didomi calls expired costs one 401, one login and one retry of the same call."""
    await client.write_event("ev-1", "u1", OPT_IN)
    fake_didomi.expire_tokens()
    answer = await client.write_event("ev-2", "u1", OPT_IN)
    assert answer == Answer(Verdict.OK, 200, "ok")
    assert statuses(fake_didomi, EVENTS) == [200, 401, 200]
    assert fake_didomi.sessions == 2
    assert [e.body["id"] for e in fake_didomi.events] == ["ev-1", "ev-2"]


async def test_a_second_401_is_held_after_exactly_one_retry(
    client: DidomiClient, fake_didomi: FakeDidomi
) -> None:
    """When the fresh token is refused too, the call is not retried again: AUTH, with a hint."""
    fake_didomi.fail_next(401, count=3, path=EVENTS)
    answer = await client.write_event("ev-1", "u1", OPT_IN)
    assert (answer.verdict, answer.status) == (Verdict.AUTH, 401)
    assert "after a fresh login" in answer.reason
    assert "didomi_api.key" in answer.reason
    assert statuses(fake_didomi, EVENTS) == [401, 401]
    assert fake_didomi.sessions == 2
    assert fake_didomi.events == []


async def test_a_refused_login_is_held_as_a_wrong_key_or_secret(
    make_didomi: MakeDidomi, http: aiohttp.ClientSession
) -> None:
    """Didomi's 400 from /sessions (its answer to a wrong key or secret) is AUTH, held, naming
    didomi_api.key and secret; no API call is made, and a 401 there is held the same."""
    fake = await make_didomi()
    config = api_config(fake, secret="not-the-secret")
    client = DidomiClient(http, config, limiter=RateLimiter(1000.0))
    answer = await client.write_event("ev-1", "u1", OPT_IN)
    assert (answer.verdict, answer.status) == (Verdict.AUTH, 400)
    assert "didomi_api.key and didomi_api.secret" in answer.reason
    assert [r.path for r in fake.requests] == [SESSIONS]
    fake.fail_next(401, path=SESSIONS)
    answer = await client.write_event("ev-1", "u1", OPT_IN)
    assert (answer.verdict, answer.status) == (Verdict.AUTH, 401)
    assert "didomi_api.key and didomi_api.secret" in answer.reason
    assert [r.path for r in fake.requests] == [SESSIONS, SESSIONS]


def test_token_expiry_reads_the_exp_claim_or_assumes_an_hour() -> None:
    """exp comes from the JWT's base64url payload; anything unreadable means an hour from now."""

    def jwt(claims: dict[str, Any]) -> str:
        payload = base64.urlsafe_b64encode(msgspec.json.encode(claims)).rstrip(b"=").decode()
        return f"eyJhbGciOiJIUzI1NiJ9.{payload}.c2ln"

    assert token_expiry(jwt({"exp": 1_900_000_000.5, "sub": "k"}), now=0) == 1_900_000_000.5
    assert token_expiry("opaque-token", now=100.0) == 3700.0
    assert token_expiry("a.!!!.c", now=100.0) == 3700.0
    assert token_expiry(jwt({}), now=100.0) == 3700.0
    assert token_expiry(jwt({"exp": "soon"}), now=100.0) == 3700.0


# ---------------------------------------------------------------------------
# Reads and writes.


async def test_the_event_body_is_the_one_of_design_section_7(
    client: DidomiClient, fake_didomi: FakeDidomi
) -> None:
    """id, user, regulation (configured or given), consents and our metadata tag are sent."""
    purposes = [{"id": "newsletter", "enabled": True, "values": {"topics": {"value": "a,b"}}}]
    await client.write_event("ev-1", "u1", purposes)
    await client.write_event("ev-2", "u1", purposes, regulation="cpra")
    assert fake_didomi.events[0].body == {
        "id": "ev-1",
        "user": {"organization_user_id": "u1"},
        "regulation": "gdpr",
        "consents": {"purposes": purposes},
        "metadata": {"source": SOURCE},
    }
    assert fake_didomi.events[1].body["regulation"] == "cpra"
    assert fake_didomi.requests[1].query == {"organization_id": DIDOMI_ORG}


async def test_disable_integrations_is_sent_only_when_configured(
    fake_didomi: FakeDidomi,
) -> None:
    """$disable_integrations=true goes with every event when configured, and never otherwise."""
    for disable in (False, True):
        config = api_config(fake_didomi, disable_integrations=disable)
        async with open_didomi_client(config) as client:
            await client.write_event(f"ev-{disable}", "u1", OPT_IN)
            await client.current_user("u1")
    off, on = fake_didomi.events
    assert (off.disable_integrations, on.disable_integrations) == (False, True)
    queries = [r.query for r in fake_didomi.requests if r.path == EVENTS]
    assert "$disable_integrations" not in queries[0]
    assert queries[1]["$disable_integrations"] == "true"
    for request in fake_didomi.requests:
        if request.path != EVENTS:
            assert "$disable_integrations" not in request.query


async def test_current_user_returns_the_seeded_status_and_none_for_a_stranger(
    client: DidomiClient, fake_didomi: FakeDidomi
) -> None:
    """A known person comes back with purposes and preference values; a stranger is None."""
    fake_didomi.seed_user(
        "u1",
        [
            {"id": "marketing_email", "enabled": True, "values": {"topics": {"value": "a,b"}}},
            {"id": "sms", "enabled": False},
        ],
    )
    answer, user = await client.current_user("u1")
    assert answer.verdict is Verdict.OK
    assert user is not None
    assert user.organization_user_id == "u1"
    purposes = user.purposes
    assert purposes["marketing_email"].enabled is True
    values = purposes["marketing_email"].values
    assert values is not None
    assert values["topics"].value == "a,b"
    assert purposes["sms"].enabled is False
    answer, stranger = await client.current_user("nobody")
    assert (answer.verdict, stranger) == (Verdict.OK, None)
    assert fake_didomi.requests[-1].query == {
        "organization_id": DIDOMI_ORG,
        "organization_user_id": "nobody",
        "regulation": "gdpr",
    }


async def test_a_read_sees_what_earlier_writes_recorded(client: DidomiClient) -> None:
    """Events merge into the current status: enabled replaced when given, values by preference."""
    await client.write_event(
        "ev-1", "u1", [{"id": "news", "enabled": True, "values": {"topics": {"value": "a"}}}]
    )
    await client.write_event(
        "ev-2", "u1", [{"id": "news", "enabled": None, "values": {"topics": {"value": "a,b"}}}]
    )
    _, user = await client.current_user("u1")
    assert user is not None
    news = user.purposes["news"]
    assert news.enabled is True
    assert news.values is not None
    assert news.values["topics"].value == "a,b"
    _, other = await client.current_user("u1", regulation="cpra")
    assert other is None


@pytest.mark.parametrize("duplicate_status", [409, 400])
async def test_a_retried_write_with_the_same_id_is_recorded_once_and_ok(
    make_didomi: MakeDidomi, duplicate_status: int
) -> None:
    """Didomi refusing an id it already has (409, or a 400 saying so) is success: it is recorded."""
    fake = await make_didomi(duplicate_status=duplicate_status)
    async with open_didomi_client(api_config(fake)) as client:
        first = await client.write_event("ev-1", "u1", OPT_IN)
        again = await client.write_event("ev-1", "u1", OPT_IN)
    assert first.verdict is Verdict.OK
    assert again == Answer(Verdict.OK, duplicate_status, "already recorded")
    assert statuses(fake, EVENTS) == [200, duplicate_status]
    assert len(fake.events) == 1


async def test_a_write_whose_answer_was_lost_is_retried_safely(make_didomi: MakeDidomi) -> None:
    """A timeout after Didomi recorded the event is RETRY, and the retry is OK, recorded once."""
    fake = await make_didomi()
    async with open_didomi_client(api_config(fake, timeout_s=0.2)) as client:
        assert (await client.current_user("u1"))[0].verdict is Verdict.OK  # log in first
        fake.latency_s = 2.0
        lost = await client.write_event("ev-1", "u1", OPT_IN)
        fake.latency_s = 0.0
        retried = await client.write_event("ev-1", "u1", OPT_IN)
    assert lost == Answer(Verdict.RETRY, None, "timeout")
    assert retried.verdict is Verdict.OK
    assert len(fake.events) == 1


# ---------------------------------------------------------------------------
# Answers classified for the retry policy.


async def test_429_is_rate_limited_and_the_limiter_honours_retry_after(
    http: aiohttp.ClientSession, fake_didomi: FakeDidomi
) -> None:
    """A 429 with Retry-After is RATE_LIMITED and tells the shared limiter how long to wait."""
    limiter = RecordingLimiter()
    client = DidomiClient(http, api_config(fake_didomi), limiter=limiter)
    fake_didomi.fail_next(429, headers={"Retry-After": "7"}, path=EVENTS)
    answer = await client.write_event("ev-1", "u1", OPT_IN)
    assert (answer.verdict, answer.status) == (Verdict.RATE_LIMITED, 429)
    assert limiter.waits[-1] == 7.0
    assert fake_didomi.events == []


@pytest.mark.parametrize("status", [408, 500, 502, 503])
async def test_server_errors_are_retried(
    client: DidomiClient, fake_didomi: FakeDidomi, status: int
) -> None:
    """408 and 5xx from the API, or from the login, are RETRY with their status."""
    fake_didomi.fail_next(status, path=EVENTS)
    assert await client.write_event("ev-1", "u1", OPT_IN) == Answer(
        Verdict.RETRY, status, f"Didomi answered {status}"
    )
    fake_didomi.expire_tokens()
    fake_didomi.fail_next(status, path=SESSIONS)
    answer, user = await client.current_user("u1")
    assert (answer.verdict, answer.status, user) == (Verdict.RETRY, status, None)


async def test_a_timeout_is_retried(make_didomi: MakeDidomi) -> None:
    """No answer within didomi_api.timeout_s is RETRY with no status."""
    fake = await make_didomi(latency_s=2.0)
    async with open_didomi_client(api_config(fake, timeout_s=0.1)) as client:
        answer = await client.write_event("ev-1", "u1", OPT_IN)
    assert answer == Answer(Verdict.RETRY, None, "timeout")


async def test_connection_refused_is_retried() -> None:
    """Nothing listening at base_url is RETRY with no status, naming a connection error."""
    config = api_config(None, base_url=f"http://127.0.0.1:{free_port()}/v1")
    async with open_didomi_client(config) as client:
        answer = await client.write_event("ev-1", "u1", OPT_IN)
    assert (answer.verdict, answer.status) == (Verdict.RETRY, None)
    assert answer.reason.startswith("connection: ")


async def test_403_is_held_with_a_hint_about_the_organization_and_key(
    fake_didomi: FakeDidomi,
) -> None:
    """An organization the key may not act for is a 403: AUTH, naming organization_id and key."""
    async with open_didomi_client(api_config(fake_didomi, organization_id="other")) as client:
        answer = await client.write_event("ev-1", "u1", OPT_IN)
    assert (answer.verdict, answer.status) == (Verdict.AUTH, 403)
    assert "didomi_api.organization_id" in answer.reason
    assert "didomi_api.key" in answer.reason
    assert fake_didomi.events == []


async def test_404_and_405_are_held_as_a_wrong_base_url(
    client: DidomiClient, fake_didomi: FakeDidomi
) -> None:
    """A base_url without /v1 gets 404s, a wrong route 405s: AUTH saying base_url looks wrong."""
    async with open_didomi_client(api_config(fake_didomi, base_url=fake_didomi.url)) as wrong:
        answer = await wrong.write_event("ev-1", "u1", OPT_IN)
    assert (answer.verdict, answer.status) == (Verdict.AUTH, 404)
    assert "didomi_api.base_url looks wrong" in answer.reason
    fake_didomi.fail_next(405, path=EVENTS)
    answer = await client.write_event("ev-1", "u1", OPT_IN)
    assert (answer.verdict, answer.status) == (Verdict.AUTH, 405)
    assert "didomi_api.base_url looks wrong" in answer.reason


@pytest.mark.parametrize("path", [SESSIONS, EVENTS])
async def test_redirects_are_never_followed(
    client: DidomiClient, fake_didomi: FakeDidomi, path: str
) -> None:
    """A 302, even to the right place, is AUTH (base_url looks wrong) and nothing follows it."""
    target = f"{fake_didomi.url}/v1{path}?organization_id={DIDOMI_ORG}"
    fake_didomi.fail_next(302, headers={"Location": target}, path=path)
    answer = await client.write_event("ev-1", "u1", OPT_IN)
    assert (answer.verdict, answer.status) == (Verdict.AUTH, 302)
    assert "didomi_api.base_url looks wrong" in answer.reason
    assert statuses(fake_didomi, path) == [302]
    assert fake_didomi.events == []


async def test_other_4xx_are_refused_with_didomis_message_truncated(
    client: DidomiClient, fake_didomi: FakeDidomi
) -> None:
    """A 400 that is no duplicate, or a 422, is REFUSED with Didomi's own words, kept short."""
    fake_didomi.fail_next(400, body=didomi_error(400, "Invalid purpose ID: nope"), path=EVENTS)
    answer = await client.write_event("ev-1", "u1", [{"id": "nope", "enabled": True}])
    assert answer == Answer(Verdict.REFUSED, 400, "Didomi answered 400: Invalid purpose ID: nope")
    fake_didomi.fail_next(422, body=didomi_error(422, "x" * 5000), path=EVENTS)
    answer = await client.write_event("ev-2", "u1", OPT_IN)
    assert (answer.verdict, answer.status) == (Verdict.REFUSED, 422)
    assert len(answer.reason) <= 250
    fake_didomi.fail_next(400, body={"unexpected": True}, path=EVENTS)
    answer = await client.write_event("ev-3", "u1", OPT_IN)
    assert answer.verdict is Verdict.REFUSED


async def test_answers_that_are_not_didomis_are_held_as_a_wrong_base_url(
    client: DidomiClient, fake_didomi: FakeDidomi
) -> None:
    """A login 200 with no token, or a users 200 that is no page, means base_url looks wrong."""
    fake_didomi.fail_next(200, body={"hello": "world"}, path=SESSIONS)
    answer = await client.write_event("ev-1", "u1", OPT_IN)
    assert (answer.verdict, answer.status) == (Verdict.AUTH, 200)
    assert "didomi_api.base_url looks wrong" in answer.reason
    fake_didomi.fail_next(200, body={"data": "nope"}, path=USERS)
    answer, user = await client.current_user("u1")
    assert (answer.verdict, user) == (Verdict.AUTH, None)
    assert "didomi_api.base_url looks wrong" in answer.reason


async def test_the_retry_policy_applies_unchanged(
    client: DidomiClient, fake_didomi: FakeDidomi
) -> None:
    """Held on 401/403/404, dead-lettered when refused, retried on 5xx and 429: decide() as is."""
    delivery = DeliveryConfig()
    expected = {401: Action.HOLD, 403: Action.HOLD, 404: Action.HOLD, 400: Action.DEAD_LETTER}
    expected |= {503: Action.RETRY, 429: Action.RETRY}
    for status, action in expected.items():
        fake_didomi.fail_next(status, count=2 if status == 401 else 1, path=EVENTS)
        answer = await client.write_event(f"ev-{status}", "u1", OPT_IN)
        decision = decide(answer, attempt=1, oldest_age_s=0, can_split=False, delivery=delivery)
        assert decision.action is action, (status, answer)
    assert fake_didomi.events == []


async def test_on_request_reports_every_exchange(fake_didomi: FakeDidomi) -> None:
    """The callback gets each exchange's endpoint and status label, logins and failures too."""
    seen: list[tuple[str, str]] = []

    def record(path: str, status: str, seconds: float) -> None:
        assert seconds >= 0
        seen.append((path, status))

    async with open_didomi_client(api_config(fake_didomi), on_request=record) as client:
        await client.write_event("ev-1", "u1", OPT_IN)
        fake_didomi.fail_next(503, path=USERS)
        await client.current_user("u1")
    refused = api_config(None, base_url=f"http://127.0.0.1:{free_port()}/v1")
    async with open_didomi_client(refused, on_request=record) as client:
        await client.current_user("u1")
    assert seen == [(SESSIONS, "200"), (EVENTS, "200"), (USERS, "503"), (SESSIONS, "error")]


# ---------------------------------------------------------------------------
# Secrets.


async def test_no_secret_or_token_in_any_reason_log_record_or_repr(
    fake_didomi: FakeDidomi, caplog: pytest.LogCaptureFixture
) -> None:
    """Through logins, renewals, echoed credentials and refusals, none leaks anywhere."""
    caplog.set_level(logging.DEBUG)
    answers: list[Answer] = []
    config = api_config(fake_didomi)
    async with open_didomi_client(config) as client:
        answers.append(await client.write_event("ev-1", "u1", OPT_IN))
        fake_didomi.expire_tokens()
        answers.append((await client.current_user("u1"))[0])
        token = next(t for t, exp in fake_didomi.tokens.items() if exp > time.time())
        echo = f"bad key {DIDOMI_API_KEY} secret {DIDOMI_API_SECRET} token {token}"
        fake_didomi.fail_next(400, body=didomi_error(400, echo), path=EVENTS)
        answers.append(await client.write_event("ev-2", "u1", OPT_IN))
        fake_didomi.fail_next(422, body={"message": f"Authorization: Bearer {token}"}, path=USERS)
        answers.append((await client.current_user("u1"))[0])
        fake_didomi.fail_next(401, count=2, path=EVENTS)
        answers.append(await client.write_event("ev-3", "u1", OPT_IN))
        shown = [repr(client), repr(config), str(config)]
    async with open_didomi_client(api_config(fake_didomi, secret="wrong-secret-77")) as client:
        answers.append(await client.write_event("ev-4", "u1", OPT_IN))
    assert [a.verdict for a in answers] == [
        Verdict.OK,
        Verdict.OK,
        Verdict.REFUSED,
        Verdict.REFUSED,
        Verdict.AUTH,
        Verdict.AUTH,
    ]
    assert "[redacted]" in answers[2].reason
    secrets = [DIDOMI_API_KEY, DIDOMI_API_SECRET, "wrong-secret-77", *fake_didomi.tokens]
    texts = [a.reason for a in answers] + shown
    texts += [r.getMessage() for r in caplog.records] + [str(r.__dict__) for r in caplog.records]
    assert any("logging in again" in t for t in texts)  # the renewal was logged, and checked
    for text in texts:
        for secret in secrets:
            assert secret not in text


async def test_a_users_page_with_fields_the_client_does_not_name_still_reads(
    client: DidomiClient, fake_didomi: FakeDidomi
) -> None:
    """Unknown fields in the page, the user and its purposes are ignored: Didomi adds fields."""
    user = {
        "id": "d1",
        "organization_user_id": "u1",
        "version": 3,
        "last_seen_country": "FR",
        "consents": {
            "purposes": [{"id": "news", "enabled": True, "enabled_li": None, "metadata": {}}],
            "vendors": {"enabled": ["iab:1"]},
            "tcfcs": "CP...",
        },
    }
    page = {"data": [user], "limit": 100, "cursor": None, "total": 1}
    fake_didomi.fail_next(200, body=page, path=USERS)
    answer, found = await client.current_user("u1")
    assert answer.verdict is Verdict.OK
    assert found is not None
    assert found.purposes["news"].enabled is True
