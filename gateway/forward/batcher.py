"""The batcher: mapped spool rows -> per-person items -> batches, in each person's spool order.

Pure and synchronous, so a property test can drive it directly. It holds the backlog (rows
fetched and mapped, in spool order), coalesces one person's consecutive rows of one kind into one
item, and knows who is in flight: a person with an item in flight gets no second one until that
item is settled or given back, so requests for one person leave in spool order whatever their
endpoint. Nothing here talks to Braze or to the spool.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from gateway.peers.braze_bodies import MAX_DELETE_IDS
from gateway.rules.mappings import Mapped, State, Target
from gateway.spool.store import Pending


@dataclass(slots=True)
class Change:
    """The winning state of one target for one person, with the choice's time."""

    state: State
    at: float
    erasure: bool = False  # from a user.deleted: dated at arrival, never dropped as stale
    entry: Entry | None = None  # the row whose choice this is, for the audit trail


@dataclass(slots=True)
class Entry:
    """One fetched spool row and what it maps to."""

    row: Pending
    mapped: Mapped

    @property
    def key(self) -> str:
        """Who the row is about: the identifier kind and the person."""
        return f"{self.mapped.identity}:{self.mapped.person}"


@dataclass(slots=True)
class Item:
    """One Braze object (or one deletion) under construction: a person and the rows behind it."""

    identity: str
    person: str
    delete: bool = False
    changes: dict[Target, Change] = field(default_factory=dict)
    entries: list[Entry] = field(default_factory=list)
    erased_at: float | None = None  # the time an erasure in this item takes effect
    stale: dict[Target, Change] = field(default_factory=dict)  # dropped as stale, for the audit
    expired: set[Target] = field(default_factory=set)  # of `stale`, those only a floor refused
    settled: bool = False  # acknowledged or dead-lettered: its rows have left the inbox
    returned: bool = False  # given back to the backlog after a failure

    @property
    def key(self) -> str:
        """Who this item is about, as `Entry.key` spells it."""
        return f"{self.identity}:{self.person}"

    @property
    def rows(self) -> list[Pending]:
        """The spool rows this item settles."""
        return [entry.row for entry in self.entries]

    def merge(self, entry: Entry) -> None:
        """Fold in another row of this person: the later choice wins, ties to the later arrival."""
        self.entries.append(entry)
        mapped = entry.mapped
        if mapped.erasure:
            self.erased_at = max(self.erased_at or mapped.at, mapped.at)
        for target, state in mapped.changes.items():
            current = self.changes.get(target)
            if current is None or mapped.at >= current.at:
                self.changes[target] = Change(state, mapped.at, mapped.erasure, entry)


@dataclass(slots=True)
class Batch:
    """Items sent together in one request: all updates, or all deletions of one identifier kind."""

    items: list[Item]
    delete: bool = False

    @property
    def keys(self) -> Iterator[str]:
        """The people in this batch."""
        return (item.key for item in self.items)


