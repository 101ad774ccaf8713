"""Backfill throughput: a generated Didomi export through `gateway backfill` into Braze.

The fake Braze (in this process, 10 ms latency) counts the objects it receives; the gateway
(`python -m gateway run`, requests_per_second = 1000, backfill.share = 0.5) delivers the lane
while `python -m gateway backfill FOLDER` stores it, and a live webhook every 100 ms measures
live latency (POSTed to the gateway -> seen by Braze). The export is laid out as Didomi's batch
export (`date=.../users/*.json.gz` and `_SUCCESS`). Reported: users/s stored (the command's
run) and delivered (first to last backfilled object at Braze), the peak RSS of both processes
(VmHWM), live p99, and CPU per user from /proc (the gateway's per delivered user, the
command's per stored user). Then the same kind of users through the webhook path.

    python bench/backfill.py --users 1000000                 # SQLite spool
    python bench/backfill.py --users 1000000 --postgres      # a throwaway PostgreSQL spool
    python bench/backfill.py --users 200000 --profile DIR    # py-spy the gateway during the lane

`--profile DIR` samples the gateway with py-spy (DIR/gateway.collapsed, for
`bench/profile_top.py`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gzip
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from procs import HOST, PYTHON, ROOT, TICKS, Procs, cpu_ticks, free_port, memory_kb, wait_for
from run import profile

from gateway.testing.braze import FakeBraze

TOKEN = "bench-backfill-token"  # the benchmark gateway's own bearer token
API_KEY = "bench-backfill-key"


class CountingBraze(FakeBraze):
    """Records nothing but counts: backfilled objects, and when each live person arrived."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(api_key=API_KEY, record=False, **kw)
        self.backfilled = 0
        self.backfill_requests = 0
        self.webhooked = 0
        self.live_seen: dict[str, float] = {}
        self.first_backfilled: float | None = None  # monotonic
        self.last_backfilled: float | None = None

    def _answer(self, request: Any, raw: Any, body: Any, apply: Any) -> Any:
        now = time.time()
        before = self.backfilled
        for obj in (body or {}).get("attributes") or [] if isinstance(body, dict) else []:
            ext = str(obj.get("external_id", ""))
            if ext.startswith("live-"):
                self.live_seen.setdefault(ext, now)
            elif ext.startswith("hook-"):
                self.webhooked += 1
            else:
                self.backfilled += 1
                self.last_backfilled = time.monotonic()
                if self.first_backfilled is None:
                    self.first_backfilled = self.last_backfilled
        self.backfill_requests += self.backfilled > before
        return super()._answer(request, raw, body, apply)


