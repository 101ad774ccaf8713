"""gateway.server on loopback: the intake's checks in order, durability, readiness and shutdown."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gc
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, make_mocked_request

from gateway.app import heap
from gateway.app.server import CONFIG, SPOOL, STATE, Context, create_app, readyz
from gateway.config.settings import Config
from gateway.delivery import health
from gateway.delivery.health import DeliveryHealth
from gateway.delivery.outcome import Answer, Verdict
from gateway.metrics import Metrics
from gateway.spool.sqlite import Pending, SpoolDB
from gateway.testing.braze import FakeBraze
from tests.conftest import BRAZE_API_KEY, choice, free_port, recent
from tests.system.test_reliability import StartGateway, eventually, start_gateway  # noqa: F401 - a fixture

Client = TestClient[web.Request, web.Application]
MakeClient = Callable[[web.Application], Awaitable[Client]]
Start = Callable[..., Awaitable[Client]]
MakeConfig = Callable[..., Config]
MakeEvent = Callable[..., bytes]

ROOT = Path(__file__).resolve().parents[2]
EVENTS = ROOT / "tests" / "events"
JSON = {"Content-Type": "application/json"}
LIMIT = 4096  # server.max_body_bytes in most tests: small, so size tests stay fast


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


@pytest.fixture
def start(aiohttp_client: MakeClient, metrics: Metrics) -> Start:
    """Serve create_app(config) on loopback and return a client for it."""

    async def start(config: Config, contexts: Sequence[Context] = ()) -> Client:
        return await aiohttp_client(create_app(config, metrics=metrics, contexts=contexts))

    return start


@pytest.fixture
def config(make_config: MakeConfig, tmp_path: Path) -> Config:
    return make_config(tmp_path, server={"max_body_bytes": LIMIT})


@pytest.fixture
async def client(start: Start, config: Config) -> Client:
    return await start(config)


@pytest.fixture
def server_log() -> Iterator[list[logging.LogRecord]]:
    """Every record the gateway.server logger emits during the test, whatever else is set up."""
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    logger = logging.getLogger("gateway.server")
    handler, level = Keep(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield records
    logger.removeHandler(handler)
    logger.setLevel(level)


def received(metrics: Metrics, type_: str, outcome: str) -> float:
    value = metrics.registry.get_sample_value(
        "gateway_webhooks_received_total",
        {"direction": "to_braze", "type": type_, "outcome": outcome},
    )
    assert value is not None
    return value


async def stored(client: Client) -> list[Pending]:
    spool = client.app[SPOOL]
    return await spool.run(spool.db.fetch, 0, 1_000_000)


def entity_id(body: bytes) -> str:
    parameters = json.loads(body)["parameters"]
    return str((parameters.get("new_entity") or parameters["entity"])["id"])


async def stored_ids(client: Client) -> list[str]:
    return [entity_id(row.body) for row in await stored(client)]


async def post(
    client: Client, body: bytes | str, headers: dict[str, str] | None = None, **kw: Any
) -> tuple[int, dict[str, Any]]:
    resp = await client.post("/webhooks/didomi", data=body, headers=headers, **kw)
    return resp.status, await resp.json()


def nested(levels: int) -> bytes:
    """A valid webhook whose deepest value sits `levels` arrays/objects deep."""
    inner = b"[" * (levels - 3) + b"]" * (levels - 3)  # root, parameters, entity: 3 levels
    return b'{"type": "event.created", "parameters": {"entity": {"id": "deep", "extra": %s}}}' % (
        inner
    )


async def raw_status(client: Client, head: bytes, body_parts: Sequence[bytes]) -> bytes:
    """Send a request byte by byte on a raw socket, never finishing it; return the status line."""
    assert client.server.host is not None
    reader, writer = await asyncio.open_connection(client.server.host, client.server.port)
    try:
        writer.write(head)
        for part in body_parts:
            writer.write(part)
            await writer.drain()
        return await asyncio.wait_for(reader.readline(), timeout=5)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


# ---------------------------------------------------------------------------
# The order of the checks


async def test_a_serving_gateway_freezes_its_start_up_and_collects_the_young_less_often(
    start: Start, config: Config, make_config: MakeConfig, tmp_path: Path
) -> None:
    """Once started, start-up's objects are out of the garbage collector's way and its young
    generation is collected every `heap.YOUNG` allocations; the last app to stop undoes both."""
    before = gc.get_threshold()
    client = await start(config)
    assert gc.get_threshold() == (heap.YOUNG, *before[1:])
    assert gc.get_freeze_count() > 0
    (tmp_path / "second").mkdir()
    second = await start(make_config(tmp_path / "second"))
    await client.close()  # another app still serves: it stays tuned
    assert gc.get_threshold() == (heap.YOUNG, *before[1:])
    await second.close()
    assert gc.get_threshold() == before
    assert gc.get_freeze_count() == 0


async def test_bad_auth_wins_over_wrong_content_type(client: Client, metrics: Metrics) -> None:
    """A request with a bad token and a wrong media type is a 401 (auth is checked first)."""
    status, body = await post(
        client, "x", {"Authorization": "Bearer nope", "Content-Type": "text/plain"}
    )
    assert (status, body["error"]) == (401, "unauthorized")
    assert set(body) == {"error", "detail"}
    assert received(metrics, "other", "unauthorized") == 1


async def test_wrong_content_type_wins_over_size(
    client: Client, auth_headers: dict[str, str]
) -> None:
    """With a good token, a text/plain body over the size limit is a 415."""
    headers = {**auth_headers, "Content-Type": "text/plain"}
    status, body = await post(client, b"x" * (LIMIT * 4), headers)
    assert (status, body["error"]) == (415, "unsupported_media_type")


async def test_size_wins_over_bad_json(client: Client, auth_headers: dict[str, str]) -> None:
    """A JSON request whose invalid body is over the limit is a 413."""
    status, body = await post(client, b"{" * (LIMIT + 1), auth_headers)
    assert (status, body["error"]) == (413, "too_large")


async def test_shape_wins_over_unknown_type(client: Client, auth_headers: dict[str, str]) -> None:
    """An unknown type in a body without `parameters` is a 400, not an ignored 200."""
    status, body = await post(client, b'{"type": "consent.changed"}', auth_headers)
    assert (status, body["error"]) == (400, "bad_request")
    assert "parameters" in body["detail"]


async def test_unknown_type_is_ignored_and_counted(
    client: Client, auth_headers: dict[str, str], metrics: Metrics
) -> None:
    """A well-formed webhook of a type we do not handle answers 200 ignored and stores nothing."""
    payload = b'{"type": "notice.published", "parameters": {"anything": [1, 2]}}'
    assert await post(client, payload, auth_headers) == (200, {"status": "ignored"})
    assert await stored(client) == []
    assert received(metrics, "other", "ignored") == 1


# ---------------------------------------------------------------------------
# Authentication


@pytest.mark.parametrize(
    "authorization",
    [
        None,
        "",
        "Bearer",
        "Bearer not-a-token",
        "Basic ZGlkb21pOnNlY3JldA==",
        # A well-formed token signed with another secret.
        "Bearer eyJzdWIiOiJkaWRvbWkiLCJpYXQiOjAsImV4cCI6OTk5OTk5OTk5OSwianRpIjoieCJ9."
        "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
    ],
)
async def test_webhooks_without_a_valid_token_are_401(
    client: Client, make_event: MakeEvent, metrics: Metrics, authorization: str | None
) -> None:
    """No token, a wrong scheme or a forged token: 401 with a Bearer challenge, nothing stored."""
    headers = {**JSON} if authorization is None else {**JSON, "Authorization": authorization}
    resp = await client.post("/webhooks/didomi", data=make_event(1), headers=headers)
    assert resp.status == 401
    assert resp.headers["WWW-Authenticate"].startswith("Bearer")
    assert (await resp.json())["error"] == "unauthorized"
    assert await stored(client) == []
    assert received(metrics, "other", "unauthorized") == 1


async def test_token_from_form_then_webhook_accepted(
    client: Client, make_event: MakeEvent, secrets_env: dict[str, str]
) -> None:
    """Client credentials in the form body give a token that the webhook route accepts."""
    form = {
        "grant_type": "client_credentials",
        "client_id": "didomi",
        "client_secret": secrets_env["DIDOMI_CLIENT_SECRET"],
    }
    resp = await client.post("/oauth/token", data=form)
    assert resp.status == 200
    token = (await resp.json())["access_token"]
    headers = {**JSON, "Authorization": f"Bearer {token}"}
    assert await post(client, make_event(1), headers) == (202, {"status": "accepted"})


async def test_token_from_basic_auth_then_webhook_accepted(
    client: Client, make_event: MakeEvent, secrets_env: dict[str, str]
) -> None:
    """HTTP Basic client authentication gives a token that the webhook route accepts."""
    basic = base64.b64encode(f"didomi:{secrets_env['DIDOMI_CLIENT_SECRET']}".encode()).decode()
    resp = await client.post(
        "/oauth/token",
        data={"grant_type": "client_credentials"},
        headers={"Authorization": f"Basic {basic}"},
    )
    assert resp.status == 200
    token = (await resp.json())["access_token"]
    headers = {**JSON, "Authorization": f"bearer {token}"}  # the scheme is case-insensitive
    assert await post(client, make_event(1), headers) == (202, {"status": "accepted"})


async def test_wrong_client_secret_gets_no_token(client: Client) -> None:
    """The token endpoint answers 401 invalid_client, with both error and detail."""
    form = {"grant_type": "client_credentials", "client_id": "didomi", "client_secret": "wrong"}
    resp = await client.post("/oauth/token", data=form)
    assert resp.status == 401
    body = await resp.json()
    assert body["error"] == "invalid_client"
    assert "detail" in body


async def test_bearer_mode_accepts_configured_tokens_only(
    start: Start, make_config: MakeConfig, tmp_path: Path, make_event: MakeEvent
) -> None:
    """In bearer mode a listed token is accepted, another is 401, and /oauth/token is 404."""
    config = make_config(tmp_path, auth={"mode": "bearer", "tokens": ["static-one", "static-2"]})
    client = await start(config)
    ok = {**JSON, "Authorization": "Bearer static-2"}
    assert (await post(client, make_event(1), ok))[0] == 202
    bad = {**JSON, "Authorization": "Bearer static-3"}
    assert (await post(client, make_event(2), bad))[0] == 401
    resp = await client.post("/oauth/token", data={"grant_type": "client_credentials"})
    assert resp.status == 404
    assert (await resp.json())["error"] == "not_found"


async def test_none_mode_needs_no_token(
    start: Start, make_config: MakeConfig, tmp_path: Path, make_event: MakeEvent
) -> None:
    """In none mode a webhook without Authorization is accepted, and /oauth/token is 404."""
    client = await start(make_config(tmp_path, auth={"mode": "none"}))
    assert (await post(client, make_event(1), JSON))[0] == 202
    resp = await client.post("/oauth/token", data={"grant_type": "client_credentials"})
    assert resp.status == 404


async def test_allow_from_refuses_other_networks(
    start: Start,
    make_config: MakeConfig,
    tmp_path: Path,
    auth_headers: dict[str, str],
    make_event: MakeEvent,
    metrics: Metrics,
) -> None:
    """A peer outside server.allow_from gets 403 on the webhook and token routes, not on probes."""
    client = await start(make_config(tmp_path, server={"allow_from": ["10.0.0.0/8"]}))
    status, body = await post(client, make_event(1), auth_headers)
    assert (status, body["error"]) == (403, "forbidden")
    assert (await client.post("/oauth/token")).status == 403
    assert (await client.get("/healthz")).status == 200
    assert received(metrics, "other", "unauthorized") == 1
    assert await stored(client) == []


async def test_allow_from_admits_listed_networks(
    start: Start,
    make_config: MakeConfig,
    tmp_path: Path,
    auth_headers: dict[str, str],
    make_event: MakeEvent,
) -> None:
    """A peer inside one of the listed networks is served as usual."""
    config = make_config(tmp_path, server={"allow_from": ["10.0.0.0/8", "127.0.0.0/8"]})
    client = await start(config)
    assert (await post(client, make_event(1), auth_headers))[0] == 202


# ---------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize(
    ("body", "detail"),
    [
        (b"", "empty"),
        (b"   \n", "empty"),
        (b"{not json", "not valid JSON"),
        (b'{"type": "event.created", "parameters": {"entity": {}}', "not valid JSON"),
        (b"[]", "not a Didomi webhook"),
        (b'"event.created"', "not a Didomi webhook"),
        (b'{"type": 1, "parameters": {}}', "$.type"),
        (b'{"type": "event.created", "parameters": []}', "$.parameters"),
        (b'{"type": "event.created", "parameters": {}}', "$.parameters.entity"),
        (b'{"type": "event.updated", "parameters": {"source": {}}}', "new_entity"),
        (
            b'{"type": "user.created", "parameters": {"entity": {"consents": {"purposes": {}}}}}',
            "purposes",
        ),
        (
            b'{"type": "user.created", "parameters": {"entity": {"consents": '
            b'{"purposes": [{"enabled": true}]}}}}',
            "id",
        ),
    ],
)
async def test_bad_bodies_are_400_with_a_reason(
    client: Client, auth_headers: dict[str, str], metrics: Metrics, body: bytes, detail: str
) -> None:
    """Empty, invalid or wrongly shaped JSON is a 400 whose detail says what is wrong."""
    status, answer = await post(client, body, auth_headers)
    assert (status, answer["error"]) == (400, "bad_request")
    assert detail in answer["detail"]
    assert received(metrics, "other", "rejected") == 1
    assert await stored(client) == []


@pytest.mark.parametrize(
    "content_type",
    ["text/plain", "application/x-www-form-urlencoded", "application/jsonx", None],
)
async def test_non_json_media_types_are_415(
    client: Client, oauth_token: str, make_event: MakeEvent, content_type: str | None
) -> None:
    """Anything but application/json (or a missing Content-Type) is a 415."""
    headers = {"Authorization": f"Bearer {oauth_token}"}
    if content_type is not None:
        headers["Content-Type"] = content_type
    else:
        headers["Content-Type"] = ""  # aiohttp would otherwise add application/octet-stream
    status, body = await post(client, make_event(1), headers)
    assert (status, body["error"]) == (415, "unsupported_media_type")


async def test_json_with_parameters_is_json(
    client: Client, oauth_token: str, make_event: MakeEvent
) -> None:
    """`application/json; charset=utf-8` (any parameters, any case) is JSON."""
    headers = {
        "Authorization": f"Bearer {oauth_token}",
        "Content-Type": "Application/JSON; charset=UTF-8",
    }
    assert (await post(client, make_event(1), headers))[0] == 202


async def test_content_length_over_the_limit_is_413_before_the_body_is_read(
    client: Client, oauth_token: str
) -> None:
    """A declared Content-Length over the limit is answered 413 before any body byte is sent."""
    head = (
        f"POST /webhooks/didomi HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer {oauth_token}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {100 * LIMIT}\r\n\r\n"
    ).encode()
    assert (await raw_status(client, head, [])).startswith(b"HTTP/1.1 413")


async def test_content_length_over_the_limit_is_413_for_an_http_client(
    client: Client, auth_headers: dict[str, str], metrics: Metrics
) -> None:
    """An ordinary client sending an oversized body gets a JSON 413, counted as rejected."""
    status, body = await post(client, b" " * (LIMIT + 1), auth_headers)
    assert (status, body["error"]) == (413, "too_large")
    assert str(LIMIT) in body["detail"]
    assert received(metrics, "other", "rejected") == 1


async def test_chunked_body_over_the_limit_is_413_while_reading(
    client: Client, oauth_token: str
) -> None:
    """A chunked body is refused as soon as it passes the limit, before the client finishes."""
    head = (
        f"POST /webhooks/didomi HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer {oauth_token}\r\n"
        "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    ).encode()
    chunk = b"%x\r\n%s\r\n" % (1024, b" " * 1024)
    # Just over the limit, and no terminating zero-length chunk: the upload never ends.
    status = await raw_status(client, head, [chunk] * (LIMIT // 1024 + 1))
    assert status.startswith(b"HTTP/1.1 413")


async def test_chunked_body_within_the_limit_is_accepted(
    client: Client, auth_headers: dict[str, str], make_event: MakeEvent
) -> None:
    """A chunked upload within the limit is read whole and stored."""

    async def parts() -> AsyncIterator[bytes]:
        body = make_event(1)
        for i in range(0, len(body), 50):
            yield body[i : i + 50]

    status, _ = await post(client, parts(), auth_headers)  # type: ignore[arg-type]
    assert status == 202
    assert await stored_ids(client) == ["evt-00000001"]


async def test_nesting_deeper_than_64_is_400_and_64_is_fine(
    start: Start, make_config: MakeConfig, tmp_path: Path, auth_headers: dict[str, str]
) -> None:
    """65 levels of nesting are refused as such; 64 levels (in an unknown field) are accepted."""
    client = await start(make_config(tmp_path))
    status, body = await post(client, nested(65), auth_headers)
    assert (status, body["error"]) == (400, "bad_request")
    assert "64" in body["detail"]
    assert (await post(client, nested(64), auth_headers))[0] == 202
    hostile = b"[" * 100_000  # deep and unterminated: refused fast, not a recursion error
    assert (await post(client, hostile, auth_headers))[0] == 400


async def test_huge_arrays_within_the_limit(
    start: Start, make_config: MakeConfig, tmp_path: Path, auth_headers: dict[str, str]
) -> None:
    """A 1 MiB body with 60,000 purposes is stored; as many non-objects are a 400 by shape."""
    client = await start(make_config(tmp_path, server={"max_body_bytes": 1_048_576}))
    purposes = [{"id": f"p{n}"} for n in range(60_000)]
    good = {"type": "user.created", "parameters": {"entity": {"consents": {"purposes": purposes}}}}
    payload = msgspec.json.encode(good)
    assert len(payload) < 1_048_576
    assert (await post(client, payload, auth_headers))[0] == 202
    wrong = b'{"type": "user.created", "parameters": {"entity": {"consents": {"purposes": [%s]}}}}'
    status, body = await post(client, wrong % b",".join([b"1"] * 300_000), auth_headers)
    assert (status, body["error"]) == (400, "bad_request")
    assert "purposes" in body["detail"]


async def test_a_good_webhook_is_accepted_after_every_kind_of_bad_one(
    client: Client, oauth_token: str, make_event: MakeEvent, metrics: Metrics
) -> None:
    """After each bad request the next good one is accepted, and no accepted one is lost."""
    auth = {"Authorization": f"Bearer {oauth_token}"}
    bad: list[tuple[bytes, dict[str, str]]] = [
        (make_event(0), {**JSON}),
        (make_event(0), {**JSON, "Authorization": "Bearer forged"}),
        (make_event(0), {**auth, "Content-Type": "text/plain"}),
        (b" " * (LIMIT + 1), {**auth, **JSON}),
        (b"{oops", {**auth, **JSON}),
        (b"[]", {**auth, **JSON}),
        (b"", {**auth, **JSON}),
        (nested(65), {**auth, **JSON}),
        (b'{"type": "x.y", "parameters": {}}', {**auth, **JSON}),
    ]
    accepted = []
    for n, (body, headers) in enumerate(bad, start=1):
        status, _ = await post(client, body, headers)
        assert status in (200, 400, 401, 413, 415)
        assert (await post(client, make_event(n), {**auth, **JSON}))[0] == 202
        accepted.append(f"evt-{n:08d}")
    assert await stored_ids(client) == accepted
    assert received(metrics, "event.created", "accepted") == len(bad)


# ---------------------------------------------------------------------------
# Storing


async def test_accepted_webhook_is_stored_with_its_type(
    client: Client, auth_headers: dict[str, str], metrics: Metrics
) -> None:
    """A Didomi example is answered 202 only once its exact bytes are in the spool."""
    body = (EVENTS / "consent_given.json").read_bytes()
    assert await post(client, body, auth_headers) == (202, {"status": "accepted"})
    (row,) = await stored(client)
    assert (row.type, row.body) == ("event.created", body)
    assert received(metrics, "event.created", "accepted") == 1
    assert (
        metrics.registry.get_sample_value("gateway_spool_pending", {"direction": "to_braze"}) == 1
    )


async def test_duplicate_is_200_and_stored_once(
    client: Client, auth_headers: dict[str, str], metrics: Metrics
) -> None:
    """The same type, entity id and update time delivered twice is stored once."""
    body = (EVENTS / "user_updated.json").read_bytes()
    assert (await post(client, body, auth_headers))[0] == 202
    assert await post(client, body, auth_headers) == (200, {"status": "duplicate"})
    assert len(await stored(client)) == 1
    assert received(metrics, "user.updated", "duplicate") == 1


async def test_wake_is_called_once_per_stored_webhook(
    client: Client, auth_headers: dict[str, str], make_event: MakeEvent
) -> None:
    """state.wake() runs the dispatcher's callback after each store, not for duplicates."""
    woken: list[int] = []
    client.app[STATE].on_wake = lambda: woken.append(len(woken))
    for n in (1, 2, 2):
        await post(client, make_event(n), auth_headers)
    assert len(woken) == 2


