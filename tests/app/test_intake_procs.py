"""`server.intake_processes`: a real `gateway run` taking webhooks in two processes on one port."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import pickle
import shutil
import signal
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from gateway.app import intake_only, intake_procs
from gateway.app.intake_procs import REPORT_S
from gateway.app.reload import LiveRules
from gateway.config.settings import load_config
from gateway.http.intake import CONFIG, METRICS, SPOOL, STATE, State
from gateway.metrics import Metrics
from gateway.spool.audit import Record
from gateway.testing.braze import FakeBraze
from tests.conftest import (
    DIDOMI_API_KEY,
    DIDOMI_API_SECRET,
    DIDOMI_ORG,
    Stoppable,
    build_config,
    choice,
    free_port,
    write_config,
)
from tests.system.test_bidirectional import BRAZE_TOKEN, CURRENTS, currents, global_change
from tests.system.test_reliability import STATES, GatewayProcess, at, eventually

SINGLES = 120  # persons with one choice each: each must reach Braze exactly once
ORDERED = 30  # persons with CHOICES choices each, sent one after the other
CHOICES = 4


def records(gw: GatewayProcess) -> list[dict[str, Any]]:
    return [json.loads(line) for line in gw.log().splitlines() if line.startswith("{")]


def objects_by_person(fake: FakeBraze) -> dict[str, list[str]]:
    """Each person's `email_subscribe` states in the order the fake Braze took them."""
    states: dict[str, list[str]] = defaultdict(list)
    for request in fake.requests:
        if request.path == "/users/track" and request.status == 201:
            for obj in request.body.get("attributes", []):
                if "email_subscribe" in obj:
                    states[obj["external_id"]].append(obj["email_subscribe"])
    return states


async def _equals(value: Any, expected: float) -> bool:
    return bool(await value == expected)


@pytest.mark.slow
async def test_two_intake_processes_on_one_port_deliver_each_webhook_once_in_order(
    tmp_path: Path,
    spool_url: str,
    secrets_env: dict[str, str],
    processes: list[Stoppable],
    fake: FakeBraze,
    auth_headers: dict[str, str],
) -> None:
    """With `intake_processes = 2`, webhooks posted on new connections are taken by both
    processes, each reaches the fake Braze exactly once, each person's choices arrive in the
    order sent, `/metrics` from either process counts them all, and SIGTERM stops both (exit 0)."""
    port = free_port()
    write_config(
        tmp_path,
        server={"port": port, "intake_processes": 2, "shutdown_timeout_s": 5},
        braze={"server": fake.url, "flush_interval_ms": 10},
        delivery={"spool": spool_url, "retry_initial_ms": 20, "retry_max_ms": 200},
    )
    gw = GatewayProcess(tmp_path, port, secrets_env)
    processes.append(gw)
    await gw.start(timeout=60)

    async def both_ready() -> bool:
        return any(r.get("msg", "").startswith("intake process 1 ready") for r in records(gw))

    await eventually(both_ready, 30, "the second intake process to be ready")
    # A new connection per request: the kernel spreads connections, not requests.
    connector = aiohttp.TCPConnector(force_close=True)
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def post(body: bytes) -> int:
            url = f"{gw.base}/webhooks/didomi"
            async with session.post(url, data=body, headers=auth_headers) as resp:
                return resp.status

        async def single(n: int) -> int:
            return await post(choice(f"single-{n}", n % 2 == 0, at(n % 600)))

        async def ordered(n: int) -> list[int]:
            # Each choice once the one before is stored, each newer: the last one must win.
            return [
                await post(choice(f"ordered-{n}", k % 2 == 0, at(10 * k + 1), event_id=f"o{n}-{k}"))
                for k in range(CHOICES)
            ]

        singles = asyncio.gather(*(single(n) for n in range(SINGLES)))
        chains = asyncio.gather(*(ordered(n) for n in range(ORDERED)))
        assert await singles == [202] * SINGLES
        assert await chains == [[202] * CHOICES] * ORDERED

    def taken() -> dict[int, int]:
        # Written on the loop's next turn after the answers: a moment after the last 202.
        by_process: dict[int, int] = defaultdict(int)
        for record in records(gw):
            if record.get("msg") == "webhooks accepted":
                by_process[record.get("intake_process", 0)] += record["count"]
        return by_process

    total = SINGLES + ORDERED * CHOICES
    await eventually(lambda: _true(sum(taken().values()) == total), 10, "every accepted line")
    assert sum(taken().values()) == total
    assert taken()[0] > 0
    assert taken()[1] > 0, "the second process took no webhook: nothing was spread"

    async def delivered() -> bool:
        states = objects_by_person(fake)
        return all(len(states[f"single-{n}"]) >= 1 for n in range(SINGLES)) and all(
            states[f"ordered-{n}"][-1:] == [STATES[(CHOICES - 1) % 2 == 0]] for n in range(ORDERED)
        )

    await eventually(delivered, 30, "every person to reach the fake Braze")
    states = objects_by_person(fake)
    for n in range(SINGLES):
        assert states[f"single-{n}"] == [STATES[n % 2 == 0]], f"single-{n}"
    sent = [STATES[k % 2 == 0] for k in range(CHOICES)]
    for n in range(ORDERED):
        got = states[f"ordered-{n}"]
        # Coalescing may leave some out; what arrives comes in the order sent, never again.
        rest = iter(sent)
        assert all(state in rest for state in got), (n, got)
        assert got[-1] == sent[-1]

    async def accepted() -> float:
        samples = await gw.metrics()
        return sum(
            v
            for (name, labels), v in samples.items()
            if name == "gateway_webhooks_received_total" and ("outcome", "accepted") in labels
        )

    # The second process reports its counters every second.
    await eventually(lambda: _equals(accepted(), total), 10, "/metrics to count every webhook")
    for _ in range(4):  # whichever process the kernel gives the connection to
        assert await accepted() == total
    status, _ = await gw.readyz()
    assert status == 200

    assert await gw.stop(timeout=30) == 0, gw.log()  # SIGTERM
    log = records(gw)
    messages = [r.get("msg", "") for r in log]
    assert "intake process 1 stopped" in messages
    assert not [r for r in log if r.get("level") in ("ERROR", "CRITICAL")], log


