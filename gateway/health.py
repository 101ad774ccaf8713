"""Delivery health: what readiness and the metrics say about one peer (Braze, or Didomi's API).

Two states, neither of which makes the gateway unready: Didomi gives up after about five
minutes of retries, so refusing webhooks would turn a delivery problem into lost consent.
- blocked: the peer refuses the key or the URL (401, 403, 404, 405, 3xx). Nothing moves until an
  operator fixes the config; updates wait in the spool. `gateway_delivery_blocked{reason}` is 1.
- failing: the peer is down, slow or answers 5xx; delivery retries with backoff by itself.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from .braze import Answer

if TYPE_CHECKING:
    from prometheus_client import Gauge

    from .metrics import Flow

log = logging.getLogger("gateway.delivery")

# `gateway_delivery_blocked{reason}`: the status that blocks delivery, 3xx as one.
BLOCKED_REASONS = ("401", "403", "404", "405", "3xx")


def blocked_label(status: int | None) -> str:
    """The `reason` label for a blocking status."""
    if status is not None and 300 <= status < 400:
        return "3xx"
    return str(status)


class DeliveryHealth:
    """Whether the peer takes our requests, as readiness and the metrics report it."""

    def __init__(self, flow: Flow, auth_ok: Gauge | None = None, *, peer: str = "Braze") -> None:
        self.flow = flow
        self.peer = peer
        self.auth_ok = auth_ok  # gateway_braze_auth_ok, for the Braze direction
        self.blocked: str | None = None  # why the peer refuses the config, naming its status
        self.failing: str | None = None  # why requests are being retried right now
        self._label: str | None = None

    def ok(self) -> None:
        """The peer acknowledged a request: whatever was wrong is fixed."""
        if self.blocked is not None:
            log.info("%s accepts the gateway's requests again", self.peer)
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
