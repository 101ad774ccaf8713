"""The SQLite spool's backfill lane (`lane`): storing backfilled users, reading them back."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence

from gateway.errors import SpoolFull
from gateway.spool import lane
from gateway.spool.sqlite_file import SqliteFile, _row_cost
from gateway.spool.store import Pending


class SqliteLane(SqliteFile):
    """`SpoolDB`'s part for `gateway backfill`'s rows and progress."""

    def put_backfill(
        self,
        rows: Sequence[tuple[str, bytes, str]],
        source: str,
        position: str,
        counts: dict[str, int],
        *,
        finished: bool = False,
    ) -> int:
        """Store backfilled (key, body, person) rows and the source's progress, atomically;
        SpoolFull (nothing stored) while they would eat the reserve acknowledgements need."""
        now = self.clock()
        cost = sum(_row_cost(key, body) for key, body, _ in rows)
        if self.low_on_disk is not None:
            self._give_back()
        self._shed_for(cost)

        def work(db: sqlite3.Connection) -> int:
            # As intake: the rows' WAL frames, then the pages the checkpoint adds where no
            # free page is left, must leave `min_free_bytes` to acknowledgements.
            disk, reusable = self._room()
            needed = cost + max(0, cost - reusable)
            if self._above_reserve(disk - needed, max(0, reusable - cost)) < 0:
                raise SpoolFull(self._short_of_room())
            stored = lane.store(db, rows, now, self.dedupe_window_s, None)
            total = {**counts, "stored": counts.get("stored", 0) + stored}
            lane.save(db, source, position, total, now, finished)
            return stored

        stored = self._tx(work)
        self._stored(stored, 0, len(rows))
        return stored

    def backfill_progress(self, source: str) -> lane.Progress | None:
        """What the last backfill of `source` committed."""
        with self._reading("the backfill progress"):
            return lane.load(self.db, source)

    def fetch_backfill(self, after_id: int, limit: int) -> list[Pending]:
        """The oldest backfilled rows after `after_id`."""
        with self._reading("backfilled users"):
            return lane.fetch(self.db, after_id, limit, None, with_part=False)

    def count_backfill(self) -> int:
        """Backfilled users waiting for delivery."""
        with self._reading("the backfill count"):
            return lane.count(self.db)