def _child_pids(gw: GatewayProcess) -> list[int]:
    return [r["pid"] for r in records(gw) if r.get("msg") == "intake process 1 ready"]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"


@pytest.mark.slow
@pytest.mark.sqlite_only
async def test_a_killed_intake_process_is_reported_and_restarted_and_dies_with_the_gateway(
    tmp_path: Path,
    spool_url: str,
    secrets_env: dict[str, str],
    processes: list[Stoppable],
    fake: FakeBraze,
    auth_headers: dict[str, str],
) -> None:
    """`kill -9` of the second intake process: the log says so, `/readyz` stays 200 but names it
    as degraded until it is started again; `kill -9` of the gateway takes its children along."""
    port = free_port()
    write_config(
        tmp_path,
        server={"port": port, "intake_processes": 2},
        braze={"server": fake.url, "flush_interval_ms": 10},
        delivery={"spool": spool_url},
    )
    gw = GatewayProcess(tmp_path, port, secrets_env)
    processes.append(gw)
    await gw.start(timeout=60)
    await eventually(lambda: _true(bool(_child_pids(gw))), 30, "the second process to be ready")
    [first] = _child_pids(gw)
    os.kill(first, signal.SIGKILL)

    async def reported() -> bool:
        status, body = await gw.readyz()
        return status == 200 and "intake process 1 exited" in body.get("degraded", "")

    await eventually(reported, 10, "/readyz to name the dead intake process")
    assert any(
        r.get("level") == "ERROR" and r.get("msg", "").startswith("intake process 1 exited")
        for r in records(gw)
    )
    await eventually(lambda: _true(len(_child_pids(gw)) == 2), 30, "the restart")
    second = _child_pids(gw)[1]

    async def healed() -> bool:
        status, body = await gw.readyz()
        return status == 200 and "degraded" not in body

    await eventually(healed, 10, "/readyz to be plain ready again")
    await gw.kill()
    await eventually(lambda: _true(not _alive(second)), 15, "the child to exit with its parent")


async def _true(value: bool) -> bool:
    return value


