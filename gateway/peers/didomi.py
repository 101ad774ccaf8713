"""Didomi's Consents API: the client the reverse path writes people's Braze choices through.

It logs in with the organization's private API key (`POST /sessions`), keeps the JWT it gets
until shortly before its `exp`, reads a person's current status (`GET /consents/users`) and
writes consent events (`POST /consents/events`) under caller-chosen ids, so a retried write is
never recorded twice (developers.didomi.io, "Authentication", "Consents API"; the id rule is in
Didomi's own API reference, api.didomi.io/docs, ConsentEventInput.id).

Every answer is sorted into an `Answer` / `Verdict` (delivery/), so `delivery.retry.decide` applies
unchanged: a wrong key or URL is held (AUTH), never dead-lettered; a refused event is REFUSED.
No reason, log line or repr ever holds the key, the secret or a token.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import logging
import re
import time
from collections.abc import AsyncIterator, Callable, Mapping
from datetime import datetime
from typing import Any

import aiohttp
import msgspec

from gateway.config.settings import DidomiApiConfig, didomi_base_url
from gateway.delivery.outcome import Answer, Verdict
from gateway.delivery.pacing import RateLimiter
from gateway.logs import REDACTED, redact
from gateway.shapes.webhooks import GATEWAY_SOURCE, Consents, Lenient, Purpose

SESSIONS = "/sessions"
EVENTS = "/consents/events"
USERS = "/consents/users"
SOURCE = GATEWAY_SOURCE  # metadata.source of every event we write: how echoes are known

DEFAULT_TOKEN_TTL_S = 3600.0  # Didomi's tokens last about an hour when the JWT does not say
RENEW_MARGIN_S = 60.0
MAX_REASON_CHARS = 200

log = logging.getLogger(__name__)

OnRequest = Callable[[str, str, float], None]  # endpoint path, status label, seconds


class ConsentsApiUser(Lenient, frozen=True):
    """A Didomi consent user as the Consents API returns it: the person's current status."""

    id: str | None = None
    organization_user_id: str | None = None
    created_at: datetime | None = None
    updated_at: datetime | None = None
    metadata: dict[str, Any] | None = None
    consents: Consents | None = None

    @property
    def purposes(self) -> dict[str, Purpose]:
        """The user's purposes by id."""
        listed = self.consents.purposes if self.consents is not None else None
        return {purpose.id: purpose for purpose in listed or ()}


class _UsersPage(Lenient, frozen=True):
    data: list[ConsentsApiUser] = msgspec.field(default_factory=list)


class _Session(Lenient, frozen=True):
    access_token: str | None = None


class _Claims(Lenient, frozen=True):
    exp: float | None = None


class _Created(Lenient, frozen=True):
    """The event Didomi answers a write with: only its date (Didomi's clock) is read."""

    created_at: datetime | None = None


class _Error(Lenient, frozen=True):
    """Didomi's error body: `{"code": 400, "name": "BadRequest", "message": "..."}`."""

    name: str | None = None
    message: str | None = None


_users_page = msgspec.json.Decoder(_UsersPage)
_session = msgspec.json.Decoder(_Session)
_claims = msgspec.json.Decoder(_Claims)
_error = msgspec.json.Decoder(_Error)
_created = msgspec.json.Decoder(_Created)
_encoder = msgspec.json.Encoder()

# Didomi documents that it refuses an event id it already has, not how: a 409 Conflict, or a
# 400 BadRequest whose message says so (a unique-key violation passed through), are both it.
_DUPLICATE = re.compile(r"(?i)already exist|duplicate (?:key|event|id)|unique (?:constraint|viol)")


def token_expiry(token: str, now: float) -> float:
    """When a Didomi JWT expires (epoch seconds): its `exp` claim, else an hour from `now`."""
    # Only renewal is scheduled from this, so the signature is not checked: Didomi does that.
    parts = token.split(".")
    if len(parts) == 3:
        segment = parts[1]
        try:
            payload = base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
            exp = _claims.decode(payload).exp
        except (binascii.Error, ValueError, msgspec.DecodeError):
            exp = None
        if exp is not None:
            return exp
    return now + DEFAULT_TOKEN_TTL_S


