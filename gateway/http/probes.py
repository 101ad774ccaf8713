"""The probes: `GET /healthz` (the process lives) and `GET /readyz` (it can take webhooks)."""

from __future__ import annotations

from aiohttp import web

from gateway.http.intake import METRICS, RETRY_AFTER_S, STATE, error_answer, json_answer


async def healthz(request: web.Request) -> web.Response:
    """`GET /healthz`: 200 while the process is alive."""
    return json_answer(200, {"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """`GET /readyz`: 200 when the spool and every added context are up, else 503 and why."""
    reason = request.app[STATE].not_ready_reason()
    request.app[METRICS].ready.set(0 if reason else 1)
    if reason is not None:
        return error_answer(503, "not_ready", reason, {"Retry-After": str(RETRY_AFTER_S)})
    degraded = request.app[STATE].degraded_reason()
    if degraded is not None:
        return json_answer(200, {"status": "ready", "degraded": degraded})
    return json_answer(200, {"status": "ready"})
