"""Every gateway metric, on one injected `CollectorRegistry`, and the `/metrics` handler.

Names follow Prometheus conventions: the `gateway_` prefix, base units (seconds), `_total` on
counters. Every label set that is known in advance is created in `__init__`, so its series exists
at zero from the first scrape and `rate()`/`increase()` see the first event. No label ever holds
a user id, an email or a token: webhook types outside the known six become `other`, and HTTP
requests are labelled by their aiohttp route's canonical path, never by the raw URL.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.aiohttp import make_aiohttp_handler

from gateway import __version__
from gateway.delivery.health import BLOCKED_REASONS
from gateway.peers.braze_bodies import DELETE, TRACK
from gateway.peers.didomi import EVENTS, SESSIONS, USERS
from gateway.shapes.webhooks import BRAZE_TYPES, direction_of
from gateway.shapes.webhooks import EVENT_TYPES as WEBHOOK_TYPES
from gateway.words import Direction

__all__ = [
    "EVENT_TYPES",
    "OUTCOMES",
    "Metrics",
    "metrics_handler",
]

EVENT_TYPES = (*WEBHOOK_TYPES, "other")
DIRECTIONS: tuple[Direction, ...] = ("to_braze", "to_didomi")
OUTCOMES = ("accepted", "duplicate", "ignored", "rejected", "unauthorized", "unavailable")
BRAZE_ENDPOINTS = (TRACK, DELETE)
DIDOMI_ENDPOINTS = (SESSIONS, USERS, EVENTS)
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
BACKFILL_OUTCOMES = ("delivered", "stale", "skipped", "dead_lettered")
# The reasons `RuleSet.apply` and the dispatcher give for a webhook that changes nothing.
SKIP_REASONS = (
    "no_identity",
    "stale",
    "older_than_retention",
    "regulation",
    "not_confirmed",
    "deleted",
    "no_rule",
    "ignored",
    "echo",
    "unchanged",
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
            "Webhooks answered (Didomi's, to_braze; Braze's, to_didomi), by type and outcome.",
            ["direction", "type", "outcome"],
            registry=r,
        )
        self._webhook_children = {
            (type_, outcome): self.webhooks_received.labels(_direction_of(type_), type_, outcome)
            for type_ in (*EVENT_TYPES, *BRAZE_TYPES)
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

        # Every delivery family is split by direction: to_braze (Didomi's choices sent to
        # Braze) and to_didomi (Braze's subscription changes written back to Didomi).
        self.didomi_requests = Counter(
            "gateway_didomi_requests",
            "Requests sent to Didomi's API, by endpoint and HTTP status ('error': no answer).",
            ["endpoint", "status"],
            registry=r,
        )
        self.didomi_request_duration = Histogram(
            "gateway_didomi_request_duration_seconds",
            "Time for one Didomi API request to be answered.",
            ["endpoint"],
            buckets=BRAZE_BUCKETS,
            registry=r,
        )
        for endpoint in DIDOMI_ENDPOINTS:
            self.didomi_request_duration.labels(endpoint)

        self.updates_delivered = Counter(
            "gateway_updates_delivered",
            "Updates acknowledged by the other side (Braze objects, Didomi consent events).",
            ["direction"],
            registry=r,
        )
        self.updates_failed = Counter(
            "gateway_updates_failed",
            "Updates moved to the dead letters, by reason.",
            ["direction", "reason"],
            registry=r,
        )
        self.retries = Counter(
            "gateway_retries", "Requests retried, by reason.", ["direction", "reason"], registry=r
        )
        self.delivery_latency = Histogram(
            "gateway_delivery_latency_seconds",
            "Time from a webhook being accepted to the other side acknowledging its update.",
            ["direction"],
            buckets=DELIVERY_BUCKETS,
            registry=r,
        )
        self.spool_pending = Gauge(
            "gateway_spool_pending",
            "Updates stored and not yet acknowledged by the other side.",
            ["direction"],
            registry=r,
        )
        # Delivery can stall with no error to count (a wedged batch, say): age shows it.
        self.spool_oldest_pending_age = Gauge(
            "gateway_spool_oldest_pending_age_seconds",
            "Age of the oldest update waiting in the spool; 0 when empty.",
            ["direction"],
            registry=r,
        )
        self.dead_letters = Gauge(
            "gateway_dead_letters",
            "Updates refused for good, waiting for replay or purge.",
            ["direction"],
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
            ["direction", "reason"],
            registry=r,
        )

        self.currents_versions = Counter(
            "gateway_braze_currents_batches",
            "Currents batches received, by Braze-Currents-Version ('none': no header; "
            "'other': not a small number).",
            ["version"],
            registry=r,
        )
        _touch(self.currents_versions, ("1", "none", "other"))
        self.braze_object_errors = Counter(
            "gateway_braze_object_errors",
            "Errors Braze named in a 2xx answer: 'object' names an object by its index, "
            "'unattributed' is a plain message that names none.",
            ["reason"],
            registry=r,
        )
        _touch(self.braze_object_errors, ("object", "unattributed"))

        self.event_dates_clamped = Counter(
            "gateway_event_dates_clamped",
            "Choices dated later than their arrival plus didomi.max_clock_skew_s, moved back.",
            registry=r,
        )
        self.delivery_blocked = Gauge(
            "gateway_delivery_blocked",
            "1 while the other side refuses the key or the URL (by status); updates wait.",
            ["direction", "reason"],
            registry=r,
        )
        self.flows = {direction: Flow(self, direction) for direction in DIRECTIONS}
        self.retention_pruned = Counter(
            "gateway_retention_pruned",
            "Spool rows deleted by the retention of [retention], by table.",
            ["table"],
            registry=r,
        )
        _touch(self.retention_pruned, ("audit", "dead_letters", "applied", "sent"))
        self.audit_shed = Counter(
            "gateway_audit_shed",
            "Audit records deleted before their retention to keep room for consent on a nearly"
            " full spool disk (SQLite).",
            registry=r,
        )
        # -- backfill (issue 24): the lane `gateway backfill` fills, as this gateway delivers it
        self.backfill_users = Counter(
            "gateway_backfill_users",
            "Backfilled users this gateway settled, by outcome (delivered, stale: a newer choice"
            " was known, skipped: the rules ask nothing, dead_lettered).",
            ["outcome"],
            registry=r,
        )
        _touch(self.backfill_users, BACKFILL_OUTCOMES)
        self.backfill_pending = Gauge(
            "gateway_backfill_pending",
            "Backfilled users waiting in the spool for delivery.",
            registry=r,
        )

        # Set from the spool, where the last `gateway reconcile` left its ratios (drift.py).
        self.drift_ratio = Gauge(
            "gateway_drift_ratio",
            "Share of the persons compared by the last `gateway reconcile` whose Braze state"
            " differs from what Didomi's status gives, by Braze target ('any': any target).",
            ["target"],
            registry=r,
        )

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

    def didomi_request(self, endpoint: str, status: str, seconds: float) -> None:
        """Count and time one request to Didomi's API (the client's `on_request`)."""
        self.didomi_requests.labels(endpoint, status).inc()
        self.didomi_request_duration.labels(endpoint).observe(seconds)

    def flow(self, direction: Direction) -> Flow:
        """The delivery metrics of one direction, their children bound once."""
        return self.flows[direction]

    def currents_version(self, header: str | None) -> None:
        """Count one Currents batch by its version header, in a bounded set of labels."""
        value = "none" if header is None else header.strip()
        if value != "none" and not (value.isascii() and value.isdigit() and len(value) <= 2):
            value = "other"  # Braze's header, but any sender could put anything in it
        self.currents_versions.labels(value).inc()

    def webhook(self, type_: str, outcome: str) -> None:
        """Count one answered webhook; a type outside the known ones is counted as `other`."""
        known = type_ in EVENT_TYPES or type_ in BRAZE_TYPES
        key = (type_ if known else "other", outcome)
        child = self._webhook_children.get(key)
        if child is None:  # .labels() costs a lock and a tuple hash; this runs per request
            child = self.webhooks_received.labels(_direction_of(key[0]), *key)
            self._webhook_children[key] = child
        child.inc()

    def request_meter(self) -> Callable[[web.Request, int, float], None]:
        """Count and time one answered request: `meter(request, status, seconds)`."""
        # (route, method, status) -> the two children; bounded by the routes, the methods
        # `method_label` keeps and the statuses answered, as the series themselves are.
        children: dict[tuple[str, str, int], tuple[Any, Any]] = {}

        def meter(request: web.Request, status: int, seconds: float) -> None:
            route = route_label(request)
            method = method_label(request.method)  # never a raw method: it keys the cache
            key = (route, method, status)
            bound = children.get(key)
            if bound is None:  # .labels() costs a lock and a hash; this runs per request
                bound = children[key] = (
                    self.http_requests.labels(route, method, str(status)),
                    self.http_request_duration.labels(route),
                )
            bound[0].inc()
            bound[1].observe(seconds)

        return meter


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


class Flow:
    """The metric children of one delivery direction, bound once: `.labels()` costs a lock and
    a hash per call, and these are touched per batch or per row."""

    def __init__(self, metrics: Metrics, direction: Direction) -> None:
        self.direction = direction
        self.delivered = metrics.updates_delivered.labels(direction)
        self.latency = metrics.delivery_latency.labels(direction)
        self.pending = metrics.spool_pending.labels(direction)
        self.oldest_age = metrics.spool_oldest_pending_age.labels(direction)
        self.dead_letters = metrics.dead_letters.labels(direction)
        self.oldest_age.set(0)
        self._failed = {r: metrics.updates_failed.labels(direction, r) for r in FAILURE_REASONS}
        self._retries = {r: metrics.retries.labels(direction, r) for r in RETRY_REASONS}
        self._skipped = {r: metrics.events_skipped.labels(direction, r) for r in SKIP_REASONS}
        self._blocked = {r: metrics.delivery_blocked.labels(direction, r) for r in BLOCKED_REASONS}
        for gauge in self._blocked.values():
            gauge.set(0)
        self._metrics = metrics

    def failed(self, reason: str, count: int = 1) -> None:
        """Count updates moved to the dead letters."""
        self._child(self._failed, self._metrics.updates_failed, reason).inc(count)

    def retried(self, reason: str) -> None:
        """Count one request sent again."""
        self._child(self._retries, self._metrics.retries, reason).inc()

    def skipped(self, reason: str, count: int = 1) -> None:
        """Count stored webhooks (or people, for `stale`) that changed nothing."""
        self._child(self._skipped, self._metrics.events_skipped, reason).inc(count)

    def blocked(self, reason: str, on: bool) -> None:
        """Say whether the other side refuses the config, by status."""
        self._child(self._blocked, self._metrics.delivery_blocked, reason).set(1 if on else 0)

    def _child(self, cache: dict[str, Any], family: Any, reason: str) -> Any:
        child = cache.get(reason)
        if child is None:
            child = cache[reason] = family.labels(self.direction, reason)
        return child


def _direction_of(type_: str) -> Direction:
    return direction_of(type_) if type_ != "other" else "to_braze"


def _touch(counter: Counter, values: tuple[str, ...]) -> None:
    """Create one child per label value so each series is exported at zero."""
    for value in values:
        counter.labels(value)
