"""Who may post webhooks: OAuth2 client-credentials tokens, static bearer tokens, or nobody checks.

An OAuth2 access token is ``base64url(claims).base64url(HMAC-SHA256(key, first part))`` with the
key derived from ``auth.client_secret``: nothing is stored, tokens survive restarts, and rotating
the secret revokes every token issued under the old one.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import re
import secrets
import time
from collections.abc import Callable, Sequence
from typing import Protocol
from urllib.parse import parse_qsl, unquote_plus

import msgspec
from aiohttp import web

from gateway.config.settings import AuthConfig

log = logging.getLogger("gateway.auth")

_KEY_INFO = b"gateway oauth token v1"
# A claims part is ~150 characters; the cap stops hashing of megabyte-long garbage headers.
_TOKEN_SHAPE = re.compile(r"[A-Za-z0-9_-]{1,1024}\.[A-Za-z0-9_-]{43}")
MAX_TOKEN_REQUEST_BYTES = 8192
_FORM = "application/x-www-form-urlencoded"
KNOWN_TOKENS = 256  # verified tokens remembered (`TokenIssuer.verify`); forgotten all at once


class _Claims(msgspec.Struct, forbid_unknown_fields=True):
    sub: str  # the client id the token was issued to
    iat: int
    exp: int
    jti: str  # random, so two tokens issued in the same second differ


class _TokenResponse(msgspec.Struct):
    access_token: str
    token_type: str
    expires_in: int


class _ErrorBody(msgspec.Struct):
    error: str
    detail: str


_ENCODER = msgspec.json.Encoder()
_CLAIMS_DECODER = msgspec.json.Decoder(_Claims)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


class TokenIssuer:
    """Issues and verifies self-contained signed OAuth2 access tokens (no token store)."""

    def __init__(
        self,
        client_id: str,
        client_secret: str,
        ttl_s: int,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        # An empty secret would let anyone who knows the (public) client id mint tokens.
        if not client_secret:
            raise ValueError("auth.client_secret must not be empty in oauth2 mode")
        if ttl_s <= 0:
            raise ValueError("auth.token_ttl_s must be positive")
        self._client_id = client_id
        self._id = client_id.encode("utf-8")
        self._secret = client_secret.encode("utf-8")
        self._key = hmac.new(self._secret, _KEY_INFO, hashlib.sha256).digest()
        self._ttl = ttl_s
        self._clock = clock
        # Tokens verified already, with their expiry: a sender reuses one token for its whole
        # life, and checking its signature again cost ~5 µs of every webhook.
        self._known: dict[str, int] = {}

    def check_client(self, client_id: str, client_secret: str) -> bool:
        """Whether these are the configured client credentials, compared in constant time."""
        try:
            given_id, given_secret = client_id.encode("utf-8"), client_secret.encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates cannot match a configured value
            return False
        # Both comparisons always run (`&` never short-circuits): timing never says which failed.
        id_ok = hmac.compare_digest(given_id, self._id)
        secret_ok = hmac.compare_digest(given_secret, self._secret)
        return id_ok & secret_ok

    def issue(self) -> tuple[str, int]:
        """A fresh access token and its lifetime in seconds."""
        iat = int(self._clock())
        claims = _Claims(
            sub=self._client_id, iat=iat, exp=iat + self._ttl, jti=secrets.token_urlsafe(12)
        )
        body = _b64(_ENCODER.encode(claims))
        return f"{body}.{self._sign(body)}", self._ttl

    def verify(self, token: str) -> bool:
        """Whether the token was signed with our key, is unexpired and names our client id."""
        exp = self._known.get(token)
        if exp is not None:
            # The very token verified before (the whole string is the key): only its expiry
            # can have changed. A lookup's timing can only tell an exact valid token.
            if self._clock() < exp:
                return True
            del self._known[token]
            return False
        if not _TOKEN_SHAPE.fullmatch(token):
            return False
        body, _, sig = token.partition(".")
        # Comparing the encoded signatures, not decoded bytes, rules out base64 malleability.
        if not hmac.compare_digest(self._sign(body).encode("ascii"), sig.encode("ascii")):
            return False
        try:
            claims = _CLAIMS_DECODER.decode(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
        except (binascii.Error, ValueError, msgspec.DecodeError):
            return False  # only reachable with our own key, i.e. a bug or an older format
        if claims.sub != self._client_id or self._clock() >= claims.exp:
            return False
        if len(self._known) >= KNOWN_TOKENS:
            self._known.clear()  # a sender holds one or two at a time: this is not the case
        self._known[token] = claims.exp
        return True

    def _sign(self, body: str) -> str:
        return _b64(hmac.new(self._key, body.encode("ascii"), hashlib.sha256).digest())


class StaticTokens:
    """The fixed bearer tokens of ``auth.mode = "bearer"``."""

    def __init__(self, tokens: Sequence[str]) -> None:
        if not tokens or not all(tokens):
            raise ValueError("auth.tokens must hold at least one token, and no empty one")
        self._tokens = [t.encode("utf-8") for t in tokens]

    def verify(self, token: str) -> bool:
        """Whether the token is one of the configured ones; every one is compared, always."""
        try:
            given = token.encode("utf-8")
        except UnicodeEncodeError:
            return False
        ok = False
        for expected in self._tokens:
            ok |= hmac.compare_digest(given, expected)  # no early exit: timing hides which matched
        return ok


class Authenticator(Protocol):
    """What the webhook route calls with the raw ``Authorization`` header value."""

    def authenticate(self, authorization: str | None) -> bool:
        """Whether the request carrying this header may proceed."""
        ...


class _Verifier(Protocol):
    def verify(self, token: str) -> bool: ...


class _Bearer:
    def __init__(self, verifier: _Verifier) -> None:
        self._verifier = verifier

    def authenticate(self, authorization: str | None) -> bool:
        parts = (authorization or "").split()
        # RFC 7235: the scheme name is case-insensitive.
        return len(parts) == 2 and parts[0].lower() == "bearer" and self._verifier.verify(parts[1])


class _Open:
    def authenticate(self, authorization: str | None) -> bool:
        return True


def bearer_tokens(tokens: Sequence[str]) -> Authenticator:
    """An authenticator taking exactly these bearer tokens (Braze's, for its routes)."""
    return _Bearer(StaticTokens(tokens))


def authenticator_for(cfg: AuthConfig, *, issuer: TokenIssuer | None = None) -> Authenticator:
    """The webhook authenticator for ``auth.mode``; pass ``issuer`` to share the endpoint's."""
    if cfg.mode == "oauth2":
        return _Bearer(issuer or TokenIssuer(cfg.client_id, cfg.client_secret, cfg.token_ttl_s))
    if cfg.mode == "bearer":
        return _Bearer(StaticTokens(cfg.tokens))
    log.warning(
        'auth.mode = "none": ANYONE who can reach this gateway can change consent in Braze; '
        "never run this way outside a local test"
    )
    return _Open()


def _answer(status: int, body: msgspec.Struct) -> web.Response:
    # RFC 6749 §5.1: token responses must not be cached by anything on the way.
    headers = {"Cache-Control": "no-store", "Pragma": "no-cache"}
    if status == 401:  # §5.2: a 401 names the scheme the client should authenticate with
        headers["WWW-Authenticate"] = 'Basic realm="gateway"'
    return web.Response(
        status=status, body=_ENCODER.encode(body), content_type="application/json", headers=headers
    )


def _error(status: int, error: str, detail: str) -> web.Response:
    return _answer(status, _ErrorBody(error, detail))


async def _read_capped(request: web.Request) -> bytes | None:
    """The body, or None when it is larger than the cap (checked while reading)."""
    if (request.content_length or 0) > MAX_TOKEN_REQUEST_BYTES:
        return None
    body = bytearray()
    while chunk := await request.content.read(MAX_TOKEN_REQUEST_BYTES + 1 - len(body)):
        body += chunk
        if len(body) > MAX_TOKEN_REQUEST_BYTES:
            return None
    return bytes(body)


def _basic(header: str) -> tuple[str, str] | None:
    """The (id, secret) of an RFC 6749 §2.3.1 Basic header, or None when it is malformed."""
    scheme, _, b64 = header.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(b64.strip(), validate=True).decode()
    except (binascii.Error, ValueError):
        return None
    client_id, colon, secret = decoded.partition(":")
    return (client_id, secret) if colon else None


async def token_endpoint(issuer: TokenIssuer, request: web.Request) -> web.Response:
    """``POST /oauth/token``: the client-credentials grant of RFC 6749 §4.4."""
    raw = await _read_capped(request)
    if raw is None:
        return _error(413, "invalid_request", f"body over {MAX_TOKEN_REQUEST_BYTES} bytes")
    if raw and request.content_type != _FORM:
        return _error(400, "invalid_request", f"body must be {_FORM}")
    try:
        pairs = parse_qsl(raw.decode(), strict_parsing=False, errors="strict", max_num_fields=16)
    except ValueError:
        return _error(400, "invalid_request", "body is not a valid form")
    form: dict[str, str] = {}
    for name, value in pairs:  # blank values were dropped: §3.2 treats them as omitted
        if name in form:
            return _error(400, "invalid_request", f"parameter {name!r} given more than once")
        form[name] = value
    grant = form.get("grant_type")
    if grant is None:
        return _error(400, "invalid_request", "grant_type is missing")
    if grant != "client_credentials":
        return _error(400, "unsupported_grant_type", "only client_credentials is supported")

    header = request.headers.get("Authorization")
    if header is not None:
        if "client_secret" in form:
            return _error(400, "invalid_request", "client credentials given in header and body")
        creds = _basic(header)
        if creds is None:
            return _error(401, "invalid_client", "Authorization must be HTTP Basic")
        decoded = (unquote_plus(creds[0]), unquote_plus(creds[1]))
        if form.get("client_id", decoded[0]) not in (decoded[0], creds[0]):
            return _error(400, "invalid_request", "client_id differs between header and body")
        # §2.3.1 form-encodes both parts; the raw retry serves clients that skip that step.
        ok = issuer.check_client(*decoded) or (decoded != creds and issuer.check_client(*creds))
    elif "client_id" in form and "client_secret" in form:
        ok = issuer.check_client(form["client_id"], form["client_secret"])
    else:
        return _error(401, "invalid_client", "client authentication is required")
    if not ok:
        log.info("token request refused: wrong client credentials from %s", request.remote)
        return _error(401, "invalid_client", "client authentication failed")
    token, expires_in = issuer.issue()
    return _answer(200, _TokenResponse(token, "Bearer", expires_in))
