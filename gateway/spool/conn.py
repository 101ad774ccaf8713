"""The part of a DB-API connection the SQL both backends share runs on."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    pass


class Conn(Protocol):
    """The part of a DB-API connection the shared SQL (`audit`, `retention`) runs on.

    sqlite3's connection is one; PostgreSQL's is `spool_pg.Conn`, which takes the same `?`
    placeholders, so a statement written once runs on both.
    """

    def execute(self, sql: str, parameters: Any = ..., /) -> Any: ...

    def executemany(self, sql: str, parameters: Iterable[Any], /) -> Any: ...
