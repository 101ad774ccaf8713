"""An intake-only process of `server.intake_processes`: takes webhooks on the shared port.

Started by `app.intake_procs` as `python -m gateway.app.intake_only`, its `Launch` pickled on
stdin. It opens the spool without the gateway's lock (SQLite's WAL lets several processes write
one file; the main process holds the lock and delivers), checks, decodes and stores webhooks as
the main process does, and reports on stdout (`intake_procs.Report`). It stops on SIGTERM or
SIGINT, draining as the main process does, and when its stdin closes: the main process is gone
(if that happens mid-drain, the drain goes on, within the shutdown timeout).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pickle
import signal
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Literal

import aiohttp
import msgspec
from aiohttp import web

from gateway.app.intake_procs import REPORT_S, Launch, Report
from gateway.app.reload import LiveRules
from gateway.app.server import Context, create_app
from gateway.config.settings import Config, secrets_of
from gateway.errors import ConfigError, GatewayError
from gateway.forward.intake import ACCEPTED
from gateway.http.intake import CONFIG, METRICS, RETRY_AFTER_S, SPOOL, STATE, error_answer
from gateway.logs import configure_logging, register_secret
from gateway.metrics import Metrics
from gateway.spool.backend import open_store, take_turns
from gateway.spool.face import Spool
from gateway.spool.sqlite import SpoolDB
from gateway.spool.store import SpoolBase

log = logging.getLogger("gateway.server")

RECOUNT_S = 5.0  # how often the pending count is read from the spool: the main process acks

_SIDE = web.AppKey("gateway.side", aiohttp.ClientSession)
_encode = msgspec.json.Encoder().encode


class Reporter:
    """Writes `Report` lines on stdout, buffered by the loop: a write never blocks intake."""

    def __init__(self, transport: asyncio.WriteTransport) -> None:
        self.transport = transport
        # The rows the spool committed (to Braze, to Didomi), as the spool counts them: a
        # request's wake-up is no count (a Currents batch stores many rows, and wakes once).
        self.stored: Callable[[], tuple[int, int]] = lambda: (0, 0)
        self._due = False

    def committed(self) -> None:
        """Rows were stored: reported once per turn of the loop."""
        if not self._due:
            self._due = True
            asyncio.get_running_loop().call_soon(self._send_stored)

    def _send_stored(self) -> None:
        self._due = False
        self.send(Report(stored=self.stored()))

    def send(self, report: Report) -> None:
        """Write one line, unless the main process has gone."""
        if not self.transport.is_closing():
            self.transport.write(_encode(report) + b"\n")


def counters(metrics: Metrics) -> list[tuple[str, dict[str, str], float]]:
    """Every counter sample of `metrics`, cumulative, as `Report.counters` carries them."""
    # Every process reloads when the main one does (it passes SIGHUP on): the main process's
    # count is the gateway's, one per reload.
    reloads = next(iter(metrics.config_reloads.describe())).name
    out = []
    for family in metrics.registry.collect():
        if family.type != "counter" or family.name == reloads:
            continue
        for sample in family.samples:
            if sample.name.endswith("_total") and sample.value:
                out.append((family.name, dict(sample.labels), sample.value))
    return out


async def _spool_context(app: web.Application) -> AsyncIterator[None]:
    # No SpoolLock: the main process holds it and delivers; this one only adds rows.
    config = app[CONFIG]
    db = await asyncio.to_thread(open_store, config.delivery, config.retention.person_key)
    turns = take_turns(db)
    if isinstance(db, SpoolDB):
        # Its puts shed audit records under disk pressure too: counted, and reported.
        db.on_shed = app[METRICS].audit_shed.inc  # called from the spool thread; thread-safe
    spool = Spool(db, deliver=False)
    app[SPOOL] = spool

    async def recount() -> None:
        # Rows leave as the main process acknowledges them: read the count from the file.
        while True:
            await asyncio.sleep(RECOUNT_S)
            with contextlib.suppress(GatewayError):
                await spool.recount()

    task = asyncio.create_task(recount())
    try:
        yield
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await spool.close()
        if turns is not None:
            turns.close()


def _child_context(live: LiveRules, reporter: Reporter, side: str, stopping: Stopping) -> Context:
    async def context(app: web.Application) -> AsyncIterator[None]:
        stopping.install(asyncio.get_running_loop())
        state, metrics = app[STATE], app[METRICS]
        state.person_of = lambda webhook: live.current().person(webhook)
        state.identity = lambda: live.current().identity
        db = app[SPOOL].db
        if isinstance(db, SpoolBase):
            reporter.stored = lambda: (db.stored_total - db.stored_to_didomi, db.stored_to_didomi)
        state.on_wake = state.on_wake_to_didomi = reporter.committed
        connector = aiohttp.UnixConnector(path=side)
        timeout = aiohttp.ClientTimeout(total=5)
        app[_SIDE] = aiohttp.ClientSession(connector=connector, timeout=timeout)
        loop = asyncio.get_running_loop()
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signal.SIGHUP, live.request_reload)

        async def report() -> None:
            while True:
                await asyncio.sleep(REPORT_S)
                # With the rows stored: those of a request answered 503 woke nobody.
                reporter.send(Report(stored=reporter.stored(), counters=counters(metrics)))

        task = asyncio.create_task(report())
        try:
            yield
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            reporter.send(Report(counters=counters(metrics)))  # the last requests' counts
            await app[_SIDE].close()
            await live.close()

    return context


async def _proxied(request: web.Request) -> web.StreamResponse:
    """`/metrics` and `/readyz` as the main process answers them (it counts every process)."""
    if request.path == "/readyz" and (reason := request.app[STATE].not_ready_reason()):
        return error_answer(503, "not_ready", reason, {"Retry-After": str(RETRY_AFTER_S)})
    accept = {"Accept": request.headers.get("Accept", "*/*")}
    try:
        async with request.app[_SIDE].get(f"http://gateway{request.path}", headers=accept) as resp:
            body = await resp.read()
            kept = ("Content-Type", "Retry-After")  # the body comes decompressed
            headers = {k: resp.headers[k] for k in kept if k in resp.headers}
            return web.Response(status=resp.status, body=body, headers=headers)
    except (aiohttp.ClientError, TimeoutError) as exc:
        detail = f"the gateway's main process does not answer: {exc!r}"
        return error_answer(503, "not_ready", detail, {"Retry-After": str(RETRY_AFTER_S)})


def _read_launch() -> Launch:
    """The `Launch` on stdin: its length (8 bytes, big-endian), then the pickle."""
    # os.read, not sys.stdin: a daemon thread blocked in a buffered read aborts the exit.
    data = b""
    size: int | None = None
    while size is None or len(data) < size:
        if size is None and len(data) >= 8:
            size, data = int.from_bytes(data[:8], "big"), data[8:]
            continue
        chunk = os.read(0, 65536 if size is None else size - len(data))
        if not chunk:
            raise SystemExit("intake process: stdin closed before its launch arrived")
        data += chunk
    return pickle.loads(data)  # type: ignore[no-any-return]  # noqa: S301 - our parent's


class Stopping:
    """Whether this process's shutdown has begun: on SIGTERM or SIGINT, or once stdin closes."""

    def __init__(self) -> None:
        self.began = False

    def signalled(self) -> None:
        """SIGTERM or SIGINT (on the loop): begin the drain, as aiohttp's own handler does."""
        self.began = True
        raise web.GracefulExit()

    def parent_gone(self) -> None:
        """Stdin closed (on the loop): the main process exited or was killed."""
        if self.began:
            # It died mid-drain, after its SIGTERM: a second one would make aiohttp cut this
            # drain short. The drain goes on, bounded by the shutdown timeout as always.
            log.warning("intake process: the main process is gone; finishing the drain")
            return
        os.kill(os.getpid(), signal.SIGTERM)  # stop as the main process would have told us

    def install(self, loop: asyncio.AbstractEventLoop) -> None:
        """Take SIGTERM and SIGINT over from aiohttp's handlers (installed before startup)."""
        with contextlib.suppress(NotImplementedError, RuntimeError):
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.signalled)


