"""Braze's routes: a webhook step's body and Braze Currents' batches, stored for Didomi.

Both answer as `/webhooks/didomi` does (DESIGN.md section 9): `202` once stored, `200` for a
duplicate or for nothing to change, `4xx` for the sender's mistakes, `503` to be retried (Braze
retries `408`, `429` and `5xx` up to five times within 30 minutes, never another `4xx`). Both
need `[braze_webhooks]`; without it they are not routed at all, so they answer `404`.

A Currents batch is stored event by event, each under its type and id (Braze's samples reuse
an id across types): a `400` makes Braze resend the batch one event at a time and drop what it
refuses again, so a bad event is skipped and counted, never allowed to fail its batch, and an
unknown `Braze-Currents-Version` is read as version 1 and counted, never refused. An event the
gateway does not read is counted and, when it names a person, audited as `ignored` with why.
"""

from __future__ import annotations

import asyncio
import logging
import time

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from gateway.config.settings import Config
from gateway.errors import SpoolError, SpoolFull
from gateway.http.auth import Authenticator, bearer_tokens
from gateway.http.intake import CONFIG, METRICS, SPOOL, STATE, json_answer, read_capped, refuse
from gateway.reverse.braze_webhooks import (
    CURRENTS_VERSION,
    CURRENTS_VERSION_HEADER,
    BrazeChange,
    BrazeWebhookError,
    Skipped,
    decode_step,
    split_currents,
    step_dedupe_key,
)
from gateway.spool.audit import Record

log = logging.getLogger("gateway.server")

STEP_PATH = "/webhooks/braze"
CURRENTS_PATH = "/webhooks/braze/currents"
STEP = "braze.step"
CURRENTS = "braze.currents"
_AUTH = web.AppKey("gateway.braze_authenticator", Authenticator)


def add_routes(app: web.Application, config: Config) -> None:
    """Route Braze's two shapes, when `[braze_webhooks]` says which tokens Braze sends."""
    if config.braze_webhooks is None:
        return
    app[_AUTH] = bearer_tokens(config.braze_webhooks.tokens)
    app.router.add_post(STEP_PATH, receive_step)
    app.router.add_post(CURRENTS_PATH, receive_currents)


def _refuse(
    request: web.Request, kind: str, status: int, error: str, detail: str, outcome: str
) -> web.Response:
    return refuse(request, kind, status, error, detail, outcome, sender="Braze")


async def _body(request: web.Request, kind: str) -> bytes | web.Response:
    """The body of an authenticated JSON request, or the refusal to answer instead."""
    app = request.app
    if not app[_AUTH].authenticate(request.headers.get("Authorization")):
        detail = "a Bearer token of [braze_webhooks].tokens is required"
        return _refuse(request, kind, 401, "unauthorized", detail, "unauthorized")
    if request.content_type.lower() != "application/json":
        detail = f"Content-Type must be application/json, not {request.content_type}"
        return _refuse(request, kind, 415, "unsupported_media_type", detail, "rejected")
    limit = app[CONFIG].server.max_body_bytes
    try:
        body = await read_capped(request, limit)
    except (ConnectionError, HttpProcessingError) as exc:
        detail = f"the body could not be read: {exc}"
        return _refuse(request, kind, 400, "bad_request", detail, "rejected")
    if body is None:
        detail = f"the body is over server.max_body_bytes ({limit} bytes)"
        return _refuse(request, kind, 413, "too_large", detail, "rejected")
    if app[STATE].starting or SPOOL not in app:
        return _refuse(request, kind, 503, "not_ready", "the gateway is starting", "unavailable")
    hooks = app[CONFIG].braze_webhooks
    assert hooks is not None  # the routes exist only with the table
    if app[SPOOL].pending_of("to_didomi") >= hooks.max_pending:
        # Braze retries a 503; Didomi's webhooks keep the rest of the spool.
        detail = f"{hooks.max_pending} Braze reports wait for Didomi (braze_webhooks.max_pending)"
        return _refuse(request, kind, 503, "unavailable", detail, "unavailable")
    return body


def _person(request: web.Request, changes: list[BrazeChange]) -> str | None:
    """Who a report is about, as the rules name people (it picks the partition)."""
    email = request.app[STATE].identity() == "email"
    for change in changes:
        name = change.email if email else change.external_id
        if name:
            return name
    return None