@pytest.mark.slow
async def test_rows_the_second_process_stores_count_as_pending_in_the_first(
    tmp_path: Path,
    spool_url: str,
    secrets_env: dict[str, str],
    processes: list[Stoppable],
    auth_headers: dict[str, str],
) -> None:
    """With Braze unreachable, `gateway_spool_pending` (what `/readyz` and `max_pending` read)
    comes to count the rows both processes stored, not only the delivering process's own."""
    port = free_port()
    write_config(
        tmp_path,
        server={"port": port, "intake_processes": 2},
        # Nobody there, and one row in flight at a time: the rest wait in memory, and a
        # delivery holding a backlog does not recount pending rows from the file (which would
        # hide a wrong count within seconds).
        braze={
            "server": f"http://127.0.0.1:{free_port()}",
            "timeout_s": 1,
            "batch_size": 1,
            "max_in_flight": 1,
        },
        delivery={"spool": spool_url},
    )
    gw = GatewayProcess(tmp_path, port, secrets_env)
    processes.append(gw)
    await gw.start(timeout=60)
    await eventually(lambda: _true(bool(_child_pids(gw))), 30, "the second process to be ready")
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def post(n: int) -> int:
            body = choice(f"pending-{n}", True, at(n))
            url = f"{gw.base}/webhooks/didomi"
            async with session.post(url, data=body, headers=auth_headers) as resp:
                return resp.status

        assert await asyncio.gather(*(post(n) for n in range(SINGLES))) == [202] * SINGLES

    async def counted() -> bool:
        samples = await gw.metrics()
        key = ("gateway_spool_pending", frozenset({("direction", "to_braze")}))
        return samples.get(key) == SINGLES

    await eventually(counted, 15, "the pending gauge to count both processes' rows")
    assert await gw.stop(timeout=30) == 0, gw.log()


BATCHES = 24  # Currents batches, each on a new connection: some reach the second process
PER_BATCH = 5


@pytest.mark.slow
@pytest.mark.sqlite_only  # PostgreSQL recounts pending rows from the database instead
async def test_currents_events_the_second_process_stores_each_count_and_a_reload_counts_once(
    tmp_path: Path,
    spool_url: str,
    secrets_env: dict[str, str],
    processes: list[Stoppable],
    auth_headers: dict[str, str],
) -> None:
    """With Braze and Didomi unreachable, every event of the Currents batches either process
    stored counts in the first's `gateway_spool_pending{direction="to_didomi"}` (not one per
    batch), and one SIGHUP, which every process follows, is one reload in `/metrics`."""
    port = free_port()
    nobody = f"http://127.0.0.1:{free_port()}"
    write_config(
        tmp_path,
        server={"port": port, "intake_processes": 2},
        # One row in flight at a time: the rest wait in memory, as a backlog does when Braze is
        # down, and a delivery holding a backlog does not recount pending rows from the file.
        braze={"server": nobody, "timeout_s": 1, "batch_size": 1, "max_in_flight": 1},
        delivery={"spool": spool_url},
        braze_webhooks={"tokens": [BRAZE_TOKEN]},
        didomi_api={
            "enabled": True,
            "base_url": nobody + "/v1",
            "organization_id": DIDOMI_ORG,
            "key": DIDOMI_API_KEY,
            "secret": DIDOMI_API_SECRET,
        },
    )
    gw = GatewayProcess(tmp_path, port, secrets_env)
    processes.append(gw)
    await gw.start(timeout=60)
    await eventually(lambda: _true(bool(_child_pids(gw))), 30, "the second process to be ready")
    now = time.time()
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def post(n: int) -> tuple[int, Any]:
            events = [
                global_change(f"c{n}-{k}", f"cur-{n}-{k}", "Unsubscribed", now - n)
                for k in range(PER_BATCH)
            ]
            url = f"{gw.base}/webhooks/braze/currents"
            async with session.post(url, json=currents(*events), headers=CURRENTS) as resp:
                return resp.status, (await resp.json())["stored"]

        async def didomi(n: int) -> int:
            body = choice(f"backlog-{n}", True, at(n))
            url = f"{gw.base}/webhooks/didomi"
            async with session.post(url, data=body, headers=auth_headers) as resp:
                return resp.status

        # A backlog for Braze first, then Braze's reports.
        assert await asyncio.gather(*(didomi(n) for n in range(20))) == [202] * 20
        answers = await asyncio.gather(*(post(n) for n in range(BATCHES)))
        assert answers == [(202, PER_BATCH)] * BATCHES

    async def counted() -> bool:
        samples = await gw.metrics()
        key = ("gateway_spool_pending", frozenset({("direction", "to_didomi")}))
        return samples.get(key) == BATCHES * PER_BATCH

    await eventually(counted, 15, "the pending gauge to count every stored Currents event")

    def reloads() -> int:
        return sum(1 for r in records(gw) if r.get("msg", "").startswith("reloaded "))

    gw.signal(signal.SIGHUP)
    await eventually(lambda: _true(reloads() == 2), 20, "both processes to reload")
    await asyncio.sleep(3 * REPORT_S)  # the second process's counters have been reported since

    async def reloads_counted() -> float:
        samples = await gw.metrics()
        return samples.get(("gateway_config_reloads_total", frozenset({("outcome", "success")})), 0)

    for _ in range(4):  # whichever process the kernel gives the connection to
        assert await reloads_counted() == 1
    assert await gw.stop(timeout=30) == 0, gw.log()


