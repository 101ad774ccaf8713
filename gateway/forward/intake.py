"""Didomi's route: `POST /webhooks/didomi` checked, decoded and stored for delivery."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import msgspec
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from gateway.errors import SpoolError, SpoolFull
from gateway.http.auth import Authenticator
from gateway.http.intake import (
    CONFIG,
    METRICS,
    SPOOL,
    STATE,
    json_answer,
    read_capped,
)
from gateway.http.intake import refuse as intake_refuse
from gateway.shapes.webhooks import WebhookError, decode

log = logging.getLogger("gateway.server")  # the intake log, as for Braze

WEBHOOK_PATH = "/webhooks/didomi"
_ACCEPTED = msgspec.json.encode({"status": "accepted"})
_DUPLICATE = msgspec.json.encode({"status": "duplicate"})


AUTH = web.AppKey("gateway.authenticator", Authenticator)


class AcceptedLog:
    """The audit line of accepted webhooks: one `webhooks accepted` line per intake commit.

    A line per webhook cost more CPU than storing it. Every request of one commit group
    resumes in the same turn of the event loop, after the commit; the line is written on the
    loop's next turn, so it names one group's event ids, all of them stored.
    """

    def __init__(self, after: Callable[[], None] = lambda: None) -> None:
        self._ids: list[str | None] = []
        self._after = after  # once per group too: what need not run per webhook
        self.extra: dict[str, object] = {}  # more fields for the line (which process, say)

    def add(self, event_id: str | None) -> None:
        """One webhook stored (its commit is done); logged with the rest of its group."""
        if not self._ids:
            asyncio.get_running_loop().call_soon(self.flush)
        self._ids.append(event_id)

    def flush(self) -> None:
        """Write the line for the webhooks added since the last one."""
        ids, self._ids = self._ids, []
        if ids:
            extra = {"count": len(ids), "event_ids": ids, "outcome": "accepted", **self.extra}
            log.info("webhooks accepted", extra=extra)
        self._after()


ACCEPTED = web.AppKey("gateway.accepted_log", AcceptedLog)


async def receive_webhook(request: web.Request) -> web.Response:
    """`POST /webhooks/didomi`: check, decode and durably store one Didomi webhook."""
    app = request.app
    config, metrics, state = app[CONFIG], app[METRICS], app[STATE]

    def refuse(
        status: int,
        error: str,
        detail: str,
        outcome: str = "rejected",
        type_: str = "other",
        reason: str | None = None,
    ) -> web.Response:
        """`intake.refuse`, with this route's defaults."""
        return intake_refuse(request, type_, status, error, detail, outcome, reason=reason)

    if not app[AUTH].authenticate(request.headers.get("Authorization")):
        return refuse(401, "unauthorized", "a valid Bearer token is required", "unauthorized")
    if request.content_type.lower() != "application/json":
        return refuse(
            415,
            "unsupported_media_type",
            f"Content-Type must be application/json, not {request.content_type}",
        )
    limit = config.server.max_body_bytes
    try:
        body = await read_capped(request, limit)
    except (ConnectionError, HttpProcessingError) as exc:
        return refuse(400, "bad_request", f"the body could not be read: {exc}")
    if body is None:
        return refuse(413, "too_large", f"the body is over server.max_body_bytes ({limit} bytes)")
    try:
        webhook = decode(body)
    except WebhookError as exc:
        return refuse(400, "bad_request", str(exc))
    subject = webhook.subject
    event_id = subject.id if subject is not None else None
    if not webhook.known:
        metrics.webhook(webhook.type, "ignored")
        log.info(
            "webhook ignored: unknown type", extra={"event_id": event_id, "outcome": "ignored"}
        )
        return json_answer(200, {"status": "ignored"})
    kind = webhook.type
    if state.starting or SPOOL not in app:
        return refuse(503, "not_ready", "the gateway is starting", "unavailable", kind)
    spool = app[SPOOL]
    try:
        person = state.person_of(webhook)
        stored = await spool.put(webhook.dedupe_key(), kind, body, person, decoded=webhook)
    except SpoolFull as exc:
        detail = "the spool is full; retry later"
        return refuse(503, "unavailable", detail, "unavailable", kind, reason=str(exc))
    except SpoolError as exc:
        detail = "the spool cannot store webhooks now; retry later"
        return refuse(503, "unavailable", detail, "unavailable", kind, reason=str(exc))
    # The audit trail of consent: which Didomi event, what became of it. Never the person.
    if not stored:
        metrics.webhook(kind, "duplicate")
        log.info(
            "webhook duplicate", extra={"event_id": event_id, "type": kind, "outcome": "duplicate"}
        )
        return json_answer(200, _DUPLICATE)
    metrics.webhook(kind, "accepted")
    app[ACCEPTED].add(event_id)
    state.wake()
    return json_answer(202, _ACCEPTED)
