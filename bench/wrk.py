"""Live intake cost under wrk: the bare handler, the naive forwarder and the gateway, alternated.

    .venv/bin/python bench/wrk.py [--seconds 12] [--rounds 3] [--connections 64] [--latency-ms 10]
                                  [--variants gateway+uvloop,bare+uvloop,naive+uvloop,gateway+nolog]
                                  [--profile DIR [--gil]] [--sql] [--no-pin] [--json FILE] [--keep]
                                  [--baseline DIR]

wrk (Debian's package, installed with apt-get when missing) is a C load generator: unlike
`bench/load.py` it leaves the server most of a core. Everything runs on 127.0.0.1 in a temp dir:
one fake Braze (`python -m gateway.testing`, `--latency-ms`, no rate limit), and one server
process per variant, all started once and kept up for the whole run:

- `bare`: `bench/ceiling.py`, reads the body and answers 202;
- `naive`: `bench/naive.py`, one Braze call per webhook inside the request, nothing stored;
- `gateway`: `python -m gateway run` on a generated gateway.toml, every setting at its default
  (`synchronous=FULL` and every 202 on disk first, the audit trail, the per-person stale checks);
- `NAME+uvloop`: the same on uvloop's event loop (the gateway through `bench/whatif`);
- `bare+group`: the bare handler answering only after a group "commit" that stores nothing
  (`ceiling.py --group`): the event loop's cost of waiting for the spool, without SQLite;
- `gateway+nolog`: the gateway without its per-webhook `webhook accepted` log line (whatif);
- `gateway@base` (`--baseline DIR`): the gateway imported from another source tree, say the
  commit before a change (`git archive COMMIT gateway | tar -x -C DIR`), to compare in one run;
  `base+WHATIF` in `--variants` runs it with what-ifs (`base+procs2`);
- `gateway+procsN`: the gateway with `server.intake_processes = N`, pinned to both CPUs (the
  extra intake processes are there to use the second core, which wrk and the fake Braze share);
- `gateway+syncnormal`: the gateway with SQLite's `synchronous=NORMAL` (whatif: what the fsync
  of each commit costs; not a setting to ship, a 202 must survive power loss);
- `gateway+txtime`, `gateway+gctime` (with `--keep`): each spool transaction's write turn, work
  and COMMIT, and the garbage collector's CPU, per process, into the temp dir's NAME.txtime/;
  `gateway+switch`: `sys.setswitchinterval(0.0005)` (whatif, the intake processes' too);
- what a guarantee costs, by leaving its SQL out (whatif; never settings to ship):
  `gateway+noevidx` without the audit trail's index by event id, `gateway+noaudit` without the
  audit records, `gateway+noapplied` without the per-person applied times of the stale checks;
  combined with `nolog` and `syncnormal`, the floor of the gateway's own Python;
- `gateway+procsN+parentoff`: with intake processes, this process stops listening once it has,
  so the children take every connection and its core is delivery's (whatif).

Each round runs every variant once, in the same order (A B C A B C ...), for `--seconds` each;
the table gives the median of the rounds. wrk runs one thread and `--connections` connections,
with a Lua script that makes every request a new Didomi event (fresh event and entity ids) for a
new person, with the target's OAuth2 token. By default wrk and the fake Braze are pinned with
`taskset` to CPU 0 and the servers to CPU 1 (`--no-pin`: the scheduler decides), so the server
under test has a core of its own (save for other users of the machine).

Figures per run: `2xx/s` (answers 2xx per second of load); `µs/webhook`, the server's CPU (user
+ system of its process tree, from /proc) during the load divided by its 2xx answers; for the
gateway also `µs/delivered`, its CPU from the load's start until the fake Braze holds every
accepted webhook's object and the gateway counts them delivered (the drain included), divided
by them; `braze µs`, the fake Braze's CPU per webhook over the same window.

`--profile DIR`: afterwards one more bare and one more gateway run under py-spy (`pip install
py-spy`, pinned with wrk), summarised with `bench/profile_top.py`; with `--gil`, py-spy samples
only the thread holding the GIL: where the Python CPU goes, without the threads waiting for it
(which otherwise count as busy in their last frame, `select` say), and without SQLite's C.
`--sql`: afterwards one gateway run with a sqlite3 trace callback that counts the statements it
runs (`bench/whatif`, `sqlcount`), printed per accepted webhook. Both slow the server down:
not in the table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import resource
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import events
from probes import CLIENT_ID, braze_stats, http, scrape, token, total
from procs import BENCH, HOST, PYTHON, ROOT, TICKS, Proc, Procs, free_port, listening_url, wait_for

WHATIF = BENCH / "whatif"
BASES = ("bare", "naive", "gateway")

# ---------------------------------------------------------------------------
# wrk and its script


def ensure_wrk() -> str:
    """wrk's path; installs Debian's package first when it is missing."""
    found = shutil.which("wrk")
    if found:
        return found
    print("wrk is missing: apt-get install -y wrk ...")
    apt = ["apt-get", "install", "-y", "-q", "wrk"]
    if subprocess.run(apt, check=False).returncode != 0:  # noqa: S603 - fixed command
        subprocess.run(["apt-get", "update", "-q"], check=True)  # noqa: S607 - fixed command
        subprocess.run(apt, check=True)  # noqa: S603 - fixed command
    found = shutil.which("wrk")
    if not found:
        raise RuntimeError("wrk is still missing after apt-get install wrk")
    return found


# Request numbers no real one reaches, rendered into each template and then swapped for
# placeholders: their 12 hex digits end every id, their decimal form ends the person. Two, so a
# digit string that happened to be in the fixture already would show as a difference.
_SENTINELS = (0xABCDEF012345, 0xFEDCBA987654)


def lua_script(tag: int, bearer: str, path: str) -> str:
    """wrk's script: every request one of the six templates, with its own ids and person.

    Request n's ids end in n as 12 hex digits and its person is `bench-TAG-n` (n counts per
    thread, interleaved by thread number, so threads never repeat each other); `done` prints
    one JSON line with wrk's counts and latency percentiles.
    """
    templates = []
    for template in events.templates():
        marked = {
            template.render(tag, n).decode().replace(f"{n:012x}", "@HEX@").replace(str(n), "@DEC@")
            for n in _SENTINELS
        }
        if len(marked) != 1:
            raise RuntimeError(f"the request number of {template.name} collides with its body")
        templates.append(marked.pop())
    if any("]==]" in body for body in templates):
        raise RuntimeError("a template holds the Lua long-string delimiter")
    listed = ",\n".join(f"[==[{body}]==]" for body in templates)
    return f"""-- generated by bench/wrk.py
