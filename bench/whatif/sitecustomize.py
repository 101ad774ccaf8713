"""What-if experiments: the profile's suggestions, patched into the gateway process at start-up.

    BENCH_WHATIF=uvloop PYTHONPATH=bench/whatif .venv/bin/python bench/run.py

Python imports `sitecustomize` in every process whose path holds this folder; it acts only in
the gateway (`python -m gateway run --config ...`), so the ceiling, the naive forwarder, the
fake Braze and the load generator are untouched. Nothing on disk changes. Each name measures
one idea before anyone writes it properly (`nesting` and `redact`, measured this way, are now
in the gateway itself):

- `uvloop`: the gateway's event loop is uvloop's (`.venv/bin/pip install uvloop`, or put it
  on PYTHONPATH: `pip install --target /tmp/uvsite uvloop`, `PYTHONPATH=bench/whatif:/tmp/uvsite`).
- `switch`: `sys.setswitchinterval(0.0005)`, to see whether the spool thread waits for the GIL.
- `nolog`: the `webhooks accepted` line of each intake commit group (logger `gateway.server`)
  is not written, to measure what it costs (the line is the audit of intake: not a change to
  make as is).
- `syncnormal`: the spool's `PRAGMA synchronous=FULL` is run as `NORMAL` (no fsync per
  commit in WAL mode), to see what durability costs; never a setting to ship.
- `noevidx`, `noaudit`, `noapplied`: the audit trail's index by event id is not created, the
  audit records are not inserted, the applied times (the stale checks' memory) are not
  upserted: what each guarantee costs; never settings to ship.
- `parentoff`: the gateway stops listening as soon as it listens, so with
  `server.intake_processes` the children take every webhook and this process only delivers.
- `switch` acts in the intake-only children as well.
- `sqlcount`: every SQL statement SQLite runs is counted (a trace callback on each connection),
  with literals replaced by `?`; the counts go to the file BENCH_SQLCOUNT at exit. The callback
  costs time: a run with it measures counts, not speed (`bench/wrk.py --sql`).
- `txtime` (also in the intake-only children): each spool write transaction timed, by what it
  does: waiting for the write turn (`WriteTurns`), its work, its COMMIT (percentiles), into
  BENCH_TXTIME_DIR/PID.json at exit (`bench/wrk.py --keep` leaves them in NAME.txtime/).
- `gctime` (also in the children): the garbage collector's CPU per generation, into
  BENCH_TXTIME_DIR/gc-PID.json; `gcfreeze`, `gcyoung`: what `app.heap` now does, measured first.
"""

from __future__ import annotations

import os
import sys

_argv = getattr(sys, "argv", [])
_GATEWAY = _argv[:1] == ["-m"] and "run" in _argv and "--config" in _argv
WHAT = set(os.environ.get("BENCH_WHATIF", "").split(",")) if _GATEWAY else set()


# `switch` acts in the intake-only children too (they inherit the environment).
_ANY_GATEWAY = _argv[:1] in (["-m"], ["-c"])
if "switch" in os.environ.get("BENCH_WHATIF", "").split(",") and _ANY_GATEWAY:
    sys.setswitchinterval(0.0005)
if "uvloop" in WHAT:
    import uvloop

    uvloop.install()
if "nolog" in WHAT:
    import logging

    _server = logging.getLogger("gateway.server")
    _info = _server.info

    def _quiet(msg: object, *args: object, **kwargs: object) -> None:
        if msg != "webhooks accepted":
            _info(msg, *args, **kwargs)  # type: ignore[arg-type]

    _server.info = _quiet  # type: ignore[method-assign]