async def receive_step(request: web.Request) -> web.Response:
    """`POST /webhooks/braze`: one webhook step's body, the person's states at send time."""
    body = await _body(request, STEP)
    if isinstance(body, web.Response):
        return body
    try:
        changes = decode_step(body)
    except BrazeWebhookError as exc:
        return _refuse(request, STEP, 400, "bad_request", str(exc), "rejected")
    if not changes:  # every state empty: Liquid knew none of them
        request.app[METRICS].webhook(STEP, "ignored")
        return json_answer(200, {"status": "ignored"})
    try:
        person = _person(request, changes)
        stored = await request.app[SPOOL].put(step_dedupe_key(changes), STEP, body, person)
    except SpoolError as exc:
        return _unavailable(request, STEP, exc)
    return _stored(request, STEP, stored)


async def receive_currents(request: web.Request) -> web.Response:
    """`POST /webhooks/braze/currents`: a Currents batch, each subscription event stored."""
    body = await _body(request, CURRENTS)
    if isinstance(body, web.Response):
        return body
    version = request.headers.get(CURRENTS_VERSION_HEADER)
    metrics = request.app[METRICS]
    # Another version is decoded all the same, never refused: Braze would resend the batch
    # one event at a time and drop every event refused again. Counted, so it is noticed.
    metrics.currents_version(version)
    if version is not None and version.strip() != CURRENTS_VERSION:
        log.warning(
            "reading a Currents batch of an unknown %s as version %s",
            CURRENTS_VERSION_HEADER,
            CURRENTS_VERSION,
        )
    try:
        batch = split_currents(body)
    except BrazeWebhookError as exc:
        return _refuse(request, CURRENTS, 400, "bad_request", str(exc), "rejected")
    if batch.invalid:
        log.warning("skipped %d Currents event(s) that do not decode", batch.invalid)
    spool = request.app[SPOOL]
    # Concurrent puts share one commit; the key (type and id, Braze's) dedupes its retries.
    results = await asyncio.gather(
        *(
            spool.put(key, CURRENTS, raw, _person(request, changes))
            for key, raw, changes in batch.events
        ),
        return_exceptions=True,
    )
    failed = [r for r in results if isinstance(r, BaseException)]
    if failed:
        # Braze resends the whole batch; what was stored now is a duplicate then.
        error = failed[0]
        if not isinstance(error, SpoolError):
            raise error
        return _unavailable(request, CURRENTS, error)
    try:
        await _audit_skipped(request, batch.skipped)
    except SpoolError as exc:
        return _unavailable(request, CURRENTS, exc)
    stored = sum(1 for r in results if r is True)
    duplicates = len(results) - stored
    for _ in range(stored):
        metrics.webhook(CURRENTS, "accepted")
    for _ in range(duplicates):
        metrics.webhook(CURRENTS, "duplicate")
    for _ in range(batch.ignored + batch.invalid):
        metrics.webhook(CURRENTS, "ignored")
    _publish_pending(request)
    if stored:
        request.app[STATE].wake("to_didomi")
    counts = {
        "stored": stored,
        "duplicates": duplicates,
        "ignored": batch.ignored,
        "invalid": batch.invalid,
    }
    log.info("Currents batch stored", extra={"outcome": "accepted", **counts})
    return json_answer(202 if stored else 200, {"status": "accepted" if stored else "ok", **counts})


async def _audit_skipped(request: web.Request, skipped: list[Skipped]) -> None:
    """Say in the audit trail, under each person named, which events were not read and why."""
    email = request.app[STATE].identity() == "email"
    now = time.time()
    records = [
        Record(
            person,
            "to_didomi",
            "ignored",
            now,
            event_id=event.event_id,
            event_type=event.event_type,
            detail=event.reason,
        )
        for event in skipped
        if (person := event.email if email else event.external_id)
    ]
    if records:
        await request.app[SPOOL].write_audit(records, "to_didomi")


def _stored(request: web.Request, kind: str, stored: bool) -> web.Response:
    outcome = "accepted" if stored else "duplicate"
    request.app[METRICS].webhook(kind, outcome)
    log.info("Braze webhook %s", outcome, extra={"type": kind, "outcome": outcome})
    _publish_pending(request)
    if not stored:
        return json_answer(200, {"status": "duplicate"})
    request.app[STATE].wake("to_didomi")
    return json_answer(202, {"status": "accepted"})


def _publish_pending(request: web.Request) -> None:
    pending = request.app[SPOOL].pending_of("to_didomi")
    request.app[METRICS].flow("to_didomi").pending.set(pending)


def _unavailable(request: web.Request, kind: str, exc: SpoolError) -> web.Response:
    detail = (
        "the spool is full; retry later"
        if isinstance(exc, SpoolFull)
        else "the spool cannot store webhooks now; retry later"
    )
    log.warning("cannot store a Braze webhook: %s", exc)
    return _refuse(request, kind, 503, "unavailable", detail, "unavailable")
