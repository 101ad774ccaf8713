"""The retention task: prunes the spool per `[retention]` in the background."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from typing import TYPE_CHECKING

from gateway.errors import SpoolError
from gateway.spool.prune import Cursor

if TYPE_CHECKING:
    from gateway.config.settings import RetentionConfig
    from gateway.metrics import Metrics
    from gateway.spool.face import Spool

log = logging.getLogger("gateway.retention")

TABLES = ("audit", "dead_letters", "applied", "sent")


DAY_S = 86_400.0
FINISH_S = 5.0  # how soon an unfinished erasure (zeroing, WAL truncation) is taken up again


class Retention:
    """The background task that prunes the spool per `[retention]`, counted in the metrics."""

    def __init__(self, spool: Spool, config: RetentionConfig, metrics: Metrics) -> None:
        self.spool = spool
        self.config = config
        self.pruned = metrics.retention_pruned
        self._task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()

    def start(self) -> None:
        """Begin pruning in the background: a pass now, then one every `interval_s`."""
        self._task = asyncio.create_task(self._run(), name="gateway-retention")

    async def stop(self) -> None:
        """Stop between two batches (a batch under way commits first)."""
        self._stop.set()
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        last = -math.inf
        while not self._stop.is_set():
            try:
                if time.monotonic() - last >= self.config.interval_s and self._ours():
                    last = time.monotonic()
                    await self.run_once()
                # An erasure's zeroing and WAL truncation go on in bounded steps until done.
                done = await self.spool.finish_erasures()
            except SpoolError as exc:
                log.warning("could not prune the spool (will retry): %s", exc)
                done = True
            await self._pause(FINISH_S if not done else min(self.config.interval_s, FINISH_S * 6))

    def _ours(self) -> bool:
        """Whether this process prunes: on a shared PostgreSQL spool, only the replica that
        holds partition 0 does, so replicas do not all walk the same tables."""
        owned = self.spool.owned
        return owned is None or 0 in owned

    async def run_once(self) -> int:
        """One full pass over every table; returns how many rows went."""
        config = self.config
        days = {
            "audit": config.audit_days,
            "dead_letters": config.bodies_days,
            "applied": config.applied_days,
            "sent": config.applied_days,
        }
        total = 0
        for table in TABLES:
            cutoff = self.spool.clock() - days[table] * DAY_S
            cursor: Cursor = None
            while not self._stop.is_set():
                deleted, cursor = await self.spool.prune(table, cutoff, config.batch, cursor)
                if deleted:
                    self.pruned.labels(table).inc(deleted)
                    total += deleted
                if cursor is None:
                    break
                await self._pause(config.pause_s)
        return total

    async def _pause(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), timeout=seconds)