if "sqlcount" in WHAT:
    import atexit
    import collections
    import json
    import re
    import sqlite3
    import threading

    _counts: collections.Counter[str] = collections.Counter()
    _lock = threading.Lock()
    _LITERAL = re.compile(r"'(?:[^']|'')*'|\bX'[0-9A-Fa-f]*'|-?\b\d+(?:\.\d+)?\b")
    _SPACE = re.compile(r"\s+")
    _connect = sqlite3.connect

    def _trace(sql: str) -> None:
        key = _SPACE.sub(" ", _LITERAL.sub("?", sql)).strip()[:160]
        with _lock:
            _counts[key] += 1

    def _counting(*args: object, **kwargs: object) -> sqlite3.Connection:
        db = _connect(*args, **kwargs)  # type: ignore[arg-type]
        db.set_trace_callback(_trace)
        return db

    sqlite3.connect = _counting  # type: ignore[assignment]

    @atexit.register
    def _dump() -> None:
        with open(os.environ["BENCH_SQLCOUNT"], "w") as out:
            json.dump(dict(_counts), out, indent=1)


if "parentoff" in WHAT:
    # With `server.intake_processes`, this process stops listening once it has: the children
    # take every connection, so its core is delivery's (and the spool's commits are theirs).
    from aiohttp import web_runner

    _start = web_runner.TCPSite.start

    async def _start_then_close(self: web_runner.TCPSite) -> None:
        await _start(self)
        assert self._server is not None
        self._server.close()

    web_runner.TCPSite.start = _start_then_close  # type: ignore[method-assign]

# What each guarantee of the spool costs, measured by leaving its SQL out (never to ship):
# `noevidx` the audit trail's index by event id (`gateway trace --event`), `noaudit` the audit
# records themselves, `noapplied` the per-person applied times (the stale checks' memory).
_SKIP = {
    "noaudit": "INSERT INTO audit(",
    "noapplied": "INSERT INTO applied(",
}
_SKIPPED = tuple(prefix for name, prefix in _SKIP.items() if name in WHAT)
if _SKIPPED or {"noevidx", "syncnormal"} & WHAT:
    import sqlite3

    class _WhatIf(sqlite3.Connection):
        def execute(self, sql: str, *args: object) -> sqlite3.Cursor:
            if "syncnormal" in WHAT and sql.replace(" ", "").upper() == "PRAGMASYNCHRONOUS=FULL":
                sql = "PRAGMA synchronous=NORMAL"
                print("whatif syncnormal: PRAGMA synchronous=NORMAL", file=sys.stderr)
            return super().execute(sql, *args)  # type: ignore[arg-type]

        def executemany(self, sql: str, *args: object) -> sqlite3.Cursor:
            if _SKIPPED and sql.startswith(_SKIPPED):
                return super().execute("SELECT 1")
            return super().executemany(sql, *args)  # type: ignore[arg-type]

        def executescript(self, script: str) -> sqlite3.Cursor:
            if "noevidx" in WHAT:
                script = script.replace(
                    "CREATE INDEX IF NOT EXISTS audit_event ON audit(event_id);", ""
                )
            return super().executescript(script)

    _plain_connect = sqlite3.connect

    def _what_if(*args: object, **kwargs: object) -> sqlite3.Connection:
        return _plain_connect(*args, factory=_WhatIf, **kwargs)  # type: ignore[arg-type,misc]

    sqlite3.connect = _what_if  # type: ignore[assignment]


