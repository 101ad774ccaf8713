"""Retention: old audit records, dead-letter bodies and stale-check rows pruned in the background.

`[retention]` says how long each is kept (`sent`, the states last sent to Braze, as long as
`applied`). Pruning runs in small transactions (`batch` rows each,
a pause between) so intake and acknowledgements never wait long on the spool thread. An `applied`
row is what refuses a late, older choice; pruning it would let that choice through, so the newest
pruned time per target is kept in `floors`, and the stale checks compare against the later of the
person's row and the floor: a choice older than the retention is refused for everyone.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gateway.spool.conn import Conn

log = logging.getLogger("gateway.retention")

SCHEMA = """
CREATE TABLE IF NOT EXISTS floors (   -- per target, the newest applied time pruned
    target TEXT PRIMARY KEY,
    at REAL NOT NULL
) WITHOUT ROWID;
"""
# Why a choice below a floor, and above the person's own applied time, is refused: its own
# reason (metrics, audit, log), since "stale" would say a newer choice of theirs exists.
OLDER_THAN_RETENTION = "older_than_retention"
Cursor = tuple[str, str] | None  # where a pass over `applied` (by its key) has reached


def floors(db: Conn) -> dict[str, float]:
    """The floor time per target (one row per target, so small enough to hold in memory)."""
    return {target: at for target, at in db.execute("SELECT target, at FROM floors")}


def prune(
    db: Conn, table: str, cutoff: float, limit: int, after: Cursor = None
) -> tuple[int, Cursor]:
    """Delete up to `limit` rows of `table` older than `cutoff`: (deleted, cursor of the next
    batch, None once the table is done)."""
    if table == "audit":
        # Records are written in time order, so the oldest are the lowest ids: a batch looks at
        # the first `limit` only, and needs no index on `at` (one more b-tree per record).
        deleted = db.execute(
            "DELETE FROM audit WHERE id IN (SELECT id FROM audit ORDER BY id LIMIT ?) AND at < ?",
            (limit, cutoff),
        ).rowcount
        return deleted, ("", "") if deleted == limit else None
    if table == "dead_letters":
        deleted = db.execute(
            "DELETE FROM dead_letters WHERE id IN"
            " (SELECT id FROM dead_letters WHERE created_at < ? ORDER BY id LIMIT ?)",
            (cutoff, limit),
        ).rowcount
        return deleted, ("", "") if deleted == limit else None
    if table not in ("applied", "sent"):
        raise ValueError(f"no retention for the table {table!r}")
    # Neither has an index on its time (every acknowledgement would pay for one): walk the
    # table by its key, `limit` rows a batch, deleting the old ones.
    start = after or ("", "")
    rows = db.execute(
        f"SELECT person, target, at FROM {table} WHERE (person, target) > (?, ?)"  # noqa: S608 - a constant
        " ORDER BY person, target LIMIT ?",
        (*start, limit),
    ).fetchall()
    old = [(person, target, at) for person, target, at in rows if at < cutoff]
    if table == "applied":  # `sent` only tells echoes apart: nothing to keep of it
        db.executemany(
            # CASE, not max(): PostgreSQL's max() is an aggregate (this runs on both).
            "INSERT INTO floors(target, at) VALUES (?, ?) ON CONFLICT (target) DO UPDATE"
            " SET at = CASE WHEN excluded.at > floors.at THEN excluded.at ELSE floors.at END",
            [(target, at) for _, target, at in old],
        )
    db.executemany(
        # `at` too: `sent` keeps a row per state, and only the old ones go.
        f"DELETE FROM {table} WHERE person = ? AND target = ? AND at < ?",  # noqa: S608 - a constant
        [(p, t, cutoff) for p, t, _ in old],
    )
    return len(old), ((rows[-1][0], rows[-1][1]) if len(rows) == limit else None)
