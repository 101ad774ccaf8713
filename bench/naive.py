"""The naive forwarder: map each webhook and call Braze once, inside the request, then answer.

    python bench/naive.py --config gateway.toml --port 0   # prints "naive listening on URL"

It reads the same gateway.toml as the gateway (auth secrets, Braze URL and key, mapping folder),
checks the same OAuth2 tokens, and maps with the same rules and the same Braze object builder.
What it leaves out is the point of the comparison: no spool (a crash loses what Didomi was told
was taken), no batching (one `/users/track` call per webhook), no retries, no rate pacing. It
answers 202 once Braze answered 2xx, 502 otherwise, 200 for a webhook that changes nothing.
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import AsyncIterator

import aiohttp
import msgspec
from aiohttp import web
from serving import serve

from gateway.config.settings import Config, braze_base_url, load_config
from gateway.http.auth import TokenIssuer, authenticator_for, token_endpoint
from gateway.peers.braze_bodies import track_object
from gateway.rules.mappings import Mapped, RuleSet, load_rules, options_of
from gateway.shapes.webhooks import WebhookError, decode

SESSION = web.AppKey("session", aiohttp.ClientSession)


def _json(status: int, payload: dict[str, str]) -> web.Response:
    return web.Response(
        status=status, body=msgspec.json.encode(payload), content_type="application/json"
    )


def app(config: Config) -> web.Application:
    rules: RuleSet = load_rules(config.mappings.dir, options_of(config))
    issuer = TokenIssuer(config.auth.client_id, config.auth.client_secret, config.auth.token_ttl_s)
    auth = authenticator_for(config.auth, issuer=issuer)
    track_url = braze_base_url(config.braze.server) + "/users/track"
    braze_headers = {
        "Authorization": f"Bearer {config.braze.api_key}",
        "Content-Type": "application/json",
    }

    async def webhook(request: web.Request) -> web.Response:
        if not auth.authenticate(request.headers.get("Authorization")):
            return _json(401, {"error": "unauthorized", "detail": "bad token"})
        try:
            result = rules.apply(decode(await request.read()))
        except WebhookError as exc:
            return _json(400, {"error": "bad_request", "detail": str(exc)})
        if not isinstance(result, Mapped):
            return _json(200, {"status": "ignored", "detail": result.reason})
        obj = track_object(
            result.identity,
            result.person,
            result.changes,
            update_existing_only=config.braze.update_existing_only,
        )
        body = msgspec.json.encode({"attributes": [obj]})
        try:
            async with request.app[SESSION].post(
                track_url, data=body, headers=braze_headers
            ) as response:
                await response.read()
                status = response.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            return _json(502, {"error": "braze_unreachable", "detail": type(exc).__name__})
        if 200 <= status < 300:
            return _json(202, {"status": "accepted"})
        return _json(502, {"error": "braze_refused", "detail": f"Braze answered {status}"})

    async def session_ctx(application: web.Application) -> AsyncIterator[None]:
        timeout = aiohttp.ClientTimeout(total=config.braze.timeout_s)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            application[SESSION] = session
            yield

    application = web.Application()
    application.cleanup_ctx.append(session_ctx)
    application.router.add_post("/oauth/token", functools.partial(token_endpoint, issuer))
    application.router.add_post("/webhooks/didomi", webhook)
    return application


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="bench/naive.py", description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="the gateway.toml to read")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    serve(app(load_config(args.config)), "naive", args.host, args.port)