class DidomiClient:
    """Talks to one Didomi organization through one shared connection pool and one token."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        config: DidomiApiConfig,
        *,
        limiter: RateLimiter,
        clock: Callable[[], float] = time.time,
        renew_margin_s: float = RENEW_MARGIN_S,
        on_request: OnRequest | None = None,
    ) -> None:
        self.session = session
        self.config = config
        self.base_url = didomi_base_url(config.base_url)  # the demo's fake:// too
        self.timeout = aiohttp.ClientTimeout(total=config.timeout_s)
        self.limiter = limiter
        self.clock = clock  # epoch seconds, as the JWT's exp is
        self.renew_margin_s = renew_margin_s
        self.on_request = on_request
        self._token: str | None = None
        self._renew_at = 0.0
        # One login at a time: callers arriving while it runs wait for its token.
        self._login_lock = asyncio.Lock()

    def __repr__(self) -> str:
        org = self.config.organization_id
        return f"DidomiClient(base_url={self.base_url!r}, organization_id={org!r})"

    async def current_user(
        self, organization_user_id: str, *, regulation: str | None = None
    ) -> tuple[Answer, ConsentsApiUser | None]:
        """The person's current consent status, or None when Didomi does not know them yet."""
        query = {
            "organization_id": self.config.organization_id,
            "organization_user_id": organization_user_id,
            "regulation": regulation or self.config.regulation,
        }
        answer, payload = await self._call("GET", USERS, query)
        if answer.verdict is not Verdict.OK:
            return answer, None
        try:
            page = _users_page.decode(payload)
        except msgspec.DecodeError:
            # A 2xx that is not a users page does not come from the Consents API.
            reason = f"Didomi answered {answer.status} with no users page: " + _WRONG_URL
            return Answer(Verdict.AUTH, answer.status, reason), None
        for user in page.data:
            if user.organization_user_id == organization_user_id:
                return answer, user
        return answer, None

    async def users_page(
        self, cursor: str | None, *, regulation: str | None = None
    ) -> tuple[Answer, bytes]:
        """One page of every user of the organization (`GET /consents/users`), undecoded.

        Didomi pages them 100 at a time; `cursor` is the previous page's (None for the first),
        and a page whose `cursor` is null is the last (developers.didomi.io, "Query users").
        """
        query = {
            "organization_id": self.config.organization_id,
            "regulation": regulation or self.config.regulation,
        }
        if cursor is not None:
            query["$cursor"] = cursor
        return await self._call("GET", USERS, query)

    async def write_event(
        self,
        event_id: str,
        organization_user_id: str,
        purposes: list[dict[str, Any]],
        regulation: str | None = None,
        *,
        on_created: Callable[[float], None] | None = None,
    ) -> Answer:
        """Record one consent event under `event_id`; an id Didomi already has counts as done.

        `on_created` gets the event's `created_at` (epoch seconds, Didomi's clock) when Didomi
        answers with it: the writeback tells its own writes from others' by it.
        """
        query = {"organization_id": self.config.organization_id}
        if self.config.disable_integrations:
            query["$disable_integrations"] = "true"
        body = {
            "id": event_id,
            "user": {"organization_user_id": organization_user_id},
            "regulation": regulation or self.config.regulation,
            "consents": {"purposes": purposes},
            "metadata": {"source": SOURCE},
        }
        answer, payload = await self._call("POST", EVENTS, query, _encoder.encode(body))
        if on_created is not None and answer.verdict is Verdict.OK and payload:
            with contextlib.suppress(msgspec.DecodeError):
                created = _created.decode(payload).created_at
                if created is not None:
                    on_created(created.timestamp())
        return answer

    # -----------------------------------------------------------------------
    # Requests, the token, and the classification of answers.

    async def _call(
        self, method: str, path: str, query: Mapping[str, str], body: bytes | None = None
    ) -> tuple[Answer, bytes]:
        """One API call with the current token; on a 401, one fresh login and one retry."""
        retried = False
        while True:
            token = await self._valid_token()
            if isinstance(token, Answer):
                return token, b""
            headers = {"Authorization": f"Bearer {token}"}
            outcome = await self._send(method, path, query, body, headers)
            if isinstance(outcome, Answer):
                return outcome, b""
            status, payload = outcome
            if status != 401 or retried:
                return self._classify(path, status, payload, retried=retried), payload
            # Expired early or revoked: log in again and retry this call, once.
            log.info("Didomi refused the access token on %s; logging in again", path)
            self._drop(token)
            retried = True

    async def _valid_token(self) -> str | Answer:
        """The cached token while fresh, else a new one; or the answer that refused the login."""
        if self._token is not None and self.clock() < self._renew_at:
            return self._token
        async with self._login_lock:
            if self._token is not None and self.clock() < self._renew_at:
                return self._token  # another caller logged in while this one waited
            return await self._login()

    async def _login(self) -> str | Answer:
        body = {"type": "api-key", "key": self.config.key, "secret": self.config.secret}
        outcome = await self._send("POST", SESSIONS, {}, _encoder.encode(body), {})
        if isinstance(outcome, Answer):
            return outcome
        status, payload = outcome
        if not 200 <= status < 300:
            return self._classify(SESSIONS, status, payload, retried=False)
        try:
            token = _session.decode(payload).access_token
        except msgspec.DecodeError:
            token = None
        if not token:
            reason = f"Didomi answered {status} to the login without an access token: "
            return Answer(Verdict.AUTH, status, reason + _WRONG_URL)
        now = self.clock()
        expires = token_expiry(token, now)
        self._token, self._renew_at = token, expires - self.renew_margin_s
        log.debug("logged in to Didomi; the token expires in %.0f s", expires - now)
        return token

    def _drop(self, token: str) -> None:
        # Only the token that failed: a concurrent caller may already have replaced it.
        if self._token == token:
            self._token = None

    async def _send(
        self,
        method: str,
        path: str,
        query: Mapping[str, str],
        body: bytes | None,
        headers: dict[str, str],
    ) -> tuple[int, bytes] | Answer:
        """One HTTP exchange after the rate limiter allows it: the status and body, or RETRY."""
        number = await self.limiter.acquire()
        if body is not None:
            headers = {**headers, "Content-Type": "application/json"}
        started = time.perf_counter()
        status_label = "error"
        try:
            async with self.session.request(
                method,
                self.base_url + path,
                params=query,
                data=body,
                headers=headers,
                timeout=self.timeout,
                # A redirect means base_url is wrong; following it would send the token along.
                allow_redirects=False,
            ) as response:
                status_label = str(response.status)
                payload = await response.read()
                self.limiter.observe(response.status, response.headers, number)
                return response.status, payload
        except TimeoutError:
            return Answer(Verdict.RETRY, None, "timeout")
        except aiohttp.ClientError as exc:
            return Answer(Verdict.RETRY, None, f"connection: {type(exc).__name__}")
        finally:
            if self.on_request is not None:
                self.on_request(path, status_label, time.perf_counter() - started)

    def _classify(self, path: str, status: int, payload: bytes, *, retried: bool) -> Answer:
        """Sort one HTTP answer into what the retry policy should do with it."""
        if 200 <= status < 300:
            return Answer(Verdict.OK, status, "ok")
        message = self._message(payload)
        if path == EVENTS and (
            status == 409 or (status == 400 and _DUPLICATE.search(message) is not None)
        ):
            # The caller chose the id, so Didomi already holds this very event: it is recorded.
            return Answer(Verdict.OK, status, "already recorded")
        if status == 429:
            return Answer(Verdict.RATE_LIMITED, status, "rate limited")
        # Didomi refuses a wrong key or secret with a 400 ("Authentication"): held, never a
        # refused (dead-lettered) change.
        if status in (401, 403) or (path == SESSIONS and status == 400):
            return Answer(Verdict.AUTH, status, _auth_reason(path, status, retried=retried))
        if status in (404, 405) or 300 <= status < 400:
            return Answer(Verdict.AUTH, status, f"Didomi answered {status} on {path}: {_WRONG_URL}")
        if status == 408 or status >= 500:
            return Answer(Verdict.RETRY, status, f"Didomi answered {status}")
        detail = f": {message}" if message else ""
        return Answer(Verdict.REFUSED, status, f"Didomi answered {status}{detail}")

    def _message(self, payload: bytes) -> str:
        """Didomi's own explanation, short and with every credential masked."""
        try:
            error = _error.decode(payload)
            text = error.message or error.name or ""
        except msgspec.DecodeError:
            text = payload[:MAX_REASON_CHARS].decode("utf-8", "replace")
        # Didomi may echo what it was sent; our own credentials are masked before anything else.
        for secret in (self.config.key, self.config.secret, self._token):
            if secret:
                text = text.replace(secret, REDACTED)
        text = redact(" ".join(text.split()))
        if len(text) > MAX_REASON_CHARS:
            text = text[: MAX_REASON_CHARS - 1] + "…"
        return text


