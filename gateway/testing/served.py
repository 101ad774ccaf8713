"""What the fakes of `gateway.testing` share: serving their aiohttp app on loopback."""

from __future__ import annotations

import msgspec
from aiohttp import web


class Served:
    """Serves `self.app` on loopback: `start()` it, point a client at `url`, `stop()` it."""

    app: web.Application

    def __init__(self) -> None:
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Serve on host:port (0 picks a free port) and return the base URL."""
        # A short shutdown_timeout: stop() must not wait out a handler sleeping in latency_s.
        self._runner = web.AppRunner(self.app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        await web.TCPSite(self._runner, host, port).start()
        port = self._runner.addresses[0][1]
        # An IPv6 address is bracketed in a URL (the demo's fake://[::1]:PORT logs this one).
        self.url = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
        return self.url

    async def stop(self) -> None:
        """Stop serving; the recorded traffic stays readable."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


def readable(status: int, payload: object) -> web.Response:
    """JSON for people reading along (`curl` in a terminal): indented, ending in a newline."""
    body = msgspec.json.format(msgspec.json.encode(payload), indent=2) + b"\n"
    return web.Response(status=status, body=body, content_type="application/json")
