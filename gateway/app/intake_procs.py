"""`server.intake_processes`: intake-only processes beside this one, on the same port.

One process can use one core (the GIL keeps its event loop and its spool thread to one). With
`intake_processes = N`, the gateway starts N-1 more processes (`app.intake_only`) that bind the
same port with SO_REUSEPORT, so the kernel spreads connections over all N. They check, decode
and store webhooks (`202` after the commit, as here) and run no delivery: this process's
dispatcher and writeback deliver every row, reading the spool for theirs.

Each child reports on its stdout, one JSON line at a time: how many rows it stored (cumulative:
this process adds them to its pending count and wakes delivery at once) and its counters
(cumulative: added here, so `/metrics` counts every process's webhooks and requests; histograms
and gauges are this process's own, so request durations are timed here only). A child
proxies `/metrics` and `/readyz` to this process over an abstract Unix socket, whichever process the
kernel gave the connection to. A child that exits is logged, named in `/readyz` (degraded) and
started again; the children get SIGTERM when shutdown begins and drain alongside this process,
which waits for them before delivery stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pickle
import secrets
import signal
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import msgspec
from aiohttp import web
from prometheus_client import Counter

from gateway.app.reload import LiveRules
from gateway.app.wiring import Context
from gateway.config.settings import Config
from gateway.http.intake import CONFIG, METRICS, SPOOL, STATE
from gateway.http.probes import readyz
from gateway.metrics import Metrics, metrics_handler

log = logging.getLogger("gateway.server")

RESTART_MIN_S = 1.0  # a child that exits is started again after this, doubling to the max
RESTART_MAX_S = 30.0
REPORT_S = 1.0  # how often a child sends its counters (its stored rows go at each commit)


@dataclass(frozen=True)
class Launch:
    """What a child needs to start: sent pickled on its stdin (after its length, 8 bytes
    big-endian), which then stays open."""

    config: Config  # a frozen Struct: picklable
    config_path: str | None
    log_format: str
    log_level: str
    index: int
    side: str  # the Unix socket this process answers /metrics and /readyz on for the children


class Report(msgspec.Struct, omit_defaults=True):
    """One line a child writes on its stdout; every figure is cumulative since it started."""

    ready: bool = False
    stored: tuple[int, int] | None = None  # rows stored going to Braze, to Didomi
    counters: list[tuple[str, dict[str, str], float]] | None = None


_decode_report = msgspec.json.Decoder(Report).decode


class Child:
    """One intake-only process, as this process follows it."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.proc: asyncio.subprocess.Process | None = None
        self.down: str | None = "starting"  # why it takes no webhooks now, or None
        # A reload asked for while it started: SIGHUP before its handler would kill it (the
        # default action), so it is sent once the child says it is ready.
        self.reload_due = False
        self.stored = (0, 0)
        self.counted: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}


