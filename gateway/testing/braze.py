"""gateway.testing: a fake Braze REST server for the tests and the benchmarks.

It answers `POST /users/track` and `POST /users/delete` as Braze's docs say the real ones do
(braze.com/docs/api: "Errors & responses", "Rate limits", "POST: Track users", "User attributes
object"), keeps the users it was told about, records the traffic, and injects faults on demand.
`GET /fake/users/{external_id}` (and `/fake/users`) shows what a profile now holds; the demo
(`braze.server = "fake://..."`) serves it from the gateway's own process.
`python -m gateway.testing --port 9000` serves it standalone for benchmarks. This module
serves the routes and holds the state; `braze_writes` checks and applies the writes,
`braze_reads` answers the reads, `braze_access` holds the keys' permissions and the rate windows.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections import deque
from collections.abc import Callable, Collection
from dataclasses import dataclass
from http.client import responses
from typing import Any, Literal

import msgspec
from aiohttp import web

from gateway.testing.braze_access import (
    ACCESS_DENIED,
    ALL_PERMISSIONS,
    INVALID_KEY,
    PERMISSIONS,
    UNLIMITED,
    ExportLimits,
    Window,
)
from gateway.testing.braze_reads import Reads
from gateway.testing.braze_writes import (
    MAX_TRACK_OBJECTS,
    PARSE_ERROR,
    Json,
    TrackAndDelete,
    User,
)
from gateway.testing.didomi import (
    FakeDidomi as FakeDidomi,  # the Consents API's fake, for one import
)
from gateway.testing.served import Served, readable

MAX_BODY_BYTES = 4 * 1024 * 1024  # Braze answers 413 above 4 MB


@dataclass(frozen=True, slots=True)
class Recorded:
    """One request as the fake saw it, with the status it answered."""

    path: str
    status: int
    body: Any  # the decoded JSON, or None when it was not JSON
    at: float  # time.monotonic() on arrival
    object_count: int


class FakeBraze(Served, TrackAndDelete, Reads):
    """An in-process Braze REST server: start() it, point the client at url, inspect the rest."""

    def __init__(
        self,
        *,
        api_key: str = "test-braze-key",
        latency_s: float = 0.0,
        rate_limit: int | None = None,
        rate_window_s: float = 3.0,
        reset_style: Literal["epoch", "seconds"] = "epoch",
        known_users: set[str] | None = None,
        record: bool = True,
        max_objects: int = MAX_TRACK_OBJECTS,
        instance: str = "US-01",
        groups: set[str] | None = None,
    ) -> None:
        super().__init__()
        self.api_key = api_key  # this instance's key with every permission
        self.instance = instance
        # Other keys: key -> (the instance that issued it, its permissions); see `grant`.
        self.keys: dict[str, tuple[str, frozenset[str]]] = {}
        self.groups = groups  # the workspace's subscription group ids; None: any id exists
        self.latency_s = latency_s
        # /users/track and /users/delete count in one window; None: Braze's large default.
        self.write_limit = Window(
            UNLIMITED if rate_limit is None else rate_limit, rate_window_s, reset_style=reset_style
        )
        self.known_users = known_users  # None: every user exists; else grows on upserts
        self.record = record  # False: only `stats` counts; requests, ignored, deleted stay empty
        # Objects a /users/track takes: 75, or 50 on "Monthly Active Users CY 24-25" plans.
        self.max_objects = max_objects
        self.requests: list[Recorded] = []
        self.users: dict[str, User] = {}
        self.deleted: list[str] = []
        self.ignored: list[Json] = []  # objects for unknown users in update-only mode
        # When set, one matching attributes object makes the whole call a 400, nothing applied.
        self.refuse_with_400: Callable[[Json], bool] | None = None
        # Called for each subscription state a /users/track changed: (user key, group id or
        # None for email_subscribe, new state), as Braze reports changes through Currents.
        self.on_change: Callable[[str, str | None, str], None] | None = None
        self.stats = {"requests": 0, "objects": 0, "ignored": 0, "deleted": 0, "rate_limited": 0}
        self._faults: deque[tuple[int, Json, dict[str, str]]] = deque()
        self._rejecters: list[Callable[[Json], str | None]] = []
        self._unattributed: list[Callable[[Json], str | None]] = []
        self._decoder = msgspec.json.Decoder()
        self.app = web.Application(client_max_size=MAX_BODY_BYTES)
        routes = self.app.router
        routes.add_post("/users/track", functools.partial(self._serve, self._apply_track))
        routes.add_post("/users/delete", functools.partial(self._serve, self._apply_delete))
        routes.add_get("/_stats", self._stats)
        # What a person's Braze profile now holds, for the demo and for people reading along.
        routes.add_get("/fake/users", self._all_users)
        routes.add_get("/fake/users/{key}", self._one_user)
        # Reconcile's reads (Braze's "Export users by identifier" and "List user's subscription
        # group status"), each limited in its own window as Braze limits them apart.
        self.export_limit = ExportLimits()
        routes.add_post("/users/export/ids", self._export_ids)
        routes.add_get("/subscription/status/get", self._subscription_status)

    def fail_next(
        self,
        status: int,
        count: int = 1,
        *,
        body: Json | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        """Answer the next `count` requests with this status instead, applying nothing."""
        fault = (status, body or {"message": responses.get(status, "Error")}, headers or {})
        self._faults.extend([fault] * count)

    def heal(self) -> None:
        """Drop the faults `fail_next` still holds: answer normally from the next request."""
        self._faults.clear()

    def reject_objects(self, predicate: Callable[[Json], str | None]) -> None:
        """Refuse each otherwise valid attributes object whose predicate returns an error type."""
        self._rejecters.append(predicate)

    def refuse_unattributed(self, predicate: Callable[[Json], str | None]) -> None:
        """Refuse each otherwise valid attributes object whose predicate returns a message, and
        answer `201` with `"errors": ["<message>"]`: a plain string naming no object, as Braze
        sometimes does."""
        self._unattributed.append(predicate)

    def objects_sent(self) -> list[Json]:
        """Every attributes object of every 2xx /users/track, in order."""
        return [
            obj
            for r in self.requests
            if r.path == "/users/track" and 200 <= r.status < 300 and isinstance(r.body, dict)
            for obj in r.body.get("attributes") or []
        ]

    async def _stats(self, request: web.Request) -> web.Response:
        return _json(200, {**self.stats, "users": len(self.users)}, {})

    def user_state(self, key: str) -> Json | None:
        """One profile as JSON (its state per target), or None when Braze has no such user."""
        user = self.users.get(key)
        if user is None:
            return None
        return {
            "user": key,
            "email_subscribe": user.email_subscribe,
            "subscription_groups": dict(sorted(user.subscription_groups.items())),
            "attributes": dict(sorted(user.attributes.items())),
        }

    async def _all_users(self, request: web.Request) -> web.Response:
        return readable(200, {"users": [self.user_state(key) for key in sorted(self.users)]})

    async def _one_user(self, request: web.Request) -> web.Response:
        key = request.match_info["key"]
        state = self.user_state(key)
        if state is None:
            # An external id names itself; other identifiers carry their kind, as in `users`.
            detail = f"no user {key!r} (never updated, or deleted); an email is email:ADDRESS"
            return readable(404, {"message": detail})
        return readable(200, state)

    async def _serve(
        self, apply: Callable[[Json], tuple[int, Json, int]], request: web.Request
    ) -> web.Response:
        at = time.monotonic()
        self.stats["requests"] += 1
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            raw = None
        try:
            body = self._decoder.decode(raw) if raw else None
        except msgspec.DecodeError:
            body = None
        status, payload, headers, count = self._answer(request, raw, body, apply)
        self.stats["objects"] += count
        if self.record:
            self.requests.append(Recorded(request.path, status, body, at, count))
        # Answer late but apply first: real Braze may apply a call whose answer the client
        # never saw, and retries must survive that.
        if self.latency_s > 0:
            await asyncio.sleep(self.latency_s)
        return _json(status, payload, headers)

    def _answer(
        self,
        request: web.Request,
        raw: bytes | None,
        body: Any,
        apply: Callable[[Json], tuple[int, Json, int]],
    ) -> tuple[int, Json, dict[str, str], int]:
        if self._faults:
            status, payload, headers = self._faults.popleft()
            return status, payload, {**self.write_limit.headers(consume=False)[1], **headers}, 0
        refused = self._authorize(request)
        if refused is not None:
            # No workspace is known yet, so nothing is counted against its rate limit.
            return *refused, self.write_limit.headers(consume=False)[1], 0
        allowed, headers = self.write_limit.headers(consume=True)
        if not allowed:
            self.stats["rate_limited"] += 1
            return 429, {"message": "Rate Limited"}, headers, 0
        if raw is None:
            return 413, {"message": "Payload Too Large"}, headers, 0
        if request.content_type != "application/json":
            return 415, {"message": "Unsupported Media Type"}, headers, 0
        if not isinstance(body, dict):
            return 400, {"error": PARSE_ERROR}, headers, 0
        status, payload, count = apply(body)
        return status, payload, headers, count

    # -----------------------------------------------------------------------
    # Keys and their permissions (the one way to restrict a key, this instance's own included);
    # the routes of the reads of `gateway reconcile` and `check --online`.

    def grant(self, key: str, permissions: Collection[str], *, instance: str | None = None) -> None:
        """Issue `key` with these permissions, on this instance or (`instance`) another one."""
        self.keys[key] = (instance or self.instance, frozenset(permissions))

    def _authorize(self, request: web.Request) -> tuple[int, Json] | None:
        """Braze's 401 for a key it does not know here, its 403 for a missing permission."""
        auth = request.headers.get("Authorization", "")
        key = auth.removeprefix("Bearer ") if auth.startswith("Bearer ") else None
        entry = self.keys.get(key) if key is not None else None
        if entry is None and key is not None and key == self.api_key:
            entry = (self.instance, ALL_PERMISSIONS)
        if entry is None or entry[0] != self.instance:
            return 401, {"message": INVALID_KEY}  # a key of another instance is unknown here
        needed = PERMISSIONS.get(request.path)
        if needed is not None and needed not in entry[1]:
            return 403, {"message": ACCESS_DENIED, "errors": [f"the key lacks {needed}"]}
        return None

    def seed(
        self,
        key: str,
        *,
        email_subscribe: str | None = None,
        groups: dict[str, str] | None = None,
        attributes: dict[str, Any] | None = None,
    ) -> User:
        """Put a profile in Braze as a campaign or an import would, behind the gateway's back."""
        user = self.users.setdefault(key, User())
        if email_subscribe is not None:
            user.email_subscribe = email_subscribe
        user.subscription_groups.update({g.lower(): s for g, s in (groups or {}).items()})
        user.attributes.update(attributes or {})
        if self.known_users is not None:
            self.known_users.add(key)
        return user

    def _reading(self, request: web.Request, window: Window) -> Any:
        """The refusal a read gets before its body is looked at (key, permission, limit),
        with the rate-limit headers to send, as (status, payload) or None to go on."""
        self.stats["requests"] += 1
        refused = self._authorize(request)
        if refused is not None:
            return refused, window.headers(consume=False)[1]
        allowed, headers = window.headers(consume=True)
        if not allowed:
            self.stats["rate_limited"] += 1
            return (429, {"message": "Rate Limited"}), headers
        return None, headers

    async def _export_ids(self, request: web.Request) -> web.Response:
        refused, headers = self._reading(request, self.export_limit.export)
        raw = await request.read()
        if refused is None:
            try:
                body = self._decoder.decode(raw) if raw else None
            except msgspec.DecodeError:
                body = None
            refused = self._export_answer(body)
        status, payload = refused
        self._record(request.path, status, None, 0)
        return await self._late(_json(status, payload, headers))

    async def _subscription_status(self, request: web.Request) -> web.Response:
        refused, headers = self._reading(request, self.export_limit.status)
        if refused is None:
            refused = self._status_answer(request.query)
        status, payload = refused
        self._record(request.path, status, None, 0)
        return await self._late(_json(status, payload, headers))

    def _record(self, path: str, status: int, body: Any, count: int) -> None:
        if self.record:
            self.requests.append(Recorded(path, status, body, time.monotonic(), count))

    async def _late(self, response: web.Response) -> web.Response:
        if self.latency_s > 0:
            await asyncio.sleep(self.latency_s)
        return response


def _json(status: int, payload: Json, headers: dict[str, str]) -> web.Response:
    return web.Response(
        status=status,
        body=msgspec.json.encode(payload),
        content_type="application/json",
        headers=headers,
    )
