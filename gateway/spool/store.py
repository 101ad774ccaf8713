"""The spool's interface: what both backends store and answer, (`backend` opens one).

Two backends keep the same records: `spool.SpoolDB`, one SQLite file for one gateway (the
embedded default), and `spool_pg.PgSpoolDB`, one PostgreSQL database that several replicas
share. `delivery.spool` picks one: a `postgresql://` URL, else a path. Everything above the
spool (the asyncio `Spool`, delivery, the CLI) sees only the `Store` protocol below.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from gateway.errors import SpoolError
from gateway.spool import audit as trail
from gateway.spool.conn import Conn
from gateway.words import Direction

if TYPE_CHECKING:
    from contextlib import AbstractContextManager

    from gateway.spool import prune as retention

log = logging.getLogger("gateway.spool")

# Every person's rows go to one of this many partitions, by a hash of the person; a replica
# owns a share of them at a time, so one person's updates are sent by one replica at a time.
PARTITIONS = 64

# The inbox's `direction` column (indexed), and how dead letters of Braze's reports (the
# reverse path) are told apart, by their type: the same SQL on both engines.
CODES: dict[Direction, int] = {"to_braze": 0, "to_didomi": 1}
TO_DIDOMI = "type LIKE 'braze.%'"


def inbox_where(direction: Direction | None) -> str:
    """The WHERE clause that keeps one direction's inbox rows (by the indexed column)."""
    if direction is None:
        return ""
    return f" WHERE direction = {CODES[direction]}"


def letters_where(direction: Direction | None) -> str:
    """The WHERE clause that keeps one direction's dead letters, or none for both."""
    if direction is None:
        return ""
    return f" WHERE {'' if direction == 'to_didomi' else 'NOT '}{TO_DIDOMI}"


