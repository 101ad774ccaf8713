"""The last reconcile's drift ratios: kept in the spool by `gateway reconcile`, exported by the
running gateway as `gateway_drift_ratio{target}`.

Reconcile is a command that ends (a nightly job), and Prometheus scrapes the gateway, so the
ratios travel through the spool every replica reads: one row of its `meta` table, replaced by
each run. A target the last run did not compare (a rule since removed) leaves the metric.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

import msgspec

from gateway.errors import SpoolError

if TYPE_CHECKING:
    from gateway.metrics import Metrics
    from gateway.spool.face import Spool
    from gateway.spool.store import Store

KEY = "reconcile.drift"
REFRESH_S = 60.0
log = logging.getLogger("gateway.drift")


class LastRun(msgspec.Struct, frozen=True):
    """What the last reconcile run found, per target (and `any`), and when it ended."""

    at: float
    sampled: bool
    ratios: dict[str, float]


_decoder = msgspec.json.Decoder(LastRun)


def save(store: Store, run: LastRun) -> None:
    """Record a run's ratios for the gateway's /metrics."""
    store.set_meta(KEY, msgspec.json.encode(run))


def load(store: Store) -> LastRun | None:
    """The last run's ratios, or None before the first run (or from an unreadable row)."""
    return _parse(store.meta(KEY))


def _parse(raw: bytes | None) -> LastRun | None:
    if raw is None:
        return None
    try:
        return _decoder.decode(raw)
    except msgspec.DecodeError:
        return None


def publish(metrics: Metrics, run: LastRun | None) -> None:
    """Set `gateway_drift_ratio{target}` to a run's ratios, dropping targets it did not have."""
    gauge = metrics.drift_ratio
    gauge.clear()
    for target, ratio in (run.ratios if run is not None else {}).items():
        gauge.labels(target).set(ratio)


async def follow(spool: Spool, metrics: Metrics, interval_s: float = REFRESH_S) -> None:
    """Read the last run's ratios now and then, for as long as the gateway runs."""
    seen: LastRun | None = None
    while True:
        try:
            run = _parse(await spool.meta(KEY))
        except SpoolError as exc:
            log.warning("could not read the last reconcile's drift (will retry): %s", exc)
        else:
            if run != seen:
                publish(metrics, run)
                seen = run
        await asyncio.sleep(interval_s)