async def test_spool_over_max_pending_is_503_and_stores_nothing(
    start: Start,
    make_config: MakeConfig,
    tmp_path: Path,
    auth_headers: dict[str, str],
    make_event: MakeEvent,
    metrics: Metrics,
) -> None:
    """Beyond delivery.max_pending the answer is 503 with Retry-After, and readiness drops."""
    client = await start(make_config(tmp_path, delivery={"max_pending": 3}))
    for n in range(3):
        assert (await post(client, make_event(n), auth_headers))[0] == 202
    resp = await client.post("/webhooks/didomi", data=make_event(3), headers=auth_headers)
    assert resp.status == 503
    assert int(resp.headers["Retry-After"]) > 0
    assert (await resp.json())["error"] == "unavailable"
    assert len(await stored(client)) == 3
    assert received(metrics, "event.created", "unavailable") == 1
    ready = await client.get("/readyz")
    assert ready.status == 503
    assert "spool is full" in (await ready.json())["detail"]


async def test_disk_full_is_503_never_2xx(
    start: Start,
    make_config: MakeConfig,
    tmp_path: Path,
    auth_headers: dict[str, str],
    make_event: MakeEvent,
    metrics: Metrics,
) -> None:
    """With no room every webhook gets 503 and /readyz says why; when room returns, 202 again."""
    client = await start(make_config(tmp_path))
    spool = client.app[SPOOL]
    padding = b"x" * 20_000

    def big(n: int) -> bytes:
        return make_event(n).replace(b'"status"', b'"pad": "%s", "status"' % padding)

    await spool.run(spool.db.db.execute, "PRAGMA max_page_count = 1")  # = the current size
    for n in range(5):
        status, body = await post(client, big(n), auth_headers)
        assert (status, body["error"]) == (503, "unavailable")
    assert await stored(client) == []
    assert received(metrics, "event.created", "unavailable") == 5
    ready = await client.get("/readyz")
    assert ready.status == 503
    assert "could not be written" in (await ready.json())["detail"]
    await spool.run(spool.db.db.execute, "PRAGMA max_page_count = 1000000")
    for n in range(5):  # not mistaken for duplicates: a refused webhook was never stored
        assert (await post(client, big(n), auth_headers))[0] == 202
    assert len(await stored(client)) == 5
    assert (await client.get("/readyz")).status == 200  # one good commit clears it


