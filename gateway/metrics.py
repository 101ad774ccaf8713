"""Every gateway metric, on one injected `CollectorRegistry`, and the `/metrics` handler.

Names follow Prometheus conventions: the `gateway_` prefix, base units (seconds), `_total` on
counters. Every label set that is known in advance is created in `__init__`, so its series exists
at zero from the first scrape and `rate()`/`increase()` see the first event. No label ever holds
a user id, an email or a token: webhook types outside the known six become `other`, and HTTP
requests are labelled by their aiohttp route's canonical path, never by the raw URL.
"""

from __future__ import annotations

import asyncio
import math
import time

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.aiohttp import make_aiohttp_handler

from . import __version__
from .braze import DELETE, TRACK
from .health import BLOCKED_REASONS
from .webhooks import EVENT_TYPES as WEBHOOK_TYPES

__all__ = [
    "EVENT_TYPES",
    "OUTCOMES",
    "Metrics",
    "metrics_handler",
]

EVENT_TYPES = (*WEBHOOK_TYPES, "other")
OUTCOMES = ("accepted", "duplicate", "ignored", "rejected", "unauthorized", "unavailable")
BRAZE_ENDPOINTS = (TRACK, DELETE)
FAILURE_REASONS = ("rejected", "bad_request", "gave_up", "too_large", "unmappable")
RETRY_REASONS = (
    "server_error",
    "timeout",
    "connection",
    "rate_limited",
    "unauthorized",
    "misconfigured",
)
RELOAD_OUTCOMES = ("success", "error")
# The reasons `RuleSet.apply` and the dispatcher give for a webhook that changes nothing.
SKIP_REASONS = (
    "no_identity",
    "stale",
    "regulation",
    "not_confirmed",
    "deleted",
    "no_rule",
    "ignored",
)
# HTTP methods are labels only when standard; anything else a client invents becomes "other".
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
UNMATCHED = "unmatched"