def generate(folder: Path, users: int, files: int) -> Path:
    """Didomi batch-export lines (the user wrapped with its events, dates over three years) in
    `files` gzip files of a `date=` partition, with its `_SUCCESS` marker; returns the folder."""
    now = datetime.now(UTC)
    users_dir = folder / "export-id=bench" / f"date={now:%Y-%m-%d}" / "users"
    users_dir.mkdir(parents=True)
    per_file = -(-users // files)
    for part in range(files):
        name = users_dir / f"part-{part:05d}.json.gz"
        with gzip.open(name, "wt", compresslevel=1) as out:
            for n in range(part * per_file, min(users, (part + 1) * per_file)):
                when = (now - timedelta(minutes=n % 1_500_000)).strftime("%Y-%m-%dT%H:%M:%S.000Z")
                enabled = "true" if n % 3 else "false"
                out.write(
                    f'{{"user":{{"id":"d-{n}","organization_id":"acme","organization_user_id":'
                    f'"u{n}","updated_at":"{when}","created_at":"{when}","consents":{{"purposes":'
                    f'[{{"id":"marketing_email","enabled":{enabled},"values":{{"topics":{{"value":'
                    f'"product_news"}}}}}}],"channels":[],"vendors":{{}}}}}},"events":[]}}\n'
                )
    (users_dir / "_SUCCESS").write_bytes(b"")
    return folder


def webhook(person: str, enabled: bool) -> bytes:
    """A user.updated webhook as Didomi sends it, dated now."""
    at = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    entity = {
        "id": f"d-{person}",
        "organization_user_id": person,
        "updated_at": at,
        "consents": {"purposes": [{"id": "marketing_email", "enabled": enabled}]},
    }
    return json.dumps({"type": "user.updated", "parameters": {"new_entity": entity}}).encode()


def post(base: str, body: bytes) -> int:
    """POST one webhook with the bench's bearer token."""
    request = urllib.request.Request(  # noqa: S310 - loopback only
        base + "/webhooks/didomi",
        data=body,
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {TOKEN}"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
        return int(response.status)


def config(path: Path, port: int, braze_url: str, spool: str, args: argparse.Namespace) -> None:
    path.write_text(
        f"""[server]
host = "{HOST}"
port = {port}
[auth]
mode = "bearer"
tokens = ["{TOKEN}"]
[braze]
server = "{braze_url}"
api_key = "{API_KEY}"
requests_per_second = {args.rps}
[delivery]
spool = "{spool}"
[mappings]
dir = "{ROOT / "mappings"}"
[backfill]
share = {args.share}
"""
    )


def _peak_kb(pid: int) -> int:
    """VmHWM of a process still running; 0 once it is gone."""
    with contextlib.suppress(OSError):
        return memory_kb(pid).get("VmHWM", 0)
    return 0


def _ticks(pid: int) -> int | None:
    with contextlib.suppress(OSError, IndexError, ValueError):
        return cpu_ticks(pid)
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--users", type=int, default=1_000_000)
    parser.add_argument("--files", type=int, default=8, help="export files the users are split in")
    parser.add_argument("--webhook-users", type=int, default=10_000)
    parser.add_argument("--latency-ms", type=float, default=10.0)
    parser.add_argument("--rps", type=float, default=1000.0)
    parser.add_argument("--share", type=float, default=0.5)
    parser.add_argument("--postgres", action="store_true", help="a throwaway PostgreSQL spool")
    parser.add_argument("--profile", type=Path, metavar="DIR", help="py-spy the gateway into DIR")
    parser.add_argument("--profile-s", type=float, default=30.0, help="how long to sample")
    parser.add_argument("--keep", action="store_true", help="keep the export, spool and logs")
    args = parser.parse_args()
    with contextlib.ExitStack() as stack:
        spool = None
        if args.postgres:
            from gateway.testing.postgres import running

            spool = stack.enter_context(running(fsync=True)).database()
        return _run(args, spool)


def _run(args: argparse.Namespace, spool: str | None) -> int:
    tmp = Path(tempfile.mkdtemp(prefix="bench-backfill-"))
    started = time.monotonic()
    export = generate(tmp / "data", args.users, args.files)
    print(f"generated {args.users:,} users in {time.monotonic() - started:.1f} s", flush=True)

    loop = asyncio.new_event_loop()
    braze = CountingBraze(latency_s=args.latency_ms / 1000)
    threading.Thread(target=loop.run_forever, daemon=True).start()
    braze_url = asyncio.run_coroutine_threadsafe(braze.start(HOST, 0), loop).result()

    procs = Procs(tmp)
    port = free_port()
    toml = tmp / "gateway.toml"
    config(toml, port, braze_url, spool or str(tmp / "spool.db"), args)
    base = f"http://{HOST}:{port}"
    try:
        gateway = procs.start("gateway", [PYTHON, "-m", "gateway", "run", "--config", str(toml)])

        def ready() -> bool:
            with urllib.request.urlopen(base + "/readyz", timeout=1) as r:  # noqa: S310
                return bool(r.status == 200)

        wait_for("the gateway", gateway, ready)
        live_sent: dict[str, float] = {}
        stop = threading.Event()

        def live() -> None:
            n = 0
            while not stop.is_set():
                person = f"live-{n}"
                live_sent[person] = time.time()
                with contextlib.suppress(OSError):
                    post(base, webhook(person, n % 2 == 0))
                n += 1
                stop.wait(0.1)

        sender = threading.Thread(target=live, daemon=True)
        sender.start()
        gateway_ticks0 = cpu_ticks(gateway.pid)
        t0 = time.monotonic()
        own0 = time.process_time()  # this process: the fake Braze, the live sender
        spy = profile(procs, gateway, args.profile, args.profile_s)
        command = procs.start(
            "backfill", [PYTHON, "-m", "gateway", "backfill", str(export), "--config", str(toml)]
        )
        rss = {"gateway": 0, "backfill": 0}
        command_ticks = 0
        stored_at = None
        shown = t0
        while True:
            for name, proc in (("gateway", gateway), ("backfill", command)):
                rss[name] = max(rss[name], _peak_kb(proc.pid))
            # The command's CPU, sampled while it runs (its /proc entry goes when it is reaped).
            command_ticks = _ticks(command.pid) or command_ticks
            if gateway.popen.poll() is not None:
                raise RuntimeError(f"the gateway exited:\n{gateway.tail()}")
            if stored_at is None and command.popen.poll() is not None:
                stored_at = time.monotonic()
                if command.popen.returncode != 0:
                    raise RuntimeError(f"gateway backfill failed:\n{command.tail()}")
            if stored_at is not None and braze.backfilled >= args.users:
                break
            if time.monotonic() - t0 > 3 * 3600:
                raise RuntimeError(f"not delivered after three hours: {braze.backfilled:,}")
            if time.monotonic() - shown > 30:
                shown = time.monotonic()
                print(
                    f"  {time.monotonic() - t0:.0f} s: {braze.backfilled:,} delivered", flush=True
                )
            time.sleep(0.2)
        delivered_at = time.monotonic()
        gateway_ticks = cpu_ticks(gateway.pid) - gateway_ticks0
        own_s = time.process_time() - own0
        if spy is not None:
            procs.stop(spy, grace_s=30, sig=signal.SIGINT)  # it writes what it sampled
        stop.set()
        sender.join()
        time.sleep(1.0)
        latencies = sorted(
            braze.live_seen[p] - at for p, at in live_sent.items() if p in braze.live_seen
        )
        p99 = latencies[int(len(latencies) * 0.99) - 1] if latencies else float("nan")
        lost_live = len(live_sent) - len(latencies)
        summary = command.out.read_text() + command.err.read_text()

        # The same kind of users through the webhook path, 64 at a time.
        hook_t0 = time.monotonic()
        bodies = [webhook(f"hook-{n}", n % 3 != 0) for n in range(args.webhook_users)]
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(64) as pool:
            list(pool.map(lambda b: post(base, b), bodies))
        while braze.webhooked < args.webhook_users and time.monotonic() - hook_t0 < 600:
            time.sleep(0.05)
        hook_rate = braze.webhooked / (time.monotonic() - hook_t0)
        rss["gateway"] = max(rss["gateway"], _peak_kb(gateway.pid))
    finally:
        procs.stop_all()
        asyncio.run_coroutine_threadsafe(braze.stop(), loop).result()
        if args.keep:
            print(f"kept {tmp}", flush=True)
        else:
            shutil.rmtree(tmp, ignore_errors=True)  # the export and the spool: GBs at 1,000,000

    assert stored_at is not None
    first, last = braze.first_backfilled or t0, braze.last_backfilled or delivered_at
    result = {
        "users": args.users,
        "spool": "postgresql" if spool else "sqlite",
        "stored_per_s": round(args.users / (stored_at - t0)),
        "delivered_per_s": round(braze.backfilled / max(last - first, 1e-6)),
        "end_to_end_per_s": round(args.users / (delivered_at - t0)),
        "gateway_cpu_percent": round(100 * gateway_ticks / TICKS / (delivered_at - t0)),
        "fake_braze_cpu_percent": round(100 * own_s / (delivered_at - t0)),
        "backfill_users_per_request": round(args.users / max(1, braze.backfill_requests), 1),
        "webhook_path_per_s": round(hook_rate),
        "rss_mb": {k: round(v / 1024) for k, v in rss.items()},
        "live_p99_s": round(p99, 3),
        "live_median_s": round(statistics.median(latencies), 3) if latencies else None,
        "live_count": len(latencies),
        "live_not_seen": lost_live,
        "gateway_cpu_ms_per_delivered_user": round(
            gateway_ticks / TICKS * 1000 / max(braze.backfilled, 1), 3
        ),
        "command_cpu_ms_per_stored_user": round(command_ticks / TICKS * 1000 / args.users, 3),
        "objects_at_braze": braze.backfilled,  # above `users`: redelivered (at least once)
    }
    print("\n".join(summary.strip().splitlines()[-4:]))
    print(json.dumps(result, indent=2))
    print(
        "| spool | users | stored/s | delivered/s | end to end/s | webhook path/s | RSS backfill"
        " | RSS gateway | live p99 | gateway CPU/user |\n" + "|---" * 10 + "|\n"
        f"| {result['spool']} | {args.users:,} | {result['stored_per_s']:,} |"
        f" {result['delivered_per_s']:,} | {result['end_to_end_per_s']:,} |"
        f" {result['webhook_path_per_s']:,} | {result['rss_mb']['backfill']} MB |"
        f" {result['rss_mb']['gateway']} MB | {result['live_p99_s']} s |"
        f" {result['gateway_cpu_ms_per_delivered_user']} ms |"
    )
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    os.chdir(ROOT)
    sys.exit(main())