async def test_thousands_of_concurrent_webhooks_are_each_stored_exactly_once(
    client: Client, auth_headers: dict[str, str], make_event: MakeEvent, metrics: Metrics
) -> None:
    """3,000 concurrent webhooks with distinct ids: 3,000 202s, and each id in the spool once."""
    count = 3000
    bodies = [make_event(n) for n in range(count)]

    async def send(body: bytes) -> int:
        resp = await client.post("/webhooks/didomi", data=body, headers=auth_headers)
        return resp.status

    statuses = await asyncio.wait_for(asyncio.gather(*(send(b) for b in bodies)), timeout=120)
    assert statuses == [202] * count
    ids = await stored_ids(client)
    assert len(ids) == count
    assert set(ids) == {entity_id(b) for b in bodies}
    assert received(metrics, "event.created", "accepted") == count
    assert (
        metrics.registry.get_sample_value("gateway_spool_pending", {"direction": "to_braze"})
        == count
    )


async def test_accepted_webhooks_are_logged_once_per_commit_with_every_event_id(
    client: Client,
    auth_headers: dict[str, str],
    make_event: MakeEvent,
    server_log: list[logging.LogRecord],
) -> None:
    """Concurrent accepted webhooks log one `webhooks accepted` line per commit group, each
    after its commit, together naming every event id once; a duplicate keeps its own line."""
    count = 200
    bodies = [make_event(n) for n in range(count)]
    statuses = await asyncio.gather(*(post(client, body, auth_headers) for body in bodies))
    assert [status for status, _ in statuses] == [202] * count
    assert (await post(client, bodies[0], auth_headers))[0] == 200
    lines = [r for r in server_log if r.getMessage() == "webhooks accepted"]
    logged = [event_id for r in lines for event_id in r.__dict__["event_ids"]]
    assert sorted(logged) == sorted(
        json.loads(body)["parameters"]["entity"]["id"] for body in bodies
    )
    assert all(r.__dict__["count"] == len(r.__dict__["event_ids"]) for r in lines)
    spool = client.app[SPOOL]
    # Grouped: no more lines than intake transactions, so fewer than the webhooks.
    assert len(lines) <= spool.commits < count
    duplicates = [r for r in server_log if r.__dict__.get("outcome") == "duplicate"]
    assert len(duplicates) == 1