SHUTDOWN_S = 4
STALLED = 16  # connections whose body never finishes: 1 in 65536 that all reach one process


@pytest.mark.slow
@pytest.mark.sqlite_only  # the processes, not the spool, are under test
async def test_sigterm_with_intake_processes_returns_within_the_shutdown_timeout(
    tmp_path: Path,
    spool_url: str,
    secrets_env: dict[str, str],
    processes: list[Stoppable],
    fake: FakeBraze,
    auth_headers: dict[str, str],
) -> None:
    """With requests stalled in both processes, SIGTERM ends the gateway about
    server.shutdown_timeout_s after it, as with one process: the intake processes drain at the
    same time as the first, not after it."""
    port = free_port()
    write_config(
        tmp_path,
        server={"port": port, "intake_processes": 2, "shutdown_timeout_s": SHUTDOWN_S},
        braze={"server": fake.url},
        delivery={"spool": spool_url},
    )
    gw = GatewayProcess(tmp_path, port, secrets_env)
    processes.append(gw)
    await gw.start(timeout=60)
    await eventually(lambda: _true(bool(_child_pids(gw))), 30, "the second process to be ready")
    head = "POST /webhooks/didomi HTTP/1.1\r\nHost: gw\r\nContent-Length: 1000\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in auth_headers.items())
    stalled = []
    for _ in range(STALLED):
        # A new connection each (the kernel spreads connections), its body cut short.
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(f"{head}\r\n{{".encode())
        await writer.drain()
        stalled.append(writer)
    await asyncio.sleep(0.5)  # each process now waits for the rest of its bodies
    try:
        started = time.monotonic()
        assert await gw.stop(timeout=30) == 0, gw.log()  # one SIGTERM, as an init system sends
        took = time.monotonic() - started
    finally:
        for writer in stalled:
            writer.close()
    # About SHUTDOWN_S + 0.5 s when they drain together, twice SHUTDOWN_S one after the other:
    # the bound between leaves a busy machine seconds of slack.
    assert took < 1.5 * SHUTDOWN_S + 1, f"SIGTERM took {took:.1f} s"


def _children(pid: int) -> list[int]:
    """The processes `pid` started (Linux's /proc)."""
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


