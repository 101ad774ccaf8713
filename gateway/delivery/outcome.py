"""A peer's answer to one request, sorted into what delivery does next."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class Verdict(enum.Enum):
    """What the dispatcher should do with a request's objects after the peer answered."""

    OK = "ok"  # acknowledged; `errors` names the objects Braze refused anyway
    RETRY = "retry"  # transient (5xx, timeout, connection): back off and send again
    RATE_LIMITED = "rate_limited"  # 429: wait for the window, then send again
    AUTH = "auth"  # 401/403, or 404/405/3xx from a wrong server: keep everything, retry slowly
    SPLIT = "split"  # 400/413: some object is bad or the body too big; halve and resend
    REFUSED = "refused"  # another 4xx: Braze will never take this request
    MOVED = "moved"  # not sent: the rows' partitions are another replica's now


@dataclass(frozen=True, slots=True)
class Answer:
    """A peer's answer to one request (Braze's or Didomi's), classified."""

    verdict: Verdict
    status: int | None  # None: no HTTP answer (timeout, connection error)
    reason: str  # short, for logs, metrics and dead letters; never holds the API key
    errors: dict[int, str] = field(default_factory=dict)  # object index -> Braze's error type
    # A 2xx's errors that name no object (`"errors": ["<message>"]`), redacted.
    unattributed: tuple[str, ...] = ()
