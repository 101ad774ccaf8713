"""Load generator: distinct Didomi webhooks at a fixed concurrency for a bounded time.

    python bench/load.py --url http://127.0.0.1:8080/webhooks/didomi --seconds 10 \
        --concurrency 64 --oauth http://127.0.0.1:8080/oauth/token --client-id didomi

With `--oauth`, the client secret comes from the environment (BENCH_CLIENT_SECRET), never the
command line; without it, the bearer token itself does (BENCH_TOKEN; the ceiling checks none).
Prints one JSON object: requests sent, accepted (202) per second, p50/p99 response time of the
accepted ones, errors by status or exception, and this process's own CPU time (to tell when the
load generator itself is the limit).

`run.py --replicas` also names the webhooks: `--tag` fixes the body stream (`--stream pairs`
for two choices per person), `--slice K/M` sends only webhooks n with n % M == K (two load
processes share one stream), `--only FILE` only the indexes a JSON list names (a resend), and
`--acked` lists the indexes answered 200 or 202 (stored, or already stored).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import itertools
import json
import os
import random
import resource
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import aiohttp
import events
from procs import TICKS, cpu_ticks


async def fetch_token(session: aiohttp.ClientSession, url: str, client_id: str) -> str:
    """An access token from the gateway's OAuth2 client-credentials endpoint."""
    form = {
        "grant_type": "client_credentials",
        "client_id": client_id,
        "client_secret": os.environ["BENCH_CLIENT_SECRET"],
    }
    async with session.post(url, data=form) as response:
        body = await response.json()
        if response.status != 200:
            raise SystemExit(f"token request failed: {response.status} {body}")
        return str(body["access_token"])


class Run:
    """Shared state of the workers: the body stream, the bounds, what came back."""

    def __init__(
        self, seconds: float, max_requests: int | None, bodies: Iterator[tuple[int, bytes]]
    ) -> None:
        self.bodies = bodies
        self.deadline = time.monotonic() + seconds
        self.left = max_requests if max_requests is not None else -1
        self.latencies: list[float] = []
        self.statuses: collections.Counter[str] = collections.Counter()
        self.acked: list[int] = []  # the indexes answered 200 or 202
        self.sent = 0

    def next_body(self) -> tuple[int, bytes] | None:
        if time.monotonic() >= self.deadline or self.left == 0:
            return None
        item = next(self.bodies, None)
        if item is not None:
            self.left -= 1
            self.sent += 1
        return item


async def worker(
    session: aiohttp.ClientSession, url: str, headers: dict[str, str], run: Run
) -> None:
    while (item := run.next_body()) is not None:
        n, body = item
        started = time.perf_counter()
        try:
            async with session.post(url, data=body, headers=headers) as response:
                await response.read()
                status = response.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            run.statuses[type(exc).__name__] += 1
            continue
        if status == 202:
            run.latencies.append(time.perf_counter() - started)
        if status in (200, 202):
            run.acked.append(n)
        run.statuses[str(status)] += 1


def percentile(sorted_values: list[float], q: float) -> float | None:
    """The nearest-rank percentile of an ascending list, or None when it is empty."""
    if not sorted_values:
        return None
    index = min(len(sorted_values) - 1, max(0, round(q * len(sorted_values) + 0.5) - 1))
    return sorted_values[index]


async def main(args: argparse.Namespace) -> dict[str, object]:
    connector = aiohttp.TCPConnector(limit=args.concurrency, force_close=False)
    timeout = aiohttp.ClientTimeout(total=args.timeout)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        if args.oauth is not None:
            token = await fetch_token(session, args.oauth, args.client_id)
        else:
            token = os.environ["BENCH_TOKEN"]
        headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        watched = dict(item.split("=", 1) for item in args.watch)
        ticks = {name: cpu_ticks(int(pid)) for name, pid in watched.items()}
        cpu_before = resource.getrusage(resource.RUSAGE_SELF)
        started_at = time.time()
        started = time.monotonic()
        run = Run(args.seconds, args.requests, numbered(args))
        await asyncio.gather(
            *(worker(session, args.url, headers, run) for _ in range(args.concurrency))
        )
        elapsed = time.monotonic() - started
        ended_at = time.time()
        cpu_after = resource.getrusage(resource.RUSAGE_SELF)
        ticks = {name: cpu_ticks(int(watched[name])) - t for name, t in ticks.items()}
    cpu = (cpu_after.ru_utime - cpu_before.ru_utime) + (cpu_after.ru_stime - cpu_before.ru_stime)
    latencies = sorted(run.latencies)
    p50, p99 = percentile(latencies, 0.50), percentile(latencies, 0.99)
    return {
        "sent": run.sent,
        "accepted": len(latencies),
        "elapsed_s": elapsed,
        "accepted_per_s": len(latencies) / elapsed if elapsed > 0 else 0.0,
        "p50_ms": None if p50 is None else p50 * 1000,
        "p99_ms": None if p99 is None else p99 * 1000,
        "errors": {k: v for k, v in run.statuses.items() if k != "202"},
        "cpu_s": cpu,
        "cpu_percent": 100 * cpu / elapsed if elapsed > 0 else 0.0,
        "watched_cpu_percent": {name: 100 * t / TICKS / elapsed for name, t in ticks.items()},
        "started_at": started_at,
        "ended_at": ended_at,
        **({"acked": sorted(run.acked)} if args.acked else {}),
    }


def numbered(args: argparse.Namespace) -> Iterator[tuple[int, bytes]]:
    """The (index, body) pairs this run sends, in order."""
    indexes: Iterable[int]
    if args.only is not None:
        indexes = json.loads(args.only.read_text())
    else:
        k, m = (int(part) for part in args.slice.split("/"))
        indexes = itertools.count(k, m)
    tag = random.getrandbits(32) if args.tag is None else args.tag
    return events.numbered(args.stream, tag, indexes)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench/load.py", description=__doc__.split("\n")[0])
    parser.add_argument("--url", required=True, help="the webhook URL")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--requests", type=int, default=None, help="stop after this many")
    parser.add_argument("--timeout", type=float, default=30.0, help="per request, seconds")
    parser.add_argument("--oauth", metavar="URL", help="the /oauth/token URL to get a token from")
    parser.add_argument("--client-id", default="didomi")
    parser.add_argument("--tag", type=int, help="the body stream's tag (default: random)")
    parser.add_argument("--stream", choices=("distinct", "pairs"), default="distinct")
    parser.add_argument("--slice", default="0/1", metavar="K/M", help="only n %% M == K")
    parser.add_argument("--only", type=Path, metavar="FILE", help="only these indexes (JSON)")
    parser.add_argument("--acked", action="store_true", help="list the indexes stored")
    parser.add_argument(
        "--watch",
        action="append",
        default=[],
        metavar="NAME=PID",
        help="also report the CPU this process used during the load (repeatable)",
    )
    return parser.parse_args(argv)


if __name__ == "__main__":
    result = asyncio.run(main(parse()))
    json.dump(result, sys.stdout)
    print()