def _watch_stdin(loop: asyncio.AbstractEventLoop, stopping: Stopping) -> None:
    """Tell the loop once stdin closes: the main process exited or was killed."""
    with contextlib.suppress(OSError):
        while os.read(0, 65536):
            pass
    with contextlib.suppress(RuntimeError):  # the loop has closed: this process is done
        loop.call_soon_threadsafe(stopping.parent_gone)


def main() -> int:
    """Run one intake-only process until SIGTERM, SIGINT or the end of stdin."""
    started = time.monotonic()
    launch = _read_launch()
    config: Config = launch.config
    fmt: Literal["text", "json"] = "json" if launch.log_format == "json" else "text"
    configure_logging(fmt, launch.log_level)
    for secret in secrets_of(config):
        register_secret(secret)
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    stopping = Stopping()
    threading.Thread(target=_watch_stdin, args=(loop, stopping), name="stdin", daemon=True).start()
    metrics = Metrics()
    try:
        live = LiveRules.load(config, metrics, launch.config_path)
    except ConfigError as exc:
        for problem in exc.problems:
            log.error("intake process %d cannot start: %s", launch.index, problem)
        return 1
    out = os.fdopen(1, "wb", buffering=0, closefd=False)
    transport, _ = loop.run_until_complete(loop.connect_write_pipe(asyncio.Protocol, out))
    reporter = Reporter(transport)
    probes = {"/readyz": _proxied, "/metrics": _proxied}
    app = create_app(
        config,
        metrics=metrics,
        contexts=[_child_context(live, reporter, launch.side, stopping)],
        spool=_spool_context,
        probes=probes,
    )
    app[ACCEPTED].extra = {"intake_process": launch.index}
    server = config.server

    def listening(_banner: str) -> None:
        app[STATE].listening = True
        reporter.send(Report(ready=True))
        log.info(
            "intake process %d ready after %.1f s",
            launch.index,
            time.monotonic() - started,
            extra={"intake_process": launch.index},
        )

    try:
        web.run_app(
            app,
            host=server.host,
            port=server.port,
            reuse_port=True,
            shutdown_timeout=server.shutdown_timeout_s,
            handle_signals=True,
            print=listening,
            access_log=None,
            loop=loop,
        )
    except GatewayError as exc:
        log.error("intake process %d cannot start: %s", launch.index, exc)
        return 1
    except OSError as exc:
        log.error("intake process %d cannot serve: %s", launch.index, exc.strerror or exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
