"""`gateway check --online`: ask Braze and Didomi, reading only, whether this config will work.

Which call answers which question (none changes any data):

- Braze key, instance and `users.track`: `POST /users/track` with one attributes object holding
  only a random `external_id` and `_update_existing_only: true` ("Update Only" mode, Braze's
  "User attributes object"): no profile exists, so none is created or changed. 401 is a wrong
  key or another instance's (errors.md), 403 a missing permission.
- `users.delete`: no call can answer it without deleting; a warning says to look in Braze.
- A subscription group id and `subscription.status.get`: `GET /subscription/status/get` for the
  group and a random external id. Braze does not document its answer for an unknown group: a
  2xx is taken as "the group exists", any other 4xx but 401/403/429 as "it does not".
- `users.export.ids`: `POST /users/export/ids` for a random external id (it lands in
  `invalid_user_ids`).
- Didomi's key: `POST /sessions` (a wrong key or secret is a 400); the organization, purposes
  and preferences: `GET /metadata/purposes` and `GET /preferences`, paged with $limit/$skip.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import aiohttp
import msgspec

from gateway.config.located import KeyPath, LineIndex, format_path
from gateway.config.settings import Config, braze_base_url
from gateway.errors import Problem
from gateway.rules.mappings import Reference, RuleSet
from gateway.shapes.webhooks import Lenient

PROBE_PREFIX = "gateway-check-"  # the random external id every Braze probe names
PAGE = 100  # Didomi: "$limit ... usually has to be lower than 100"
MAX_PAGES = 1000  # a list that never ends is a broken server, not a big organization
MAX_MESSAGE_CHARS = 200


class _Item(Lenient, frozen=True):
    """A purpose, or a preference value: only its id is read."""

    id: str


class _Preference(Lenient, frozen=True):
    id: str
    values: list[_Item] = msgspec.field(default_factory=list)


class _Page(Lenient, frozen=True):
    data: list[_Item] = msgspec.field(default_factory=list)
    total: int | None = None


class _Preferences(Lenient, frozen=True):
    data: list[_Preference] = msgspec.field(default_factory=list)
    total: int | None = None


class _Said(Lenient, frozen=True):
    """The words of an error body: Braze's `message`, Didomi's `message` or `name`."""

    message: str | None = None
    name: str | None = None
    error: str | None = None


_purposes = msgspec.json.Decoder(_Page)
_preferences = msgspec.json.Decoder(_Preferences)
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
class _Answer:
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


class _Checker:
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

    def said(self, answer: _Answer, path: KeyPath, message: str) -> None:
        """An unexpected answer: the service's trouble (429, 5xx), or the config's."""
        (self.down if _busy(answer) else self.at_key)(path, message)

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
    ) -> _Answer | str:
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
                return _Answer(response.status, await response.read())
        except TimeoutError:
            return f"no answer within {timeout_s:g} s"
        except aiohttp.ClientConnectorError as exc:
            return f"cannot connect ({exc.os_error.strerror or type(exc.os_error).__name__})"
        except aiohttp.ClientError as exc:
            return f"the connection failed ({type(exc).__name__})"

    # ------------------------------------------------------------------ Braze

    async def braze(self) -> None:
        braze = self.config.braze
        base = braze_base_url(braze.server)
        host = urlsplit(base).netloc
        timeout = braze.timeout_s
        headers = {"Authorization": f"Bearer {braze.api_key}"}
        # users.track, the key and the instance: an update-only object for nobody.
        body = {"attributes": [{"external_id": self.probe, "_update_existing_only": True}]}
        answer = await self.call("POST", base + "/users/track", timeout, headers=headers, json=body)
        if isinstance(answer, str):
            self.down(("braze", "server"), f"cannot reach Braze at {host}: {answer}")
            return
        if answer.status == 401:
            self.at_key(
                ("braze", "api_key"),
                f"Braze at {host} refused the key ({answer.said()}): braze.api_key is wrong, or"
                f" was made on another instance than braze.server = {braze.server!r} (a key"
                " works only on its own instance's REST endpoint)",
            )
            return
        if answer.status in (404, 405) or 300 <= answer.status < 400:
            self.at_key(
                ("braze", "server"),
                f"Braze at {host} answered {answer.said()} on /users/track: braze.server is not"
                " a Braze REST endpoint (an instance name such as US-01, or rest.*.braze.com)",
            )
            return
        if answer.status == 403:
            self.at_key(
                ("braze", "api_key"),
                f"the Braze key lacks users.track ({answer.said()}): every update needs it;"
                " create a key with users.track (Braze keys cannot be edited)",
            )
        elif answer.status == 400:
            # Inferred, not documented: Braze answers 401/403 for the key before it reads the
            # body, so a 400 to our bare probe object still says the key and permission are right.
            self.report.summary.append(
                f"Braze {host}: the key works, with users.track (the probe got {answer.said()})"
            )
        elif not 200 <= answer.status < 300:
            self.said(answer, ("braze", "server"), f"Braze at {host} answered {answer.said()}")
            return
        else:
            self.report.summary.append(f"Braze {host}: the key works, with users.track")
        if self.config.didomi.on_user_deleted == "delete":
            self.at_key(
                ("didomi", "on_user_deleted"),
                'didomi.on_user_deleted = "delete" needs the Braze key\'s users.delete, which'
                " cannot be checked without deleting: verify it in Braze's dashboard (Settings,"
                " APIs and Identifiers)",
                warning=True,
            )
        await self._groups(base, host, headers)
        await self._export(base, host, headers)

    def _reconcile_only(self, permission: str, what: str, answer: _Answer) -> None:
        """A read only reconcile needs: a warning, or an error when [check] reconcile says so."""
        used = self.config.check.reconcile
        self.at_key(
            ("check", "reconcile") if used else ("braze", "api_key"),
            f"the Braze key lacks {permission} ({answer.said()}): `gateway reconcile` needs it"
            f"{what}"
            + (
                ""
                if used
                else "; the running gateway does not ([check] reconcile = true makes this an error)"
            ),
            warning=not used,
        )

    async def _groups(self, base: str, host: str, headers: Mapping[str, str]) -> None:
        refs = self.refs("group")
        groups = sorted({r.id for r in refs})
        known = 0
        for group in groups:
            params = [("subscription_group_id", group), ("external_id[]", self.probe)]
            url = base + "/subscription/status/get"
            answer = await self.call(
                "GET", url, self.config.braze.timeout_s, headers=headers, params=params
            )
            if isinstance(answer, str):
                self.down(("braze", "server"), f"cannot reach Braze at {host}: {answer}")
                return
            if answer.status == 403:
                self._reconcile_only(
                    "subscription.status.get",
                    f", and without it the {len(groups)} subscription group id(s) of the rules"
                    " cannot be checked here: compare them with Braze's Subscription Groups page",
                    answer,
                )
                return
            if 200 <= answer.status < 300:
                known += 1
            elif 400 <= answer.status < 500 and answer.status not in (401, 429):
                for ref in refs:
                    if ref.id == group:
                        self.at_rule(
                            ref,
                            f"Braze at {host} knows no subscription group {group!r}"
                            f" ({answer.said()}): copy its id from Braze's Subscription Groups"
                            " page (the group must be in this key's workspace)",
                        )
            else:
                self.said(
                    answer,
                    ("braze", "server"),
                    f"Braze at {host} answered {answer.said()} for subscription group {group}",
                )
        if groups and known == len(groups):
            self.report.summary.append(f"Braze: {known} subscription group id(s) exist")

    async def _export(self, base: str, host: str, headers: Mapping[str, str]) -> None:
        body = {"external_ids": [self.probe], "fields_to_export": ["external_id"]}
        answer = await self.call(
            "POST", base + "/users/export/ids", self.config.braze.timeout_s, headers=headers,
            json=body,
        )  # fmt: skip
        if isinstance(answer, str):
            self.down(("braze", "server"), f"cannot reach Braze at {host}: {answer}")
        elif answer.status == 403:
            self._reconcile_only("users.export.ids", " to read Braze's state", answer)
        elif not 200 <= answer.status < 300:
            self.said(
                answer,
                ("braze", "server"),
                f"Braze at {host} answered {answer.said()} on /users/export/ids",
            )

    # ------------------------------------------------------------------ Didomi

    async def didomi(self) -> None:
        api = self.config.didomi_api
        purposes = {r.id for r in self.refs("purpose")}
        if not (api.key and api.secret and api.organization_id):
            self.at_key(
                ("didomi_api",),
                f"Didomi not asked: [didomi_api] needs key, secret and organization_id to check"
                f" the {len(purposes)} purpose id(s) and the preference value ids of the rules",
                warning=True,
            )
            return
        base = api.base_url.rstrip("/")
        host = urlsplit(base).netloc
        login = {"type": "api-key", "key": api.key, "secret": api.secret}
        answer = await self.call("POST", base + "/sessions", api.timeout_s, json=login)
        if isinstance(answer, str):
            self.down(("didomi_api", "base_url"), f"cannot reach Didomi at {host}: {answer}")
            return
        token = None
        if 200 <= answer.status < 300:
            try:
                token = msgspec.json.decode(answer.body).get("access_token")
            except (msgspec.DecodeError, AttributeError):
                token = None
        if _busy(answer):
            self.down(("didomi_api", "base_url"), f"Didomi at {host} answered {answer.said()}")
            return
        if not isinstance(token, str) or not token:
            hint = (
                "check didomi_api.key and didomi_api.secret (a private API key of the"
                " organization, Console > Settings > Private API keys)"
                if answer.status in (400, 401, 403)
                else "didomi_api.base_url looks wrong (Didomi's is https://api.didomi.io/v1)"
            )
            self.at_key(
                ("didomi_api", "key"),
                f"Didomi at {host} refused the login ({answer.said()}): {hint}",
            )
            return
        headers = {"Authorization": f"Bearer {token}"}
        listed = await self._list(base, host, "/metadata/purposes", headers, _purposes)
        if listed is None:
            return
        found = {item.id for item in listed}
        prefs = await self._list(base, host, "/preferences", headers, _preferences)
        if prefs is None:
            return
        self._compare(found, {p.id: {v.id for v in p.values} for p in prefs}, host)

    async def _list(
        self,
        base: str,
        host: str,
        path: str,
        headers: Mapping[str, str],
        decoder: msgspec.json.Decoder[Any],
    ) -> list[Any] | None:
        """Every item of one of Didomi's paged lists, or None after reporting why not."""
        api = self.config.didomi_api
        items: list[Any] = []
        for _ in range(MAX_PAGES):
            params = [
                ("organization_id", api.organization_id),
                ("$limit", str(PAGE)),
                ("$skip", str(len(items))),
            ]
            answer = await self.call(
                "GET", base + path, api.timeout_s, headers=headers, params=params
            )
            if isinstance(answer, str):
                self.down(("didomi_api", "base_url"), f"cannot reach Didomi at {host}: {answer}")
                return None
            if answer.status in (401, 403):
                self.at_key(
                    ("didomi_api", "organization_id"),
                    f"Didomi at {host} logged the key in but refused {path} for organization"
                    f" {api.organization_id!r} ({answer.said()}): check"
                    " didomi_api.organization_id, and that the key belongs to it",
                )
                return None
            try:
                page = decoder.decode(answer.body) if 200 <= answer.status < 300 else None
            except msgspec.DecodeError:
                page = None
            if page is None:
                self.said(
                    answer,
                    ("didomi_api", "base_url"),
                    f"Didomi at {host} answered {answer.said()} on {path}",
                )
                return None
            items.extend(page.data)
            if not page.data or page.total is None or len(items) >= page.total:
                return items
        self.at_key(
            ("didomi_api", "base_url"), f"Didomi's {path} did not end after {MAX_PAGES} pages"
        )
        return None

    def _compare(self, purposes: set[str], preferences: dict[str, set[str]], host: str) -> None:
        every_value = set().union(*preferences.values()) if preferences else set()
        missing = 0
        for ref in self.refs("purpose"):
            if ref.id not in purposes:
                missing += 1
                self.at_rule(
                    ref,
                    f"Didomi ({host}, organization {self.config.didomi_api.organization_id!r})"
                    f" has no purpose {ref.id!r}: copy the id from the Data Manager",
                )
        for ref in self.refs("preference"):
            if ref.id not in preferences:
                # Whether a consent's `values` key is the library's preference id or the
                # configuration tree's is not documented: a warning, not an error.
                self.at_rule(
                    ref,
                    f"Didomi's preferences library has no preference {ref.id!r}: if it is not a"
                    " configuration-tree id, no consent will ever carry it",
                    warning=True,
                )
        for ref in self.refs("value"):
            known = preferences.get(ref.preference or "", every_value)
            if ref.id not in known:
                missing += 1
                where = (
                    f"preference {ref.preference!r}"
                    if ref.preference in preferences
                    else "any preference of the library"
                )
                self.at_rule(
                    ref,
                    f"Didomi has no value {ref.id!r} in {where}: copy the value id from the"
                    " preferences library",
                )
        if not missing:
            values = len({r.id for r in self.refs("value")})
            self.report.summary.append(
                f"Didomi {host}: login and organization"
                f" {self.config.didomi_api.organization_id!r} work;"
                f" {len({r.id for r in self.refs('purpose')})} purpose id(s) and {values}"
                " preference value id(s) exist"
            )


async def check_online(config: Config, rules: RuleSet, config_path: str) -> Report:
    """Ask Braze and Didomi, at once, what the config needs of them; write nothing anywhere."""
    connector = aiohttp.TCPConnector(limit=4)
    async with aiohttp.ClientSession(connector=connector) as session:
        braze = _Checker(config, rules, config_path, session)
        didomi = _Checker(config, rules, config_path, session)
        await asyncio.gather(braze.braze(), didomi.didomi())
    report = braze.report
    for part in (didomi.report,):
        report.errors.extend(part.errors)
        report.warnings.extend(part.warnings)
        report.summary.extend(part.summary)
        report.unreachable.extend(part.unreachable)
    return report


def _busy(answer: _Answer) -> bool:
    """An answer that says the service is busy or failing now, not that the config is wrong."""
    return answer.status == 429 or answer.status >= 500


def run(config: Config, rules: RuleSet, config_path: str) -> Report:
    """`check_online` for the command line."""
    return asyncio.run(check_online(config, rules, config_path))
