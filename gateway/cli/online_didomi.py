"""`gateway check --online` for Didomi: login, organization, purpose and preference value ids."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

import msgspec

from gateway.cli.online_checker import Checker, busy
from gateway.config.settings import didomi_base_url
from gateway.shapes.webhooks import Lenient

PAGE = 100  # Didomi: "$limit ... usually has to be lower than 100"
MAX_PAGES = 1000  # a list that never ends is a broken server, not a big organization


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


_purposes = msgspec.json.Decoder(_Page)
_preferences = msgspec.json.Decoder(_Preferences)


class DidomiChecker(Checker):
    """The Didomi probes of one run."""

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
        base = didomi_base_url(api.base_url)  # the demo's fake:// too
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
        if busy(answer):
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
