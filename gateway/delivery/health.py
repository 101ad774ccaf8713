"""Delivery health: what readiness and the metrics say about one peer (Braze, or Didomi's API).

Two states, neither of which makes the gateway unready: Didomi gives up after about five
minutes of retries, so refusing webhooks would turn a delivery problem into lost consent.
- blocked: the peer refuses the key or the URL (401, 403, 404, 405, 3xx). Nothing moves until an
  operator fixes the config; updates wait in the spool. `gateway_delivery_blocked{reason}` is 1.
- failing: the peer is down, slow or answers 5xx; delivery retries with backoff by itself.

Both are said in the log, not only in readiness and the metrics: blocked once per reason;
failing at the first failed request, then once every `LOG_EVERY_S` while it lasts (retries
come every few hundred milliseconds), and once more when the peer answers again.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from gateway.delivery.outcome import Answer, Verdict

if TYPE_CHECKING:
    from prometheus_client import Gauge


log = logging.getLogger("gateway.delivery")

LOG_EVERY_S = 60.0  # while a peer keeps failing, how often the log says so again
# `gateway_delivery_blocked{reason}`: the status that blocks delivery, 3xx as one.
BLOCKED_REASONS = ("401", "403", "404", "405", "3xx")


def blocked_label(status: int | None) -> str:
    """The `reason` label for a blocking status."""
    if status is not None and 300 <= status < 400:
        return "3xx"
    return str(status)


class Blocking(Protocol):
    """Where health says a peer blocks delivery (`metrics.Flow` is one)."""

    def blocked(self, reason: str, on: bool) -> None:
        """Set `gateway_delivery_blocked{reason}` of this direction on or off."""


class DeliveryHealth:
    """Whether the peer takes our requests, as readiness and the metrics report it."""

    def __init__(
        self,
        flow: Blocking,
        auth_ok: Gauge | None = None,
        *,
        peer: str = "Braze",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.flow = flow
        self.peer = peer
        self.auth_ok = auth_ok  # gateway_braze_auth_ok, for the Braze direction
        self.blocked: str | None = None  # why the peer refuses the config, naming its status
        self.failing: str | None = None  # why requests are being retried right now
        self.clock = clock
        self._label: str | None = None
        self._failing_since: float | None = None  # the first failed request of this spell
        self._failures = 0  # failed requests in this spell
        self._said_at = -math.inf  # when the log last said the peer is failing
        self._said_since_ok = False  # whether this spell was said, so its end is said too

    def ok(self) -> None:
        """The peer acknowledged a request: whatever was wrong is fixed."""
        if self.blocked is not None:
            log.info("%s accepts the gateway's requests again", self.peer)
        if self._failing_since is not None:
            if self._said_since_ok:
                log.info(
                    "%s answers again after %.0f s (%d failed request(s))",
                    self.peer,
                    self.clock() - self._failing_since,
                    self._failures,
                )
            self._failing_since = None
            self._failures = 0
            self._said_since_ok = False
        self.blocked = self.failing = None
        self._set_label(None)
        if self.auth_ok is not None:
            self.auth_ok.set(1)

    def block(self, answer: Answer) -> None:
        """The peer refuses the key or the URL: say so once in the log, keep saying it elsewhere."""
        if self.blocked != answer.reason:
            log.error("%s; updates are kept in the spool until this is fixed", answer.reason)
        self.blocked = answer.reason
        self._set_label(blocked_label(answer.status))
        if answer.status in (401, 403) and self.auth_ok is not None:
            self.auth_ok.set(0)

    def retrying(self, answer: Answer) -> None:
        """A transient failure (outage, 5xx, timeout, 429): delivery is late, not stuck."""
        self.failing = f"retrying {self.peer} ({answer.reason})"
        if answer.verdict is Verdict.RATE_LIMITED:
            return  # the peer's own pacing, which the limiter follows: nothing is wrong
        now = self.clock()
        self._failures += 1
        if self._failing_since is None:
            self._failing_since = now
        # A peer that fails now and then (one 503 in many answers) is said no more often than
        # one that stays down: a spell that starts within LOG_EVERY_S of the last line waits.
        if now - self._said_at < LOG_EVERY_S:
            return
        self._said_at = now
        if not self._said_since_ok:
            self._said_since_ok = True
            log.warning(
                "cannot deliver to %s (%s); retrying with backoff, updates wait in the spool",
                self.peer,
                answer.reason,
            )
        else:
            log.warning(
                "still cannot deliver to %s after %.0f s (%d failed request(s); last: %s)",
                self.peer,
                now - self._failing_since,
                self._failures,
                answer.reason,
            )

    def degraded_reason(self) -> str | None:
        """What `/readyz` reports while it still answers 200, or None when delivery is well."""
        if self.blocked is not None:
            return f"delivery to {self.peer} blocked: {self.blocked}"
        return self.failing

    def _set_label(self, label: str | None) -> None:
        if label == self._label:
            return
        if self._label is not None:
            self.flow.blocked(self._label, False)
        if label is not None:
            self.flow.blocked(label, True)
        self._label = label
