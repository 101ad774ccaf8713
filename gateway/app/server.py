"""The HTTP surface: webhook intake into the spool, the token endpoint, health, readiness, metrics.

`create_app` builds the aiohttp application; every resource lives in `cleanup_ctx`, in this
order: the spool (and its lock: one gateway per spool file), then the `contexts` a caller adds
(the dispatcher, the mapping reloader), then a last one that marks the gateway ready. Shutdown
runs them backwards: readiness goes to 503 first, in-flight requests finish, the added contexts
stop, and the spool closes last, so every `202` ever answered names a committed row.

A webhook passes these checks in order (DESIGN.md section 8), and each answer is counted in
`gateway_webhooks_received_total{type,outcome}`: 403 (`server.allow_from`), 401, 415, 413 (before
and while reading), 400, `200 ignored` (unknown type), `503` while starting, then the spool:
`202 accepted`, `200 duplicate`, or `503` when it cannot store.

What delivers lives in `app.wiring` (`delivery`), the intake-only processes of
`server.intake_processes` in `app.intake_procs`; `serve` adds both.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
import sys
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Literal

from aiohttp import web
from aiohttp.typedefs import Handler

from gateway.app import heap
from gateway.app.intake_procs import intake_processes
from gateway.app.reload import LiveRules
from gateway.app.wiring import BUDGET, DISPATCHER, REPLICAS, RULES, WRITEBACK, Context, delivery
from gateway.config.settings import (
    Config,
    DeliveryConfig,
    is_postgresql,
    lease_of,
    request_bound_s,
    secrets_of,
)
from gateway.errors import ConfigError, SpoolError
from gateway.forward.intake import ACCEPTED, AUTH, WEBHOOK_PATH, AcceptedLog, receive_webhook
from gateway.http.auth import TokenIssuer, authenticator_for, token_endpoint
from gateway.http.front import front
from gateway.http.intake import (
    CONFIG,
    METRICS,
    SPOOL,
    STATE,
    State,
)
from gateway.http.probes import healthz, readyz
from gateway.logs import configure_logging, register_secret
from gateway.metrics import Metrics, metrics_handler
from gateway.reverse import intake as braze_intake
from gateway.spool.backend import open_store, take_turns
from gateway.spool.face import Spool
from gateway.spool.lock import SpoolLock
from gateway.spool.postgres import PgSpoolDB, redact
from gateway.spool.replicas import Budget, Replicas, replica_name
from gateway.spool.sqlite import SpoolDB
from gateway.spool.store import Store

__all__ = [
    "CONFIG",
    "DISPATCHER",
    "METRICS",
    "RULES",
    "SPOOL",
    "STATE",
    "WRITEBACK",
    "Context",
    "State",
    "create_app",
    "delivery",
    "serve",
]

log = logging.getLogger("gateway.server")

OAUTH_PATH = "/oauth/token"
# Paths only Didomi calls; `server.allow_from` guards these, not the probes or /metrics.
GUARDED_PATHS = frozenset({WEBHOOK_PATH, OAUTH_PATH})
WRITE_ERROR_WINDOW_S = 10.0  # how long a failed spool commit keeps /readyz at 503


def _publish_ready(app: web.Application) -> None:
    app[METRICS].ready.set(0 if app[STATE].not_ready_reason() else 1)


# ---------------------------------------------------------------------------
# Life cycle


def _open_spool(delivery: DeliveryConfig, person_key: str = "") -> tuple[SpoolLock | None, Store]:
    if is_postgresql(delivery.spool):
        # Replicas share the database by design; the partition leases keep them apart.
        return None, open_store(delivery, person_key)
    lock = SpoolLock(delivery.spool)
    lock.acquire()  # before the file is even opened: it belongs to another gateway otherwise
    try:
        db = open_store(delivery, person_key)
    except BaseException:
        lock.release()
        raise
    return lock, db


async def _spool_context(app: web.Application) -> AsyncIterator[None]:
    # The lock is taken here, with the spool it guards, rather than in serve(): every way of
    # running the app holds it for exactly as long as the spool is open, and aiohttp runs
    # this before it binds the port, so a refused second gateway never listens.
    config = app[CONFIG]
    lock, db = await asyncio.to_thread(_open_spool, config.delivery, config.retention.person_key)
    turns = take_turns(db)
    spool = Spool(db)
    app[SPOOL] = spool
    if isinstance(db, SpoolDB):
        db.on_shed = app[METRICS].audit_shed.inc  # called from the spool thread; thread-safe
    for direction in ("to_braze", "to_didomi"):
        app[METRICS].flow(direction).pending.set(spool.pending_of(direction))
    replicas: Replicas | None = None
    if isinstance(db, PgSpoolDB):
        name = replica_name(config.delivery.replica)
        replicas = Replicas(
            db, name, lease_s=lease_of(config), request_bound_s=request_bound_s(config)
        )
        app[REPLICAS] = replicas
        app[BUDGET] = Budget(db.url)
        await replicas.start()
        log.info("replica %s holds %d partition(s)", name, len(replicas.held))
    try:
        yield
    finally:
        try:
            if replicas is not None:
                await replicas.stop()  # after delivery stopped: the others take over at once
                await app[BUDGET].close()
            await spool.close()  # queued writes commit first
            if turns is not None:
                turns.close()
        finally:
            if lock is not None:
                lock.release()  # once the file is closed: no second gateway writes beside it
    grouping = {
        "commits": spool.commits,
        "rows_committed": spool.rows_committed,
        "largest_commit": spool.largest_commit,
    }
    log.info("spool closed", extra={"pending": spool.pending, **grouping})


async def _ready_context(app: web.Application) -> AsyncIterator[None]:
    # Ready to take webhooks; `serve` logs `ready` only once the port is bound as well.
    app[STATE].starting = False
    _publish_ready(app)
    with heap.settled():  # everything started: freeze it, collect the young less often
        yield
        await _drain(app)


async def _drain(app: web.Application) -> None:
    """Readiness to 503 at the first sign of shutdown, before in-flight requests are awaited."""
    state = app[STATE]
    if not state.draining:
        state.draining = True
        state.drain_started = time.monotonic()
        app[METRICS].ready.set(0)
        for hook in state.on_drain:
            hook()
        if state.listening:  # a port that could not be bound served nothing to drain
            log.info("draining: finishing in-flight requests")


def _spool_room(app: web.Application) -> str | None:
    spool = app.get(SPOOL)
    if spool is None:
        return "the spool is not open"
    if spool.pending >= spool.max_pending:
        return f"the spool is full ({spool.pending} updates pending)"
    # Time-bounded: while unready no webhook may come to prove the disk is back. A later commit
    # of anything (an acknowledgement, once space is freed) proves it as well.
    failed = spool.write_error
    if (
        failed
        and failed[0] > spool.committed_at
        and time.monotonic() - failed[0] < WRITE_ERROR_WINDOW_S
    ):
        return f"the spool could not be written: {failed[1]}"
    # Not time-bounded: the spool itself clears it once acknowledgements or a put find room.
    return spool.low_on_disk


def create_app(
    config: Config,
    *,
    metrics: Metrics | None = None,
    contexts: Sequence[Context] = (),
    spool: Context | None = None,
    probes: Mapping[str, Handler] | None = None,
) -> web.Application:
    """The gateway's aiohttp application; `contexts` start after the spool and stop before it.

    An intake-only process (`app.intake_only`) gives its own `spool` context and the handlers of
    `/readyz` and `/metrics` in `probes`.
    """
    metrics = metrics if metrics is not None else Metrics()
    networks = tuple(ipaddress.ip_network(n, strict=False) for n in config.server.allow_from)
    app = web.Application(
        middlewares=[front(metrics, networks, GUARDED_PATHS, WEBHOOK_PATH)],
        client_max_size=config.server.max_body_bytes,
    )
    app[CONFIG] = config
    app[METRICS] = metrics

    def publish_pending() -> None:
        # Once per intake commit, not per webhook: the dispatcher sets it as it acknowledges.
        if (spool := app.get(SPOOL)) is not None:
            metrics.flow("to_braze").pending.set(spool.pending_of("to_braze"))

    app[ACCEPTED] = AcceptedLog(after=publish_pending)
    state = State()
    state.ready_checks.append(functools.partial(_spool_room, app))
    app[STATE] = state
    metrics.ready.set(0)

    issuer = None
    if config.auth.mode == "oauth2":
        auth = config.auth
        issuer = TokenIssuer(auth.client_id, auth.client_secret, auth.token_ttl_s)
        app.router.add_post(OAUTH_PATH, functools.partial(token_endpoint, issuer))
    app[AUTH] = authenticator_for(config.auth, issuer=issuer)

    app.router.add_post(WEBHOOK_PATH, receive_webhook)
    braze_intake.add_routes(app, config)
    app.router.add_get("/healthz", healthz)
    if probes is None:
        probes = {"/readyz": readyz, "/metrics": metrics_handler(metrics)}
    for path, handler in probes.items():
        app.router.add_get(path, handler)

    app.cleanup_ctx.append(spool if spool is not None else _spool_context)
    app.cleanup_ctx.extend(contexts)
    app.cleanup_ctx.append(_ready_context)
    app.on_shutdown.append(_drain)
    return app


def serve(
    config: Config,
    *,
    config_path: str | None = None,
    log_format: str = "text",
    log_level: str = "INFO",
) -> int:
    """Run the gateway until SIGTERM or SIGINT, then drain, flush and return 0."""
    fmt: Literal["text", "json"] = "json" if log_format == "json" else "text"
    try:
        if log_format != fmt:
            raise ValueError(f"unknown log format {log_format!r}; use 'text' or 'json'")
        configure_logging(fmt, log_level)
    except ValueError as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        return 1
    for secret in secrets_of(config):
        register_secret(secret)
    metrics = Metrics()
    try:
        live = LiveRules.load(config, metrics, config_path)
    except ConfigError as exc:
        for problem in exc.problems:
            log.error("cannot start: %s", problem)
        return 1
    server = config.server
    # The intake-only processes start once delivery runs, and stop before it does.
    launch = {
        "config": config,
        "config_path": str(config_path) if config_path is not None else None,
        "log_format": fmt,
        "log_level": log_level,
    }
    contexts = [delivery(live), intake_processes(launch, live)]
    app = create_app(config, metrics=metrics, contexts=contexts)
    log.info(
        "gateway starting on http://%s:%d (auth %s, spool %s)",
        server.host,
        server.port,
        config.auth.mode,
        redact(config.delivery.spool),
        extra={"host": server.host, "port": server.port, "auth_mode": config.auth.mode},
    )

    def listening(_banner: str) -> None:
        # run_app prints its banner once every site listens: the start's last step. `ready`
        # before it would be a lie when the port is taken.
        app[STATE].listening = True
        log.info("ready")

    try:
        web.run_app(
            app,
            host=server.host,
            port=server.port,
            shutdown_timeout=server.shutdown_timeout_s,
            reuse_port=server.intake_processes > 1,
            handle_signals=True,
            print=listening,
            access_log=None,
        )
    except SpoolError as exc:  # most often: another gateway owns the spool file
        log.error("cannot start: %s", exc)
        return 1
    except OSError as exc:  # most often: the port is taken, or the host is not ours
        log.error("cannot serve on %s:%d: %s", server.host, server.port, exc.strerror or exc)
        return 1
    log.info("gateway stopped")
    return 0
