"""The PostgreSQL spool's connections: opened with the gateway's settings, `?` placeholders."""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import Any

from gateway.errors import SpoolError

try:
    import psycopg
except ImportError:  # pragma: no cover - exercised on installs without the extra
    psycopg = None  # type: ignore[assignment]

__all__ = ["CONNECT_TIMEOUT_S", "SCHEMA", "PgConn", "connect", "psycopg", "redact"]

SCHEMA = "didomi_braze_gateway"
CONNECT_TIMEOUT_S = 10


@functools.lru_cache(maxsize=256)
def _pg(sql: str) -> str:
    """sqlite3's `?` placeholders as psycopg's `%s` (a literal `%` doubled)."""
    return sql.replace("%", "%%").replace("?", "%s")


class PgConn:
    """A psycopg connection that takes sqlite3's `?` placeholders, so `audit`, `retention`
    and `erasure` run the same statements on both engines."""

    def __init__(self, raw: psycopg.Connection[Any]) -> None:
        self.raw = raw

    def execute(self, sql: str, parameters: Any = (), /) -> Any:
        """Run one statement; returns its cursor."""
        if not parameters:
            return self.raw.execute(sql.encode())  # unparsed: a `%` stays a `%`
        return self.raw.execute(_pg(sql).encode(), parameters)

    def executemany(self, sql: str, parameters: Iterable[Any], /) -> Any:
        """Run one statement for each parameter tuple."""
        rows = list(parameters)
        cursor = self.raw.cursor()
        if rows:
            cursor.executemany(_pg(sql).encode(), rows)
        return cursor


def connect(
    url: str, *, application_name: str = "didomi-braze-gateway", statement_timeout_ms: int = 0
) -> PgConn:
    """A connection to the spool database, its search path set to the gateway's schema."""
    if psycopg is None:
        raise SpoolError(
            "delivery.spool names a PostgreSQL database, but psycopg is not installed:"
            " install the postgresql extra, pip install 'didomi-braze-gateway[postgresql]'"
            " (from a clone, pip install '.[postgresql]')"
        )
    # PGOPTIONS and the like stay the operator's, but for the short statements asked for.
    extra: dict[str, Any] = {}
    if statement_timeout_ms:
        extra["options"] = f"-c statement_timeout={statement_timeout_ms}"
    try:
        raw = psycopg.connect(
            url,
            autocommit=True,
            connect_timeout=CONNECT_TIMEOUT_S,
            application_name=application_name,
            # A dead peer is noticed in under a minute rather than after two hours.
            keepalives=1,
            keepalives_idle=10,
            keepalives_interval=5,
            keepalives_count=3,
            # Also while a query waits for its answer, which keepalives do not cover.
            tcp_user_timeout=30_000,
            **extra,
        )
    except psycopg.Error as exc:
        raise SpoolError(f"cannot connect to the spool database {redact(url)}: {exc}") from exc
    raw.execute(f"SET search_path TO {SCHEMA}".encode())
    return PgConn(raw)


def redact(url: str) -> str:
    """The URL without a password, for messages and logs."""
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    credentials, _, host = rest.rpartition("@")
    user = credentials.split(":", 1)[0]
    return f"{scheme}://{user}@{host}"
