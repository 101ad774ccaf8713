"""gateway.testing_didomi: a fake Didomi Consents API for the tests of the reverse path.

It answers as developers.didomi.io ("Authentication", "Consents API", "Errors") and Didomi's
API reference (api.didomi.io/docs) say the real one does: `POST /v1/sessions` trades the API key
and secret for a JWT-shaped token, `POST /v1/consents/events` records an event and merges it
into the user's current status, `GET /v1/consents/users` returns that status, and
`GET /v1/metadata/purposes` and `GET /v1/preferences` list the ids `define()` made. Errors carry
Didomi's body, `{"code", "name", "message", "errors"}`. It records the traffic and injects
faults on demand. Clients use `fake.url + "/v1"` as `didomi_api.base_url`; the demo
(`base_url = "fake://127.0.0.1:PORT"`) is served by `gateway run` itself, and
`GET /fake/users/{organization_user_id}` shows a user's status without a token.

As Didomi does, a user carries the `updated_at` of the last event merged into it (the time the
event was recorded), and, with `on_webhook` set, every event recorded (the gateway's own too,
unless `$disable_integrations=true`) is reported as the `event.created` webhook Didomi sends its
integrations. `act()` records a person's own choice, as Didomi's preference centre would.
"""

from __future__ import annotations

import asyncio
import base64
import secrets
import time
import uuid
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.client import responses
from typing import Any, Literal

import msgspec
from aiohttp import web

from gateway.testing.served import Served, readable

PREFIX = "/v1"
DEFAULT_REGULATION = "gdpr"
PAGE_LIMIT = 100
INVALID_LOGIN = "Invalid authentication information"

Json = dict[str, Any]

# Didomi's error names, tied to the status as its docs' "Errors" page shows ("BadRequest").
_ERROR_NAMES = {
    400: "BadRequest",
    401: "NotAuthenticated",
    403: "Forbidden",
    404: "NotFound",
    409: "Conflict",
    429: "TooManyRequests",
    500: "GeneralError",
    503: "Unavailable",
}


@dataclass(frozen=True, slots=True)
class DidomiRequest:
    """One request as the fake saw it, with the status it answered."""

    method: str
    path: str  # without the /v1 prefix: "/sessions", "/consents/events", "/consents/users"
    status: int
    query: dict[str, str]


@dataclass(frozen=True, slots=True)
class AcceptedEvent:
    """One consent event the fake recorded, and whether Didomi's integrations were bypassed."""

    body: Json
    disable_integrations: bool
    at: float = 0.0  # time.time() when it was recorded


@dataclass(slots=True)
class _Fault:
    status: int
    body: Json
    headers: dict[str, str]
    path: str | None  # None: the next request, whatever its path


@dataclass(slots=True)
class _User:
    id: str
    organization_user_id: str
    created_at: str
    updated_at: str
    purposes: dict[str, Json] = field(default_factory=dict)  # purpose id -> {id, enabled, values}


def didomi_error(status: int, message: str) -> Json:
    """Didomi's error body for `status`."""
    name = _ERROR_NAMES.get(status, responses.get(status, "Error").replace(" ", ""))
    return {"code": status, "name": name, "message": message, "errors": {}}


