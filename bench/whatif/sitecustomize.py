"""What-if experiments: the profile's suggestions, patched into the gateway process at start-up.

    BENCH_WHATIF=uvloop PYTHONPATH=bench/whatif:/tmp/uvsite .venv/bin/python bench/run.py

Python imports `sitecustomize` in every process whose path holds this folder; it acts only in
the gateway (`python -m gateway run --config ...`), so the ceiling, the naive forwarder, the
fake Braze and the load generator are untouched. Nothing on disk changes. Each name measures
one idea before anyone writes it properly (`nesting` and `redact`, measured this way, are now
in the gateway itself):

- `uvloop`: the gateway's event loop is uvloop's (put uvloop on PYTHONPATH first, e.g.
  `pip install --target /tmp/uvsite uvloop` and `PYTHONPATH=bench/whatif:/tmp/uvsite`).
- `switch`: `sys.setswitchinterval(0.0005)`, to see whether the spool thread waits for the GIL.
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
