"""gateway.auth: signed OAuth2 tokens, the token endpoint, and the three webhook auth modes."""

from __future__ import annotations

import base64
import functools
import hmac
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any
from urllib.parse import quote_plus

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from gateway.config.settings import AuthConfig
from gateway.http import auth
from gateway.http.auth import (
    Authenticator,
    StaticTokens,
    TokenIssuer,
    authenticator_for,
    token_endpoint,
)

CLIENT_ID = "didomi"
SECRET = "s3cr:et+with/odd%chars"  # ':' '+' '%' exercise the §2.3.1 Basic encoding
T0 = 1_700_000_000.0

Client = TestClient[web.Request, web.Application]
MakeClient = Callable[[web.Application], Awaitable[Client]]


class Clock:
    """A settable clock so expiry is tested without sleeping."""

    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


def make_app(authenticator: Authenticator, issuer: TokenIssuer | None = None) -> web.Application:
    app = web.Application()
    if issuer is not None:
        app.router.add_post("/oauth/token", functools.partial(token_endpoint, issuer))

    async def protected(request: web.Request) -> web.Response:
        ok = authenticator.authenticate(request.headers.get("Authorization"))
        return web.Response(status=200 if ok else 401)

    app.router.add_post("/webhooks/didomi", protected)
    return app


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def issuer(clock: Clock) -> TokenIssuer:
    return TokenIssuer(CLIENT_ID, SECRET, 3600, clock=clock)


@pytest.fixture
async def client(aiohttp_client: MakeClient, issuer: TokenIssuer) -> Client:
    cfg = AuthConfig(mode="oauth2", client_id=CLIENT_ID, client_secret=SECRET)
    return await aiohttp_client(make_app(authenticator_for(cfg, issuer=issuer), issuer))


def basic(client_id: str, secret: str) -> str:
    raw = f"{quote_plus(client_id)}:{quote_plus(secret)}".encode()
    return "Basic " + base64.b64encode(raw).decode()


async def post_token(client: Client, **kw: Any) -> tuple[int, dict[str, Any], Any]:
    resp = await client.post("/oauth/token", **kw)
    return resp.status, dict(resp.headers), await resp.json()


async def webhook_status(client: Client, authorization: str | None) -> int:
    headers = {} if authorization is None else {"Authorization": authorization}
    resp = await client.post("/webhooks/didomi", headers=headers, json={})
    return resp.status


GRANT = {"grant_type": "client_credentials"}
FORM_CREDS = GRANT | {"client_id": CLIENT_ID, "client_secret": SECRET}
FORM_CT = {"Content-Type": "application/x-www-form-urlencoded"}


async def test_form_credentials_get_a_token_the_webhook_accepts(client: Client) -> None:
    """Credentials in the form body yield a Bearer token that opens the webhook route."""
    status, headers, body = await post_token(client, data=FORM_CREDS)
    assert status == 200
    assert body["token_type"] == "Bearer"
    assert body["expires_in"] == 3600
    assert headers["Cache-Control"] == "no-store"
    assert headers["Pragma"] == "no-cache"
    assert await webhook_status(client, f"Bearer {body['access_token']}") == 200


async def test_basic_credentials_get_a_token_the_webhook_accepts(client: Client) -> None:
    """Form-encoded HTTP Basic credentials (RFC 6749 §2.3.1) yield a working token."""
    status, _, body = await post_token(
        client, data=GRANT, headers={"Authorization": basic(CLIENT_ID, SECRET)}
    )
    assert status == 200
    assert await webhook_status(client, f"Bearer {body['access_token']}") == 200


async def test_basic_credentials_without_form_encoding_are_accepted(client: Client) -> None:
    """Clients that put the raw secret in Basic, skipping §2.3.1's encoding, still get a token."""
    raw = base64.b64encode(f"{CLIENT_ID}:{SECRET}".encode()).decode()
    status, _, _ = await post_token(client, data=GRANT, headers={"Authorization": f"Basic {raw}"})
    assert status == 200


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER", "bEaReR"])
async def test_bearer_scheme_is_case_insensitive(
    client: Client, issuer: TokenIssuer, scheme: str
) -> None:
    """The webhook accepts the Bearer scheme in any letter case."""
    token, _ = issuer.issue()
    assert await webhook_status(client, f"{scheme} {token}") == 200


