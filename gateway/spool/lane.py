"""The backfill lane in the spool: its rows, its progress records, the SQL both backends share.

Backfilled users are inbox rows of their own direction code (`CODE`): delivered to Braze by the
same dispatcher, mapped by the same rules, but read only when live webhooks are caught up and
at most `backfill.share` of Braze's rate. `backfill_progress` holds, per source, the position
the last committed batch ended at and the counts so far, written in the same transaction as
the rows: a rerun after a kill goes on from there, and the `seen` keys make a row stored twice
impossible even when the position is lost (standard input).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec

from gateway.spool.conn import Conn
from gateway.spool.store import PARTITIONS, Pending

CODE = 2  # the inbox's `direction` for backfilled users (0: live to Braze, 1: to Didomi)
KIND = "user.updated"  # each backfilled user is stored as the webhook that reports it

SCHEMA = """
CREATE TABLE IF NOT EXISTS backfill_progress (  -- per source: where the last batch ended
    source TEXT PRIMARY KEY,
    position TEXT NOT NULL,
    counts TEXT NOT NULL,          -- JSON: read, stored, duplicate, no_identity, ...
    updated_at REAL NOT NULL,
    finished_at REAL
);
"""
PG_MIGRATION = """
CREATE TABLE backfill_progress (
    source text PRIMARY KEY,
    position text NOT NULL,
    counts text NOT NULL,
    updated_at double precision NOT NULL,
    finished_at double precision
);
"""

_counts = msgspec.json.Decoder(dict[str, int])
_encoder = msgspec.json.Encoder()


@dataclass(frozen=True, slots=True)
class Progress:
    """What a source's backfill committed last: its position and counts, and if it finished."""

    source: str
    position: str
    counts: dict[str, int]
    updated_at: float
    finished_at: float | None


def key(person: str, user_id: str | None, updated_at: float) -> str:
    """The dedupe key of one user's snapshot: stored once, however often it is read."""
    return f"backfill|{person}|{user_id or ''}|{updated_at:.3f}"


def store(
    db: Conn,
    rows: Sequence[tuple[str, bytes, str]],
    now: float,
    dedupe_window_s: float,
    part: Callable[[str], int] | None,
) -> int:
    """Insert (key, body, person) rows not seen within the window; how many were new."""
    fresh: list[tuple[Any, ...]] = []
    for dedupe, body, person in rows:
        cur = db.execute(
            "INSERT INTO seen(key, at) VALUES (?, ?) ON CONFLICT (key) DO UPDATE"
            " SET at = excluded.at WHERE seen.at < ?",
            (dedupe, now, now - dedupe_window_s),
        )
        if cur.rowcount == 0:
            continue
        if part is None:
            fresh.append((now, KIND, body, CODE))
        else:
            fresh.append((now, KIND, body, CODE, part(person)))
    if fresh:
        columns = "received_at, type, body, direction" + (", part" if part else "")
        marks = ", ".join("?" * len(fresh[0]))
        db.executemany(f"INSERT INTO inbox({columns}) VALUES ({marks})", fresh)  # noqa: S608 - constants
    return len(fresh)


def save(
    db: Conn, source: str, position: str, counts: dict[str, int], now: float, finished: bool
) -> None:
    """Record where `source` stands, in the caller's transaction."""
    db.execute(
        "INSERT INTO backfill_progress(source, position, counts, updated_at, finished_at)"
        " VALUES (?, ?, ?, ?, ?) ON CONFLICT (source) DO UPDATE SET position = excluded.position,"
        " counts = excluded.counts, updated_at = excluded.updated_at,"
        " finished_at = excluded.finished_at",
        (source, position, _encoder.encode(counts).decode(), now, now if finished else None),
    )


def load(db: Conn, source: str) -> Progress | None:
    """What was committed for `source`, or None for a source never read."""
    row = db.execute(
        "SELECT position, counts, updated_at, finished_at FROM backfill_progress WHERE source = ?",
        (source,),
    ).fetchone()
    if row is None:
        return None
    return Progress(source, row[0], _counts.decode(row[1]), float(row[2]), row[3])


def fetch(
    db: Conn, after_id: int, limit: int, owned: frozenset[int] | None, with_part: bool
) -> list[Pending]:
    """The backfilled rows after `after_id`, oldest first, of the partitions owned."""
    if owned is not None and not owned:
        return []
    columns = "id, received_at, type, body" + (", part" if with_part else ", 0")
    parts = "" if owned is None else " AND part = ANY(?)"
    params: tuple[Any, ...] = (CODE, after_id)
    if owned is not None:
        params += (sorted(owned),)
    rows = db.execute(
        f"SELECT {columns} FROM inbox WHERE direction = ? AND id > ?{parts}"  # noqa: S608 - constants
        " ORDER BY id LIMIT ?",
        (*params, limit),
    ).fetchall()
    return [
        Pending(i, at, kind, bytes(body), part, backfill=True) for i, at, kind, body, part in rows
    ]


def count(db: Conn) -> int:
    """Backfilled users waiting for delivery."""
    return int(db.execute("SELECT count(*) FROM inbox WHERE direction = ?", (CODE,)).fetchone()[0])


def rate(
    share: float, requests_per_second: float, batch_size: int, owned: frozenset[int] | None
) -> float:
    """This process's lane objects a second: `share` of Braze's rate in objects, split among
    the replicas by the partitions each delivers, so that all of them together keep to it."""
    whole = share * requests_per_second * batch_size
    return whole if owned is None else whole * len(owned) / PARTITIONS


class Budget:
    """A token bucket of objects per second: the lane's share of Braze's rate."""

    def __init__(self, rate: Callable[[], float], clock: Callable[[], float]) -> None:
        self.rate = rate  # asked at each take: a reload or a partition move changes it
        self.clock = clock
        self.tokens = 0.0
        self.at = clock()

    def take(self, wanted: int) -> int:
        """Up to `wanted` objects allowed now (0 while the share is spent)."""
        now = self.clock()
        rate = self.rate()
        burst = max(rate, 1.0)  # at most one second's worth at once
        self.tokens = min(burst, self.tokens + (now - self.at) * rate)
        self.at = now
        granted = min(wanted, int(self.tokens))
        self.tokens -= granted
        return granted

    def refund(self, unused: int) -> None:
        """Give back what was allowed but not used."""
        self.tokens = min(max(self.rate(), 1.0), self.tokens + unused)
