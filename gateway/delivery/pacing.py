"""Pacing: the rate limiter every request to a peer waits on, and the shared budget."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Mapping
from typing import Protocol

from gateway.errors import GatewayError

log = logging.getLogger("gateway.braze")  # its messages kept their logger

SHARED_TIMEOUT_S = 2.0  # how long a turn waits for the shared budget before pacing locally
SHARED_RETRY_S = 5.0  # then how long turns are paced locally before asking it again


class SharedBudget(Protocol):
    """A request budget several replicas draw on (`replicas.Budget`, on PostgreSQL)."""

    async def take(self, rate: float) -> float:
        """0.0: the turn is this request's, send now; else seconds to wait, then ask again."""

    async def block(self, seconds: float) -> None:
        """Hold every replica's requests for `seconds`."""


class RateLimiter:
    """Paces requests to `requests_per_second` and stops all of them while Braze says to wait.

    Braze's `X-RateLimit-Remaining` counts what is left after the request it answers; requests
    sent since then spend it too. So the limiter keeps a budget, that header less the requests
    sent after the one it answers, and holds new requests once it is spent until the window's
    `X-RateLimit-Reset`: with several requests in flight, none is sent into a certain 429.
    """

    def __init__(
        self, requests_per_second: float, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.interval = 1.0 / requests_per_second
        self.clock = clock
        self._last = -math.inf  # when the last turn was granted
        self._blocked_until = 0.0
        self.remaining: int | None = None
        self._sent = 0  # requests let through so far; `acquire` returns each one's number
        self._budget: int | None = None  # requests left in this window, as far as we know
        self._window_ends = 0.0
        # Replicas on one PostgreSQL spool share the rate: set by the server, None alone.
        self.shared: SharedBudget | None = None
        self.replicas: Callable[[], int] = lambda: 1
        self._shared_down_until = 0.0  # after a failed turn, pace locally for a while
        self._blocking: set[asyncio.Task[None]] = set()

    def set_rate(self, requests_per_second: float) -> None:
        """Pace later requests to a new rate; a wait Braze asked for still holds."""
        self.interval = 1.0 / requests_per_second

    async def acquire(self) -> int:
        """Wait for this request's turn; returns its number, for `observe`."""
        number, alone = await self._local()
        while self.shared is not None and not alone:
            try:
                wait = await asyncio.wait_for(
                    self.shared.take(1.0 / self.interval), SHARED_TIMEOUT_S
                )
            except (GatewayError, TimeoutError) as exc:
                if self.clock() >= self._shared_down_until:  # once per outage, not per request
                    reason = str(exc) or "no answer"
                    log.warning(
                        "the shared Braze budget cannot be read (pacing locally): %s", reason
                    )
                self._shared_down_until = self.clock() + SHARED_RETRY_S
                # A turn of the local pace: its spacing, not a sleep of each request's own, is
                # what holds several requests waiting at once to this replica's share.
                _, alone = await self._local(count=False)
                continue
            if wait <= 0:
                break  # this request's turn: it leaves now
            await asyncio.sleep(wait)
        # A wait Braze asked of this replica while it waited (shared with the others a moment
        # later) holds this request too.
        left = self._blocked_until - self.clock()
        if left > 0:
            await asyncio.sleep(left)
        return number

    async def _local(self, *, count: bool = True) -> tuple[int, bool]:
        """A turn of this replica's own pace: (its number, whether it stands for the shared one).

        While the shared budget has just failed, turns are spaced as if every replica alive
        sent as fast as this one (`1 / rate` x replicas), and such a turn is the request's
        whole wait: it does not queue behind a hung database again.
        """
        while True:
            now = self.clock()
            if self._budget is not None and now >= self._window_ends:
                self._budget = None  # a new window: Braze's next answer tells its budget
            spent = count and self._budget is not None and self._budget <= 0
            alone = self.shared is not None and now < self._shared_down_until
            spacing = self.interval * (max(1, self.replicas()) if alone else 1)
            start = max(
                now, self._last + spacing, self._blocked_until, self._window_ends if spent else 0
            )
            if start <= now:
                self._last = now
                if count:
                    if self._budget is not None:
                        self._budget -= 1
                    self._sent += 1
                return self._sent, alone
            await asyncio.sleep(start - now)

    def observe(
        self, status: int, headers: Mapping[str, str], number: int | None = None
    ) -> float | None:
        """Learn from the headers of the answer to request `number`; returns seconds to wait."""
        remaining = _header_int(headers, "X-RateLimit-Remaining")
        reset = header_float(headers, "X-RateLimit-Reset")
        if remaining is not None:
            self.remaining = remaining
            if reset is not None and number is not None:
                # Above 10^9 it is an epoch time; below, seconds from now (plans differ).
                left = reset - time.time() if reset > 1e9 else reset
                self._window_ends = self.clock() + min(max(left, 0.0), 3600.0)
                self._budget = remaining - (self._sent - number)
        wait: float | None = None
        retry_after = header_float(headers, "X-Ratelimit-Retry-After") or header_float(
            headers, "Retry-After"
        )
        if status == 429 or remaining == 0:
            if retry_after is not None:
                wait = retry_after
            elif reset is not None:
                # Above 10^9 it is an epoch time; below, seconds from now (plans differ).
                wait = reset - time.time() if reset > 1e9 else reset
            elif status == 429:
                wait = 1.0
        if wait is not None:
            wait = min(max(wait, 0.0), 3600.0)
            self._blocked_until = max(self._blocked_until, self.clock() + wait)
            if self.shared is not None and wait > 0:
                # Every replica waits too: Braze's limit is the workspace's, not this process's.
                task = asyncio.get_running_loop().create_task(self._share_block(wait))
                self._blocking.add(task)
                task.add_done_callback(self._blocking.discard)
        return wait

    async def _share_block(self, seconds: float) -> None:
        assert self.shared is not None
        try:
            await self.shared.block(seconds)
        except GatewayError as exc:
            log.warning("could not tell the other replicas to wait for Braze: %s", exc)


def header_float(headers: Mapping[str, str], name: str) -> float | None:
    """A numeric header's value, or None where it is missing or not a finite number."""
    value = headers.get(name)
    if value is None:
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    # float() takes "nan" and "inf" too: as a count or a wait they would raise or block for ever.
    return number if math.isfinite(number) else None


def _header_int(headers: Mapping[str, str], name: str) -> int | None:
    value = header_float(headers, name)
    return None if value is None else int(value)