@pytest.mark.slow
@pytest.mark.sqlite_only  # the processes, not the spool, are under test
async def test_a_reload_while_an_intake_process_starts_reaches_it_once_it_is_ready(
    tmp_path: Path,
    spool_url: str,
    secrets_env: dict[str, str],
    processes: list[Stoppable],
    fake: FakeBraze,
) -> None:
    """SIGHUP to the gateway while its second intake process is still starting neither kills
    that process (SIGHUP's default action, before its handler is set) nor is lost: it
    reloads once ready, and nothing is logged as an error."""
    port = free_port()
    write_config(
        tmp_path,
        server={"port": port, "intake_processes": 2},
        braze={"server": fake.url},
        delivery={"spool": spool_url},
    )
    gw = GatewayProcess(tmp_path, port, secrets_env)
    processes.append(gw)
    await gw.start(timeout=60)
    assert gw.proc is not None
    main = gw.proc.pid
    await eventually(lambda: _true(bool(_children(main))), 30, "the second process to start")
    assert not _child_pids(gw), "the second process was ready already: nothing under test"
    gw.signal(signal.SIGHUP)
    await eventually(lambda: _true(bool(_child_pids(gw))), 30, "the second process to be ready")

    def reloads() -> int:
        return sum(1 for r in records(gw) if r.get("msg", "").startswith("reloaded "))

    await eventually(lambda: _true(reloads() == 2), 20, lambda: f"both reloads in {gw.log()}")
    assert len(_child_pids(gw)) == 1  # started once: never killed and started again
    assert await gw.stop(timeout=30) == 0, gw.log()
    assert not [r for r in records(gw) if r.get("level") in ("ERROR", "CRITICAL")], gw.log()


async def test_an_intake_process_counts_the_audit_records_it_sheds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Audit records an intake-only process sheds to make room for webhooks are counted in the
    counters it reports to the first process (`gateway_audit_shed_total`, its alert)."""
    config = build_config(tmp_path, delivery={"spool": str(tmp_path / "gateway.db")})
    app = web.Application()
    app[CONFIG], app[METRICS] = config, Metrics()
    context = intake_only._spool_context(app)
    await anext(context)
    try:
        db = app[SPOOL].db
        records = [Record(f"p{n}", "to_braze", "delivered", float(n)) for n in range(40)]
        await app[SPOOL].write_audit(records, "to_braze")
        monkeypatch.setattr(db, "_room", lambda: (0, 0))  # no room left on the disk
        await app[SPOOL].run(db.shed_audit, 1)
        assert ("gateway_audit_shed", {}, 40.0) in intake_only.counters(app[METRICS])
    finally:
        with pytest.raises(StopAsyncIteration):
            await anext(context)


# A stand-in for `python -m gateway.app.intake_only`, run in its place (see `_stand_in`): it
# notes each start (with the mappings.dir of its launch) in a file, then acts as `mode` says.
STAND_IN = r"""
import os, sys, time
from pathlib import Path
notes, mode = Path(sys.argv[1]), sys.argv[2]
starts = len(notes.read_text().splitlines()) if notes.exists() else 0
if mode == "broken_pipe" and starts == 0:
    os.close(0)  # its launch, larger than a pipe holds, finds nobody reading
    with notes.open("a") as f:
        f.write("closed\n")
    sys.exit(3)
from gateway.app.intake_only import _read_launch
launch = _read_launch()
with notes.open("a") as f:
    f.write(launch.config.mappings.dir + "\n")
if starts == 0 and mode == "long_line":
    sys.stdout.write('{"ready":true}\n')
    sys.stdout.write("x" * (2**20 + 100) + "\n")  # over the parent's line limit
    sys.stdout.flush()
elif starts == 0 and mode == "exit":
    sys.exit(3)
elif mode == "ready":
    sys.stdout.write('{"ready":true}\n')
    sys.stdout.flush()
while os.read(0, 65536):  # as an intake process: stop when the parent is gone
    pass