# ---------------------------------------------------------------------------
# Health, readiness, errors, metrics


async def test_healthz(client: Client) -> None:
    """/healthz answers 200 {"status": "ok"}."""
    resp = await client.get("/healthz")
    assert (resp.status, await resp.json()) == (200, {"status": "ok"})


async def test_readyz_after_start(client: Client, metrics: Metrics) -> None:
    """Once started, /readyz is 200 and gateway_ready is 1."""
    resp = await client.get("/readyz")
    assert (resp.status, await resp.json()) == (200, {"status": "ready"})
    assert metrics.registry.get_sample_value("gateway_ready") == 1


async def test_readyz_is_503_while_a_context_is_starting(
    config: Config, metrics: Metrics, auth_headers: dict[str, str], make_event: MakeEvent
) -> None:
    """While an added context has not finished starting, readiness is 503; afterwards 200."""
    entered, release = asyncio.Event(), asyncio.Event()
    order: list[str] = []

    async def slow(app: web.Application) -> AsyncIterator[None]:
        order.append(f"start, spool open: {SPOOL in app}")
        entered.set()
        await release.wait()
        yield
        order.append(f"stop, draining: {app[STATE].draining}")

    app = create_app(config, metrics=metrics, contexts=[slow])
    runner = web.AppRunner(app)
    setup = asyncio.create_task(runner.setup())
    try:
        await asyncio.wait_for(entered.wait(), timeout=5)
        # Nothing listens yet (aiohttp binds after startup), so ask the handler itself.
        resp = await readyz(make_mocked_request("GET", "/readyz", app=app))
        assert resp.status == 503
        assert json.loads(resp.body) == {"error": "not_ready", "detail": "starting"}  # type: ignore[arg-type]
        assert metrics.registry.get_sample_value("gateway_ready") == 0

        release.set()
        await asyncio.wait_for(setup, timeout=5)
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = runner.addresses[0][:2]
        async with aiohttp.ClientSession(f"http://{host}:{port}") as session:
            async with session.get("/readyz") as ready:
                assert ready.status == 200
            async with session.post(
                "/webhooks/didomi", data=make_event(1), headers=auth_headers
            ) as accepted:
                assert accepted.status == 202
        assert metrics.registry.get_sample_value("gateway_ready") == 1
    finally:
        release.set()
        await setup
        await runner.cleanup()
    assert order == ["start, spool open: True", "stop, draining: True"]


