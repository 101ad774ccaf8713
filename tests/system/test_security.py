"""Security at the HTTP boundary: who gets in, from where, and what never reaches the logs.

Constant-time comparison of the client credentials and of static bearer tokens is proven in
tests/http/test_auth.py (test_check_client_uses_compare_digest_on_both,
test_static_tokens_compare_against_every_token); this file adds the token signature check.
"""

from __future__ import annotations

import base64
import hmac
import io
import json
import logging
import signal
import socket
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import msgspec
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from gateway.app.server import SPOOL, create_app
from gateway.config.settings import Config
from gateway.http import auth
from gateway.http.auth import TokenIssuer
from gateway.testing.braze import FakeBraze
from tests.conftest import (
    BRAZE_API_KEY,
    CLIENT_ID,
    CLIENT_SECRET,
    MakeConfig,
    choice,
    free_port,
    recent,
    write_config,
)
from tests.system.test_reliability import GatewayProcess, eventually, metric, spool_counts

Client = TestClient[web.Request, web.Application]
MakeClient = Callable[[web.Application], Awaitable[Client]]
JSON = {"Content-Type": "application/json"}


@pytest.fixture
def config(make_config: MakeConfig, tmp_path: Path) -> Config:
    return make_config(tmp_path)


@pytest.fixture
async def client(aiohttp_client: MakeClient, config: Config) -> Client:
    return await aiohttp_client(create_app(config))


async def webhook(client: Client, token: str, n: int = 1) -> tuple[int, dict[str, Any], str]:
    """POST one valid webhook with `Bearer token`: status, body, WWW-Authenticate."""
    headers = {**JSON, "Authorization": f"Bearer {token}"}
    resp = await client.post(
        "/webhooks/didomi", data=choice(f"p{n}", True, recent(540)), headers=headers
    )
    return resp.status, await resp.json(), resp.headers.get("WWW-Authenticate", "")


def resign(token: str, claims: dict[str, Any], key_secret: str = CLIENT_SECRET) -> str:
    """`token` with its claims replaced and signed again under `key_secret`."""
    body = auth._b64(msgspec.json.encode(claims))
    issuer = TokenIssuer(CLIENT_ID, key_secret, 3600)
    return f"{body}.{issuer._sign(body)}"


def claims_of(token: str) -> dict[str, Any]:
    part = token.split(".")[0]
    decoded: dict[str, Any] = json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))
    return decoded


def expired() -> str:
    past = TokenIssuer(CLIENT_ID, CLIENT_SECRET, 60, clock=lambda: time.time() - 3600)
    return past.issue()[0]


def forged_signature() -> str:
    body, sig = TokenIssuer(CLIENT_ID, CLIENT_SECRET, 3600).issue()[0].split(".")
    return f"{body}.{sig[:10]}{'A' if sig[10] != 'A' else 'B'}{sig[11:]}"


def extended_expiry() -> str:
    token = expired()
    claims = claims_of(token)
    claims["exp"] = int(time.time()) + 3600
    body = auth._b64(msgspec.json.encode(claims))
    return f"{body}.{token.split('.')[1]}"  # the old signature over new claims


def other_secret() -> str:
    return TokenIssuer(CLIENT_ID, "another-gateways-secret", 3600).issue()[0]


def other_client() -> str:
    return TokenIssuer("someone-else", CLIENT_SECRET, 3600).issue()[0]


def unsigned_jwt() -> str:
    header = auth._b64(b'{"alg":"none","typ":"JWT"}')
    claims = auth._b64(msgspec.json.encode({"sub": CLIENT_ID, "exp": int(time.time()) + 3600}))
    return f"{header}.{claims}."


def hs256_with_public_client_id() -> str:
    """Claims signed with the (public) client id as key: what a guessable key would allow."""
    token = TokenIssuer(CLIENT_ID, CLIENT_SECRET, 3600).issue()[0]
    return resign(token, claims_of(token), key_secret=CLIENT_ID)


BAD_TOKENS: dict[str, Callable[[], str]] = {
    "expired": expired,
    "forged signature": forged_signature,
    "claims extended under the old signature": extended_expiry,
    "signed with another secret": other_secret,
    "issued to another client id": other_client,
    "unsigned JWT (alg none)": unsigned_jwt,
    "signed with the client id as key": hs256_with_public_client_id,
    "the client secret itself": lambda: CLIENT_SECRET,
    "a valid token plus one character": lambda: (
        TokenIssuer(CLIENT_ID, CLIENT_SECRET, 3600).issue()[0] + "A"
    ),
}