class IntakeProcesses:
    """Starts, follows, restarts and stops the children of `server.intake_processes`."""

    def __init__(self, app: web.Application, launch: dict[str, Any], live: LiveRules) -> None:
        self.app = app
        self.config = app[CONFIG]
        self.metrics: Metrics = app[METRICS]
        self.launch = launch
        self.live = live
        self.children = [Child(i) for i in range(1, self.config.server.intake_processes)]
        self.stopping = False
        self._stopped = asyncio.Event()
        self._terminated: set[int] = set()  # the children sent SIGTERM
        self._tasks: list[asyncio.Task[None]] = []
        # Linux's abstract namespace: no file to leave behind when this process is killed.
        self.side = f"\0gateway-intake-{os.getpid()}-{secrets.token_hex(8)}"
        self._runner: web.AppRunner | None = None
        self._counters = {
            next(iter(c.describe())).name: c
            for c in vars(self.metrics).values()
            if isinstance(c, Counter)
        }

    def degraded_reason(self) -> str | None:
        """Which intake processes are down: this one still takes webhooks, so it is ready."""
        down = [f"intake process {c.index} {c.down}" for c in self.children if c.down]
        return "; ".join(down) if down else None

    async def start(self) -> None:
        """Serve the children's probes, then start every child."""
        side = web.Application()
        side[STATE], side[METRICS] = self.app[STATE], self.metrics
        side.router.add_get("/readyz", readyz)
        side.router.add_get("/metrics", metrics_handler(self.metrics))
        self._runner = web.AppRunner(side, access_log=None)
        await self._runner.setup()
        await web.UnixSite(self._runner, self.side).start()
        self._tasks = [asyncio.create_task(self._keep(child)) for child in self.children]

    def terminate(self) -> None:
        """Shutdown has begun: SIGTERM every child running, so they drain alongside this
        process (within the same `shutdown_timeout_s`), and start none again."""
        self.stopping = True
        self._stopped.set()
        for child in self.children:
            if child.proc is not None:
                self._terminate(child.proc)

    def _terminate(self, proc: asyncio.subprocess.Process) -> None:
        # Once per process: a second SIGTERM would cut its drain short (aiohttp exits).
        if proc.returncode is None and proc.pid not in self._terminated:
            self._terminated.add(proc.pid)
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)

    async def stop(self, grace_s: float) -> None:
        """SIGTERM every child not yet told, wait for them to drain (`grace_s` at most), then
        SIGKILL."""
        self.terminate()
        if self._tasks:
            # Not `wait_for`: cancelled, a follower would leave its child unreaped, its last
            # reports unread; killed, the child closes its stdout and the follower returns.
            _, late = await asyncio.wait(self._tasks, timeout=grace_s + 1.0)
            if late:
                # Every child running now: one started while the shutdown began is here too.
                for child in self.children:
                    proc = child.proc
                    if proc is not None and proc.returncode is None:
                        log.error("intake process %d did not stop in time; killing it", child.index)
                        with contextlib.suppress(ProcessLookupError):
                            proc.kill()
                _, late = await asyncio.wait(late, timeout=5.0)
                for task in late:
                    task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._runner is not None:
            await self._runner.cleanup()

    async def _keep(self, child: Child) -> None:
        """Run one child until shutdown, starting it again whenever it exits before."""
        pause = RESTART_MIN_S
        while not self.stopping:
            started = time.monotonic()
            try:
                code = await self._run(child)
            except Exception:  # whatever went wrong, this loop is all that restarts it
                log.exception("intake process %d failed", child.index)
                code = None
            if time.monotonic() - started > RESTART_MAX_S:
                pause = RESTART_MIN_S  # it ran a while: a new failure, not the same one again
            if self.stopping:
                log.info("intake process %d stopped", child.index, extra={"exit_code": code})
                return
            child.down = f"exited with code {code}; starting it again"
            log.error(
                "intake process %d exited with code %s; starting it again in %.0f s",
                child.index,
                code,
                pause,
                extra={"exit_code": code},
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopped.wait(), timeout=pause)
            pause = min(RESTART_MAX_S, pause * 2)

    async def _run(self, child: Child) -> int | None:
        # The config in force now: keys reloaded since `serve()` (mappings.dir, didomi.*) would
        # be stale in this child until the next reload. The files may say more (keys that need
        # a restart): the running config wins, as it does in this process.
        launch = Launch(
            index=child.index, side=self.side, **{**self.launch, "config": self.live.config}
        )
        child.stored, child.counted = (0, 0), {}
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "gateway.app.intake_only",
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                env={**os.environ},
                limit=2**20,  # a line of counters is a few kB
            )
        except OSError as exc:
            log.error("cannot start intake process %d: %s", child.index, exc)
            return None
        child.proc = proc
        assert proc.stdin is not None
        if self.stopping:
            # Shutdown began while it started: `terminate` could not see it yet. It has served
            # nothing: stopped at once, its launch never sent.
            self._terminate(proc)
            code = await proc.wait()
            proc.stdin.close()
            return code
        assert proc.stdout is not None
        # Kept open: the child stops when it reads EOF there, so it never outlives this process.
        try:
            data = pickle.dumps(launch)
            proc.stdin.write(len(data).to_bytes(8, "big") + data)
            await proc.stdin.drain()
            while line := await proc.stdout.readline():
                try:
                    self._apply(child, _decode_report(line))
                except msgspec.DecodeError:
                    log.warning("intake process %d wrote an unreadable line", child.index)
        except (OSError, ValueError) as exc:
            # A broken pipe, or a line over the limit (ValueError): its reports can no longer
            # be followed, so its stored rows would go uncounted. It is dead to us: stopped
            # (it drains as on SIGTERM, within the shutdown timeout) and started again.
            child.down = f"its pipe failed ({exc!r}); starting it again"
            log.error("intake process %d: its pipe failed: %r; stopping it", child.index, exc)
            await self._put_down(child, proc)
        except Exception:
            # Anything else (a bug here): it cannot be followed either, and left running it
            # would serve unwatched beside the one `_keep` starts in its place. Stopped (it
            # drains as on SIGTERM), its reports no longer read.
            child.down = "following it failed; starting it again"
            log.exception("intake process %d: following it failed; stopping it", child.index)
            self._terminate(proc)
            try:
                timeout = self.config.server.shutdown_timeout_s + 1
                await asyncio.wait_for(_discard(proc.stdout), timeout=timeout)
            except TimeoutError:
                log.error("intake process %d did not stop in time; killing it", child.index)
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
        code = await proc.wait()
        proc.stdin.close()
        return code

    async def _put_down(self, child: Child, proc: asyncio.subprocess.Process) -> None:
        """SIGTERM a child whose pipe failed, then SIGKILL once the shutdown timeout is up."""
        if proc.returncode is None and proc.pid not in self._terminated:
            self._terminated.add(proc.pid)
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        assert proc.stdout is not None
        try:
            timeout = self.config.server.shutdown_timeout_s + 1
            await asyncio.wait_for(self._read_rest(child, proc.stdout), timeout=timeout)
        except TimeoutError:
            log.error("intake process %d did not stop in time; killing it", child.index)
            with contextlib.suppress(ProcessLookupError):
                proc.kill()

    async def _read_rest(self, child: Child, stdout: asyncio.StreamReader) -> None:
        """Count what a child stopping still reports (its last rows), until it exits."""
        while True:
            try:
                line = await stdout.readline()
            except ValueError:
                continue  # over the limit: dropped, with what the reader buffered of it
            if not line:
                return
            with contextlib.suppress(msgspec.DecodeError):
                # Not `ready`: it is going down, and must stay named in /readyz.
                report = msgspec.structs.replace(_decode_report(line), ready=False)
                self._apply(child, report)

    def reload(self) -> None:
        """Pass a reload on: SIGHUP to every child ready, and to the others once they are."""
        for child in self.children:
            proc = child.proc
            if child.down is None and proc is not None and proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGHUP)
            else:
                child.reload_due = True

    def _apply(self, child: Child, report: Report) -> None:
        if report.ready:
            child.down = None
            if child.reload_due and child.proc is not None:
                child.reload_due = False
                with contextlib.suppress(ProcessLookupError):
                    child.proc.send_signal(signal.SIGHUP)
            log.info(
                "intake process %d ready", child.index, extra={"pid": child.proc and child.proc.pid}
            )
        if report.stored is not None:
            to_braze = report.stored[0] - child.stored[0]
            to_didomi = report.stored[1] - child.stored[1]
            child.stored = report.stored
            spool = self.app.get(SPOOL)
            if spool is not None and spool.handoff is not None:
                # SQLite: this process counts every row; PostgreSQL recounts every few seconds.
                spool.stored_elsewhere(to_braze, to_didomi)
            state = self.app[STATE]
            if to_braze:
                state.wake()
            if to_didomi:
                state.wake("to_didomi")
        for name, labels, value in report.counters or ():
            key = (name, tuple(sorted(labels.items())))
            delta = value - child.counted.get(key, 0.0)
            child.counted[key] = value
            counter = self._counters.get(name)
            if counter is not None and delta > 0:
                (counter.labels(**labels) if labels else counter).inc(delta)


