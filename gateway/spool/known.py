"""Applied times read ahead for a page of the backfill lane, forgotten when an ack touches them.

The stale check reads a person's applied times just before their change is sent. For the lane
that is one spool trip per request; read once per page instead, they must still be exact when
the request leaves. Which wins where the read-ahead and the spool disagree: the spool, always.
An entry is kept only while no acknowledgement of this process can have written that person's
applied times since the read: an ack in progress during the read, one that finished during it,
or one that starts after it drops the person, who is then read afresh before sending. Writes
of other processes cannot touch them: on SQLite this process is the only one that acknowledges,
on PostgreSQL only the owner of a person's partition does, and entries read under another
`Spool.generation` of the partitions than the current one are never used: given up and taken
back during the read, or after it before the dispatcher looked, another replica may have acked
them meanwhile (a change the dispatcher sees forgets everything too, `forget_all`).
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterable, Iterator

Times = dict[tuple[str, str], float]

LIMIT = 50_000  # persons held at most: beyond, all is forgotten (a read afresh is always right)


class Known:
    """Per person, the applied times read ahead, valid until an acknowledgement touches them."""

    def __init__(self) -> None:
        self._times: dict[str, Times] = {}
        self._writing: Counter[str] = Counter()  # persons an ack in progress writes
        self._reads = 0  # read-aheads in progress
        self._written: set[str] = set()  # persons acked while a read-ahead was in progress
        self._generation = 0  # `Spool.generation` when the entries' read began

    @contextlib.contextmanager
    def writing(self, persons: Iterable[str]) -> Iterator[None]:
        """Around an acknowledgement that may write `persons`' applied times (or erase them)."""
        people = set(persons)
        for person in people:
            self._times.pop(person, None)
        self._writing.update(people)
        try:
            yield
        finally:
            self._writing.subtract(people)
            for person in people:
                if self._writing[person] <= 0:
                    del self._writing[person]
                self._times.pop(person, None)
            if self._reads:
                self._written.update(people)

    @contextlib.contextmanager
    def reading(self) -> Iterator[None]:
        """Around the read whose result is then given to `keep`."""
        self._reads += 1
        try:
            yield
        finally:
            self._reads -= 1
            if not self._reads:
                self._written.clear()

    def keep(self, persons: Iterable[str], times: Times, *, generation: int = 0) -> None:
        """Hold what a read (inside `reading`, begun under the partitions' `generation`) found
        for `persons`, but of those an ack may have written meanwhile: their next stale check
        reads the spool."""
        if len(self._times) > LIMIT or generation != self._generation:
            self._times.clear()
            self._generation = generation
        people = {
            person
            for person in persons
            if person not in self._writing and person not in self._written
        }
        found: dict[str, Times] = {person: {} for person in people}
        for key, at in times.items():
            if key[0] in found:
                found[key[0]][key] = at
        self._times.update(found)

    def take(self, person: str, *, generation: int = 0) -> Times | None:
        """The person's applied times read ahead and still exact, once; None: read them.
        `generation`: the partitions' now, which must be the one the read began under."""
        if generation != self._generation:
            self._times.clear()  # partitions moved since: another replica may have acked them
            return None
        return self._times.pop(person, None)

    def forget_all(self) -> None:
        """Drop every entry (the partitions this process delivers changed)."""
        self._times.clear()

    def __len__(self) -> int:
        return len(self._times)
