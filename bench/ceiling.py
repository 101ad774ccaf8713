"""The ceiling: a bare aiohttp server answering 202 to every webhook, doing nothing else.

    python bench/ceiling.py --port 0      # prints "ceiling listening on http://127.0.0.1:PORT"

It reads the body (a real server must drain it to reuse the connection) and nothing more: no
auth, no decoding, no storage. No Python HTTP service on aiohttp answers faster on this host.

`--group`: each request waits for a "commit" as the gateway's intake does (`spool.Spool.put`):
its future joins a queue, one writer task hands the queue to a worker thread that sleeps 2 ms
(about a group commit's wall time here) and stores nothing, then resolves the futures. What
this costs beyond the ceiling is the mechanics of answering after a group commit, not SQLite.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

from aiohttp import web
from serving import serve

ACCEPTED = b'{"status":"accepted"}'


async def webhook(request: web.Request) -> web.Response:
    await request.read()
    return web.Response(status=202, body=ACCEPTED, content_type="application/json")


class Group:
    """Futures resolved a group at a time after a thread hop, as the spool's writer does."""

    def __init__(self) -> None:
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="group")
        self.queue: list[asyncio.Future[bool]] = []
        self.writer: asyncio.Task[None] | None = None

    async def webhook(self, request: web.Request) -> web.Response:
        await request.read()
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self.queue.append(future)
        if self.writer is None or self.writer.done():
            self.writer = asyncio.create_task(self.write())
        await future
        return web.Response(status=202, body=ACCEPTED, content_type="application/json")

    async def write(self) -> None:
        loop = asyncio.get_running_loop()
        while self.queue:
            batch, self.queue = self.queue, []
            await loop.run_in_executor(self.executor, time.sleep, 0.002)
            for future in batch:
                if not future.done():
                    future.set_result(True)


def app(group: bool = False) -> web.Application:
    application = web.Application()
    application.router.add_post("/webhooks/didomi", Group().webhook if group else webhook)
    return application


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="bench/ceiling.py", description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--group", action="store_true", help="answer after a group 'commit'")
    args = parser.parse_args()
    serve(app(args.group), "ceiling", args.host, args.port)
