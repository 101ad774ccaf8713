"""The gateway's exceptions, all rooted in :class:`GatewayError`.

    GatewayError
    ├── ConfigError        a config or mapping file is wrong; carries every Problem found
    ├── BrazeError         Braze refused a request; carries the status and the response body
    ├── BrazeWebhookError  a body Braze sent us is not of a shape the gateway reads (a 400)
    └── SpoolError         the durable spool could not do what was asked
        ├── SpoolFull      the spool is over `delivery.max_pending` or out of disk
        └── SpoolLocked    another `gateway run` owns the spool file

Messages say what to fix, and never hold a secret.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


class GatewayError(Exception):
    """Root of every error the gateway raises on purpose."""


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong in one file: where, and what to fix."""

    file: str
    message: str
    line: int | None = None
    path: str | None = None  # the TOML key path, when no line is known

    def __str__(self) -> str:
        if self.line is not None:
            return f"{self.file}:{self.line}: {self.message}"
        if self.path:
            return f"{self.file}: {self.path}: {self.message}"
        return f"{self.file}: {self.message}"


class ConfigError(GatewayError):
    """The config or the mapping rules cannot be used; `problems` lists each one."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


class BrazeError(GatewayError):
    """Braze answered with a status that is not success."""

    def __init__(self, status: int, body: str, message: str = "") -> None:
        self.status = status
        self.body = body
        super().__init__(message or f"Braze answered {status}: {body[:500]}")


class SpoolError(GatewayError):
    """The spool database could not store or read what was asked."""


class SpoolFull(SpoolError):
    """The spool will not accept more until pending updates drain or disk space returns."""


class SpoolLocked(SpoolError):
    """Another `gateway run` holds the spool's lock; only one process may deliver from it."""

    def __init__(self, spool: str | Path, pid: int | None = None) -> None:
        self.spool = str(spool)
        self.pid = pid
        holder = f" (pid {pid})" if pid else ""
        super().__init__(
            f"another gateway{holder} is running on the spool {spool}: only one `gateway run`"
            " may own a spool file; stop that one first, or give this one its own delivery.spool"
        )