@dataclass(frozen=True, slots=True)
class Pending:
    """One accepted webhook waiting for delivery."""

    id: int
    received_at: float  # when the gateway first accepted it: what undated choices are dated at
    type: str
    body: bytes
    part: int = 0  # the partition of its person (`PARTITIONS`); always 0 on SQLite
    # When `gateway dead-letters replay` put it back; None for a row never replayed.
    replayed_at: float | None = None
    # The webhook as intake decoded it, when the row came from intake in memory (`Handoff`),
    # so delivery need not decode it again; None when read from the spool.
    decoded: Any = field(default=None, compare=False, repr=False)
    backfill: bool = False  # from `gateway backfill`'s lane (`lane.CODE`), not a live webhook

    @property
    def queued_at(self) -> float:
        """When it (last) entered the inbox: `give_up_after_s` and latency count from here."""
        return self.received_at if self.replayed_at is None else self.replayed_at


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One webhook whose update the other side refused, with the reason."""

    id: int
    created_at: float
    received_at: float
    type: str
    person: str | None
    reason: str
    body: bytes


@dataclass(frozen=True, slots=True)
class Dead:
    """An instruction to move an inbox row to the dead letters."""

    id: int
    reason: str
    person: str | None = None


# What one intake item is: (dedupe key or None, type, body[, the person it is about]).
StoredItem = tuple[str | None, str, bytes, str | None] | tuple[str | None, str, bytes]


def person_of(item: StoredItem) -> str | None:
    """The person an intake item is about, if it says."""
    return item[3] if len(item) > 3 else None


class Store(Protocol):
    """One spool backend, synchronous: the asyncio `Spool` calls it from one thread."""

    max_pending: int
    clock: Callable[[], float]
    floors: dict[str, float]
    low_on_disk: str | None
    committed_at: float
    pending: int
    pending_backfill: int

    @property
    def owned(self) -> frozenset[int] | None:
        """The partitions this process may deliver now; None: all of them (one owner)."""

    @property
    def generation(self) -> int:
        """Bumped whenever `owned` changes, so delivery knows to look again."""

    def close(self) -> None: ...

    def put_many(self, items: Sequence[StoredItem]) -> list[bool | Exception]: ...

    def handoff_from(self) -> int | None:
        """The last inbox id when delivery may take this process's new rows from memory
        (`spool.handoff.Handoff`); None when other processes write rows too (PostgreSQL's
        replicas)."""

    def fetch(
        self, after_id: int, limit: int, direction: Direction = "to_braze"
    ) -> list[Pending]: ...

    def applied_times(self, persons: Iterable[str]) -> dict[tuple[str, str], float]: ...

    def sent_states(self, persons: Iterable[str]) -> dict[tuple[str, str], dict[str, float]]: ...

    def ack(
        self,
        done: Sequence[int],
        applied: Sequence[tuple[str, str, float]] = (),
        dead: Sequence[Dead] = (),
        *,
        sent: Sequence[tuple[str, str, str, float]] = (),
        direction: Direction = "to_braze",
        audit: Sequence[trail.Record] = (),
        erase: Sequence[str] = (),
    ) -> None: ...

    def prune(
        self, table: str, cutoff: float, limit: int, after: retention.Cursor = None
    ) -> tuple[int, retention.Cursor]: ...

    def finish_erasures(self) -> bool: ...

    def trail(
        self, person: str | None = None, *, event_id: str | None = None, since: float | None = None
    ) -> list[trail.StoredRecord]: ...

    def recount(self, direction: Direction = "to_braze") -> tuple[int, int]: ...

    def written_elsewhere(self) -> bool:
        """Whether another process may have written rows since last asked (a CLI replay)."""

    def pending_of(self, direction: Direction) -> int: ...

    def count_pending(self, direction: Direction | None = None) -> int: ...

    def count_dead(self, direction: Direction | None = None) -> int: ...

    def oldest_pending_at(self, direction: Direction = "to_braze") -> float | None: ...

    def dead_letters(self, ids: Sequence[int] | None = None) -> list[DeadLetter]: ...

    def replay(self, ids: Sequence[int] | None = None) -> int: ...

    def purge(self, ids: Sequence[int] | None = None) -> int: ...

    def meta(self, key: str) -> bytes | None: ...

    def set_meta(self, key: str, value: bytes) -> None: ...

    def put_backfill(
        self,
        rows: Sequence[tuple[str, bytes, str]],
        source: str,
        position: str,
        counts: dict[str, int],
        *,
        finished: bool = False,
    ) -> int: ...

    def backfill_progress(self, source: str) -> Any: ...

    def fetch_backfill(self, after_id: int, limit: int) -> list[Pending]: ...

    def count_backfill(self) -> int: ...


class SpoolBase:
    """What both backends do alike, above their SQL: counts, clean-up cadence, and the reads
    that merge a person's rows with those kept under their hash (an erased person)."""

    pending = 0
    pending_to_didomi = 0
    # Backfilled users (`lane`), as last counted: not live webhooks, so not in to_braze's
    # pending (its backlog alert must not fire for a backfill); gateway_backfill_pending has them.
    pending_backfill = 0
    # Rows this process stored since it opened the spool, and those of them going to Didomi:
    # what an intake-only process reports to the one that delivers.
    stored_total = 0
    stored_to_didomi = 0
    dedupe_window_s = 0.0
    clock: Callable[[], float]
    person_key: bytes
    _puts_since_prune = 0

    def _tx(self, work: Callable[[Any], Any]) -> Any:
        """Run `work(connection)` in one transaction; errors become SpoolError."""
        raise NotImplementedError

    def _reading(self, what: str) -> AbstractContextManager[Conn]:
        """The connection to read `what` on; errors become SpoolError naming it."""
        raise NotImplementedError

    def _by_person(
        self, what: str, columns: str, table: str, persons: Iterable[str]
    ) -> list[tuple[Any, ...]]:
        """Rows of `table` keyed by the persons or their hashes, each named by its person."""
        raise NotImplementedError

    def _stored(self, stored: int, reverse: int, offered: int) -> None:
        """Count what a committed intake transaction added; now and then forget old keys."""
        self.pending += stored
        self.pending_to_didomi += reverse
        self.stored_total += stored
        self.stored_to_didomi += reverse
        self._puts_since_prune += offered
        if self._puts_since_prune >= 10_000:
            self._puts_since_prune = 0
            try:
                self.prune_seen()
            except SpoolError as exc:
                # The rows are committed: a failed clean-up must not turn 202s into 503s.
                log.warning("could not prune old delivery keys (will retry later): %s", exc)

    def prune_seen(self) -> None:
        """Forget delivery keys older than the dedupe window, so the table stays bounded."""
        cutoff = self.clock() - self.dedupe_window_s
        self._tx(lambda db: db.execute("DELETE FROM seen WHERE at < ?", (cutoff,)))

    def applied_times(self, persons: Iterable[str]) -> dict[tuple[str, str], float]:
        """The last applied choice time per (person, target), for the given persons.

        An erased person's rows are kept under their hash: both are read, the later time wins.
        """
        out: dict[tuple[str, str], float] = {}
        for person, target, at in self._by_person(
            "applied times", "target, at", "applied", persons
        ):
            out[(person, target)] = max(at, out.get((person, target), at))
        return out

    def sent_states(self, persons: Iterable[str]) -> dict[tuple[str, str], dict[str, float]]:
        """Every state sent to Braze and when it was last, per (person, target), for the given
        persons (an erased person's rows, kept under their hash, merged in)."""
        out: dict[tuple[str, str], dict[str, float]] = {}
        rows = self._by_person("the states sent to Braze", "target, state, at", "sent", persons)
        for person, target, state, at in rows:
            states = out.setdefault((person, target), {})
            states[state] = max(at, states.get(state, at))
        return out

    def written_elsewhere(self) -> bool:
        """Whether another process may have written rows since last asked: by default, always
        (PostgreSQL's replicas all write; SQLite knows better)."""
        return True

    def pending_of(self, direction: Direction) -> int:
        """Rows waiting to go `direction`, as this process counts them."""
        if direction == "to_didomi":
            return self.pending_to_didomi
        return max(0, self.pending - self.pending_to_didomi - self.pending_backfill)

    def count_pending(self, direction: Direction | None = None) -> int:
        """Rows waiting in the inbox, read afresh (another process may have replayed)."""
        with self._reading("the pending count") as db:
            sql = f"SELECT count(*) FROM inbox{inbox_where(direction)}"  # noqa: S608 - a constant
            return int(db.execute(sql).fetchone()[0])

    def count_dead(self, direction: Direction | None = None) -> int:
        """Rows in the dead letters."""
        with self._reading("the dead-letter count") as db:
            sql = f"SELECT count(*) FROM dead_letters{letters_where(direction)}"  # noqa: S608 - a constant
            return int(db.execute(sql).fetchone()[0])

    def oldest_pending_at(self, direction: Direction = "to_braze") -> float | None:
        """When the oldest webhook still waiting to go `direction` was queued, or None."""
        with self._reading("the oldest pending webhook") as db:
            where = inbox_where(direction)
            row = db.execute(
                f"SELECT coalesce(replayed_at, received_at) FROM inbox{where} ORDER BY id LIMIT 1"  # noqa: S608 - a constant
            ).fetchone()
        return None if row is None else float(row[0])

    def dead_letters(self, ids: Sequence[int] | None = None) -> list[DeadLetter]:
        """Every dead letter, or the ones named, oldest first."""
        with self._reading("the dead letters") as db:
            rows = db.execute(
                "SELECT id, created_at, received_at, type, person, reason, body FROM dead_letters"
                " ORDER BY id"
            ).fetchall()
        wanted = set(ids) if ids is not None else None
        return [
            DeadLetter(i, created, received, kind, person, reason, bytes(body))
            for i, created, received, kind, person, reason, body in rows
            if wanted is None or i in wanted
        ]

    def meta(self, key: str) -> bytes | None:
        """A value of the spool's `meta` table (written by a command, read by the server)."""
        with self._reading(f"the spool's {key}") as db:
            row = db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else bytes(row[0])

    def set_meta(self, key: str, value: bytes) -> None:
        """Write a value of the spool's `meta` table, replacing the one before."""
        self._tx(
            lambda db: db.execute(
                "INSERT INTO meta(key, value) VALUES (?, ?)"
                " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (key, value),
            )
        )

    def trail(
        self, person: str | None = None, *, event_id: str | None = None, since: float | None = None
    ) -> list[trail.StoredRecord]:
        """A person's audit records (or one event's), newest first."""
        with self._reading("the audit trail") as db:
            if event_id is not None:
                return trail.of_event(db, event_id)
            return trail.of_person(db, trail.person_hash(self.person_key, person or ""), since)