async def test_webhooks_are_503_while_starting(
    client: Client, auth_headers: dict[str, str], make_event: MakeEvent, metrics: Metrics
) -> None:
    """A valid webhook arriving while the gateway is starting is 503 (Didomi retries)."""
    client.app[STATE].starting = True
    resp = await client.post("/webhooks/didomi", data=make_event(1), headers=auth_headers)
    assert resp.status == 503
    assert "Retry-After" in resp.headers
    assert (await resp.json())["error"] == "not_ready"
    assert await stored(client) == []
    assert received(metrics, "event.created", "unavailable") == 1
    client.app[STATE].starting = False
    assert (await post(client, make_event(1), auth_headers))[0] == 202


async def test_readyz_reports_a_failing_check(client: Client, metrics: Metrics) -> None:
    """A readiness check that gives a reason makes /readyz 503 with that reason as detail."""
    reasons: list[str | None] = ["Braze rejects the API key (401)"]
    client.app[STATE].ready_checks.append(lambda: reasons[0])
    resp = await client.get("/readyz")
    assert resp.status == 503
    assert await resp.json() == {"error": "not_ready", "detail": reasons[0]}
    assert metrics.registry.get_sample_value("gateway_ready") == 0
    reasons[0] = None
    assert (await client.get("/readyz")).status == 200
    assert metrics.registry.get_sample_value("gateway_ready") == 1