"""


class _Spool:
    handoff = None  # PostgreSQL-like: nobody counts the children's rows here


async def _stand_in(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str, live: LiveRules, **launch: Any
) -> tuple[Path, State, Any]:
    """Run `intake_processes` with one child, `STAND_IN` in `mode`; its start notes, its
    state and its context (to close)."""
    notes = tmp_path / "starts"
    script = tmp_path / "stand_in.py"
    script.write_text(STAND_IN, encoding="utf-8")
    python = tmp_path / "python"
    python.write_text(f"#!/bin/sh\nexec {sys.executable} {script} {notes} {mode}\n")
    python.chmod(0o755)
    monkeypatch.setattr(intake_procs, "RESTART_MIN_S", 0.1)
    monkeypatch.setattr(intake_procs.sys, "executable", str(python))
    app = web.Application()
    app[CONFIG], app[METRICS], app[STATE] = live.config, Metrics(), State()
    app[SPOOL] = _Spool()  # type: ignore[assignment]  # only `handoff` is read
    default = {"config": live.config, "config_path": None, "log_format": "json"}
    context = intake_procs.intake_processes({**default, "log_level": "INFO", **launch}, live)(app)
    await anext(context)
    return notes, app[STATE], context


def _starts(notes: Path) -> list[str]:
    return notes.read_text().splitlines() if notes.exists() else []


@pytest.mark.parametrize("mode", ["long_line", "broken_pipe"])
async def test_an_intake_process_whose_pipe_fails_is_logged_and_restarted(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    mode: str,
) -> None:
    """A child that writes a line over the limit, or whose stdin breaks before its launch is
    read, is logged, named in /readyz's degraded reasons and started again, not forgotten."""
    config = build_config(tmp_path, server={"intake_processes": 2, "shutdown_timeout_s": 2})
    live = LiveRules.load(config, Metrics(), None)
    big = {"config_path": "x" * 2**20} if mode == "broken_pipe" else {}  # over a pipe's room
    notes, state, context = await _stand_in(tmp_path, monkeypatch, mode, live, **big)
    try:

        async def restarted() -> bool:
            return len(_starts(notes)) >= 2

        await eventually(restarted, 30, lambda: f"a restart; started: {_starts(notes)}")
        assert "intake process 1" in (state.degraded_reason() or "")  # not ready again yet
        assert any(
            r.levelname == "ERROR" and "intake process 1" in r.getMessage() for r in caplog.records
        ), [r.getMessage() for r in caplog.records]
    finally:
        with contextlib.suppress(StopAsyncIteration):
            await anext(context)


async def test_a_restarted_intake_process_starts_from_the_config_in_force(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    secrets_env: dict[str, str],
) -> None:
    """A child started again after a reload gets the reloaded config (here mappings.dir), not
    the one the gateway started with."""
    for name, value in secrets_env.items():
        monkeypatch.setenv(name, value)
    first, second = tmp_path / "mappings", tmp_path / "mappings2"
    path = write_config(
        tmp_path, server={"intake_processes": 2}, mappings={"dir": str(first), "watch": False}
    )
    shutil.copytree(first, second)
    config = load_config(path)
    live = LiveRules.load(config, Metrics(), path)
    notes, _state, context = await _stand_in(
        tmp_path, monkeypatch, "exit", live, config_path=str(path)
    )
    try:

        async def started() -> bool:
            return len(_starts(notes)) >= 1

        await eventually(started, 30, "the first start")
        write_config(
            tmp_path, server={"intake_processes": 2}, mappings={"dir": str(second), "watch": False}
        )
        assert await live.reload_async()

        async def restarted() -> bool:
            return len(_starts(notes)) >= 2

        await eventually(restarted, 30, lambda: f"a restart; started: {_starts(notes)}")
        assert _starts(notes)[:2] == [str(first), str(second)]
    finally:
        with contextlib.suppress(StopAsyncIteration):
            await anext(context)