# `txtime` acts in every gateway process, the intake-only children too (they inherit the
# environment): each spool write transaction timed, by what it does, into BENCH_TXTIME_DIR.
if "txtime" in os.environ.get("BENCH_WHATIF", "").split(",") and _argv[:1] in (["-m"], ["-c"]):
    import atexit
    import collections
    import json
    import threading
    import time

    _tx_lock = threading.Lock()
    _tx: collections.defaultdict[str, list[float]] = collections.defaultdict(
        lambda: [0, 0.0, 0.0, 0.0]
    )
    _commits: collections.defaultdict[str, list[float]] = collections.defaultdict(list)

    def _install() -> None:
        from gateway.spool import sqlite_file

        def timed(self, work):  # type: ignore[no-untyped-def]
            what = ".".join(getattr(work, "__qualname__", "?").split(".")[:2])
            started = time.perf_counter()
            try:
                with self.writers:
                    held = time.perf_counter()
                    self.db.execute("BEGIN IMMEDIATE")
                    try:
                        result = work(self.db)
                        committing = time.perf_counter()
                        self.db.execute("COMMIT")
                        self.committed_at = time.monotonic()
                    except BaseException:
                        self._rollback()
                        raise
                    ended = time.perf_counter()
            except sqlite_file.sqlite3.Error as exc:
                raise self._write_error(exc) from exc
            with _tx_lock:
                row = _tx[what]
                row[0] += 1
                row[1] += held - started  # waiting for the write turn
                row[2] += committing - held  # BEGIN and the work
                row[3] += ended - committing  # COMMIT (and any checkpoint it runs)
                _commits[what].append(round((ended - committing) * 1e6))
            return result

        sqlite_file.SqliteFile._tx = timed  # type: ignore[method-assign,assignment]

    _started = time.perf_counter()

    @atexit.register
    def _dump_tx() -> None:
        out = os.path.join(os.environ["BENCH_TXTIME_DIR"], f"{os.getpid()}.json")
        with open(out, "w") as fh:
            json.dump(
                {"wall": time.perf_counter() - _started, "tx": dict(_tx), "commits_us": _commits},
                fh,
            )

    import importlib.abc
    import importlib.machinery

    class _After(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):  # type: ignore[no-untyped-def]
            if name != "gateway.spool.sqlite_file":
                return None
            sys.meta_path.remove(self)
            spec = importlib.machinery.PathFinder.find_spec(name, path)
            assert spec is not None
            assert spec.loader is not None
            load = spec.loader.exec_module

            def exec_module(module):  # type: ignore[no-untyped-def]
                load(module)
                sys.modules[name] = module
                _install()

            spec.loader.exec_module = exec_module  # type: ignore[method-assign]
            return spec

    sys.meta_path.insert(0, _After())


# `gctime` (every gateway process, as `txtime`): the CPU the cyclic garbage collector takes,
# per generation, into BENCH_TXTIME_DIR/gc-PID.json at exit.
if "gctime" in os.environ.get("BENCH_WHATIF", "").split(",") and _argv[:1] in (["-m"], ["-c"]):
    import atexit
    import gc
    import json
    import time

    _gc = {"runs": [0, 0, 0], "seconds": [0.0, 0.0, 0.0], "collected": [0, 0, 0]}
    _gc_started = [0.0]
    _gc_born = time.perf_counter()

    def _gc_timer(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            _gc_started[0] = time.thread_time()  # CPU: a descheduled thread's wait is not GC
            return
        generation = info["generation"]
        _gc["runs"][generation] += 1
        _gc["seconds"][generation] += time.thread_time() - _gc_started[0]
        _gc["collected"][generation] += info["collected"]

    gc.callbacks.append(_gc_timer)

    @atexit.register
    def _dump_gc() -> None:
        out = os.path.join(os.environ["BENCH_TXTIME_DIR"], f"gc-{os.getpid()}.json")
        with open(out, "w") as fh:
            json.dump({"wall": time.perf_counter() - _gc_born, **_gc}, fh)


# `gcfreeze`: gc.freeze() 4 s after start (the gateway is up by then): what start-up allocated
# is left out of every later collection. `gcyoung`: the youngest generation collected every
# 20,000 net allocations rather than 700 (and the freeze), so the objects of requests in
# flight are traversed once per 20,000 rather than every 700.
if {"gcfreeze", "gcyoung"} & set(os.environ.get("BENCH_WHATIF", "").split(",")) and _argv[:1] in (
    ["-m"],
    ["-c"],
):
    import gc
    import threading

    if "gcyoung" in os.environ["BENCH_WHATIF"].split(","):
        gc.set_threshold(20_000, 10, 10)
    _freezer = threading.Timer(4.0, gc.freeze)
    _freezer.daemon = True
    _freezer.start()
