"""gateway.metrics: series at zero, route-labelled HTTP metrics, and the /metrics endpoint."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

import gateway
from gateway.http.front import front
from gateway.metrics import (
    BRAZE_TYPES,
    EVENT_TYPES,
    OUTCOMES,
    Metrics,
    metrics_handler,
)

Client = TestClient[web.Request, web.Application]
MakeClient = Callable[[web.Application], Awaitable[Client]]


def sample(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def make_app(metrics: Metrics) -> web.Application:
    # The gateway's one middleware, which counts and times every request.
    app = web.Application(middlewares=[front(metrics, (), (), "")])

    async def item(request: web.Request) -> web.Response:
        return web.json_response({"id": request.match_info["id"]})

    async def forbidden(request: web.Request) -> web.Response:
        raise web.HTTPForbidden(text="no")

    async def broken(request: web.Request) -> web.Response:
        raise RuntimeError("handler bug")

    app.router.add_get("/items/{id}", item)
    app.router.add_get("/forbidden", forbidden)
    app.router.add_get("/broken", broken)
    app.router.add_get("/metrics", metrics_handler(metrics))
    return app


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


@pytest.fixture
async def client(aiohttp_client: MakeClient, metrics: Metrics) -> Client:
    return await aiohttp_client(make_app(metrics))


def test_every_known_series_exists_at_zero(metrics: Metrics) -> None:
    """A fresh Metrics exports every known label set at zero, so rate() sees the first event."""
    for types, direction in ((EVENT_TYPES, "to_braze"), (BRAZE_TYPES, "to_didomi")):
        for type_ in types:
            for outcome in OUTCOMES:
                labels = {"direction": direction, "type": type_, "outcome": outcome}
                assert sample(metrics, "gateway_webhooks_received_total", **labels) == 0
    expected = {
        "gateway_updates_failed_total": ("rejected", "bad_request", "gave_up", "too_large"),
        "gateway_retries_total": (
            "server_error",
            "timeout",
            "connection",
            "rate_limited",
            "unauthorized",
            "misconfigured",
        ),
        "gateway_events_skipped_total": (
            "no_identity",
            "stale",
            "regulation",
            "not_confirmed",
            "deleted",
            "no_rule",
            "echo",
        ),
        "gateway_delivery_blocked": ("401", "403", "404", "405", "3xx"),
    }
    for direction in ("to_braze", "to_didomi"):
        for name, reasons in expected.items():
            for reason in reasons:
                value = sample(metrics, name, direction=direction, reason=reason)
                assert value == 0, (name, direction, reason)
    for outcome in ("success", "error"):
        assert sample(metrics, "gateway_config_reloads_total", outcome=outcome) == 0
    for endpoint in ("/users/track", "/users/delete"):
        count = "gateway_braze_request_duration_seconds_count"
        assert sample(metrics, count, endpoint=endpoint) == 0
    for direction in ("to_braze", "to_didomi"):
        for name in (
            "gateway_updates_delivered_total",
            "gateway_spool_pending",
            "gateway_spool_oldest_pending_age_seconds",
            "gateway_dead_letters",
            "gateway_delivery_latency_seconds_count",
        ):
            assert sample(metrics, name, direction=direction) == 0, (name, direction)
    assert sample(metrics, "gateway_ready") == 0
    assert sample(metrics, "gateway_braze_auth_ok") == 1


def test_build_info_carries_the_package_version(metrics: Metrics) -> None:
    """gateway_build_info is a gauge of 1 labelled with gateway.__version__."""
    assert sample(metrics, "gateway_build_info", version=gateway.__version__) == 1


def test_histogram_buckets_span_the_documented_ranges(metrics: Metrics) -> None:
    """Braze calls are bucketed from 5 ms to 30 s, delivery latency from 10 ms to one day."""
    for name, low, high, labels in (
        ("gateway_braze_request_duration_seconds", "0.005", "30.0", {"endpoint": "/users/track"}),
        ("gateway_delivery_latency_seconds", "0.01", "86400.0", {"direction": "to_braze"}),
    ):
        for le in (low, high, "+Inf"):
            assert sample(metrics, f"{name}_bucket", le=le, **labels) == 0, (name, le)


def test_two_instances_do_not_collide() -> None:
    """Each Metrics has its own registry, so two never clash and count independently."""
    first, second = Metrics(), Metrics()
    first.flow("to_braze").delivered.inc(3)
    assert sample(first, "gateway_updates_delivered_total", direction="to_braze") == 3
    assert sample(second, "gateway_updates_delivered_total", direction="to_braze") == 0


def test_an_injected_registry_is_used() -> None:
    """Metrics registers on the registry it is given."""
    registry = CollectorRegistry()
    Metrics(registry).flow("to_braze").pending.set(7)
    assert registry.get_sample_value("gateway_spool_pending", {"direction": "to_braze"}) == 7


def test_unknown_webhook_types_are_counted_as_other(metrics: Metrics) -> None:
    """A type sent by a client never becomes a label value unless it is one of the known ones."""
    metrics.webhook("user.updated", "accepted")
    metrics.webhook("alice@example.com", "ignored")
    metrics.webhook("braze.currents", "accepted")
    name = "gateway_webhooks_received_total"
    to_braze = {"direction": "to_braze"}
    assert sample(metrics, name, type="user.updated", outcome="accepted", **to_braze) == 1
    assert sample(metrics, name, type="other", outcome="ignored", **to_braze) == 1
    assert (
        sample(metrics, name, direction="to_didomi", type="braze.currents", outcome="accepted") == 1
    )
    assert b"alice" not in generate_latest(metrics.registry)


async def test_middleware_labels_by_canonical_route(client: Client, metrics: Metrics) -> None:
    """A request to /items/42 is counted and timed under the route template /items/{id}."""
    response = await client.get("/items/42")
    assert response.status == 200
    labels = {"route": "/items/{id}", "method": "GET", "status": "200"}
    assert sample(metrics, "gateway_http_requests_total", **labels) == 1
    duration = "gateway_http_request_duration_seconds_count"
    assert sample(metrics, duration, route="/items/{id}") == 1
    assert b"42" not in generate_latest(metrics.registry).split(b"gateway_http_requests_total")[1]


async def test_unmatched_paths_are_labelled_unmatched(client: Client, metrics: Metrics) -> None:
    """A 404 for any path is labelled route="unmatched", never with the raw URL."""
    response = await client.get("/users/alice@example.com")
    assert response.status == 404
    labels = {"route": "unmatched", "method": "GET", "status": "404"}
    assert sample(metrics, "gateway_http_requests_total", **labels) == 1
    assert b"alice" not in generate_latest(metrics.registry)


async def test_invented_methods_become_other(client: Client, metrics: Metrics) -> None:
    """A method no route serves is answered 405 and labelled method="other", route="unmatched"."""
    response = await client.request("PROPFIND", "/items/1")
    assert response.status == 405
    labels = {"route": "unmatched", "method": "other", "status": "405"}
    assert sample(metrics, "gateway_http_requests_total", **labels) == 1


async def test_raised_http_exceptions_are_counted(client: Client, metrics: Metrics) -> None:
    """A handler that raises web.HTTPForbidden is counted with status 403 on its route."""
    response = await client.get("/forbidden")
    assert response.status == 403
    labels = {"route": "/forbidden", "method": "GET", "status": "403"}
    assert sample(metrics, "gateway_http_requests_total", **labels) == 1


async def test_handler_crashes_are_counted_as_500(client: Client, metrics: Metrics) -> None:
    """An unexpected exception in a handler is counted as status 500 on its route."""
    response = await client.get("/broken")
    assert response.status == 500
    labels = {"route": "/broken", "method": "GET", "status": "500"}
    assert sample(metrics, "gateway_http_requests_total", **labels) == 1


async def test_metrics_endpoint_serves_parseable_text(client: Client, metrics: Metrics) -> None:
    """GET /metrics answers the Prometheus text format, which prometheus_client's parser reads."""
    metrics.flow("to_braze").pending.set(5)
    response = await client.get("/metrics")
    assert response.status == 200
    assert response.content_type == "text/plain"
    families = {f.name: f for f in text_string_to_metric_families(await response.text())}
    pending = {s.labels["direction"]: s.value for s in families["gateway_spool_pending"].samples}
    assert pending == {"to_braze": 5, "to_didomi": 0}
    build = families["gateway_build_info"].samples[0]
    assert build.labels == {"version": gateway.__version__}
    assert build.value == 1
    assert "gateway_webhooks_received" in families


async def test_metrics_endpoint_negotiates_openmetrics(client: Client) -> None:
    """Content negotiation is prometheus_client's: an OpenMetrics Accept gets OpenMetrics."""
    response = await client.get("/metrics", headers={"Accept": "application/openmetrics-text"})
    assert response.status == 200
    assert response.content_type == "application/openmetrics-text"
    assert (await response.text()).rstrip().endswith("# EOF")
