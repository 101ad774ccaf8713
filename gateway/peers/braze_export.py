"""Braze's read side for reconcile: `/users/export/ids` and `/subscription/status/get`, paced.

Braze limits `/users/export/ids` per minute (250 requests for workspaces onboarded after
August 2024, 2,500 before; `braze.export_requests_per_minute`) and `/subscription/status/get`
by its default limit (250,000 requests an hour, shared). `WindowLimiter` keeps each at its
budget: at most `limit` requests in any window, counted from a request's start until a window
after its answer came (so arrival jitter can never put one more in Braze's window than it
allows), and held while Braze's `X-RateLimit-*` headers say its own budget is spent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import aiohttp
import msgspec

from gateway.config.settings import BrazeConfig, braze_base_url
from gateway.delivery.pacing import header_float
from gateway.errors import BrazeError

log = logging.getLogger("gateway.reconcile")

EXPORT = "/users/export/ids"
STATUS = "/subscription/status/get"
MAX_EXPORT_IDS = 50  # external ids a /users/export/ids request takes (one email at a time)
MAX_STATUS_IDS = 50  # external_id[] (or email[]) a /subscription/status/get takes
STATUS_REQUESTS_PER_HOUR = 250_000  # Braze's default limit, which this endpoint shares
MAX_ATTEMPTS = 8  # for a 5xx, a timeout or a lost connection; a 429 waits and never counts
MAX_WAIT_S = 3600.0
_PERMISSION = {EXPORT: "users.export.ids", STATUS: "subscription.status.get"}


class ExportedUser(msgspec.Struct, frozen=True):
    """One profile of `/users/export/ids`, the fields reconcile asks for (others ignored)."""

    external_id: str | None = None
    email: str | None = None
    email_subscribe: str | None = None
    custom_attributes: dict[str, Any] | None = None


class _ExportAnswer(msgspec.Struct, frozen=True):
    message: str | None = None
    users: list[ExportedUser] = []
    invalid_user_ids: list[str] = []


class _StatusAnswer(msgspec.Struct, frozen=True):
    message: str | None = None
    status: dict[str, str] = {}


_export_answer = msgspec.json.Decoder(_ExportAnswer)
_status_answer = msgspec.json.Decoder(_StatusAnswer)
_encoder = msgspec.json.Encoder()


class WindowLimiter:
    """At most `limit` requests in any `window_s` seconds, and none while Braze says to wait.

    A request holds its slot from its start until `window_s` after its answer: it reached Braze
    between the two, so two requests a slot apart are always a full window apart at Braze,
    whatever the latency did. Braze's `X-RateLimit-Remaining` counts what its window has left
    after the answered request; the requests started after that one spend it too, so once
    that budget is gone no request starts until `X-RateLimit-Reset`.
    """

    def __init__(
        self, limit: int, window_s: float = 60.0, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.limit = limit
        self.window_s = window_s
        self.clock = clock
        self._in_flight = 0
        self._done: deque[float] = deque()  # when each answered slot frees, oldest first
        self._started = 0  # requests started so far; `acquire` returns each one's number
        self._budget: int | None = None  # Braze's count for its window, less ours since
        self._window_ends = 0.0
        self._blocked_until = 0.0
        self._changed = asyncio.Event()

    async def acquire(self) -> int:
        """Wait for a slot; returns the request's number, for `release`."""
        while True:
            now = self.clock()
            while self._done and self._done[0] <= now:
                self._done.popleft()
            if self._budget is not None and now >= self._window_ends:
                self._budget = None  # Braze's window reset: its next answer tells the new one
            wait_until = self._blocked_until
            if self._budget is not None and self._budget <= 0:
                wait_until = max(wait_until, self._window_ends)
            if self._in_flight + len(self._done) >= self.limit and self._done:
                wait_until = max(wait_until, self._done[0])
            full = self._in_flight + len(self._done) >= self.limit
            if wait_until <= now and not full:
                self._in_flight += 1
                self._started += 1
                if self._budget is not None:
                    self._budget -= 1
                return self._started
            self._changed.clear()
            timeout = max(0.0, wait_until - now) if wait_until > now else None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), timeout)

    def release(self, number: int, status: int | None, headers: Mapping[str, str]) -> float:
        """Free request `number`'s slot a window from now, learn from Braze's headers; returns
        how long Braze asked to wait (a 429), 0 otherwise."""
        now = self.clock()
        self._in_flight -= 1
        self._done.append(now + self.window_s)
        remaining = header_float(headers, "X-RateLimit-Remaining")
        reset = header_float(headers, "X-RateLimit-Reset")
        left = None
        if reset is not None:
            # Above 10^9 an epoch time (Braze's docs), below seconds from now (other plans).
            left = min(max(reset - time.time() if reset > 1e9 else reset, 0.0), MAX_WAIT_S)
        wait = 0.0
        if remaining is not None and left is not None:
            self._window_ends = now + left
            self._budget = int(remaining) - (self._started - number)
        if status == 429:
            retry_after = header_float(headers, "X-Ratelimit-Retry-After") or header_float(
                headers, "Retry-After"
            )
            wait = retry_after if retry_after is not None else (left if left is not None else 1.0)
            wait = min(max(wait, 0.0), MAX_WAIT_S)
            self._blocked_until = max(self._blocked_until, now + wait)
        self._changed.set()
        return wait


@dataclass(slots=True)
class Exported:
    """What one export answered: the profiles found, by the identifier asked, and the rest."""

    users: dict[str, ExportedUser] = field(default_factory=dict)
    invalid: set[str] = field(default_factory=set)


