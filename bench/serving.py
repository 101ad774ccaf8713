"""Serve one aiohttp app for a benchmark: free port, a "listening on URL" line, stop on SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal

from aiohttp import web


async def _serve(app: web.Application, name: str, host: str, port: int) -> None:
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=2.0)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        print(f"{name} listening on http://{host}:{runner.addresses[0][1]}", flush=True)
        await stop.wait()
    finally:
        await runner.cleanup()


def serve(app: web.Application, name: str, host: str = "127.0.0.1", port: int = 0) -> None:
    """Run `app` until SIGTERM or SIGINT; port 0 picks a free one (BENCH_LOOP=uvloop: on uvloop)."""
    if os.environ.get("BENCH_LOOP") == "uvloop":
        import uvloop  # only when asked: no extra of the gateway holds it

        uvloop.install()
    asyncio.run(_serve(app, name, host, port))
