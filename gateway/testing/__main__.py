"""`python -m gateway.testing`: serve a fake Braze standalone, for benchmarks."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import Sequence

from gateway.testing.braze import FakeBraze


async def _serve_forever(args: argparse.Namespace) -> None:
    fake = FakeBraze(
        api_key=args.api_key,
        latency_s=args.latency_ms / 1000,
        rate_limit=args.rate_limit or None,  # 0 lifts the limit (bench/README.md), not a 429 each
        rate_window_s=args.rate_window_s,
        reset_style=args.reset_style,
        record=False,  # a long benchmark must not grow memory with every request
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    url = await fake.start(args.host, args.port)
    print(f"fake braze listening on {url}", flush=True)
    try:
        await stop.wait()
    finally:
        await fake.stop()


def main(argv: Sequence[str] | None = None) -> int:
    """Serve a fake Braze until SIGTERM or SIGINT."""
    parser = argparse.ArgumentParser(prog="python -m gateway.testing", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000)
    parser.add_argument("--latency-ms", type=float, default=0.0)
    parser.add_argument("--api-key", default="test-braze-key")
    parser.add_argument("--rate-limit", type=int, default=None)
    parser.add_argument("--rate-window-s", type=float, default=3.0)
    parser.add_argument("--reset-style", choices=("epoch", "seconds"), default="epoch")
    asyncio.run(_serve_forever(parser.parse_args(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
