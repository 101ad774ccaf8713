"""Every benchmark script still imports what it measures: a refactor of the package must not leave
`bench/` naming functions that moved (`dispatch_cost.py` imported a dispatcher helper gone since).
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import ROOT

BENCH = ROOT / "bench"
SCRIPTS = sorted(p.name for p in BENCH.glob("*.py") if '__name__ == "__main__"' in p.read_text())
HELPERS = sorted(p.stem for p in BENCH.glob("*.py") if p.name not in SCRIPTS)


def test_the_benchmark_scripts_are_all_found() -> None:
    """The lists below are not silently empty."""
    assert {"wrk.py", "dispatch_cost.py", "ack_cost.py", "backfill.py"} <= set(SCRIPTS)
    assert {"events", "procs", "probes"} <= set(HELPERS)


def _python(*args: str) -> subprocess.CompletedProcess[str]:
    """This interpreter in bench/, as the scripts are run."""
    return subprocess.run(
        [sys.executable, *args], cwd=BENCH, capture_output=True, text=True, timeout=60, check=False
    )


def test_the_benchmark_helper_modules_import() -> None:
    """The modules the scripts share (processes, probes, tables, events) import."""
    done = _python("-c", "; ".join(f"import {name}" for name in HELPERS))
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_benchmark_script_imports_and_prints_its_usage(script: str) -> None:
    """`--help` imports the script's modules (the gateway's among them) and exits 0."""
    done = _python(script, "--help")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "usage" in done.stdout.lower(), done.stdout[-2000:]