async def test_in_flight_webhook_finishes_while_draining(
    client: Client,
    auth_headers: dict[str, str],
    make_event: MakeEvent,
    metrics: Metrics,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On shutdown readiness drops at once, a webhook being stored still gets its 202, and then
    the spool closes with it committed."""
    app = client.app
    spool = app[SPOOL]
    gate = threading.Event()
    original = spool.db.put_many

    def held(items: Sequence[tuple[str | None, str, bytes]], *rest: Any) -> list[Any]:
        gate.wait(timeout=10)  # the commit is in progress when the shutdown starts
        return list(original(items, *rest))

    monkeypatch.setattr(spool.db, "put_many", held)
    request = asyncio.create_task(
        client.post("/webhooks/didomi", data=make_event(7), headers=auth_headers)
    )
    try:
        await asyncio.sleep(0.2)
        closing = asyncio.create_task(client.server.close())
        for _ in range(100):
            if app[STATE].draining:
                break
            await asyncio.sleep(0.02)
        assert app[STATE].not_ready_reason() == "draining: the gateway is shutting down"
        assert metrics.registry.get_sample_value("gateway_ready") == 0
        assert not request.done()
        assert not closing.done()
    finally:
        gate.set()
    resp = await asyncio.wait_for(request, timeout=5)
    assert resp.status == 202
    await asyncio.wait_for(closing, timeout=10)
    db = SpoolDB(app[CONFIG].delivery.spool)
    try:
        assert [entity_id(row.body) for row in db.fetch(0, 10)] == ["evt-00000007"]
    finally:
        db.close()


async def test_unknown_routes_and_methods_answer_json(client: Client) -> None:
    """aiohttp's own 404 and 405 come back as JSON {"error", "detail"}."""
    resp = await client.get("/nope")
    assert resp.status == 404
    assert resp.content_type == "application/json"
    assert await resp.json() == {"error": "not_found", "detail": "nothing at /nope"}
    resp = await client.get("/webhooks/didomi")
    assert resp.status == 405
    body = await resp.json()
    assert body["error"] == "method_not_allowed"
    assert "POST" in body["detail"]
    assert "POST" in resp.headers["Allow"]


async def test_metrics_show_the_intake_counters(
    client: Client, auth_headers: dict[str, str], make_event: MakeEvent
) -> None:
    """GET /metrics exposes webhooks_received_total by type and outcome, and the spool gauge."""
    await post(client, make_event(1), auth_headers)
    await post(client, make_event(1), auth_headers)
    await post(client, b"{", auth_headers)
    await post(client, make_event(2), JSON)
    resp = await client.get("/metrics")
    assert resp.status == 200
    text = await resp.text()
    received = 'gateway_webhooks_received_total{direction="to_braze"'
    for line in (
        f'{received},outcome="accepted",type="event.created"}} 1.0',
        f'{received},outcome="duplicate",type="event.created"}} 1.0',
        f'{received},outcome="rejected",type="other"}} 1.0',
        f'{received},outcome="unauthorized",type="other"}} 1.0',
        f'{received},outcome="ignored",type="user.deleted"}} 0.0',
        'gateway_spool_pending{direction="to_braze"} 1.0',
        "gateway_ready 1.0",
    ):
        assert line in text


async def test_refusals_are_logged_once_without_secrets_or_bodies(
    client: Client,
    oauth_token: str,
    server_log: list[logging.LogRecord],
) -> None:
    """Each refused webhook logs one line with its reason; no token, body or email appears."""
    secret_body = b'{"type": "event.created", "parameters": {"entity": {"email": "a@b.example"'
    await post(client, secret_body, {"Authorization": f"Bearer {oauth_token}x", **JSON})
    await post(client, secret_body, {"Authorization": f"Bearer {oauth_token}", **JSON})
    lines = [record.getMessage() for record in server_log]
    assert len(lines) == 2
    assert "401" in lines[0]
    assert "not valid JSON" in lines[1]
    for line in lines:
        assert oauth_token not in line
        assert "a@b.example" not in line


# ---------------------------------------------------------------------------
# The real process


@pytest.mark.slow
async def test_sigterm_drains_and_keeps_every_accepted_webhook(
    tmp_path: Path,
    make_config: MakeConfig,
    secrets_env: dict[str, str],
    auth_headers: dict[str, str],
    make_event: MakeEvent,
) -> None:
    """`gateway run` stops on SIGTERM with exit 0, and every webhook it answered 202 is on disk."""
    port = free_port()
    config = make_config(tmp_path, server={"port": port, "shutdown_timeout_s": 10.0})
    command = [sys.executable, "-m", "gateway", "run", "--config", str(tmp_path / "gateway.toml")]
    log_path = tmp_path / "gateway.log"
    base = f"http://127.0.0.1:{port}"
    with log_path.open("wb") as log_file:
        proc = await asyncio.create_subprocess_exec(
            *command,
            "--log-format",
            "json",
            env={**os.environ, **secrets_env},
            stdout=log_file,
            stderr=subprocess.STDOUT,
            cwd=tmp_path,
        )
        try:
            async with aiohttp.ClientSession() as session:
                for _ in range(200):
                    assert proc.returncode is None, log_path.read_text()
                    try:
                        async with session.get(f"{base}/readyz") as resp:
                            if resp.status == 200:
                                break
                    except aiohttp.ClientConnectionError:
                        pass
                    await asyncio.sleep(0.05)
                else:
                    pytest.fail("the gateway did not become ready in 10 s")

                answered = asyncio.Event()
                accepted: set[str] = set()

                async def send(n: int) -> None:
                    body = make_event(n)
                    try:
                        async with session.post(
                            f"{base}/webhooks/didomi", data=body, headers=auth_headers
                        ) as resp:
                            if resp.status == 202:
                                accepted.add(entity_id(body))
                                if len(accepted) >= 100:
                                    answered.set()
                            else:
                                assert resp.status == 503, resp.status
                    except aiohttp.ClientError:
                        pass  # refused or cut off by the shutdown: Didomi would retry

                sends = [asyncio.create_task(send(n)) for n in range(1000)]
                await asyncio.wait_for(answered.wait(), timeout=30)
                proc.send_signal(signal.SIGTERM)
                await asyncio.wait_for(asyncio.gather(*sends), timeout=30)
            code = await asyncio.wait_for(proc.wait(), timeout=30)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    output = log_path.read_text()
    assert code == 0, output
    db = SpoolDB(config.delivery.spool)
    try:
        on_disk = [entity_id(row.body) for row in db.fetch(0, 1_000_000)]
        on_disk += [entity_id(letter.body) for letter in db.dead_letters()]
    finally:
        db.close()
    assert len(accepted) >= 100
    assert accepted <= set(on_disk)
    assert len(on_disk) == len(set(on_disk))
    assert "gateway starting on" in output
    for secret in secrets_env.values():
        assert secret not in output
    assert auth_headers["Authorization"].split()[1] not in output


async def test_gateway_run_exits_1_when_the_port_is_taken(
    tmp_path: Path, make_config: MakeConfig, secrets_env: dict[str, str]
) -> None:
    """`gateway run` on a port another socket holds logs why and exits 1, without a traceback,
    and never says `ready` (nor `draining`): it is ready only once its port is bound."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = int(holder.getsockname()[1])
        make_config(tmp_path, server={"port": port})
        proc = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "gateway", "run", "--config", str(tmp_path / "gateway.toml")),
            "--log-format",
            "text",
            env={**os.environ, **secrets_env},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            cwd=tmp_path,
        )
        _, stderr = await asyncio.wait_for(proc.communicate(), timeout=30)
    output = stderr.decode()
    assert proc.returncode == 1, output
    assert f"cannot serve on 127.0.0.1:{port}" in output
    assert "Traceback" not in output
    said = [line.split(": ", 1)[1] for line in output.splitlines() if ": " in line]
    assert "ready" not in said
    assert not any(line.startswith("draining") for line in said)


# ---------------------------------------------------------------------------
# An unreachable peer: said in the log at once, then at a bounded pace, and when it is back.


@pytest.fixture
def delivery_log() -> Iterator[list[logging.LogRecord]]:
    """Every record the gateway.delivery logger emits during the test."""
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    logger = logging.getLogger("gateway.delivery")
    handler, level = Keep(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield records
    logger.removeHandler(handler)
    logger.setLevel(level)


async def test_an_unreachable_braze_is_logged_at_once_then_at_a_bounded_pace(
    start_gateway: StartGateway,  # noqa: F811 - the imported fixture
    auth_headers: dict[str, str],
    delivery_log: list[logging.LogRecord],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A Braze that refuses connections is a warning on the first failed request, then one per
    `LOG_EVERY_S` however often delivery retries, and a line once Braze answers again."""
    monkeypatch.setattr(health, "LOG_EVERY_S", 0.5)
    port = free_port()  # nothing listens: every connection is refused
    gw = await start_gateway(f"http://127.0.0.1:{port}", delivery={"retry_max_ms": 50})
    started = time.monotonic()
    assert await gw.post(choice("unreached", True, recent()), auth_headers) == 202

    def retries() -> float:
        return gw.sample("gateway_retries_total", direction="to_braze", reason="connection")

    async def retried_a_while() -> bool:
        return retries() >= 20 and time.monotonic() - started >= 1.5

    await eventually(retried_a_while, 60, lambda: f"20 retries ({retries()} so far)")
    elapsed = time.monotonic() - started
    warnings = [r.getMessage() for r in delivery_log if r.levelno == logging.WARNING]
    assert warnings, "nothing said about an unreachable Braze"
    assert "Braze" in warnings[0]
    assert "connection" in warnings[0]
    assert 2 <= len(warnings) <= elapsed / 0.5 + 2, warnings
    assert len(warnings) < retries() / 2

    fake = FakeBraze(api_key=BRAZE_API_KEY)
    await fake.start(port=port)
    try:
        await gw.settle(timeout=60)
    finally:
        await fake.stop()
    assert [o["external_id"] for o in fake.objects_sent()] == ["unreached"]
    back = [r.getMessage() for r in delivery_log if r.levelno == logging.INFO]
    assert any(line.startswith("Braze answers again after") for line in back), back


def test_a_failing_peer_is_logged_at_first_then_once_a_minute_and_on_recovery(
    delivery_log: list[logging.LogRecord],
) -> None:
    """For Didomi as for Braze (one DeliveryHealth each): the first failure is a warning, the
    next ones within a minute are silent, one a minute later says how long it has lasted, and
    the first success after them says it is over; Braze's 429 pacing is never one of them, and
    short spells soon after a line wait for the next one."""
    now = [1000.0]
    flow = Metrics().flow("to_didomi")
    peer = DeliveryHealth(flow, peer="Didomi", clock=lambda: now[0])
    refused = Answer(Verdict.RETRY, None, "connection: ClientConnectorError")
    for _ in range(30):  # 30 s of a retry a second
        peer.retrying(refused)
        now[0] += 1.0
    assert [r.getMessage() for r in delivery_log] == [
        "cannot deliver to Didomi (connection: ClientConnectorError); retrying with backoff,"
        " updates wait in the spool"
    ]
    for _ in range(40):
        peer.retrying(refused)
        now[0] += 1.0
    assert len(delivery_log) == 2
    assert delivery_log[1].levelno == logging.WARNING
    assert delivery_log[1].getMessage() == (
        "still cannot deliver to Didomi after 60 s (61 failed request(s); last:"
        " connection: ClientConnectorError)"
    )
    peer.ok()
    assert delivery_log[2].levelno == logging.INFO
    assert delivery_log[2].getMessage() == (
        "Didomi answers again after 70 s (70 failed request(s))"
    )
    peer.retrying(Answer(Verdict.RATE_LIMITED, 429, "rate limited"))
    now[0] += 1.0
    peer.ok()
    assert len(delivery_log) == 3
    # A brief failure soon after the last line is not said, nor is its end: a peer failing
    # now and then is logged no more often than one that stays down.
    peer.retrying(refused)
    peer.ok()
    now[0] += 60.0
    peer.retrying(refused)
    assert len(delivery_log) == 4
    assert delivery_log[3].getMessage().startswith("cannot deliver to Didomi")
