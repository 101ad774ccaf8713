"""The one middleware every request passes: `server.allow_from`, JSON errors, request metrics.

Three middlewares did this before, each a coroutine frame and an `await` per request; at
thousands of webhooks a second the chain cost more than the checks themselves.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections.abc import Collection
from http import HTTPStatus

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from gateway.http.intake import error_answer
from gateway.metrics import Metrics

log = logging.getLogger("gateway.server")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def front(
    metrics: Metrics, networks: tuple[Network, ...], guarded: Collection[str], counted: str
) -> Middleware:
    """The middleware: refuse callers outside `networks` on the `guarded` paths (counting a
    refused webhook on `counted`), answer aiohttp's own errors as JSON, count and time all."""
    meter = metrics.request_meter()

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        started = time.perf_counter()
        status = 500
        try:
            try:
                if networks and request.path in guarded and not _allowed(request.remote, networks):
                    response: web.StreamResponse = _refuse(request, metrics, counted)
                else:
                    response = await handler(request)
            except web.HTTPException as exc:
                if exc.status < 400:
                    status = exc.status
                    raise
                response = _json_error(request, exc)
            except Exception:
                log.exception("error handling %s %s", request.method, request.path)
                response = error_answer(
                    500, "internal_error", "the gateway failed on this request; see its log"
                )
            status = response.status
            return response
        except asyncio.CancelledError:
            status = 499  # the client went away before the answer (nginx's convention)
            raise
        finally:
            meter(request, status, time.perf_counter() - started)

    return middleware


def _refuse(request: web.Request, metrics: Metrics, counted: str) -> web.Response:
    """`server.allow_from`: only the listed networks may call the Didomi-facing routes."""
    if request.path == counted:
        metrics.webhook("other", "unauthorized")
    log.info("request refused: %s is not in server.allow_from", request.remote)
    return error_answer(
        403, "forbidden", "this address may not call the gateway (server.allow_from)"
    )


def _json_error(request: web.Request, exc: web.HTTPException) -> web.Response:
    """aiohttp's own error answers (404, 405, ...) as JSON `{"error", "detail"}` too."""
    if exc.status == 404:
        detail = f"nothing at {request.path}"
    elif exc.status == 405:
        detail = f"{request.method} is not allowed here; use {exc.headers.get('Allow', '')}"
    else:
        detail = exc.reason
    headers = {k: v for k, v in exc.headers.items() if k.lower() in ("allow", "retry-after")}
    code = HTTPStatus(exc.status).phrase.lower().replace(" ", "_").replace("-", "_")
    return error_answer(exc.status, code, detail, headers)


def _allowed(remote: str | None, networks: tuple[Network, ...]) -> bool:
    if remote is None:
        return False  # not a TCP peer: nothing to check against, so refuse
    try:
        address = ipaddress.ip_address(remote.partition("%")[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address in network for network in networks)
