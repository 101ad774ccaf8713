"""Retention: old audit records, dead-letter bodies and stale-check rows pruned in the background.

`[retention]` says how long each is kept (`sent`, the states last sent to Braze, as long as
`applied`). Pruning runs in small transactions (`batch` rows each,
a pause between) so intake and acknowledgements never wait long on the spool thread. An `applied`
row is what refuses a late, older choice; pruning it would let that choice through, so the newest
pruned time per target is kept in `floors`, and the stale checks compare against the later of the
person's row and the floor: a choice older than the retention is refused for everyone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from typing import TYPE_CHECKING

from gateway.errors import SpoolError

if TYPE_CHECKING:
    from gateway.config.settings import RetentionConfig
    from gateway.metrics import Metrics
    from gateway.spool.conn import Conn
    from gateway.spool.face import Spool

log = logging.getLogger("gateway.retention")

SCHEMA = """
CREATE TABLE IF NOT EXISTS floors (   -- per target, the newest applied time pruned
    target TEXT PRIMARY KEY,
    at REAL NOT NULL
) WITHOUT ROWID;
"""
TABLES = ("audit", "dead_letters", "applied", "sent")
# Why a choice below a floor, and above the person's own applied time, is refused: its own
# reason (metrics, audit, log), since "stale" would say a newer choice of theirs exists.
OLDER_THAN_RETENTION = "older_than_retention"
DAY_S = 86_400.0
FINISH_S = 5.0  # how soon an unfinished erasure (zeroing, WAL truncation) is taken up again
Cursor = tuple[str, str] | None  # where a pass over `applied` (by its key) has reached


def floors(db: Conn) -> dict[str, float]:
    """The floor time per target (one row per target, so small enough to hold in memory)."""
    return {target: at for target, at in db.execute("SELECT target, at FROM floors")}


def prune(
    db: Conn, table: str, cutoff: float, limit: int, after: Cursor = None
) -> tuple[int, Cursor]:
    """Delete up to `limit` rows of `table` older than `cutoff`: (deleted, cursor of the next
    batch, None once the table is done)."""
    if table == "audit":
        # Records are written in time order, so the oldest are the lowest ids: a batch looks at
        # the first `limit` only, and needs no index on `at` (one more b-tree per record).
        deleted = db.execute(
            "DELETE FROM audit WHERE id IN (SELECT id FROM audit ORDER BY id LIMIT ?) AND at < ?",
            (limit, cutoff),
        ).rowcount
        return deleted, ("", "") if deleted == limit else None
    if table == "dead_letters":
        deleted = db.execute(
            "DELETE FROM dead_letters WHERE id IN"
            " (SELECT id FROM dead_letters WHERE created_at < ? ORDER BY id LIMIT ?)",
            (cutoff, limit),
        ).rowcount
        return deleted, ("", "") if deleted == limit else None
    if table not in ("applied", "sent"):
        raise ValueError(f"no retention for the table {table!r}")
    # Neither has an index on its time (every acknowledgement would pay for one): walk the
    # table by its key, `limit` rows a batch, deleting the old ones.
    start = after or ("", "")
    rows = db.execute(
        f"SELECT person, target, at FROM {table} WHERE (person, target) > (?, ?)"  # noqa: S608 - a constant
        " ORDER BY person, target LIMIT ?",
        (*start, limit),
    ).fetchall()
    old = [(person, target, at) for person, target, at in rows if at < cutoff]
    if table == "applied":  # `sent` only tells echoes apart: nothing to keep of it
        db.executemany(
            # CASE, not max(): PostgreSQL's max() is an aggregate (this runs on both).
            "INSERT INTO floors(target, at) VALUES (?, ?) ON CONFLICT (target) DO UPDATE"
            " SET at = CASE WHEN excluded.at > floors.at THEN excluded.at ELSE floors.at END",
            [(target, at) for _, target, at in old],
        )
    db.executemany(
        # `at` too: `sent` keeps a row per state, and only the old ones go.
        f"DELETE FROM {table} WHERE person = ? AND target = ? AND at < ?",  # noqa: S608 - a constant
        [(p, t, cutoff) for p, t, _ in old],
    )
    return len(old), ((rows[-1][0], rows[-1][1]) if len(rows) == limit else None)


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
                done = await self.spool.run(self.spool.db.finish_erasures)
            except SpoolError as exc:
                log.warning("could not prune the spool (will retry): %s", exc)
                done = True
            await self._pause(FINISH_S if not done else min(self.config.interval_s, FINISH_S * 6))

    def _ours(self) -> bool:
        """Whether this process prunes: on a shared PostgreSQL spool, only the replica that
        holds partition 0 does, so replicas do not all walk the same tables."""
        owned = self.spool.db.owned
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
            cutoff = self.spool.db.clock() - days[table] * DAY_S
            cursor: Cursor = None
            while not self._stop.is_set():
                deleted, cursor = await self.spool.run(
                    self.spool.db.prune, table, cutoff, config.batch, cursor
                )
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