# One Braze call: tens of milliseconds when healthy, capped by `braze.timeout_s` (10 s default).
BRAZE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0)
# Accepted to acknowledged: a flush interval when all is well, up to `give_up_after_s` (1 day).
_FAST = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
DELIVERY_BUCKETS = (*_FAST, 60.0, 300.0, 900.0, 1800.0, 3600.0, 3 * 3600.0, 6 * 3600.0, 86400.0)
# Our own endpoints: a webhook waits for one grouped SQLite commit (fsync), a few milliseconds.
HTTP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    """Every gateway metric, on one injected CollectorRegistry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry

        self.webhooks_received = Counter(
            "gateway_webhooks_received",
            "Didomi webhooks answered, by event type and outcome.",
            ["type", "outcome"],
            registry=r,
        )
        self._webhook_children = {
            (type_, outcome): self.webhooks_received.labels(type_, outcome)
            for type_ in EVENT_TYPES
            for outcome in OUTCOMES
        }

        self.braze_requests = Counter(
            "gateway_braze_requests",
            "Requests sent to Braze, by endpoint and HTTP status ('error': no answer).",
            ["endpoint", "status"],
            registry=r,
        )
        self.braze_request_duration = Histogram(
            "gateway_braze_request_duration_seconds",
            "Time for one Braze request to be answered.",
            ["endpoint"],
            buckets=BRAZE_BUCKETS,
            registry=r,
        )
        for endpoint in BRAZE_ENDPOINTS:
            self.braze_request_duration.labels(endpoint)

        self.updates_delivered = Counter(
            "gateway_updates_delivered", "Braze user objects acknowledged by Braze.", registry=r
        )
        self.updates_failed = Counter(
            "gateway_updates_failed",
            "Updates moved to the dead letters, by reason.",
            ["reason"],
            registry=r,
        )
        _touch(self.updates_failed, FAILURE_REASONS)
        self.retries = Counter(
            "gateway_retries", "Braze requests retried, by reason.", ["reason"], registry=r
        )
        _touch(self.retries, RETRY_REASONS)
        self.delivery_latency = Histogram(
            "gateway_delivery_latency_seconds",
            "Time from a webhook being accepted to Braze acknowledging its update.",
            buckets=DELIVERY_BUCKETS,
            registry=r,
        )

        self.spool_pending = Gauge(
            "gateway_spool_pending", "Updates stored and not yet acknowledged by Braze.", registry=r
        )
        # Delivery can stall with no error to count (a wedged batch, say): age shows it.
        self.spool_oldest_pending_age = Gauge(
            "gateway_spool_oldest_pending_age_seconds",
            "Age of the oldest update waiting in the spool; 0 when empty.",
            registry=r,
        )
        self.spool_oldest_pending_age.set(0)
        self.dead_letters = Gauge(
            "gateway_dead_letters",
            "Updates Braze refused, waiting for replay or purge.",
            registry=r,
        )
        self.braze_rate_limit_remaining = Gauge(
            "gateway_braze_rate_limit_remaining",
            "X-RateLimit-Remaining of Braze's last answer (NaN until Braze has answered).",
            registry=r,
        )
        self.braze_rate_limit_remaining.set(math.nan)

        self.config_reloads = Counter(
            "gateway_config_reloads",
            "Mapping reloads (SIGHUP or file change), by outcome.",
            ["outcome"],
            registry=r,
        )
        _touch(self.config_reloads, RELOAD_OUTCOMES)
        self.events_skipped = Counter(
            "gateway_events_skipped",
            "Stored webhooks or targets that changed nothing, by reason.",
            ["reason"],
            registry=r,
        )
        _touch(self.events_skipped, SKIP_REASONS)

        self.event_dates_clamped = Counter(
            "gateway_event_dates_clamped",
            "Choices dated later than their arrival plus didomi.max_clock_skew_s, moved back.",
            registry=r,
        )
        self.delivery_blocked = Gauge(
            "gateway_delivery_blocked",
            "1 while Braze refuses the key or the URL (by status); updates wait in the spool.",
            ["reason"],
            registry=r,
        )
        for reason in BLOCKED_REASONS:
            self.delivery_blocked.labels(reason).set(0)

        self.ready = Gauge("gateway_ready", "1 while /readyz answers 200.", registry=r)
        self.braze_auth_ok = Gauge(
            "gateway_braze_auth_ok", "0 while Braze answers 401 or 403 to the API key.", registry=r
        )
        self.braze_auth_ok.set(1)
        self.build_info = Gauge(
            "gateway_build_info",
            "Always 1; the version label says which build runs.",
            ["version"],
            registry=r,
        )
        self.build_info.labels(__version__).set(1)

        self.http_requests = Counter(
            "gateway_http_requests",
            "HTTP requests answered, by route template ('unmatched' for none), method and status.",
            ["route", "method", "status"],
            registry=r,
        )
        self.http_request_duration = Histogram(
            "gateway_http_request_duration_seconds",
            "Time to answer an HTTP request, by route.",
            ["route"],
            buckets=HTTP_BUCKETS,
            registry=r,
        )

    def webhook(self, type_: str, outcome: str) -> None:
        """Count one answered webhook; a type outside the known six is counted as `other`."""
        key = (type_ if type_ in EVENT_TYPES else "other", outcome)
        child = self._webhook_children.get(key)
        if child is None:  # .labels() costs a lock and a tuple hash; this runs per request
            child = self._webhook_children[key] = self.webhooks_received.labels(*key)
        child.inc()

    def middleware(self) -> Middleware:
        """An aiohttp middleware that counts and times every request, by canonical route."""

        @web.middleware
        async def observe(request: web.Request, handler: Handler) -> web.StreamResponse:
            started = time.perf_counter()
            status = 500
            try:
                response = await handler(request)
            except web.HTTPException as exc:
                status = exc.status
                raise
            except asyncio.CancelledError:
                status = 499  # the client went away before the answer (nginx's convention)
                raise
            else:
                status = response.status
                return response
            finally:
                route = route_label(request)
                self.http_requests.labels(route, method_label(request.method), str(status)).inc()
                self.http_request_duration.labels(route).observe(time.perf_counter() - started)

        return observe


def route_label(request: web.Request) -> str:
    """The route template that matched `request` (`/items/{id}`), or `unmatched`."""
    resource = request.match_info.route.resource
    if resource is None:  # the router's own 404/405 answers
        return UNMATCHED
    return resource.canonical


def method_label(method: str) -> str:
    """The request method, or `other` for a method no route of ours would serve."""
    return method if method in HTTP_METHODS else "other"


def metrics_handler(metrics: Metrics) -> Handler:
    """The `GET /metrics` handler: prometheus-client's own, so content negotiation is theirs."""
    return make_aiohttp_handler(metrics.registry)


def _touch(counter: Counter, values: tuple[str, ...]) -> None:
    """Create one child per label value so each series is exported at zero."""
    for value in values:
        counter.labels(value)