local templates = {{
{listed}
}}
local headers = {{
  ["Authorization"] = "Bearer {bearer}",
  ["Content-Type"] = "application/json",
}}
local threads, count, stride, offset = {{}}, 0, 1, 0

function setup(thread)
  thread:set("offset", #threads)
  table.insert(threads, thread)
  for _, t in ipairs(threads) do t:set("stride", #threads) end
end

function request()
  local n = count * stride + offset
  count = count + 1
  local body = templates[(n % #templates) + 1]
  body = body:gsub("@HEX@", string.format("%012x", n))
  body = body:gsub("@DEC@", tostring(n))
  return wrk.format("POST", "{path}", headers, body)
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK {{"requests": %d, "duration_us": %d, "status_errors": %d, "connect": %d, ' ..
    '"read": %d, "write": %d, "timeout": %d, "p50_us": %d, "p99_us": %d}}\\n',
    summary.requests, summary.duration, e.status, e.connect, e.read, e.write, e.timeout,
    latency:percentile(50), latency:percentile(99)))
end
"""


# ---------------------------------------------------------------------------
# /proc


def tree_ticks(pid: int) -> int:
    """User + system ticks of a process and its descendants, with the children they reaped."""
    total_ticks = 0
    todo = [pid]
    while todo:
        one = todo.pop()
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{one}/stat").read_text().rsplit(")", 1)[1].split()
            total_ticks += sum(int(f) for f in fields[11:15])  # utime stime cutime cstime
            for task in Path(f"/proc/{one}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
    return total_ticks


def thread_ticks(pid: int) -> tuple[int, int]:
    """User + system ticks of a process's main thread (its event loop) and of its other threads."""
    main = other = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            ticks = int(fields[11]) + int(fields[12])
            if int(task.name) == pid:
                main += ticks
            else:
                other += ticks
    return main, other


def cpu_busy() -> list[tuple[int, int]]:
    """(busy, total) ticks of each CPU so far, from /proc/stat."""
    out = []
    for text in Path("/proc/stat").read_text().splitlines():
        name, *values = text.split()
        if name.startswith("cpu") and name != "cpu":
            ticks = [int(v) for v in values[:8]]
            out.append((sum(ticks) - ticks[3] - ticks[4], sum(ticks)))  # less idle and iowait
    return out


def loop_of(pid: int) -> str:
    """Which event loop a server runs, from the libraries it mapped."""
    return "uvloop" if "uvloop" in Path(f"/proc/{pid}/maps").read_text() else "asyncio"


# ---------------------------------------------------------------------------
# The servers


@dataclass
class Variant:
    """One server under test: which base, which what-ifs, its process and URL once started."""

    name: str
    base: str
    whatif: list[str]
    proc: Proc | None = None
    url: str = ""
    runs: list[dict[str, Any]] = field(default_factory=list)
    tree: Path | None = None  # `--baseline`: the package is imported from this source tree


# `python -m gateway` from another source tree: first on sys.path, ahead of the cwd's package.
_FROM_TREE = (
    "import runpy, sys; sys.path.insert(0, sys.argv.pop(1)); "
    "runpy.run_module('gateway', run_name='__main__', alter_sys=True)"
)


def parse_variant(name: str, tree: Path | None = None) -> Variant:
    base, *whatif = name.split("+")
    if base == "base" and tree is not None:  # `--baseline`: the gateway from another tree
        variant = parse_variant("+".join(["gateway", *whatif]))
        return Variant(name, "gateway", variant.whatif, tree=tree)
    if base not in BASES:
        raise SystemExit(f"unknown variant {name!r}: the base must be one of {', '.join(BASES)}")
    allowed = {"uvloop"} | {
        "gateway": {
            "nolog",
            "syncnormal",
            "txtime",
            "gctime",
            "gcfreeze",
            "gcyoung",
            "switch",
            "noevidx",
            "noaudit",
            "noapplied",
            "parentoff",
        },
        "bare": {"group"},
    }.get(base, set())
    if base == "gateway":
        allowed |= {w for w in whatif if re.fullmatch(r"procs[1-9]", w)}
    if set(whatif) - allowed:
        raise SystemExit(f"unknown variant {name!r}: {base} takes +{' +'.join(sorted(allowed))}")
    return Variant(name, base, whatif)


def gateway_toml(path: Path, port: int, braze_url: str, spool: Path, processes: int = 1) -> None:
    """A gateway.toml at the documented defaults; only ports, paths and secrets are ours."""
    path.write_text(
        f"""# generated by bench/wrk.py
[server]
host = "{HOST}"
port = {port}
{f"intake_processes = {processes}" if processes > 1 else ""}

[auth]
mode = "oauth2"
client_id = "{CLIENT_ID}"
client_secret = "${{DIDOMI_CLIENT_SECRET}}"

[braze]
server = {json.dumps(braze_url)}
api_key = "${{BRAZE_API_KEY}}"

[delivery]
spool = {json.dumps(str(spool))}

[mappings]
dir = {json.dumps(str(ROOT / "mappings"))}
"""
    )


class Bench:
    """The run: the fake Braze, every variant's server, wrk, and the figures they gave."""

    def __init__(self, args: argparse.Namespace, procs: Procs, tmp: Path) -> None:
        self.args, self.procs, self.tmp = args, procs, tmp
        self.wrk = ensure_wrk()
        self.secret, self.api_key = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
        self.server_env = {"DIDOMI_CLIENT_SECRET": self.secret, "BRAZE_API_KEY": self.api_key}
        self.variants = [parse_variant(v) for v in ("bare", "naive", "gateway")]
        self.variants += [parse_variant(v, args.baseline) for v in args.variants.split(",") if v]
        if args.baseline is not None:
            self.variants.append(Variant("gateway@base", "gateway", [], tree=args.baseline))

    def pinned(self, cpu: int | str, argv: list[str]) -> list[str]:
        return argv if self.args.no_pin else ["taskset", "-c", str(cpu), *argv]

    def start_fake(self) -> None:
        argv = [PYTHON, "-m", "gateway.testing", "--host", HOST, "--port", "0"]
        argv += ["--latency-ms", str(self.args.latency_ms), f"--api-key={self.api_key}"]
        self.fake = self.procs.start("fake-braze", self.pinned(0, argv))
        self.braze = listening_url(self.fake)

    def start(self, variant: Variant, extra: list[str] | None = None) -> None:
        """Start one variant's server on CPU 1 and wait until it answers."""
        whatif = [*variant.whatif, *(extra or [])]
        env = dict(self.server_env)
        name = variant.name + "".join(f"+{w}" for w in extra or [])
        if variant.base == "gateway":
            config = self.tmp / f"{name}.toml"
            port = free_port()
            procs = [int(w[5:]) for w in whatif if w.startswith("procs")]
            gateway_toml(config, port, self.braze, self.tmp / name / "gateway.db", *procs)
            argv = [PYTHON, "-m", "gateway", "run", "--config", str(config)]
            if variant.tree is not None:
                argv[1:3] = ["-c", _FROM_TREE, str(variant.tree)]
            whatif = [w for w in whatif if not w.startswith("procs")]
            path = [str(variant.tree)] if variant.tree is not None else []  # for its children too
            if whatif:
                env["BENCH_WHATIF"] = ",".join(whatif)
                env["BENCH_SQLCOUNT"] = str(self.tmp / f"{name}.sql.json")
                env["BENCH_TXTIME_DIR"] = str((self.tmp / f"{name}.txtime").resolve())
                (self.tmp / f"{name}.txtime").mkdir(exist_ok=True)
                path += [str(WHATIF), str(BENCH)]
            if path:
                env["PYTHONPATH"] = os.pathsep.join(path)
            # N intake processes are there to use both cores: pinned to both.
            cpus = "0,1" if procs and procs[0] > 1 else 1
            proc = self.procs.start(name, self.pinned(cpus, argv), env)
            url = f"http://{HOST}:{port}"
            ready = lambda: http(url + "/readyz", timeout=1)[0] == 200  # noqa: E731
            wait_for(f"{name} to be ready", proc, ready)
        else:
            script = BENCH / ("ceiling.py" if variant.base == "bare" else "naive.py")
            argv = [PYTHON, str(script), "--host", HOST]
            if variant.base == "naive":
                argv += ["--config", str(self.config)]
            if "group" in whatif:
                argv.append("--group")
            if "uvloop" in whatif:
                env["BENCH_LOOP"] = "uvloop"
            proc = self.procs.start(name, self.pinned(1, argv), env)
            url = listening_url(proc)
        variant.proc, variant.url = proc, url
        wanted = "uvloop" if "uvloop" in whatif else "asyncio"
        if loop_of(proc.pid) != wanted:
            raise RuntimeError(f"{name} runs on {loop_of(proc.pid)}, not {wanted}")

    def run(self) -> dict[str, Any]:
        self.start_fake()
        self.config = self.tmp / "naive.toml"
        gateway_toml(self.config, free_port(), self.braze, self.tmp / "unused.db")
        print(f"starting {', '.join(v.name for v in self.variants)} and a fake Braze ...")
        for variant in self.variants:
            self.start(variant)
        # A gateway that took no token yet would sign its first on the clock: warm every
        # server with one token and one webhook, unmeasured.
        for variant in self.variants:
            self.load(variant, 1.0, warm=True)
        for round_ in range(self.args.rounds):
            for variant in self.variants:
                row = self.load(variant, self.args.seconds)
                variant.runs.append(row)
                print(f"  round {round_ + 1}, {variant.name:<15} {line(row)}", flush=True)
        report: dict[str, Any] = {
            "args": {k: str(v) for k, v in vars(self.args).items()},
            "nproc": os.cpu_count(),
            "variants": {v.name: v.runs for v in self.variants},
        }
        if self.args.sql:
            report["sql"] = self.sql_count()
        if self.args.profile:
            report["profile"] = self.profile(self.args.profile)
        return report

    def load(self, variant: Variant, seconds: float, warm: bool = False) -> dict[str, Any]:
        """wrk against `variant` for `seconds`, and what its server spent on it."""
        assert variant.proc is not None
        pid, gateway = variant.proc.pid, variant.base == "gateway"
        # bare checks no token but gets one of the real size all the same.
        issuer = variant.url if variant.base != "bare" else self.gateway_url()
        bearer = token(issuer, self.secret)
        script = self.tmp / f"{variant.name}.lua"
        script.write_text(lua_script(random.getrandbits(32), bearer, "/webhooks/didomi"))
        accepted_before = self.accepted(variant.url) if gateway else 0.0
        settled_before = self.settled(variant.url) if gateway else 0.0
        braze_before, fake_before = braze_stats(self.braze), tree_ticks(self.fake.pid)
        argv = [self.wrk, "-t1", f"-c{self.args.connections}", f"-d{seconds:g}s"]
        argv += ["--timeout", "10s", "-s", str(script), variant.url + "/webhooks/didomi"]
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        busy = cpu_busy()
        started, ticks, threads = time.time(), tree_ticks(pid), thread_ticks(pid)
        done = subprocess.run(  # noqa: S603 - wrk on loopback
            self.pinned(0, argv), capture_output=True, text=True, timeout=seconds + 60, check=False
        )
        intake_ticks = tree_ticks(pid) - ticks
        ended = time.time()
        busy_after = cpu_busy()
        wrk_rusage = resource.getrusage(resource.RUSAGE_CHILDREN)
        wrk_s = wrk_rusage.ru_utime - children.ru_utime + wrk_rusage.ru_stime - children.ru_stime
        found = re.search(r"^WRK (\{.*\})$", done.stdout, re.M)
        if done.returncode != 0 or found is None:
            raise RuntimeError(f"wrk failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
        wrk = json.loads(found.group(1))
        ok = wrk["requests"] - wrk["status_errors"]
        row: dict[str, Any] = {
            "wrk": wrk,
            "ok": ok,
            "ok_per_s": ok / (wrk["duration_us"] / 1e6),
            "cpu_us": intake_ticks / TICKS * 1e6 / max(ok, 1),
            "cpu_percent": 100 * intake_ticks / TICKS / (ended - started),
            "wrk_cpu_percent": 100 * wrk_s / (ended - started),
            # Each CPU's busy share during the load, whoever used it (other sessions too).
            "cpus_busy_percent": [
                round(100 * (b1 - b0) / max(t1 - t0, 1))
                for (b0, t0), (b1, t1) in zip(busy, busy_after, strict=True)
            ],
        }
        if gateway:
            row["accepted"] = accepted = self.accepted(variant.url) - accepted_before
            row["cpu_us"] = intake_ticks / TICKS * 1e6 / max(accepted, 1)
            objects = braze_before["objects"] + accepted  # one object per benchmark webhook
            row.update(self.drain(variant, objects, settled_before + accepted))
            row["delivered_cpu_us"] = (tree_ticks(pid) - ticks) / TICKS * 1e6 / max(accepted, 1)
            # Threads that ended meanwhile are lost to this split (the spool's live for good).
            row["main_thread_us"], row["other_threads_us"] = (
                (after - before) / TICKS * 1e6 / max(accepted, 1)
                for before, after in zip(threads, thread_ticks(pid), strict=True)
            )
            row["drain_s"] = time.time() - ended
        braze_after = braze_stats(self.braze)
        row["braze_objects"] = braze_after["objects"] - braze_before["objects"]
        row["braze_requests"] = braze_after["requests"] - braze_before["requests"]
        fake_ticks = tree_ticks(self.fake.pid) - fake_before
        row["braze_cpu_us"] = fake_ticks / TICKS * 1e6 / max(row.get("accepted", ok), 1)
        if warm:
            time.sleep(0.5)
        return row

    def gateway_url(self) -> str:
        return next(v.url for v in self.variants if v.base == "gateway")

    @staticmethod
    def accepted(url: str) -> float:
        return total(scrape(url), "gateway_webhooks_received_total", outcome="accepted")

    @staticmethod
    def settled(url: str) -> float:
        """Updates the gateway is done with: delivered, or skipped (stale, unmapped)."""
        samples = scrape(url)
        return total(samples, "gateway_updates_delivered_total") + total(
            samples, "gateway_events_skipped_total"
        )

    def drain(self, variant: Variant, objects: float, settled: float) -> dict[str, Any]:
        """Wait until the fake Braze holds `objects` and the gateway has `settled` updates.

        The fake is polled (it costs the gateway nothing); the gateway's /metrics only once the
        objects are there, since its count moves when Braze's answer is acknowledged."""
        deadline = time.monotonic() + self.args.drain_timeout
        while braze_stats(self.braze)["objects"] < objects:
            if time.monotonic() > deadline:
                return {"drained": False}
            time.sleep(0.05)
        while True:
            if self.settled(variant.url) >= settled:
                return {"drained": True}
            if time.monotonic() > deadline:
                return {"drained": False}
            time.sleep(0.05)

    def sql_count(self) -> dict[str, Any]:
        """One gateway run with every SQL statement counted, stopped to write the counts."""
        variant = parse_variant("gateway")
        self.start(variant, ["sqlcount"])
        assert variant.proc is not None
        self.load(variant, 1.0, warm=True)
        row = self.load(variant, min(self.args.seconds, 5.0))
        # Counted over the whole life of the process, as the statements are: start-up is a few
        # dozen statements next to the thousands of the warm-up and the run.
        accepted = self.accepted(variant.url)
        self.procs.stop(variant.proc)  # the counts are written at exit
        counts = json.loads((self.tmp / "gateway+sqlcount.sql.json").read_text())
        per = {sql: n / accepted for sql, n in sorted(counts.items(), key=lambda kv: -kv[1])}
        print(f"\nSQL statements per accepted webhook ({accepted:.0f} accepted, load and drain):")
        for sql, n in per.items():
            if n >= 0.005:
                print(f"  {n:7.3f}  {sql}")
        print(f"  {sum(per.values()):7.3f}  in all")
        return {"accepted": accepted, "per_webhook": per, "run": row}

    def profile(self, folder: Path) -> dict[str, Any]:
        """One run of the bare handler and one of the gateway under py-spy, then their summary.

        py-spy runs beside wrk (CPU 0). A thread waiting for a busy CPU counts as active to
        it, so shares of samples are read against the /proc CPU of each thread."""
        spy = shutil.which("py-spy", path=str(Path(PYTHON).parent)) or shutil.which("py-spy")
        if spy is None:
            raise RuntimeError("--profile needs py-spy: .venv/bin/pip install py-spy")
        folder.mkdir(parents=True, exist_ok=True)
        out: dict[str, Any] = {}
        names = ["bare", "gateway"] + [v.name for v in self.variants if "procs" in v.name]
        for name in names:
            variant = next(v for v in self.variants if v.name == name)
            assert variant.proc is not None
            collapsed = folder / f"{name}.collapsed"
            argv = [spy, "record", "--pid", str(variant.proc.pid), "--rate", "250", "--threads"]
            argv += ["--gil"] if self.args.gil else []
            argv += ["--subprocesses"] if "procs" in name else []
            argv += ["--nonblocking", "--format", "raw", "--output", str(collapsed)]
            spying = self.procs.start(f"py-spy-{name}", self.pinned(0, argv))
            time.sleep(1.0)
            row = self.load(variant, self.args.seconds)
            self.procs.stop(spying, grace_s=30, sig=signal.SIGINT)
            print(f"\nprofiled {name} run (not in the table): {line(row)}; {collapsed}")
            top = [PYTHON, str(BENCH / "profile_top.py"), str(collapsed), "--top", "15"]
            subprocess.run(top, check=False)  # noqa: S603 - our own script
            out[name] = {"run": row, "collapsed": str(collapsed)}
        return out


# ---------------------------------------------------------------------------
# Output


def line(row: dict[str, Any]) -> str:
    wrk = row["wrk"]
    text = (
        f"{row['ok_per_s']:7.0f} 2xx/s  {row['cpu_us']:5.0f} µs/webhook  "
        f"cpu {row['cpu_percent']:3.0f} % (wrk {row['wrk_cpu_percent']:.0f} %, "
        f"CPUs busy {'/'.join(map(str, row['cpus_busy_percent']))} %)  "
        f"p50 {wrk['p50_us'] / 1000:.1f} ms  p99 {wrk['p99_us'] / 1000:.1f} ms"
    )
    if "delivered_cpu_us" in row:
        text += f"  {row['delivered_cpu_us']:5.0f} µs/delivered (drain {row['drain_s']:.1f} s"
        text += f"; loop {row['main_thread_us']:.0f} + threads {row['other_threads_us']:.0f})"
        if not row.get("drained"):
            text += " NOT DRAINED"
    errors = {k: wrk[k] for k in ("status_errors", "connect", "read", "write", "timeout") if wrk[k]}
    return text + (f"  errors {errors}" if errors else "")


def median(rows: list[dict[str, Any]], key: str) -> float:
    values = [row[key] for row in rows if key in row]
    return statistics.median(values) if values else float("nan")


def table(report: dict[str, Any]) -> str:
    variants = report["variants"]
    bare_us = median(variants["bare"], "cpu_us")
    naive_rate = median(variants["naive"], "ok_per_s")
    out = [
        f"medians of {len(variants['bare'])} alternated runs"
        f" ({report['args']['seconds']} s each, {report['args']['connections']} connections)",
        "",
        "| | 2xx/s | server CPU µs per webhook | µs per delivered webhook (drain included)"
        " | of which event loop / other threads | fake Braze µs per webhook |",
        "|---|---|---|---|---|---|",
    ]
    for name, rows in variants.items():
        delivered = median(rows, "delivered_cpu_us")
        out.append(
            f"| {name} | {median(rows, 'ok_per_s'):,.0f} | {median(rows, 'cpu_us'):,.0f} | "
            + (f"{delivered:,.0f}" if delivered == delivered else "")
            + " | "
            + (
                f"{median(rows, 'main_thread_us'):,.0f} / {median(rows, 'other_threads_us'):,.0f}"
                if delivered == delivered
                else ""
            )
            + f" | {median(rows, 'braze_cpu_us'):,.0f} |"
        )
    gw = variants["gateway"]
    ratio = median(gw, "ok_per_s") / naive_rate
    cost = median(gw, "delivered_cpu_us") / bare_us
    out += [
        "",
        f"gateway intake / naive forwarder: {ratio:.2f} x (target >= 2: "
        f"{'met' if ratio >= 2 else 'NOT met'})",
        f"gateway CPU per delivered webhook / bare handler's per webhook: {cost:.1f} x "
        f"(target <= 3: {'met' if cost <= 3 else 'NOT met'})",
    ]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/wrk.py", description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=12.0, help="load per run (default 12)")
    parser.add_argument("--rounds", type=int, default=3, help="alternated rounds (default 3)")
    parser.add_argument("--connections", type=int, default=64, help="wrk connections")
    parser.add_argument("--latency-ms", type=float, default=10.0, help="fake Braze latency")
    parser.add_argument(
        "--variants",
        default="",
        help="more servers, comma-separated: bare+uvloop, bare+group, naive+uvloop, "
        "gateway+uvloop, gateway+nolog, gateway+syncnormal, gateway+procs2, gateway+txtime, "
        "gateway+gctime, gateway+switch (or combined: "
        "gateway+uvloop+nolog)",
    )
    parser.add_argument(
        "--baseline",
        type=Path,
        metavar="DIR",
        help="also run the gateway imported from DIR (holding a gateway/ package, e.g. from"
        " `git archive COMMIT gateway | tar -x -C DIR`) as the variant gateway@base",
    )
    parser.add_argument("--drain-timeout", type=float, default=90.0, help="seconds, at most")
    parser.add_argument("--no-pin", action="store_true", help="no taskset")
    parser.add_argument("--sql", action="store_true", help="count SQL statements per webhook")
    parser.add_argument("--profile", type=Path, metavar="DIR", help="py-spy a gateway run")
    parser.add_argument(
        "--gil",
        action="store_true",
        help="with --profile: sample only the thread holding the GIL (the Python CPU)",
    )
    parser.add_argument("--json", type=Path, help="also write every figure to this file")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs, spools)")
    args = parser.parse_args(argv)
    if (os.cpu_count() or 1) < 2 and not args.no_pin:
        args.no_pin = True  # one CPU: nothing to pin apart

    started = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="gateway-wrk-"))
    (tmp / "logs").mkdir()
    procs = Procs(tmp / "logs")
    try:
        report = Bench(args, procs, tmp).run()
    except (RuntimeError, subprocess.SubprocessError, OSError) as exc:
        print(f"benchmark failed: {exc}", file=sys.stderr)
        print(f"logs: {tmp / 'logs'}", file=sys.stderr)
        args.keep = True
        return 1
    finally:
        procs.stop_all()
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    report["wall_s"] = time.monotonic() - started
    print()
    print(table(report))
    print(f"\n(the whole benchmark took {report['wall_s']:.0f} s)")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
