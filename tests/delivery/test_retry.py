"""The retry policy: each Braze answer leads to one step, and holding never gives up."""

from __future__ import annotations

import random

import pytest

from gateway.config.settings import DeliveryConfig
from gateway.delivery.outcome import Answer, Verdict
from gateway.delivery.retry import Action, backoff, decide

DELIVERY = DeliveryConfig(retry_initial_ms=100, retry_max_ms=1000, give_up_after_s=60)


def step(
    answer: Answer, *, age: float = 0.0, can_split: bool = True, attempt: int = 1
) -> tuple[Action, str]:
    decision = decide(
        answer, attempt=attempt, oldest_age_s=age, can_split=can_split, delivery=DELIVERY
    )
    return decision.action, decision.reason


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        (Answer(Verdict.OK, 201, "ok"), (Action.ACK, "")),
        (Answer(Verdict.SPLIT, 400, "bad"), (Action.SPLIT, "")),
        (Answer(Verdict.REFUSED, 422, "no"), (Action.DEAD_LETTER, "bad_request")),
        (Answer(Verdict.AUTH, 401, "key"), (Action.HOLD, "unauthorized")),
        (Answer(Verdict.AUTH, 403, "perm"), (Action.HOLD, "unauthorized")),
        (Answer(Verdict.AUTH, 404, "url"), (Action.HOLD, "misconfigured")),
        (Answer(Verdict.RATE_LIMITED, 429, "slow"), (Action.RETRY, "rate_limited")),
        (Answer(Verdict.RETRY, 503, "down"), (Action.RETRY, "server_error")),
        (Answer(Verdict.RETRY, None, "timeout"), (Action.RETRY, "timeout")),
        (Answer(Verdict.RETRY, None, "connection: X"), (Action.RETRY, "connection")),
        (Answer(Verdict.MOVED, None, "another's"), (Action.GIVE_BACK, "moved")),
    ],
)
def test_each_answer_has_one_next_step(answer: Answer, expected: tuple[Action, str]) -> None:
    """Each verdict maps to the step and metric reason the README promises."""
    assert step(answer) == expected


def test_a_single_object_that_cannot_be_split_is_dead_lettered() -> None:
    """A 400 or 413 on one object cannot be narrowed further: it is refused for good."""
    assert step(Answer(Verdict.SPLIT, 400, "x"), can_split=False) == (
        Action.DEAD_LETTER,
        "bad_request",
    )
    assert step(Answer(Verdict.SPLIT, 413, "x"), can_split=False) == (
        Action.DEAD_LETTER,
        "too_large",
    )


def test_transient_failures_give_up_after_the_configured_age_but_holds_never_do() -> None:
    """Past give_up_after_s a 5xx dead-letters; a 401, a 429 or a request withheld because its
    partition moved keeps the update however old."""
    old = DELIVERY.give_up_after_s + 1
    assert step(Answer(Verdict.RETRY, 500, "x"), age=old) == (Action.DEAD_LETTER, "gave_up")
    assert step(Answer(Verdict.AUTH, 401, "x"), age=old)[0] is Action.HOLD
    assert step(Answer(Verdict.RATE_LIMITED, 429, "x"), age=old)[0] is Action.RETRY
    assert step(Answer(Verdict.MOVED, None, "x"), age=old)[0] is Action.GIVE_BACK


def test_backoff_doubles_up_to_the_ceiling_with_jitter() -> None:
    """Delays grow from retry_initial_ms, never pass retry_max_ms, and vary."""
    rng = random.Random(1)
    first = [backoff(1, DELIVERY, rng) for _ in range(50)]
    late = [backoff(20, DELIVERY, rng) for _ in range(50)]
    assert all(0.1 <= d <= 0.2 for d in first)
    assert all(0.5 <= d <= 1.0 for d in late)
    assert len(set(first)) > 1
