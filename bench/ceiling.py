"""The ceiling: a bare aiohttp server answering 202 to every webhook, doing nothing else.

    python bench/ceiling.py --port 0      # prints "ceiling listening on http://127.0.0.1:PORT"

It reads the body (a real server must drain it to reuse the connection) and nothing more: no
auth, no decoding, no storage. No Python HTTP service on aiohttp answers faster on this host.
"""

from __future__ import annotations

import argparse

from aiohttp import web
from serving import serve


async def webhook(request: web.Request) -> web.Response:
    await request.read()
    return web.Response(status=202, body=b'{"status":"accepted"}', content_type="application/json")


def app() -> web.Application:
    application = web.Application()
    application.router.add_post("/webhooks/didomi", webhook)
    return application


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="bench/ceiling.py", description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    serve(app(), "ceiling", args.host, args.port)