@dataclass(slots=True)
class ReadStats:
    """Requests sent, by endpoint, and the 429s Braze answered (zero when pacing is right)."""

    requests: dict[str, int] = field(default_factory=lambda: {EXPORT: 0, STATUS: 0})
    rate_limited: int = 0
    retried: int = 0


class BrazeReader:
    """Reads profiles and subscription-group states from one Braze REST endpoint, paced.

    `minute_s` is how long Braze's minute lasts: 60, except in tests and benchmarks, which
    scale the fake Braze's windows and this one's together (the hourly limit scales alike).
    """

    def __init__(
        self,
        config: BrazeConfig,
        *,
        minute_s: float = 60.0,
        max_in_flight: int = 16,
        backoff_s: float = 0.5,
    ) -> None:
        self.base_url = braze_base_url(config.server)
        self.api_key = config.api_key
        self.timeout = aiohttp.ClientTimeout(total=config.timeout_s)
        self.export_limiter = WindowLimiter(config.export_requests_per_minute, minute_s)
        self.status_limiter = WindowLimiter(STATUS_REQUESTS_PER_HOUR, 60 * minute_s)
        self.backoff_s = backoff_s
        self.stats = ReadStats()
        connector = aiohttp.TCPConnector(limit=max_in_flight * 2, keepalive_timeout=60)
        self.session = aiohttp.ClientSession(connector=connector)

    async def close(self) -> None:
        """Close the connection pool."""
        await self.session.close()

    async def export(
        self, identity: Literal["external_id", "email"], persons: Sequence[str], fields: list[str]
    ) -> Exported:
        """The profiles of up to 50 external ids in one request, or of one email address."""
        if identity == "email":
            if len(persons) != 1:
                raise ValueError("Braze exports one email address a request")
            body: dict[str, Any] = {"email_address": persons[0]}
        else:
            if len(persons) > MAX_EXPORT_IDS:
                raise ValueError(f"Braze exports at most {MAX_EXPORT_IDS} external ids a request")
            body = {"external_ids": list(persons)}
        body["fields_to_export"] = fields
        payload = await self._send("POST", EXPORT, self.export_limiter, body=_encoder.encode(body))
        answer = _export_answer.decode(payload)
        out = Exported(invalid=set(answer.invalid_user_ids))
        wanted = set(persons)
        for user in answer.users:
            key = user.email if identity == "email" else user.external_id
            if key in wanted and key not in out.users:
                # One email may name several profiles: the first Braze lists is the one compared.
                out.users[key] = user
        out.invalid.update(wanted - out.users.keys())
        return out

    async def group_status(
        self, group: str, identity: Literal["external_id", "email"], persons: Sequence[str]
    ) -> dict[str, str]:
        """`Subscribed`, `Unsubscribed` or `Unknown` per person (at most 50) for one group."""
        if len(persons) > MAX_STATUS_IDS:
            raise ValueError(f"Braze reads at most {MAX_STATUS_IDS} ids a subscription status")
        name = "external_id[]" if identity == "external_id" else "email[]"
        params = [("subscription_group_id", group), *((name, p) for p in persons)]
        payload = await self._send("GET", STATUS, self.status_limiter, params=params)
        return dict(_status_answer.decode(payload).status)

    async def _send(
        self,
        method: str,
        path: str,
        limiter: WindowLimiter,
        *,
        body: bytes | None = None,
        params: list[tuple[str, str]] | None = None,
    ) -> bytes:
        """One request, sent again after a 429 (when Braze says) or a transient failure."""
        headers = {"Authorization": f"Bearer {self.api_key}"}
        if body is not None:
            headers["Content-Type"] = "application/json"
        failures = 0
        reason = ""
        while True:
            number = await limiter.acquire()
            self.stats.requests[path] += 1
            status: int | None = None
            answer_headers: Mapping[str, str] = {}
            payload = b""
            try:
                async with self.session.request(
                    method,
                    self.base_url + path,
                    data=body,
                    params=params,
                    headers=headers,
                    timeout=self.timeout,
                    allow_redirects=False,
                ) as response:
                    status, answer_headers = response.status, response.headers
                    payload = await response.read()
            except (TimeoutError, aiohttp.ClientError) as exc:
                reason = f"{type(exc).__name__}"
            finally:
                wait = limiter.release(number, status, answer_headers)
            if status is not None and 200 <= status < 300:
                return payload
            if status == 429:
                self.stats.rate_limited += 1
                continue  # the limiter holds every request until Braze's window resets
            if status in (401, 403):
                hint = (
                    "the API key is wrong or belongs to another instance (check braze.server)"
                    if status == 401
                    else f"the API key lacks the {_PERMISSION[path]} permission reconcile needs"
                )
                raise BrazeError(status, payload.decode("utf-8", "replace"), f"{path}: {hint}")
            if status is not None and status < 500 and status != 408:
                text = payload[:300].decode("utf-8", "replace")
                raise BrazeError(status, text, f"Braze answered {status} on {path}: {text}")
            failures += 1
            self.stats.retried += 1
            reason = f"Braze answered {status}" if status is not None else reason
            if failures >= MAX_ATTEMPTS:
                raise BrazeError(status or 0, reason, f"{path}: {reason}, {failures} times")
            delay = wait or min(self.backoff_s * 2 ** (failures - 1), 30.0)
            log.warning("%s: %s; again in %.1f s", path, reason, delay)
            await asyncio.sleep(delay)
