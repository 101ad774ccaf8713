"""What a delivery worker asks of the spool and of its direction's metrics, as protocols."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

from gateway.words import Direction

# Protocols, not imports: `delivery/` sits below `spool/` and `metrics` (ARCHITECTURE.md), which
# satisfy these as they are; the composition root hands the real ones in.


class Gauge(Protocol):
    """A gauge (or a counter also set outright, as `dead_letters` is)."""

    def set(self, value: float) -> None: ...

    def inc(self, amount: float = 1) -> None: ...


class Count(Protocol):
    """A counter."""

    def inc(self, amount: float = 1) -> None: ...


class Timing(Protocol):
    """A histogram."""

    def observe(self, amount: float) -> None: ...


class Flow(Protocol):
    """The metric children of one direction (`metrics.Flow` is one)."""

    @property
    def delivered(self) -> Count: ...

    @property
    def latency(self) -> Timing: ...

    @property
    def pending(self) -> Gauge: ...

    @property
    def oldest_age(self) -> Gauge: ...

    @property
    def dead_letters(self) -> Gauge: ...

    def failed(self, reason: str, count: int = 1) -> None: ...

    def retried(self, reason: str) -> None: ...

    def skipped(self, reason: str, count: int = 1) -> None: ...

    def blocked(self, reason: str, on: bool) -> None: ...


class Outcomes(Protocol):
    """The spool as a worker sees it: whose partitions, how much waits, and settling rows
    (`spool.face.Spool` is one; dead letters and audit records are the spool's own types)."""

    @property
    def owned(self) -> frozenset[int] | None: ...

    @property
    def generation(self) -> int: ...

    def pending_of(self, direction: Direction) -> int: ...

    async def recount(self, direction: Direction = "to_braze") -> tuple[int, int]: ...

    async def oldest_pending_at(self, direction: Direction = "to_braze") -> float | None: ...

    async def ack(
        self,
        done: Sequence[int],
        applied: Sequence[tuple[str, str, float]] = (),
        dead: Sequence[Any] = (),
        *,
        stopping: Callable[[], bool],
        sent: Sequence[tuple[str, str, str, float]] = (),
        direction: Direction = "to_braze",
        audit: Sequence[Any] = (),
        erase: Sequence[str] = (),
    ) -> None: ...