class Batcher:
    """The backlog of mapped rows and who is in flight; batches keep each person's order."""

    def __init__(self) -> None:
        self._backlog: deque[Entry] = deque()
        self._people: Counter[str] = Counter()  # rows per person in the backlog
        self.in_flight: set[str] = set()
        # Rows held here (in the backlog or in flight), so a fetch that reads them again (after
        # a change of partitions, on PostgreSQL) never adds them twice.
        self.ids: set[int] = set()
        self._flying: Counter[int] = Counter()  # rows in flight, per partition

    def __len__(self) -> int:
        return len(self._backlog)

    @property
    def people_waiting(self) -> int:
        """How many people have rows in the backlog (a batch of that many is full)."""
        return len(self._people)

    def add(self, entries: Iterable[Entry]) -> None:
        """Append rows fetched from the spool, in spool order."""
        for entry in entries:
            self._backlog.append(entry)
            self._people[entry.key] += 1
            self.ids.add(entry.row.id)

    @property
    def parts_held(self) -> set[int]:
        """The partitions with a row in flight or in the backlog."""
        return set(self._flying) | {entry.row.part for entry in self._backlog}

    def waiting(self, before: int) -> Iterator[Entry]:
        """The backlog's rows stored before row id `before`."""
        # All of it: a backfill page (lower ids) is appended after live rows, and a partition
        # taken over is read from its start, so the backlog is not in id order.
        return (entry for entry in self._backlog if entry.row.id < before)

    def drop(self, keep: Callable[[int], bool]) -> int:
        """Forget backlog rows whose partition `keep` refuses (another replica has it now);
        returns how many. Rows in flight finish as they are."""
        kept: deque[Entry] = deque()
        dropped = 0
        for entry in self._backlog:
            if keep(entry.row.part):
                kept.append(entry)
                continue
            dropped += 1
            self._forget(entry)
        self._backlog = kept
        return dropped

    def _forget(self, entry: Entry) -> None:
        """Let a backlog row go unsent: it stays in the spool for whoever owns it."""
        self.ids.discard(entry.row.id)
        self._people[entry.key] -= 1
        if not self._people[entry.key]:
            del self._people[entry.key]

    def take(
        self,
        size: int,
        delete_size: int = MAX_DELETE_IDS,
        owned: frozenset[int] | None = None,
    ) -> Batch | None:
        """The next batch, or None when every waiting row belongs to someone in flight.

        The first row not held back decides the kind (update, or deletion by one identifier
        kind); a person whose row is held back keeps all their later rows back too, so that
        nothing of theirs overtakes it.
        """
        items: dict[str, Item] = {}
        kept: deque[Entry] = deque()
        held: set[str] = set()
        kind: tuple[bool, str] | None = None
        limit = size
        # Once the batch is full only its people's later rows can still join it: the scan
        # stops when none is left ahead (a full scan per batch made a backlog of B rows cost
        # B/size row visits per row). `left`: each batch person's rows not yet visited.
        left: dict[str, int] = {}
        ahead = 0
        backlog = self._backlog
        while backlog and (ahead or kind is None or len(items) < limit):
            entry = backlog.popleft()
            key = entry.key
            if key in left and key not in held:
                left[key] -= 1
                ahead -= 1
            if owned is not None and entry.row.part not in owned:
                self._forget(entry)  # another replica delivers it now (rows given back, say)
                continue
            mapped = entry.mapped
            item = items.get(key)
            if key in held:
                item = None  # an earlier row of theirs waits: so does this one
            elif item is None:
                wanted = (mapped.delete, mapped.identity if mapped.delete else "")
                if kind is None:
                    limit = delete_size if wanted[0] else size
                if key not in self.in_flight and len(items) < limit and kind in (None, wanted):
                    kind = wanted
                    item = items[key] = Item(mapped.identity, mapped.person, mapped.delete)
                    left[key] = self._people[key] - 1  # this row is counted there too
                    ahead += left[key]
            elif item.delete != mapped.delete:
                item = None  # an update and a deletion of one person never share a request
            if item is None:
                if key in left and key not in held:
                    ahead -= left[key]  # their later rows wait behind this one
                held.add(key)
                kept.append(entry)
                continue
            item.merge(entry)
            self._people[key] -= 1
            if not self._people[key]:
                del self._people[key]
        # The rest, unvisited, stays where it is, behind the rows held back (in spool order);
        # rows of partitions given up are forgotten, as a full scan would have.
        if owned is not None and any(entry.row.part not in owned for entry in backlog):
            self.drop(owned.__contains__)  # over the rest only: `kept` is out of the backlog
        self._backlog.extendleft(reversed(kept))
        if not items:
            return None
        self.in_flight.update(items)
        for item in items.values():
            for entry in item.entries:
                self._flying[entry.row.part] += 1
        return Batch(list(items.values()), delete=bool(kind and kind[0]))

    def release(self, batch: Batch) -> None:
        """The batch is done with, one way or another: its people may have another request."""
        self.in_flight.difference_update(batch.keys)
        for item in batch.items:
            for entry in item.entries:
                self._flying[entry.row.part] -= 1
                if self._flying[entry.row.part] <= 0:
                    del self._flying[entry.row.part]
                if not item.returned:  # settled (gone from the spool), or left to another
                    self.ids.discard(entry.row.id)

    def give_back(self, batch: Batch) -> int:
        """Put the rows of the batch's unsettled items back in the backlog, in spool order.

        For a failure between fetching and acknowledging: the rows stay deliverable without a
        restart. Returns how many rows came back. The caller still releases the batch.
        """
        returned = [item for item in batch.items if not (item.settled or item.returned)]
        entries = [entry for item in returned for entry in item.entries]
        if not entries:
            return 0
        for item in returned:
            item.returned = True
        for entry in entries:
            self._people[entry.key] += 1
        # The backlog is in spool order (row id) and so are each person's rows: merging by id
        # puts the returned rows exactly where they were.
        self._backlog = deque(sorted((*self._backlog, *entries), key=lambda e: e.row.id))
        return len(entries)
