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
- `nolog`: the per-webhook `webhook accepted` line (logger `gateway.server`) is not written,
  to measure what it costs (the line is the audit of intake: not a change to make as is).
- `syncnormal`: the spool's `PRAGMA synchronous=FULL` is run as `NORMAL` (no fsync per
  commit in WAL mode), to see what durability costs; never a setting to ship.
- `sqlcount`: every SQL statement SQLite runs is counted (a trace callback on each connection),
  with literals replaced by `?`; the counts go to the file BENCH_SQLCOUNT at exit. The callback
  costs time: a run with it measures counts, not speed (`bench/wrk.py --sql`).
"""

from __future__ import annotations

import os
import sys

_argv = getattr(sys, "argv", [])
_GATEWAY = _argv[:1] == ["-m"] and "run" in _argv and "--config" in _argv
WHAT = set(os.environ.get("BENCH_WHATIF", "").split(",")) if _GATEWAY else set()


if "switch" in WHAT:
    sys.setswitchinterval(0.0005)
if "uvloop" in WHAT:
    import uvloop

    uvloop.install()
if "nolog" in WHAT:
    import logging

    _server = logging.getLogger("gateway.server")
    _info = _server.info

    def _quiet(msg: object, *args: object, **kwargs: object) -> None:
        if msg != "webhook %s":
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


if "syncnormal" in WHAT:
    import sqlite3

    class _Normal(sqlite3.Connection):
        def execute(self, sql: str, *args: object) -> sqlite3.Cursor:
            if sql.replace(" ", "").upper() == "PRAGMASYNCHRONOUS=FULL":
                sql = "PRAGMA synchronous=NORMAL"
                print("whatif syncnormal: PRAGMA synchronous=NORMAL", file=sys.stderr)
            return super().execute(sql, *args)  # type: ignore[arg-type]

    _plain_connect = sqlite3.connect

    def _normal(*args: object, **kwargs: object) -> sqlite3.Connection:
        return _plain_connect(*args, factory=_Normal, **kwargs)  # type: ignore[arg-type,misc]

    sqlite3.connect = _normal  # type: ignore[assignment]
