"""One run of `gateway check --online`: its report, its findings, its bounded HTTP calls."""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import aiohttp
import msgspec

from gateway.config.located import KeyPath, LineIndex, format_path
from gateway.config.settings import Config
from gateway.errors import Problem
from gateway.rules.mappings import Reference, RuleSet
from gateway.shapes.webhooks import Lenient

PROBE_PREFIX = "gateway-check-"  # the random external id every Braze probe names
MAX_MESSAGE_CHARS = 200


class _Said(Lenient, frozen=True):
    """The words of an error body: Braze's `message`, Didomi's `message` or `name`."""

    message: str | None = None
    name: str | None = None
    error: str | None = None


_said = msgspec.json.Decoder(_Said)


@dataclass(slots=True)
class Report:
    """What the online check found: errors (exit 1), warnings, and the summary lines."""

    errors: list[Problem] = field(default_factory=list)
    warnings: list[Problem] = field(default_factory=list)
    summary: list[str] = field(default_factory=list)
    # A service that did not answer (connection, timeout, 429, 5xx): says nothing of the config.
    unreachable: list[Problem] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Reply:
    """What Braze or Didomi answered one probe: the status and the body, unread."""

    status: int
    body: bytes

    def said(self) -> str:
        """The service's own words, short; the status alone when it gave none."""
        try:
            said = _said.decode(self.body)
            text = said.message or said.error or said.name or ""
        except msgspec.DecodeError:
            text = self.body[:MAX_MESSAGE_CHARS].decode("utf-8", "replace")
        text = " ".join(text.split())[:MAX_MESSAGE_CHARS]
        return f"{self.status} {text!r}" if text else str(self.status)


class Checker:
    """One run: the config's lines, one HTTP session, and the report they fill."""

    def __init__(
        self, config: Config, rules: RuleSet, config_path: str, session: aiohttp.ClientSession
    ) -> None:
        self.config = config
        self.rules = rules
        self.file = config_path
        try:
            text = Path(config_path).read_text(encoding="utf-8")
        except OSError:
            text = ""  # it was read a moment ago; without it, problems name the key instead
        self.lines = LineIndex(text)
        self.session = session
        self.report = Report()
        self.probe = PROBE_PREFIX + secrets.token_hex(8)

    # ------------------------------------------------------------------ findings

    def at_key(self, path: KeyPath, message: str, *, warning: bool = False) -> None:
        line = self.lines.line(path)
        where = None if line is not None else format_path(path)
        problem = Problem(self.file, message, line=line, path=where)
        self._add(problem, warning)

    def down(self, path: KeyPath, message: str) -> None:
        """A service that could not answer now, said at the key naming where it is."""
        line = self.lines.line(path)
        where = None if line is not None else format_path(path)
        self.report.unreachable.append(Problem(self.file, message, line=line, path=where))

    def said(self, answer: Reply, path: KeyPath, message: str) -> None:
        """An unexpected answer: the service's trouble (429, 5xx), or the config's."""
        (self.down if busy(answer) else self.at_key)(path, message)

    def at_rule(self, ref: Reference, message: str, *, warning: bool = False) -> None:
        self._add(Problem(ref.file, message, line=ref.line), warning)

    def _add(self, problem: Problem, warning: bool) -> None:
        if warning:
            warned = Problem(
                problem.file, f"warning: {problem.message}", problem.line, problem.path
            )
            self.report.warnings.append(warned)
        else:
            self.report.errors.append(problem)

    def refs(self, kind: Literal["group", "purpose", "preference", "value"]) -> list[Reference]:
        return [r for r in self.rules.references if r.kind == kind]

    # ------------------------------------------------------------------ HTTP

    async def call(
        self,
        method: str,
        url: str,
        timeout_s: float,
        *,
        headers: Mapping[str, str] | None = None,
        json: Any = None,
        params: Sequence[tuple[str, str]] | None = None,
    ) -> Reply | str:
        """One exchange, bounded by `timeout_s`: the answer, or why there was none."""
        try:
            async with self.session.request(
                method,
                url,
                headers=headers,
                json=json,
                params=params,
                timeout=aiohttp.ClientTimeout(total=timeout_s),
                allow_redirects=False,  # a redirect means a wrong URL; never send keys along
            ) as response:
                return Reply(response.status, await response.read())
        except TimeoutError:
            return f"no answer within {timeout_s:g} s"
        except aiohttp.ClientConnectorError as exc:
            return f"cannot connect ({exc.os_error.strerror or type(exc.os_error).__name__})"
        except aiohttp.ClientError as exc:
            return f"the connection failed ({type(exc).__name__})"


def busy(answer: Reply) -> bool:
    """An answer that says the service is busy or failing now, not that the config is wrong."""
    return answer.status == 429 or answer.status >= 500