@pytest.mark.slow
@pytest.mark.sqlite_only  # its commit is held on the SQLite spool's write turns
async def test_an_intake_process_whose_main_process_dies_mid_drain_finishes_its_drain(
    tmp_path: Path, auth_headers: dict[str, str]
) -> None:
    """SIGTERM, then its main process gone (stdin closed) while a webhook's commit waits: the
    intake process answers that request and exits 0 instead of cutting its drain short."""
    port = free_port()
    spool = tmp_path / "gateway.db"
    config = build_config(
        tmp_path,
        server={"port": port, "intake_processes": 2, "shutdown_timeout_s": 10},
        delivery={"spool": str(spool)},
    )
    launch = intake_procs.Launch(config, None, "json", "INFO", 1, "\0gateway-test-nobody")
    proc = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "gateway.app.intake_only"),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    assert proc.stdin is not None
    assert proc.stdout is not None
    turns = -1
    try:
        data = pickle.dumps(launch)
        proc.stdin.write(len(data).to_bytes(8, "big") + data)
        await proc.stdin.drain()
        while b'"ready":true' not in await asyncio.wait_for(proc.stdout.readline(), 30):
            pass
        # Another process's write turn: the webhook's commit waits for it, in flight.
        turns = os.open(spool.with_name(spool.name + ".writers"), os.O_RDWR)
        fcntl.flock(turns, fcntl.LOCK_EX)
        async with aiohttp.ClientSession() as session:
            url = f"http://127.0.0.1:{port}/webhooks/didomi"
            post = asyncio.create_task(
                session.post(url, data=choice("mid-drain", True), headers=auth_headers)
            )
            await asyncio.sleep(1.0)
            proc.send_signal(signal.SIGTERM)  # as the main process does when shutdown begins
            await asyncio.sleep(0.5)
            proc.stdin.close()  # then the main process dies
            await asyncio.sleep(1.0)
            fcntl.flock(turns, fcntl.LOCK_UN)  # the commit goes through
            resp = await asyncio.wait_for(post, 20)
            assert resp.status == 202
        assert await asyncio.wait_for(proc.wait(), 20) == 0
    finally:
        if turns >= 0:
            os.close(turns)
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_an_intake_process_starting_when_shutdown_begins_is_stopped_with_the_others(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A child whose start is under way when the intake processes stop (restarted after a
    crash, say) is told to stop too (SIGTERM, not the kill after the grace), its launch never
    sent, and is gone once they have stopped."""
    config = build_config(tmp_path, server={"intake_processes": 2, "shutdown_timeout_s": 1})
    live = LiveRules.load(config, Metrics(), None)
    spawn = asyncio.create_subprocess_exec
    spawning, go = asyncio.Event(), asyncio.Event()
    started: list[asyncio.subprocess.Process] = []

    async def slow_spawn(*args: Any, **kwargs: Any) -> asyncio.subprocess.Process:
        spawning.set()
        await go.wait()  # the stop begins meanwhile
        proc = await spawn(*args, **kwargs)
        started.append(proc)
        return proc

    monkeypatch.setattr(intake_procs.asyncio, "create_subprocess_exec", slow_spawn)
    notes, _state, context = await _stand_in(tmp_path, monkeypatch, "stay", live)
    try:
        await asyncio.wait_for(spawning.wait(), 30)
        stop = asyncio.create_task(anext(context))
        for _ in range(5):
            await asyncio.sleep(0)  # the stop has looked at the children and told them
        go.set()
        with contextlib.suppress(StopAsyncIteration):
            await asyncio.wait_for(stop, 30)
        [proc] = started
        assert not _alive(proc.pid), "a child started during shutdown outlived it"
        assert proc.returncode == -signal.SIGTERM, proc.returncode
        assert _starts(notes) == [], "it was sent its launch"
    finally:
        go.set()
        for proc in started:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()


async def test_an_intake_process_whose_reports_cannot_be_followed_is_stopped_not_orphaned(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An unexpected error while following a child (here, applying its first report) stops
    that child before another is started: none is left serving unwatched beside its successor."""
    config = build_config(tmp_path, server={"intake_processes": 2, "shutdown_timeout_s": 1})
    live = LiveRules.load(config, Metrics(), None)
    spawn = asyncio.create_subprocess_exec
    started: list[asyncio.subprocess.Process] = []

    async def spawning(*args: Any, **kwargs: Any) -> asyncio.subprocess.Process:
        proc = await spawn(*args, **kwargs)
        started.append(proc)
        return proc

    apply = intake_procs.IntakeProcesses._apply
    applied = 0

    def broken(self: Any, child: Any, report: Any) -> None:
        nonlocal applied
        applied += 1
        if applied == 1:
            raise RuntimeError("a bug while counting a report")
        apply(self, child, report)

    monkeypatch.setattr(intake_procs.asyncio, "create_subprocess_exec", spawning)
    monkeypatch.setattr(intake_procs.IntakeProcesses, "_apply", broken)
    _notes, _state, context = await _stand_in(tmp_path, monkeypatch, "ready", live)
    try:
        await eventually(lambda: _true(len(started) >= 2), 30, "a second start")
        first = started[0]
        await eventually(lambda: _true(not _alive(first.pid)), 10, "the first child to be stopped")
    finally:
        with contextlib.suppress(StopAsyncIteration):
            await anext(context)
        for proc in started:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
