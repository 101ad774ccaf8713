"""The benchmark's processes: start them with their logs, find their URLs, stop them all.

Also what /proc says about one: its CPU time and its memory.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
PYTHON = sys.executable
HOST = "127.0.0.1"
TICKS = os.sysconf("SC_CLK_TCK")

# This checkout's gateway before any installed one: what a bench script imports itself (the
# fake Braze of `run.py --replicas`, say) is then what its `python -m gateway` children run.
if str(ROOT) not in sys.path:
    sys.path.insert(1, str(ROOT))


@dataclass
class Proc:
    """One server process started for the benchmark, with its log files."""

    name: str
    popen: subprocess.Popen[bytes]
    out: Path
    err: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def tail(self, lines: int = 15) -> str:
        text = self.err.read_text(errors="replace") + self.out.read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])


@dataclass
class Procs:
    """Every process started, stopped in reverse order: SIGTERM, then SIGKILL after a grace."""

    logs: Path
    started: list[Proc] = field(default_factory=list)

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Proc:
        out, err = self.logs / f"{name}.out", self.logs / f"{name}.err"
        with out.open("wb") as stdout, err.open("wb") as stderr:
            popen = subprocess.Popen(  # noqa: S603 - our own interpreter and scripts
                argv,
                stdout=stdout,
                stderr=stderr,
                stdin=subprocess.DEVNULL,
                cwd=ROOT,
                env={**os.environ, "PYTHONPATH": pythonpath(), **(env or {})},
            )
        proc = Proc(name, popen, out, err)
        self.started.append(proc)
        return proc

    def stop(
        self, proc: Proc, grace_s: float = 15.0, sig: signal.Signals = signal.SIGTERM
    ) -> int | None:
        if proc.popen.poll() is None:
            proc.popen.send_signal(sig)
            try:
                proc.popen.wait(grace_s)
            except subprocess.TimeoutExpired:
                print(f"  {proc.name} ignored SIGTERM for {grace_s:.0f} s; killing it")
                proc.popen.kill()
                proc.popen.wait()
        return proc.popen.returncode

    def stop_all(self) -> None:
        for proc in reversed(self.started):
            with contextlib.suppress(Exception):
                self.stop(proc)


def pythonpath() -> str:
    """bench/ first (the scripts import each other), then whatever the caller set."""
    return os.pathsep.join(p for p in (str(BENCH), os.environ.get("PYTHONPATH")) if p)


def wait_for(what: str, proc: Proc, check: Callable[[], Any], timeout_s: float = 30.0) -> Any:
    """Poll `check` until it returns something truthy; fail early if the process died."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.popen.poll() is not None:
            raise RuntimeError(f"{proc.name} exited ({proc.popen.returncode}):\n{proc.tail()}")
        with contextlib.suppress(OSError, ValueError):
            value = check()
            if value:
                return value
        time.sleep(0.05)
    raise RuntimeError(f"timed out waiting for {what}:\n{proc.tail()}")


def listening_url(proc: Proc) -> str:
    """The URL a server prints as `... listening on URL`."""

    def check() -> str | None:
        for line in proc.out.read_text().splitlines():
            if " listening on " in line:
                return line.split(" listening on ", 1)[1].strip()
        return None

    return str(wait_for(f"{proc.name} to listen", proc, check))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def cpu_ticks(pid: int) -> int:
    """User + system clock ticks of a process (all its threads) so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def memory_kb(pid: int) -> dict[str, int]:
    """VmRSS (now) and VmHWM (peak) of a process, in kB."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    return out
