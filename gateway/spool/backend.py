"""Opening the spool `delivery.spool` names: a SQLite file, or a PostgreSQL database."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from gateway.config.settings import is_postgresql
from gateway.errors import SpoolError
from gateway.spool.lock import WriteTurns
from gateway.spool.store import Store

if TYPE_CHECKING:
    from gateway.config.settings import DeliveryConfig


def open_store(delivery: DeliveryConfig, person_key: str = "", *, create: bool = True) -> Store:
    """Open the spool `delivery.spool` names (creating or migrating its schema).

    With `create=False` (the commands that read or edit what a gateway stored), a SQLite file
    that does not exist is an error: a new empty spool would answer "0 records" for a typo.
    """
    if not create and not is_postgresql(delivery.spool) and not Path(delivery.spool).exists():
        raise SpoolError(
            f"no spool at {delivery.spool}: no gateway has run with this delivery.spool yet,"
            " or --config names another gateway's config"
        )
    if is_postgresql(delivery.spool):
        from gateway.spool.postgres import PgSpoolDB  # psycopg is only needed by those who use it

        return PgSpoolDB(
            delivery.spool,
            max_pending=delivery.max_pending,
            dedupe_window_s=delivery.dedupe_window_s,
            person_key=person_key,
        )
    from gateway.spool.sqlite import SpoolDB

    return SpoolDB(
        delivery.spool,
        max_pending=delivery.max_pending,
        dedupe_window_s=delivery.dedupe_window_s,
        min_free_bytes=delivery.min_free_bytes,
        person_key=person_key,
    )


def take_turns(db: Store) -> WriteTurns | None:
    """On a SQLite spool, queue its writers on `WriteTurns`: several intake processes, and
    `gateway backfill` storing beside the gateway, which takes them too."""
    from gateway.spool.sqlite import SpoolDB
    from gateway.spool.sqlite_file import BUSY_TIMEOUT_S

    if not isinstance(db, SpoolDB):
        return None
    # Bounded as SQLite's own wait for its lock would be: the queue stands in for that wait.
    turns = WriteTurns(db.path, timeout_s=BUSY_TIMEOUT_S)
    db.writers = turns
    return turns