class FakeDidomi(Served):
    """An in-process Didomi Consents API: start() it, point the client at url + "/v1"."""

    def __init__(
        self,
        *,
        key: str = "test-didomi-key",
        secret: str = "test-didomi-secret",  # noqa: S107 - the fake's own test credential
        organization_id: str = "test-org",
        token_ttl_s: float = 3600.0,
        duplicate_status: Literal[409, 400] = 409,
        latency_s: float = 0.0,
    ) -> None:
        super().__init__()
        self.key = key
        self.secret = secret
        self.organization_id = organization_id
        self.token_ttl_s = token_ttl_s
        # How an id seen before is refused; Didomi's docs do not say, so both are testable.
        self.duplicate_status = duplicate_status
        self.latency_s = latency_s
        self.requests: list[DidomiRequest] = []
        self.events: list[AcceptedEvent] = []
        self.sessions = 0  # successful logins
        self.tokens: dict[str, float] = {}  # every token issued -> its expiry (epoch seconds)
        self._users: dict[tuple[str, str], _User] = {}  # (regulation, organization_user_id)
        self._event_ids: set[str] = set()
        self._faults: deque[_Fault] = deque()
        # Called with each webhook body Didomi would send for an event it recorded.
        self.on_webhook: Callable[[Json], Coroutine[Any, Any, None]] | None = None
        self._reporting: set[asyncio.Task[None]] = set()
        self._decoder = msgspec.json.Decoder()
        self.app = web.Application()
        self.app.router.add_post(f"{PREFIX}/sessions", self._sessions)
        self.app.router.add_post(f"{PREFIX}/consents/events", self._events)
        self.app.router.add_get(f"{PREFIX}/consents/users", self._query_users)
        # The Data Manager's read routes (`gateway check --online`): what ids exist.
        self.purposes: list[Json] = []  # {"id", "description", ...} as /metadata/purposes lists
        self.preferences: list[Json] = []  # {"id", "name", "values": [{"id", ...}]}
        self.list_limit = PAGE_LIMIT  # the most a page of those lists holds
        self.app.router.add_get(f"{PREFIX}/metadata/purposes", self._list_purposes)
        self.app.router.add_get(f"{PREFIX}/preferences", self._list_preferences)
        # What the demo shows (no token, as the fake Braze's /fake/users): one user's status.
        self.app.router.add_get("/fake/users/{organization_user_id}", self._one_user)

    def fail_next(
        self,
        status: int,
        count: int = 1,
        headers: dict[str, str] | None = None,
        *,
        body: Json | None = None,
        path: str | None = None,
    ) -> None:
        """Answer the next `count` requests (to `path` only, if given) with this status instead."""
        payload = body if body is not None else didomi_error(status, responses.get(status, ""))
        self._faults.extend(_Fault(status, payload, headers or {}, path) for _ in range(count))

    def clear_faults(self) -> None:
        """Forget the answers `fail_next` queued: the next request is served normally."""
        self._faults.clear()

    def expire_tokens(self) -> None:
        """Make every token issued so far expired, as an hour passing would."""
        for token in self.tokens:
            self.tokens[token] = 0.0

    def seed_user(
        self,
        organization_user_id: str,
        purposes: list[Json],
        *,
        regulation: str = DEFAULT_REGULATION,
        updated_at: str | None = None,
    ) -> None:
        """Preset a user's current status, as if earlier events had recorded `purposes` (by
        default a minute ago: a Braze act dated now, to the second, comes after them)."""
        user = self._user(regulation, organization_user_id)
        _merge(user, purposes)
        user.updated_at = updated_at or _now(-60.0)
        # As Didomi's users are, never updated before they were created (the user was new now).
        if _parse(user.updated_at) < _parse(user.created_at):
            user.created_at = user.updated_at

    def act(
        self, organization_user_id: str, purposes: list[Json], regulation: str = DEFAULT_REGULATION
    ) -> Json:
        """Record a person's own choice (Didomi's preference centre) and report it; the event."""
        body = {"user": {"organization_user_id": organization_user_id}, "regulation": regulation}
        return self._record({**body, "consents": {"purposes": purposes}}, purposes, report=True)

    async def reported(self) -> None:
        """Wait until every webhook reported so far has been answered."""
        while self._reporting:
            await asyncio.gather(*list(self._reporting), return_exceptions=True)

    def user(self, organization_user_id: str, regulation: str = DEFAULT_REGULATION) -> Json | None:
        """The user's current status as `GET /consents/users` shows it, or None if unknown."""
        found = self._users.get((regulation, organization_user_id))
        return None if found is None else self._render(found, regulation)

    # -----------------------------------------------------------------------
    # The handlers.

    async def _sessions(self, request: web.Request) -> web.StreamResponse:
        body = await self._body(request)
        fault = self._fault("/sessions")
        if fault is not None:
            return await self._answer(request, "/sessions", *fault)
        if not isinstance(body, dict) or body.get("type") != "api-key":
            return await self._error(request, "/sessions", 400, 'type must be "api-key"')
        if body.get("key") != self.key or body.get("secret") != self.secret:
            # Didomi's "Authentication" page: "If there is a problem authenticating you, a 400
            # error is returned"; its "Errors" page shows this very body.
            return await self._error(request, "/sessions", 400, INVALID_LOGIN)
        self.sessions += 1
        token = self._issue()
        return await self._answer(
            request, "/sessions", 200, {"type": "api-key", "key": self.key, "access_token": token}
        )

    async def _events(self, request: web.Request) -> web.StreamResponse:
        path = "/consents/events"
        body = await self._body(request)
        refused = self._refuse(request, path)
        if refused is not None:
            return await self._answer(request, path, *refused)
        if not isinstance(body, dict):
            return await self._error(request, path, 400, "The body must be a JSON object")
        user = body.get("user")
        person = user.get("organization_user_id") if isinstance(user, dict) else None
        if not isinstance(person, str) or not person:
            return await self._error(request, path, 400, "user.organization_user_id is required")
        consents = body.get("consents") or {}
        purposes = (consents.get("purposes") or []) if isinstance(consents, dict) else None
        if not isinstance(purposes, list) or not all(
            isinstance(p, dict) and isinstance(p.get("id"), str) for p in purposes
        ):
            return await self._error(request, path, 400, "consents.purposes must list purposes")
        event_id = body.get("id") or str(uuid.uuid4())
        if event_id in self._event_ids:
            message = f"An event with ID {event_id} already exists"
            return await self._error(request, path, self.duplicate_status, message)
        disable = request.query.get("$disable_integrations") == "true"
        self.events.append(AcceptedEvent(body, disable, time.time()))
        created = self._record({**body, "id": event_id}, purposes, report=not disable)
        return await self._answer(request, path, 200, created)

    async def _query_users(self, request: web.Request) -> web.StreamResponse:
        path = "/consents/users"
        refused = self._refuse(request, path)
        if refused is not None:
            return await self._answer(request, path, *refused)
        regulation = request.query.get("regulation") or DEFAULT_REGULATION
        wanted = request.query.get("organization_user_id")
        users = [
            self._render(user, regulation)
            for (reg, person), user in self._users.items()
            if reg == regulation and (wanted is None or person == wanted)
        ]
        # Didomi pages every user 100 at a time with an opaque `$cursor`, null after the last.
        start = _offset(request.query.get("$cursor"))
        if start is None:
            return await self._error(request, path, 400, "Invalid $cursor")
        end = start + PAGE_LIMIT
        cursor = _b64(str(end).encode()) if end < len(users) else None
        page = {"data": users[start:end], "limit": PAGE_LIMIT, "cursor": cursor}
        return await self._answer(request, path, 200, page)

    async def _one_user(self, request: web.Request) -> web.Response:
        person = request.match_info["organization_user_id"]
        regulation = request.query.get("regulation") or DEFAULT_REGULATION
        found = self.user(person, regulation)
        if found is None:
            detail = f"no user {person!r} under {regulation!r} (no event recorded for them)"
            return readable(404, {"message": detail})
        return readable(200, found)

    # -----------------------------------------------------------------------
    # The Data Manager: purposes and the preferences library, paged by $limit and $skip
    # (developers.didomi.io, "Pagination": `{total, limit, skip, data}`).

    def define(self, purposes: list[str], preferences: dict[str, list[str]]) -> None:
        """Create these purposes, and these preferences with their value ids."""
        self.purposes = [{"id": p, "description": {"en": p}} for p in purposes]
        self.preferences = [
            {
                "id": pref,
                "organization_id": self.organization_id,
                "type": "multi",
                "name": {"en": pref},
                "values": [{"id": v, "name": {"en": v}, "order": i} for i, v in enumerate(vals)],
            }
            for pref, vals in preferences.items()
        ]

    async def _list_purposes(self, request: web.Request) -> web.StreamResponse:
        return await self._list(request, "/metadata/purposes", self.purposes)

    async def _list_preferences(self, request: web.Request) -> web.StreamResponse:
        return await self._list(request, "/preferences", self.preferences)

    async def _list(self, request: web.Request, path: str, items: list[Json]) -> web.Response:
        refused = self._refuse(request, path)
        if refused is not None:
            return await self._answer(request, path, *refused)
        try:
            limit = min(int(request.query.get("$limit", self.list_limit)), self.list_limit)
            skip = max(0, int(request.query.get("$skip", 0)))
        except ValueError:
            return await self._error(request, path, 400, "$limit and $skip must be integers")
        page = items[skip : skip + max(limit, 0)]
        body = {"total": len(items), "limit": limit, "skip": skip, "data": page}
        return await self._answer(request, path, 200, body)

    # -----------------------------------------------------------------------
    # Helpers.

    def _record(self, body: Json, purposes: list[Json], *, report: bool) -> Json:
        """Merge one event into its user and, if `report`, send Didomi's webhook for it."""
        event_id = body.get("id") or str(uuid.uuid4())
        self._event_ids.add(event_id)
        regulation = body.get("regulation") or DEFAULT_REGULATION
        stored = self._user(regulation, body["user"]["organization_user_id"])
        _merge(stored, purposes)
        now = _now()
        stored.updated_at = now  # the user's status changed when the event was recorded
        created = {
            **body,
            "id": event_id,
            "organization_id": self.organization_id,
            "regulation": regulation,
            "status": "confirmed",
            # Didomi keeps a created_at the caller gives (its schema says so), else its clock.
            "created_at": body.get("created_at") or now,
            "updated_at": now,
            "user": {**body["user"], "id": stored.id},
        }
        if report and self.on_webhook is not None:
            webhook = {"type": "event.created", "parameters": {"entity": created}}
            task = asyncio.get_running_loop().create_task(self.on_webhook(webhook))
            self._reporting.add(task)
            task.add_done_callback(self._reporting.discard)
        return created

    def _refuse(self, request: web.Request, path: str) -> tuple[int, Json, dict[str, str]] | None:
        """A queued fault, a missing or expired token, or a wrong organization, in that order."""
        fault = self._fault(path)
        if fault is not None:
            return fault
        auth = request.headers.get("Authorization", "")
        token = auth.removeprefix("Bearer ") if auth.startswith("Bearer ") else ""
        if self.tokens.get(token, 0.0) <= time.time():
            return 401, didomi_error(401, "jwt expired" if token in self.tokens else "No auth"), {}
        organization = request.query.get("organization_id")
        if not organization:
            return 400, didomi_error(400, "organization_id is required"), {}
        if organization != self.organization_id:
            message = f"You do not have access to organization {organization}"
            return 403, didomi_error(403, message), {}
        return None

    def _fault(self, path: str) -> tuple[int, Json, dict[str, str]] | None:
        for fault in self._faults:
            if fault.path is None or fault.path == path:
                self._faults.remove(fault)
                return fault.status, fault.body, fault.headers
        return None

    def _issue(self) -> str:
        now = time.time()
        expires = now + self.token_ttl_s
        header = {"alg": "HS256", "typ": "JWT"}
        claims = {"iat": int(now), "exp": expires, "sub": "api-key", "jti": secrets.token_hex(8)}
        token = ".".join(
            [_b64(msgspec.json.encode(header)), _b64(msgspec.json.encode(claims)), _b64(b"sig")]
        )
        self.tokens[token] = expires
        return token

    def _user(self, regulation: str, organization_user_id: str) -> _User:
        key = (regulation, organization_user_id)
        if key not in self._users:
            now = _now()
            self._users[key] = _User(str(uuid.uuid4()), organization_user_id, now, now)
        return self._users[key]

    def _render(self, user: _User, regulation: str) -> Json:
        return {
            "id": user.id,
            "organization_id": self.organization_id,
            "organization_user_id": user.organization_user_id,
            "regulation": regulation,
            "created_at": user.created_at,
            "updated_at": user.updated_at,
            "metadata": {},
            "consents": {
                "purposes": [_copy(p) for p in user.purposes.values()],
                "vendors": {"enabled": [], "disabled": [], "enabled_li": [], "disabled_li": []},
            },
        }

    async def _body(self, request: web.Request) -> Any:
        raw = await request.read()
        try:
            return self._decoder.decode(raw) if raw else None
        except msgspec.DecodeError:
            return None

    async def _error(
        self, request: web.Request, path: str, status: int, message: str
    ) -> web.Response:
        return await self._answer(request, path, status, didomi_error(status, message))

    async def _answer(
        self,
        request: web.Request,
        path: str,
        status: int,
        payload: Json,
        headers: dict[str, str] | None = None,
    ) -> web.Response:
        self.requests.append(DidomiRequest(request.method, path, status, dict(request.query)))
        if self.latency_s > 0:
            await asyncio.sleep(self.latency_s)
        return web.Response(
            status=status,
            body=msgspec.json.encode(payload),
            content_type="application/json",
            headers=headers or {},
        )


def _merge(user: _User, purposes: list[Json]) -> None:
    """Merge an event's purposes into a user: by id, `enabled` and each value when given."""
    for purpose in purposes:
        current = user.purposes.setdefault(
            purpose["id"], {"id": purpose["id"], "enabled": None, "values": {}}
        )
        if purpose.get("enabled") is not None:
            current["enabled"] = purpose["enabled"]
        for preference, chosen in (purpose.get("values") or {}).items():
            if isinstance(chosen, dict) and chosen.get("value") is not None:
                current["values"][preference] = {"value": chosen["value"]}


def _offset(cursor: str | None) -> int | None:
    """Where a page starts: 0 without a cursor, None for a cursor this fake never issued."""
    if cursor is None:
        return 0
    try:
        return int(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
    except ValueError:
        return None


def _copy(purpose: Json) -> Json:
    return {**purpose, "values": {k: dict(v) for k, v in purpose["values"].items()}}


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _parse(text: str) -> datetime:
    at = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return at if at.tzinfo is not None else at.replace(tzinfo=UTC)


def _now(offset_s: float = 0.0) -> str:
    at = datetime.now(UTC) + timedelta(seconds=offset_s)
    return at.isoformat(timespec="milliseconds").replace("+00:00", "Z")