@pytest.mark.parametrize(
    "authorization", [None, "", "Bearer", "Bearer ", "Basic abc", "Token x", "Bearer a b"]
)
async def test_missing_or_malformed_authorization_is_refused(
    client: Client, authorization: str | None
) -> None:
    """No header, an empty token, or another scheme is a 401 on the webhook."""
    assert await webhook_status(client, authorization) == 401


def test_token_expires(issuer: TokenIssuer, clock: Clock) -> None:
    """A token is valid until its ttl elapses and refused from that second on."""
    token, ttl = issuer.issue()
    clock.now = T0 + ttl - 1
    assert issuer.verify(token)
    clock.now = T0 + ttl
    assert not issuer.verify(token)


def test_a_verified_token_is_checked_again_only_for_its_expiry(
    issuer: TokenIssuer, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sender reuses its token: once verified, it is not signed again per request, and it
    is still refused from the second it expires."""
    token, ttl = issuer.issue()
    signed: list[str] = []
    sign = issuer._sign
    monkeypatch.setattr(issuer, "_sign", lambda body: signed.append(body) or sign(body))
    assert issuer.verify(token)
    assert issuer.verify(token)
    assert len(signed) == 1
    clock.now = T0 + ttl
    assert not issuer.verify(token)
    assert not issuer.verify(token)


def test_refused_tokens_are_never_remembered(
    issuer: TokenIssuer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A forged token is checked, and refused, every time; remembered tokens are bounded."""
    token, _ = issuer.issue()
    body, sig = token.split(".")
    forged = f"{body}.{sig[:-2]}{'A' if sig[-2] != 'A' else 'B'}{sig[-1]}"
    signed: list[str] = []
    sign = issuer._sign
    monkeypatch.setattr(issuer, "_sign", lambda body: signed.append(body) or sign(body))
    assert not issuer.verify(forged)
    assert not issuer.verify(forged)
    assert len(signed) == 2
    tokens = [issuer.issue()[0] for _ in range(auth.KNOWN_TOKENS + 1)]
    assert all(issuer.verify(t) for t in tokens)
    assert len(issuer._known) <= auth.KNOWN_TOKENS
    assert all(issuer.verify(t) for t in tokens)


def test_forged_signature_is_refused(issuer: TokenIssuer) -> None:
    """Changing one character of the signature makes the token worthless."""
    token, _ = issuer.issue()
    body, sig = token.split(".")
    forged = sig[:-2] + ("A" if sig[-2] != "A" else "B") + sig[-1]
    assert not issuer.verify(f"{body}.{forged}")


def test_tampered_payload_is_refused(issuer: TokenIssuer, clock: Clock) -> None:
    """Claims re-encoded with a later expiry but the old signature are refused."""
    clock.now = T0 - 7200
    old, _ = issuer.issue()
    body, sig = old.split(".")
    claims = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
    later = claims.replace(str(int(T0 - 3600)).encode(), str(int(T0 + 3600)).encode())
    assert later != claims
    clock.now = T0
    assert not issuer.verify(f"{auth._b64(later)}.{sig}")


def test_other_secret_and_rotation_revoke(issuer: TokenIssuer, clock: Clock) -> None:
    """A token signed under another secret is refused, so rotating the secret revokes tokens."""
    token, _ = issuer.issue()
    rotated = TokenIssuer(CLIENT_ID, SECRET + "-rotated", 3600, clock=clock)
    assert not rotated.verify(token)
    assert not issuer.verify(rotated.issue()[0])
    # The same secret after a restart is a fresh object and still accepts it.
    assert TokenIssuer(CLIENT_ID, SECRET, 3600, clock=clock).verify(token)


def test_token_for_another_client_id_is_refused(issuer: TokenIssuer, clock: Clock) -> None:
    """A token issued to another client id under the same secret is refused."""
    other = TokenIssuer("someone-else", SECRET, 3600, clock=clock)
    assert not issuer.verify(other.issue()[0])


@pytest.mark.parametrize(
    "garbage",
    [
        "",
        ".",
        "..",
        "a.b",
        "a.b.c",
        "not a token",
        "é.é",
        "\udcff",
        "x" * 100_000,
        "Bearer x",
        "eyJ9." + "A" * 43,
        "\x00." + "A" * 43,
    ],
)
def test_garbage_is_refused_without_raising(issuer: TokenIssuer, garbage: str) -> None:
    """Malformed, empty, huge or non-ASCII input is refused quietly, never raised on."""
    assert issuer.verify(garbage) is False


def test_check_client_uses_compare_digest_on_both(
    issuer: TokenIssuer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both id and secret go through hmac.compare_digest even when the id is already wrong."""
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def record(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr("gateway.http.auth.hmac.compare_digest", record)
    assert not issuer.check_client("wrong-id", "wrong-secret")
    assert calls == [(b"wrong-id", CLIENT_ID.encode()), (b"wrong-secret", SECRET.encode())]
    calls.clear()
    assert issuer.check_client(CLIENT_ID, SECRET)
    assert len(calls) == 2


def test_static_tokens_compare_against_every_token(monkeypatch: pytest.MonkeyPatch) -> None:
    """StaticTokens compares with every configured token, without stopping at the first match."""
    calls: list[bytes] = []
    real = hmac.compare_digest

    def record(a: bytes, b: bytes) -> bool:
        calls.append(b)
        return real(a, b)

    monkeypatch.setattr("gateway.http.auth.hmac.compare_digest", record)
    assert StaticTokens(["one", "two", "three"]).verify("one")
    assert calls == [b"one", b"two", b"three"]


def test_empty_secrets_are_refused_at_construction() -> None:
    """An empty client secret or static token would let anyone in, so it is a ValueError."""
    with pytest.raises(ValueError, match="client_secret"):
        TokenIssuer(CLIENT_ID, "", 3600)
    with pytest.raises(ValueError, match="tokens"):
        StaticTokens([])
    with pytest.raises(ValueError, match="tokens"):
        StaticTokens(["ok", ""])


@pytest.mark.parametrize(
    "kw",
    [
        {"data": GRANT | {"client_id": CLIENT_ID, "client_secret": "wrong"}},
        {"data": GRANT | {"client_id": "wrong", "client_secret": SECRET}},
        {"data": GRANT | {"client_id": CLIENT_ID}},
        {"data": GRANT},
        {"data": GRANT, "headers": {"Authorization": basic(CLIENT_ID, "wrong")}},
        {"data": GRANT, "headers": {"Authorization": "Basic !!!not-base64"}},
        {"data": GRANT, "headers": {"Authorization": "Bearer something"}},
    ],
)
async def test_bad_or_missing_client_credentials_are_401(
    client: Client, kw: dict[str, Any]
) -> None:
    """Wrong, partial, malformed or absent client credentials get 401 invalid_client."""
    status, headers, body = await post_token(client, **kw)
    assert status == 401
    assert body["error"] == "invalid_client"
    assert body["detail"]
    assert headers["WWW-Authenticate"] == 'Basic realm="gateway"'


@pytest.mark.parametrize(
    ("kw", "status", "error"),
    [
        ({"data": FORM_CREDS | {"grant_type": "password"}}, 400, "unsupported_grant_type"),
        ({"data": {"client_id": CLIENT_ID, "client_secret": SECRET}}, 400, "invalid_request"),
        (
            {"data": FORM_CREDS, "headers": {"Authorization": basic(CLIENT_ID, SECRET)}},
            400,
            "invalid_request",
        ),
        (
            {
                "data": GRANT | {"client_id": "other"},
                "headers": {"Authorization": basic(CLIENT_ID, SECRET)},
            },
            400,
            "invalid_request",
        ),
        ({"json": FORM_CREDS}, 400, "invalid_request"),
        (
            {
                "data": "grant_type=client_credentials&grant_type=client_credentials",
                "headers": FORM_CT,
            },
            400,
            "invalid_request",
        ),
        ({"data": "grant_type=%ff", "headers": FORM_CT}, 400, "invalid_request"),
        (
            {"data": "grant_type=client_credentials&pad=" + "x" * 9000, "headers": FORM_CT},
            413,
            "invalid_request",
        ),
    ],
    ids=[
        "other-grant",
        "no-grant",
        "both-places",
        "id-mismatch",
        "json-body",
        "repeated",
        "bad-utf8",
        "too-large",
    ],
)
async def test_malformed_token_requests(
    client: Client, kw: dict[str, Any], status: int, error: str
) -> None:
    """Another grant, no grant, credentials twice or a non-form body each get their error."""
    got, _, body = await post_token(client, **kw)
    assert (got, body["error"]) == (status, error)
    assert body["detail"]


async def test_body_cap_holds_without_content_length(client: Client) -> None:
    """A chunked body with no Content-Length is still cut off at the cap with a 413."""

    async def chunks() -> AsyncIterator[bytes]:
        yield b"grant_type=client_credentials&pad="
        for _ in range(64):
            yield b"x" * 1024

    status, _, body = await post_token(client, data=chunks(), headers=FORM_CT)
    assert (status, body["error"]) == (413, "invalid_request")


async def test_scope_is_accepted_and_ignored(client: Client) -> None:
    """A `scope` parameter does not stop the grant."""
    status, _, _ = await post_token(client, data=FORM_CREDS | {"scope": "webhooks"})
    assert status == 200


async def test_bearer_mode_accepts_configured_tokens_only(aiohttp_client: MakeClient) -> None:
    """In bearer mode each configured token opens the webhook and nothing else does."""
    cfg = AuthConfig(mode="bearer", tokens=["tok-one", "tok-two"])
    client = await aiohttp_client(make_app(authenticator_for(cfg)))
    assert await webhook_status(client, "Bearer tok-one") == 200
    assert await webhook_status(client, "bearer tok-two") == 200
    assert await webhook_status(client, "Bearer tok-three") == 401
    assert await webhook_status(client, "Bearer tok-on") == 401
    assert await webhook_status(client, None) == 401


async def test_none_mode_accepts_all_and_warns(
    aiohttp_client: MakeClient, caplog: pytest.LogCaptureFixture
) -> None:
    """In none mode every request passes, and building it logs one WARNING on gateway.auth."""
    with caplog.at_level(logging.WARNING, logger="gateway.auth"):
        client = await aiohttp_client(make_app(authenticator_for(AuthConfig(mode="none"))))
        assert await webhook_status(client, None) == 200
        assert await webhook_status(client, "Bearer whatever") == 200
    warnings = [r for r in caplog.records if r.name == "gateway.auth"]
    assert [r.levelno for r in warnings] == [logging.WARNING]
    assert "none" in warnings[0].getMessage()


async def test_secrets_and_tokens_never_appear_in_logs_or_error_bodies(
    client: Client, issuer: TokenIssuer, caplog: pytest.LogCaptureFixture
) -> None:
    """Neither the client secret, a wrong secret, nor any token shows up in logs or errors."""
    caplog.set_level(logging.DEBUG)
    token, _ = issuer.issue()
    wrong = "not-the-secret-but-still-private"
    bodies = []
    attempts: list[dict[str, Any]] = [
        {"data": GRANT | {"client_id": CLIENT_ID, "client_secret": wrong}},
        {"data": GRANT | {"client_id": wrong, "client_secret": SECRET}},
        {"data": FORM_CREDS | {"grant_type": wrong}},
        {"data": FORM_CREDS, "headers": {"Authorization": basic(CLIENT_ID, SECRET)}},
        {"data": GRANT, "headers": {"Authorization": basic(CLIENT_ID, wrong)}},
        {"data": GRANT, "headers": {"Authorization": f"Bearer {token}"}},
    ]
    for kw in attempts:
        resp = await client.post("/oauth/token", **kw)
        assert resp.status >= 400
        bodies.append(await resp.text())
    await webhook_status(client, f"Bearer {token}x")
    await webhook_status(client, f"Bearer {token}")
    logged = caplog.text + "".join(r.getMessage() for r in caplog.records)
    for secret in (SECRET, quote_plus(SECRET), wrong, token):
        assert secret not in logged
        assert all(secret not in body for body in bodies)
