"""The fake Braze's gate: which permission each endpoint needs, and its rate-limit windows."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Literal

UNLIMITED = 250_000  # what the headers say when no rate limit is configured

# Braze's permission names per endpoint ("API keys", and each endpoint's "Prerequisites"); errors.md
# says a key without one gets "403 Access Denied" and a key of another instance a 401. The exact
# JSON words of both are not documented: ours.
PERMISSIONS = {
    "/users/track": "users.track",
    "/users/delete": "users.delete",
    "/users/export/ids": "users.export.ids",
    "/subscription/status/get": "subscription.status.get",
}
ALL_PERMISSIONS = frozenset(PERMISSIONS.values())
INVALID_KEY = "Invalid API key"
ACCESS_DENIED = "Access Denied"


class Window:
    """One fixed rate-limit window, with Braze's X-RateLimit-* headers: the one way the fake
    limits rates, for each of its endpoints.

    The window opens with the first request after the last one closed. Reset says when it
    ends: epoch seconds, or (`reset_style="seconds"`, Braze's newer contracts) seconds left, in
    which style a 429 bears only X-Ratelimit-Retry-After. A scaled-down minute scales Braze's
    clock too: the reset is rounded up to `second_s` (a sixtieth of the minute), as Braze rounds
    a real minute's to whole seconds.
    """

    def __init__(
        self,
        limit: int,
        window_s: float,
        *,
        second_s: float = 1.0,
        reset_style: Literal["epoch", "seconds"] = "epoch",
    ) -> None:
        self.limit = limit
        self.window_s = window_s
        self.second_s = second_s
        self.reset_style = reset_style
        self.used = 0
        self.started = -math.inf

    def headers(self, *, consume: bool) -> tuple[bool, dict[str, str]]:
        """Count one request if it fits; say whether it did, and the headers to answer with."""
        now = time.monotonic()
        if now - self.started >= self.window_s:
            self.started, self.used = now, 0
        allowed = self.used < self.limit
        if consume and allowed:
            self.used += 1
        left = max(0.0, self.started + self.window_s - now)
        if not allowed and self.reset_style == "seconds":
            # Braze's newer contracts replace the three headers on a 429 by this one.
            return False, {"X-Ratelimit-Retry-After": self._rounded(left)}
        reset = time.time() + left if self.reset_style == "epoch" else left
        return allowed, {
            "X-RateLimit-Limit": str(self.limit),
            "X-RateLimit-Remaining": str(max(0, self.limit - self.used)),
            "X-RateLimit-Reset": self._rounded(reset),
        }

    def _rounded(self, seconds: float) -> str:
        """`seconds` rounded up to Braze's (maybe scaled) second, as the header writes it."""
        value = math.ceil(seconds / self.second_s) * self.second_s
        return f"{value:.3f}".rstrip("0").rstrip(".")


@dataclass(slots=True)
class ExportLimits:
    """The limits of the reads: /users/export/ids per minute (250 for workspaces onboarded on
    or after 2024-08-22, 2,500 before) and /subscription/status/get (250,000 an hour)."""

    export: Window = field(default_factory=lambda: Window(250, 60.0))
    status: Window = field(default_factory=lambda: Window(250_000, 3600.0))
    fields_required: bool = True  # newer workspaces: a request without the field is a 400

    def scale(self, minute_s: float, *, per_minute: int = 250) -> None:
        """Make Braze's minute last `minute_s` (tests, benchmarks), at `per_minute` exports."""
        second_s = minute_s / 60
        self.export = Window(per_minute, minute_s, second_s=second_s)
        self.status = Window(250_000, 60 * minute_s, second_s=second_s)