async def _discard(stdout: asyncio.StreamReader) -> None:
    """Read a child's stdout to its end, unread: its pipe then closes with it."""
    while await stdout.read(2**16):
        pass


def intake_processes(launch: dict[str, Any], live: LiveRules) -> Context:
    """The context that runs the children of `server.intake_processes` (after delivery)."""

    async def context(app: web.Application) -> AsyncIterator[None]:
        config = app[CONFIG]
        if config.server.intake_processes <= 1:
            yield
            return
        procs = IntakeProcesses(app, launch, live)
        spool = app[SPOOL]
        if spool.handoff is not None:
            spool.handoff.shared = True  # their rows are read from the file
        state = app[STATE]
        state.degraded_checks.append(procs.degraded_reason)
        state.on_drain.append(procs.terminate)
        await procs.start()

        def follow(_new: object) -> None:
            # Their rules name the person (the partition on PostgreSQL): reloaded with ours.
            procs.reload()

        live.listeners.append(follow)
        log.info(
            "intake in %d processes on port %d",
            config.server.intake_processes,
            config.server.port,
        )
        try:
            yield
        finally:
            live.listeners.remove(follow)
            # They began draining with this process (`terminate`): what is left of its time.
            grace = config.server.shutdown_timeout_s
            if state.drain_started is not None:
                grace -= time.monotonic() - state.drain_started
            await procs.stop(max(0.0, grace))

    return context
