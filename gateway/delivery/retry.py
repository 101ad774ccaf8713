"""The retry policy: what to do with a request's objects once Braze has answered.

A pure function of the answer, the attempt, the age of the oldest row and the delivery config,
so every branch is testable without a server. Holding (a wrong key, a wrong URL) never gives up
and never dead-letters: it is the operator's to fix, and the updates must still be there then.
Nor does a request withheld because its partition moved: it was never tried.
"""

from __future__ import annotations

import enum
import random
from dataclasses import dataclass

from gateway.config.settings import DeliveryConfig
from gateway.delivery.outcome import Answer, Verdict


class Action(enum.Enum):
    """The next step for a request's objects."""

    ACK = "ack"  # acknowledged: remove the rows (dead-lettering the objects Braze named)
    SPLIT = "split"  # halve the request and send each half
    DEAD_LETTER = "dead_letter"  # Braze will never take these: move them, with the reason
    RETRY = "retry"  # transient: wait `delay_s`, send the same objects again
    HOLD = "hold"  # configuration (key, URL): keep everything, wait, send again
    GIVE_BACK = "give_back"  # not sent, the partition moved: the rows are the new owner's


@dataclass(frozen=True, slots=True)
class Decision:
    """What to do, after how long, and the metric label that says why."""

    action: Action
    delay_s: float = 0.0
    reason: str = ""


def decide(
    answer: Answer,
    *,
    attempt: int,
    oldest_age_s: float,
    can_split: bool,
    delivery: DeliveryConfig,
    rng: random.Random | None = None,
) -> Decision:
    """The step after `answer`, the `attempt`-th failure in a row (1 for the first)."""
    verdict = answer.verdict
    if verdict is Verdict.OK:
        return Decision(Action.ACK)
    if verdict is Verdict.MOVED:
        # Nothing was tried, so nothing failed: however old, the rows are left in the spool for
        # the replica that owns them now, never given up on here.
        return Decision(Action.GIVE_BACK, reason="moved")
    if verdict is Verdict.SPLIT:
        if can_split:
            return Decision(Action.SPLIT)
        if answer.status is not None and 200 <= answer.status < 300:
            # A 2xx whose error names no object, isolated to this one: Braze took the request
            # and refused this object, so sending it again would meet the same answer.
            return Decision(Action.DEAD_LETTER, reason="rejected")
        reason = "too_large" if answer.status == 413 else "bad_request"
        return Decision(Action.DEAD_LETTER, reason=reason)
    if verdict is Verdict.REFUSED:
        return Decision(Action.DEAD_LETTER, reason="bad_request")
    if verdict is Verdict.AUTH:
        reason = "unauthorized" if answer.status in (401, 403) else "misconfigured"
        return Decision(Action.HOLD, backoff(attempt, delivery, rng), reason)
    if verdict is Verdict.RATE_LIMITED:
        # The limiter itself holds the next request until the window resets; no extra sleep.
        return Decision(Action.RETRY, 0.0, "rate_limited")
    if oldest_age_s > delivery.give_up_after_s:
        return Decision(Action.DEAD_LETTER, reason="gave_up")
    if answer.status is None:
        reason = "timeout" if answer.reason == "timeout" else "connection"
    else:
        reason = "server_error"
    return Decision(Action.RETRY, backoff(attempt, delivery, rng), reason)


def backoff(attempt: int, delivery: DeliveryConfig, rng: random.Random | None = None) -> float:
    """Seconds before the next try: doubling from retry_initial_ms, jittered in the upper half."""
    ceiling = min(delivery.retry_max_ms, delivery.retry_initial_ms * 2 ** min(attempt, 30))
    draw = (rng or _rng).uniform(ceiling / 2, ceiling)
    return draw / 1000


_rng = random.Random()  # noqa: S311 - jitter, not secrecy