@pytest.mark.parametrize("kind", list(BAD_TOKENS))
async def test_bad_tokens_are_refused_at_the_webhook(client: Client, kind: str) -> None:
    """Expired, forged, tampered and other-secret tokens get 401 over HTTP; nothing is stored."""
    status, body, challenge = await webhook(client, BAD_TOKENS[kind]())
    assert (status, body["error"]) == (401, "unauthorized")
    assert set(body) == {"error", "detail"}
    assert challenge.startswith("Bearer")
    spool = client.app[SPOOL]
    assert spool.db.count_pending() == 0


async def test_a_token_from_the_endpoint_is_accepted(client: Client) -> None:
    """The control case: a token the gateway itself issued opens the webhook route."""
    form = {"grant_type": "client_credentials", "client_id": CLIENT_ID}
    resp = await client.post("/oauth/token", data={**form, "client_secret": CLIENT_SECRET})
    assert resp.status == 200
    status, body, _ = await webhook(client, (await resp.json())["access_token"])
    assert (status, body) == (202, {"status": "accepted"})


async def test_rotating_the_client_secret_revokes_issued_tokens(
    aiohttp_client: MakeClient, make_config: MakeConfig, tmp_path: Path
) -> None:
    """A token issued before the secret changed is refused by the restarted gateway."""
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    before = await aiohttp_client(create_app(make_config(tmp_path / "a")))
    resp = await before.post(
        "/oauth/token",
        data={
            "grant_type": "client_credentials",
            "client_id": CLIENT_ID,
            "client_secret": CLIENT_SECRET,
        },
    )
    token = (await resp.json())["access_token"]
    assert (await webhook(before, token))[0] == 202
    rotated = make_config(tmp_path / "b", auth={"client_secret": "a-freshly-rotated-secret"})
    after = await aiohttp_client(create_app(rotated))
    assert (await webhook(after, token, n=2))[0] == 401