_WRONG_URL = "didomi_api.base_url looks wrong (Didomi's is https://api.didomi.io/v1)"


def _auth_reason(path: str, status: int, *, retried: bool) -> str:
    if path == SESSIONS:
        hint = "the login was refused: check didomi_api.key and didomi_api.secret"
    elif status == 401:
        after = " after a fresh login" if retried else ""
        hint = (
            f"the access token was refused{after}: check didomi_api.key, didomi_api.secret"
            " and didomi_api.organization_id"
        )
    else:
        hint = (
            "this API key may not act for didomi_api.organization_id: check"
            " didomi_api.organization_id and the key's permissions (didomi_api.key, secret)"
        )
    return f"Didomi answered {status} on {path}: {hint}"


@contextlib.asynccontextmanager
async def open_didomi_client(
    config: DidomiApiConfig, *, on_request: OnRequest | None = None
) -> AsyncIterator[DidomiClient]:
    """The one ClientSession to Didomi's API, paced to `didomi_api.requests_per_second`."""
    connector = aiohttp.TCPConnector(keepalive_timeout=60)
    async with aiohttp.ClientSession(connector=connector, raise_for_status=False) as session:
        yield DidomiClient(
            session,
            config,
            limiter=RateLimiter(config.requests_per_second),
            on_request=on_request,
        )
