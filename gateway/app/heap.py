"""The cyclic garbage collector tuned for serving: start-up's objects frozen, fewer collections.

At CPython's default a young collection runs every 700 net allocations of tracked objects, and
each traverses what is alive then: the requests in flight, the backlog, the hand-off; survivors
climb to the old generations, whose collections traverse the whole heap, start-up's modules and
rules included. At 5,000 webhooks a second that was ~17 µs of the event loop's CPU per webhook,
more than decoding and storing one (`bench/wrk.py` with `gctime`: 1.08 s of collections in
62,000 webhooks; as set here, 0.07 s in 53,500). Peak RSS did not move (75 MB).
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator

# Net allocations between two young collections (CPython's default 700): garbage in cycles
# lives a little longer, a few MB at most, for collections ~14 times rarer.
YOUNG = 10_000


# Apps serving in this process (the tests run several): the first tunes, the last undoes.
_serving = [0]
_default = [gc.get_threshold()]


@contextlib.contextmanager
def settled() -> Iterator[None]:
    """While serving: start-up's objects left out of every collection (`gc.freeze`), the young
    generation collected every `YOUNG` allocations; both undone once no app serves."""
    _serving[0] += 1
    if _serving[0] == 1:
        _default[0] = gc.get_threshold()
        # The young generations only: not to freeze start-up's recent garbage with the rest.
        # A full collection took 50-150 ms, at every start of the app in the tests too.
        gc.collect(1)
        gc.freeze()
        gc.set_threshold(YOUNG, *_default[0][1:])
    try:
        yield
    finally:
        _serving[0] -= 1
        if not _serving[0]:
            gc.set_threshold(*_default[0])
            gc.unfreeze()