async def test_token_signatures_are_compared_in_constant_time(
    client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A webhook token's signature is checked with hmac.compare_digest, whose verdict decides."""
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def record(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr("gateway.http.auth.hmac.compare_digest", record)
    forged = forged_signature()
    assert (await webhook(client, forged))[0] == 401
    assert calls, "the signature was not compared with hmac.compare_digest"
    assert calls[-1][1] == forged.split(".")[1].encode()
    calls.clear()
    good = TokenIssuer(CLIENT_ID, CLIENT_SECRET, 3600).issue()[0]
    assert (await webhook(client, good, n=2))[0] == 202
    assert calls[-1] == (good.split(".")[1].encode(),) * 2


# ---------------------------------------------------------------------------
# server.allow_from, with real peer addresses


def can_bind(address: str) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((address, 0))
        except OSError:
            return False
    return True


async def from_address(
    client: Client, source: str, method: str, path: str, **kw: Any
) -> tuple[int, dict[str, Any] | str]:
    """Send one request to the test server from the local address `source`."""
    connector = aiohttp.TCPConnector(local_addr=(source, 0))
    url = f"http://127.0.0.1:{client.server.port}{path}"
    async with (
        aiohttp.ClientSession(connector=connector) as session,
        session.request(method, url, **kw) as resp,
    ):
        if resp.content_type == "application/json":
            return resp.status, await resp.json()
        return resp.status, await resp.text()


@pytest.mark.skipif(not can_bind("127.0.0.2"), reason="127.0.0.2 is not a local address here")
async def test_allow_from_refuses_other_peers_and_admits_loopback(
    aiohttp_client: MakeClient,
    make_config: MakeConfig,
    tmp_path: Path,
    auth_headers: dict[str, str],
) -> None:
    """With allow_from = ["127.0.0.1/32"], a peer at 127.0.0.2 gets 403 on the Didomi routes
    (a forged X-Forwarded-For changes nothing) but not on the probes; 127.0.0.1 is served."""
    config = make_config(tmp_path, server={"allow_from": ["127.0.0.1/32"]})
    client = await aiohttp_client(create_app(config))
    body = choice("net-1", True, recent(540))
    spoofed = {**auth_headers, "X-Forwarded-For": "127.0.0.1", "X-Real-IP": "127.0.0.1"}
    status, answer = await from_address(
        client, "127.0.0.2", "POST", "/webhooks/didomi", data=body, headers=spoofed
    )
    assert status == 403
    assert isinstance(answer, dict)
    assert answer["error"] == "forbidden"
    form = {"grant_type": "client_credentials", "client_id": CLIENT_ID}
    status, _ = await from_address(
        client, "127.0.0.2", "POST", "/oauth/token", data={**form, "client_secret": CLIENT_SECRET}
    )
    assert status == 403
    for probe in ("/healthz", "/readyz", "/metrics"):
        assert (await from_address(client, "127.0.0.2", "GET", probe))[0] == 200
    assert client.app[SPOOL].db.count_pending() == 0

    status, answer = await from_address(
        client, "127.0.0.1", "POST", "/webhooks/didomi", data=body, headers=auth_headers
    )
    assert (status, answer) == (202, {"status": "accepted"})


# ---------------------------------------------------------------------------
# Nothing secret in the logs of a whole run


EMAILS = [
    "jane.doe+consent@example.com",
    "Jean.Dupont@Exemple.FR",
    "obrien_42@mail.sub.example.co.uk",
    "x@test.io",
]


@pytest.mark.slow
async def test_a_full_run_logs_no_key_secret_token_or_email(
    tmp_path: Path, secrets_env: dict[str, str], processes: list[GatewayProcess]
) -> None:
    """`gateway run --log-format json --log-level DEBUG` through token requests, webhooks keyed
    by email addresses, a Braze 401, a Braze error echoing an address, deliveries, a reload and
    a shutdown: every stderr line is a JSON log record and none holds a secret or an email."""
    fake = FakeBraze(api_key=BRAZE_API_KEY)
    await fake.start()
    fake.fail_next(401, count=2)
    # 422: a 4xx that dead-letters with Braze's words (a 404 now means a wrong braze.server).
    fake.fail_next(422, body={"message": f"no such users: {EMAILS[0]}, {EMAILS[1]}"})
    fake.reject_objects(lambda o: "invalid_user" if o.get("external_id") == EMAILS[3] else None)
    wrong_secret = "not-the-client-secret-5e7b"
    try:
        port = free_port()
        write_config(
            tmp_path,
            server={"port": port},
            braze={"server": fake.url, "flush_interval_ms": 10},
            delivery={"retry_initial_ms": 20, "retry_max_ms": 100},
        )
        gw = GatewayProcess(tmp_path, port, secrets_env, log_level="DEBUG")
        processes.append(gw)
        await gw.start()
        url = gw.base
        basic = base64.b64encode(f"{CLIENT_ID}:{CLIENT_SECRET}".encode()).decode()
        grant = {"grant_type": "client_credentials"}
        tokens: list[str] = []
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
            creds = {**grant, "client_id": CLIENT_ID, "client_secret": CLIENT_SECRET}
            async with session.post(f"{url}/oauth/token", data=creds) as resp:
                assert resp.status == 200
                tokens.append((await resp.json())["access_token"])
            basic_auth = {"Authorization": f"Basic {basic}"}
            async with session.post(f"{url}/oauth/token", data=grant, headers=basic_auth) as resp:
                assert resp.status == 200
                tokens.append((await resp.json())["access_token"])
            wrong = {**creds, "client_secret": wrong_secret}
            async with session.post(f"{url}/oauth/token", data=wrong) as resp:
                assert resp.status == 401

            async def post(body: bytes, token: str) -> int:
                headers = {**JSON, "Authorization": f"Bearer {token}"}
                async with session.post(f"{url}/webhooks/didomi", data=body, headers=headers) as r:
                    return r.status

            async def drained() -> bool:
                return spool_counts(tmp_path / "var" / "gateway.db")[0] == 0

            # Wave 1 meets two 401s, then a 422 whose body echoes the addresses: dead letters.
            for n, email in enumerate(EMAILS[:2]):
                body = choice(email, True, recent(540), event_id=f"ev-{email}")
                assert await post(body, tokens[n]) == 202
            await eventually(drained, 20, "wave 1 to be dead-lettered")
            # Wave 2 is delivered, except one object Braze refuses on its own.
            for n, email in enumerate(EMAILS[2:]):
                body = choice(email, n == 0, recent(570), event_id=f"ev-{email}")
                assert await post(body, tokens[n]) == 202
            late = choice(EMAILS[0], False, recent(600))
            assert await post(late, "x" + tokens[0]) == 401
            assert await post(late, tokens[0]) == 202
            # Truncated JSON around an address: refused, and the refusal is logged without it.
            leaky = b'{"type": "event.created", "parameters": {"entity": {"user": {"id": "%s"' % (
                EMAILS[1].encode()
            )
            assert await post(leaky, tokens[0]) == 400
            shaped = choice(EMAILS[1], True, "not a date")
            assert await post(shaped, tokens[1]) == 400
            await eventually(drained, 20, "wave 2 to be delivered")

        gw.signal(signal.SIGHUP)

        async def reloaded() -> bool:
            samples = await gw.metrics()
            return metric(samples, "gateway_config_reloads_total", outcome="success") == 1

        await eventually(reloaded, 10, "the SIGHUP reload")
        assert await gw.stop() == 0
    finally:
        await fake.stop()

    output = gw.log()
    records = [json.loads(line) for line in output.splitlines() if line.strip()]
    assert all(isinstance(r, dict) and {"ts", "level", "logger", "msg"} <= set(r) for r in records)
    messages = " | ".join(r["msg"] for r in records)
    # The run did what the test claims, and its logs say so: it is not vacuously clean.
    assert {"DEBUG", "INFO", "WARNING", "ERROR"} <= {r["level"] for r in records}
    assert "Braze answered 401" in messages
    assert "Braze answered 422" in messages  # the echo was logged, masked
    assert "Braze refused 1 object(s)" in messages
    assert "reloaded" in messages
    # Accepted webhooks are logged per commit group, each line with its count and event ids.
    accepted = [r for r in records if r.get("outcome") == "accepted"]
    assert sum(r.get("count", 1) for r in accepted) == len(EMAILS) + 1
    assert any(r.get("outcome") == "delivered" for r in records)
    assert fake.users, "nothing was delivered"

    lowered = output.lower()
    forbidden = {
        "Braze API key": BRAZE_API_KEY,
        "client secret": CLIENT_SECRET,
        "wrong client secret": wrong_secret,
        "Basic credentials": basic,
    }
    for n, token in enumerate(tokens):
        forbidden[f"token {n}"] = token
        forbidden[f"token {n} signature"] = token.split(".")[1]
    for email in EMAILS:
        forbidden[email] = email
        forbidden[f"{email} (url-encoded)"] = quote(email)
    leaks = [name for name, value in forbidden.items() if value.lower() in lowered]
    assert not leaks, f"found in the logs: {leaks}"


# Valid addresses (RFC 5322 atext, RFC 6531 internationalised) that Braze may echo back.
UNUSUAL_EMAILS = [
    "josé@correo.es",
    "zoë@example.com",
    "jane@exämple.de",
    "sean.o'brien@example.com",
]


@pytest.fixture
def restore_loggers() -> Iterator[None]:
    """Undo configure_logging, so later tests' caplog still sees the gateway's records."""
    loggers = [logging.getLogger(name) for name in ("gateway", "aiohttp", "aiohttp.access")]
    saved = [(lg, list(lg.handlers), lg.level, lg.propagate, lg.disabled) for lg in loggers]
    yield
    for logger, handlers, level, propagate, disabled in saved:
        logger.handlers = handlers
        logger.setLevel(level)
        logger.propagate = propagate
        logger.disabled = disabled


async def test_unusual_addresses_echoed_by_braze_are_masked_in_the_logs(
    aiohttp_client: MakeClient,
    make_config: MakeConfig,
    tmp_path: Path,
    auth_headers: dict[str, str],
    restore_loggers: None,
) -> None:
    """A Braze error that echoes internationalised or apostrophe addresses reaches the log (a
    dead-letter warning) with every one of them masked, not only the ASCII ones."""
    from gateway.app.reload import LiveRules
    from gateway.app.server import DISPATCHER, delivery
    from gateway.logs import configure_logging
    from gateway.metrics import Metrics

    out = io.StringIO()
    configure_logging("json", "DEBUG", stream=out)
    fake = FakeBraze(api_key=BRAZE_API_KEY)
    await fake.start()
    # 422: a 4xx that dead-letters with Braze's words (a 404 now means a wrong braze.server).
    fake.fail_next(422, body={"message": "no such users: " + ", ".join(UNUSUAL_EMAILS)})
    try:
        config = make_config(tmp_path, braze={"server": fake.url, "flush_interval_ms": 10})
        metrics = Metrics()
        live = LiveRules.load(config, metrics, tmp_path / "gateway.toml")
        app = create_app(config, metrics=metrics, contexts=[delivery(live)])
        client = await aiohttp_client(app)
        resp = await client.post(
            "/webhooks/didomi",
            data=choice("someone", True, recent(540)),
            headers=auth_headers,
        )
        assert resp.status == 202

        async def dead_lettered() -> bool:
            return app[SPOOL].db.count_dead() == 1 and app[DISPATCHER].idle

        await eventually(dead_lettered, 10, "the 422 to dead-letter the update")
    finally:
        await fake.stop()
    output = out.getvalue()
    assert "Braze answered 422" in output
    leaks = [email for email in UNUSUAL_EMAILS if email.lower() in output.lower()]
    assert not leaks, f"logged unmasked: {leaks}"
    assert "o'" not in output, "part of an address was logged"
