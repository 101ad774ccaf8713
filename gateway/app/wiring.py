"""The delivery context: both directions' clients and workers, reloads, retention, drift.

`delivery(live)` is what `serve` adds to `create_app`'s contexts: the Braze client and the
dispatcher, Didomi's client and the writeback (with `[didomi_api] enabled`), rule reloads
(SIGHUP, the mappings watcher), the retention task and the reconcile drift follower; on a
PostgreSQL spool it joins the dispatcher to the replicas' leases and shared budget.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING

from aiohttp import web

from gateway.app.reload import LiveRules
from gateway.app.retention import Retention
from gateway.bulk.drift import follow as follow_drift
from gateway.config.settings import Config, fake_braze_address, fake_didomi_address
from gateway.errors import GatewayError
from gateway.forward.dispatcher import Dispatcher
from gateway.http.intake import CONFIG, METRICS, SPOOL, STATE, nothing
from gateway.peers.braze import open_client
from gateway.peers.didomi import open_didomi_client
from gateway.reverse.writeback import Writeback
from gateway.rules.ruleset import RuleSet
from gateway.spool.replicas import Budget, Replicas

if TYPE_CHECKING:  # test code: loaded only when a demo serves a fake
    from gateway.testing.served import Served

log = logging.getLogger("gateway.server")

Context = Callable[[web.Application], AsyncIterator[None]]

DISPATCHER = web.AppKey("gateway.dispatcher", Dispatcher)
WRITEBACK = web.AppKey("gateway.writeback", Writeback)
RULES = web.AppKey("gateway.rules", LiveRules)
REPLICAS = web.AppKey("gateway.replicas", Replicas)  # only with a PostgreSQL spool
BUDGET = web.AppKey("gateway.budget", Budget)


def delivery(live: LiveRules) -> Context:
    """The context that runs delivery both ways: the Braze client and the dispatcher, Didomi's
    client and the writeback (with `[didomi_api] enabled`), and rule reloads."""

    async def context(app: web.Application) -> AsyncIterator[None]:
        config, metrics, state, spool = app[CONFIG], app[METRICS], app[STATE], app[SPOOL]
        async with contextlib.AsyncExitStack() as stack:
            # Entered first, so it stops last: delivery finishes against it before it goes.
            await stack.enter_async_context(_fake_braze(config))
            client = await stack.enter_async_context(open_client(config.braze, metrics))
            dispatcher = Dispatcher(config, spool, live.current, client, metrics)
            back: Writeback | None = None
            if config.didomi_api.enabled:
                await stack.enter_async_context(_fake_didomi(config, live.current()))
                didomi = await stack.enter_async_context(
                    open_didomi_client(config.didomi_api, on_request=metrics.didomi_request)
                )
                back = Writeback(config, spool, live.current, didomi, metrics)
                app[WRITEBACK] = back

            def follow(new: Config) -> None:
                client.reconfigure(new.braze)  # key, server, timeout, rate: next request on
                # The dispatcher reads its config for each batch; max_in_flight keeps its start
                # value here, since LiveRules passes on live keys only.
                dispatcher.config = new
                if back is not None:
                    back.config = new

            live.listeners.append(follow)
            replicas = app.get(REPLICAS)
            if replicas is not None:
                # One budget and one owner per partition across replicas (replicas.py).
                client.limiter.shared = app[BUDGET]
                client.limiter.replicas = lambda: replicas.live
                replicas.busy.append(dispatcher.busy_partitions)
                replicas.on_change.append(dispatcher.wake)
                if back is not None:
                    replicas.busy.append(back.busy_partitions)
                    replicas.on_change.append(back.wake)
            # Delivery trouble is reported, never a reason to refuse webhooks (readiness).
            state.degraded_checks.append(dispatcher.degraded_reason)
            state.on_wake = dispatcher.wake
            state.person_of = lambda webhook: live.current().person(webhook)
            state.identity = lambda: live.current().identity
            app[DISPATCHER] = dispatcher
            app[RULES] = live
            await dispatcher.start()
            if back is not None:
                state.degraded_checks.append(back.degraded_reason)
                state.on_wake_to_didomi = back.wake
                back.forward = dispatcher  # Braze's reports wait for earlier Didomi rows
                await back.start()
            loop = asyncio.get_running_loop()

            def on_sighup() -> None:
                log.info("SIGHUP: reloading gateway.toml and the mappings")
                live.request_reload()  # after the reload under way, if any: the newest wins

            with contextlib.suppress(NotImplementedError, RuntimeError):  # not the main thread
                loop.add_signal_handler(signal.SIGHUP, on_sighup)
            watcher = asyncio.create_task(live.watch()) if config.mappings.watch else None
            retention = Retention(spool, config.retention, metrics)
            retention.start()
            # The last reconcile's drift, for /metrics: a read of one row a minute.
            drift_ratios = asyncio.create_task(follow_drift(spool, metrics))
            try:
                yield
            finally:
                drift_ratios.cancel()
                await asyncio.gather(drift_ratios, return_exceptions=True)
                await retention.stop()
                with contextlib.suppress(NotImplementedError, RuntimeError):
                    loop.remove_signal_handler(signal.SIGHUP)
                if watcher is not None:
                    watcher.cancel()
                    await asyncio.gather(watcher, return_exceptions=True)
                await live.close()
                state.on_wake = state.on_wake_to_didomi = nothing
                # One budget for the whole shutdown: what waiting for requests used is gone.
                grace = config.server.shutdown_timeout_s
                if state.drain_started is not None:
                    grace -= time.monotonic() - state.drain_started
                stops = [dispatcher.stop(grace_s=max(0.0, grace))]
                if back is not None:
                    stops.append(back.stop(grace_s=max(0.0, grace)))
                await asyncio.gather(*stops)
                live.listeners.remove(follow)

    return context


@contextlib.asynccontextmanager
async def _fake_didomi(config: Config, rules: RuleSet) -> AsyncIterator[None]:
    """The demo's fake Didomi (`didomi_api.base_url = "fake://..."`), served by this process,
    its library holding the purposes and preference values the rules name (`check --online`)."""
    api = config.didomi_api
    address = fake_didomi_address(api.base_url)
    if address is None:
        yield
        return
    from gateway.testing.didomi import FakeDidomi  # test code, and only a demo needs it

    fake = FakeDidomi(key=api.key, secret=api.secret, organization_id=api.organization_id)
    preferences: dict[str, list[str]] = {}
    for ref in rules.references:
        if ref.kind == "preference":
            preferences.setdefault(ref.id, [])
        elif ref.kind == "value" and ref.preference is not None:
            values = preferences.setdefault(ref.preference, [])
            values += [] if ref.id in values else [ref.id]
    purposes = sorted({ref.id for ref in rules.references if ref.kind == "purpose"})
    fake.define(purposes, preferences)
    async with _serving(fake, address, "didomi_api.base_url", "Didomi", "organization_user_id"):
        yield


@contextlib.asynccontextmanager
async def _fake_braze(config: Config) -> AsyncIterator[None]:
    """The demo's fake Braze (`braze.server = "fake://..."`), served by this process."""
    address = fake_braze_address(config.braze.server)
    if address is None:
        yield
        return
    from gateway.testing.braze import FakeBraze  # test code, and only a demo needs it

    fake = FakeBraze(api_key=config.braze.api_key)
    async with _serving(fake, address, "braze.server", "Braze", "external id"):
        yield


@contextlib.asynccontextmanager
async def _serving(
    fake: Served, address: tuple[str, int], key: str, name: str, person: str
) -> AsyncIterator[None]:
    """Serve a demo's fake on its loopback port for as long as the context lasts."""
    host, port = address
    try:
        url = await fake.start(host, port)
    except OSError as exc:
        raise GatewayError(
            f"cannot serve the demo's fake {name} on {host}:{port}: {exc.strerror or exc};"
            f" pick another port in {key}"
        ) from None
    # Loud on purpose: a gateway that looks healthy while nothing reaches the real service is
    # a demo only.
    log.warning(
        "DEMO: %s is the fake %s of gateway.testing, served by this process at %s: nothing"
        " reaches a real %s and its users are lost at exit; see a person at %s/fake/users/<%s>",
        key,
        name,
        url,
        name,
        url,
        person,
        extra={f"fake_{name.lower()}": url},
    )
    try:
        yield
    finally:
        await fake.stop()
