"""Intake's hand-over to delivery: the rows this process stored, kept in memory for Braze."""

from __future__ import annotations

import itertools
from collections import deque

from gateway.spool.store import Pending


class Handoff:
    """The rows this process stored for delivery to Braze, handed over in memory.

    Delivery would otherwise read back, and decode again, what intake has just written. The
    spool stays the source of truth: every row going to Braze with an id above
    `complete_after` is here (or was delivered); below it, delivery reads the spool (the
    backlog found at start, rows another process wrote, what an overflow dropped). Rows are
    dropped only once the delivery cursor has passed them, so a page that fails is taken again.
    """

    LIMIT = 4096  # rows held at most (a few MB); beyond, delivery reads the spool

    def __init__(self, complete_after: int) -> None:
        self.rows: deque[Pending] = deque()
        self.complete_after = complete_after
        # Intake-only processes write the file too (`server.intake_processes`): once this
        # process's rows are taken, theirs may follow, so delivery reads the spool.
        self.shared = False

    def add(self, row: Pending) -> None:
        """A row intake stored (in id order)."""
        if len(self.rows) >= self.LIMIT:
            # Delivery is far behind (Braze is down, say): it reads these from the spool.
            self.rows.clear()
            self.complete_after = max(self.complete_after, row.id)
            return
        self.rows.append(row)

    def gap(self, upto: int) -> None:
        """Rows up to `upto` may include some another process wrote: read them from the spool."""
        self.complete_after = max(self.complete_after, upto)

    def swap_in(self, rows: list[Pending]) -> list[Pending]:
        """Rows read from the spool, those this process stored replaced by their copies here,
        decoded already (with `server.intake_processes` most pages are read from the file).

        The read decides which rows there are; a copy is the row its own commit stored."""
        held = self.rows
        if not held or not rows or held[-1].id < rows[0].id or held[0].id > rows[-1].id:
            return rows
        mine = {row.id: row for row in held}
        return [mine.get(row.id, row) for row in rows]

    def take(self, cursor: int, limit: int) -> list[Pending] | None:
        """The rows after `cursor`, oldest first; None while the spool must be read first."""
        if cursor < self.complete_after:
            return None
        while self.rows and self.rows[0].id <= cursor:
            self.rows.popleft()
        if self.shared and not self.rows:
            return None
        return list(itertools.islice(self.rows, limit))
