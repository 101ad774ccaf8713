"""What every intake route shares: the app's state and keys, JSON answers, capped body reads.

The Didomi route lives in `server`, Braze's in `braze_intake`; both answer the same way, so a
sender's retry logic (Didomi's five minutes, Braze's five tries in 30 minutes) meets one
contract: `202` once stored, `200` for a duplicate, `4xx` for the sender's mistakes, `503` to
be retried.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import msgspec
from aiohttp import web

from gateway.config.settings import Config
from gateway.metrics import Metrics
from gateway.shapes.webhooks import Webhook
from gateway.spool.face import Spool
from gateway.words import Direction

log = logging.getLogger("gateway.server")

RETRY_AFTER_S = 30  # what a 503 asks the sender to wait; senders retry on their own schedule
READ_CHUNK = 65_536


def nothing() -> None:
    """The wake-up that wakes nobody, before delivery starts and after it stops."""
    return


class State:
    """Mutable runtime state: starting, ready, draining, and what else readiness depends on."""

    def __init__(self) -> None:
        self.starting = True
        self.draining = False
        self.listening = False  # `serve` bound the port: only then are requests to drain
        self.drain_started: float | None = None  # time.monotonic() when shutdown began
        # Called once when shutdown begins: what drains beside this process starts now too.
        self.on_drain: list[Callable[[], None]] = []
        # Each returns None when all is well, or the reason the gateway is not ready.
        self.ready_checks: list[Callable[[], str | None]] = []
        # Each returns None, or why delivery is slow right now; readiness stays 200 and says so.
        self.degraded_checks: list[Callable[[], str | None]] = []
        # Called after each stored webhook; the dispatcher sets its own wake-up here, and the
        # writeback (Braze -> Didomi) its own in `on_wake_to_didomi`.
        self.on_wake: Callable[[], None] = nothing
        self.on_wake_to_didomi: Callable[[], None] = nothing
        # Who a Didomi webhook is about, and how Braze names people, per the live rules: the
        # person picks the partition on PostgreSQL. Set by delivery; unknown before it starts.
        self.person_of: Callable[[Webhook], str | None] = lambda _webhook: None
        self.identity: Callable[[], str] = lambda: "external_id"

    def wake(self, direction: Direction = "to_braze") -> None:
        """New webhooks going `direction` are in the spool."""
        if direction == "to_didomi":
            self.on_wake_to_didomi()
        else:
            self.on_wake()

    def not_ready_reason(self) -> str | None:
        """Why /readyz should answer 503, or None when the gateway is ready."""
        if self.draining:
            return "draining: the gateway is shutting down"
        if self.starting:
            return "starting"
        for check in self.ready_checks:
            try:
                reason = check()
            except Exception as exc:  # a broken check must not turn /readyz into a 500
                log.exception("a readiness check failed")
                return f"a readiness check failed: {exc!r}"
            if reason:
                return reason
        return None

    def degraded_reason(self) -> str | None:
        """Why delivery lags right now (a Braze outage, say), while intake still works."""
        for check in self.degraded_checks:
            if reason := check():
                return reason
        return None


SPOOL = web.AppKey("gateway.spool", Spool)
CONFIG = web.AppKey("gateway.config", Config)
METRICS = web.AppKey("gateway.metrics", Metrics)
STATE = web.AppKey("gateway.state", State)

_encode = msgspec.json.Encoder().encode
# A header dict rather than `content_type=`: aiohttp parses that argument on every answer.
_JSON = {"Content-Type": "application/json"}


def json_answer(
    status: int, body: Mapping[str, Any] | bytes, headers: Mapping[str, str] | None = None
) -> web.Response:
    """A JSON response (`body` as a mapping, or already encoded)."""
    data = body if isinstance(body, bytes) else _encode(body)
    return web.Response(
        status=status, body=data, headers={**_JSON, **headers} if headers else _JSON
    )


def error_answer(
    status: int, error: str, detail: str, headers: Mapping[str, str] | None = None
) -> web.Response:
    """A JSON error body `{"error", "detail"}`, the one shape of every refusal."""
    return json_answer(status, {"error": error, "detail": detail}, headers)


async def read_capped(request: web.Request, limit: int) -> bytes | None:
    """The body, or None once it is known to exceed `limit`: by its header, or while reading."""
    if (request.content_length or 0) > limit:
        return None
    body = bytearray()
    while chunk := await request.content.read(min(READ_CHUNK, limit + 1 - len(body))):
        body += chunk
        if len(body) > limit:
            return None
    return bytes(body)


def refuse(
    request: web.Request,
    kind: str,
    status: int,
    error: str,
    detail: str,
    outcome: str,
    *,
    reason: str | None = None,
    sender: str = "",
) -> web.Response:
    """Count, log (the reason, never the body) and answer one refused webhook."""
    request.app[METRICS].webhook(kind, outcome)
    level = logging.WARNING if status >= 500 else logging.INFO
    extra = {"status": status, "remote": request.remote, "type": kind}
    what = f"{sender} webhook" if sender else "webhook"
    log.log(level, "%s refused (%d %s): %s", what, status, error, reason or detail, extra=extra)
    headers = {"Retry-After": str(RETRY_AFTER_S)} if status == 503 else {}
    if status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="gateway"'
    return error_answer(status, error, detail, headers)
