"""gateway.testing: a fake Braze REST server for the tests and the benchmarks.

It answers `POST /users/track` and `POST /users/delete` as Braze's docs say the real ones do
(braze.com/docs/api: "Errors & responses", "Rate limits", "POST: Track users", "User attributes
object"), keeps the users it was told about, records the traffic, and injects faults on demand.
`GET /fake/users/{external_id}` (and `/fake/users`) shows what a profile now holds; the demo
(`braze.server = "fake://..."`) serves it from the gateway's own process.
`python -m gateway.testing --port 9000` serves it standalone for benchmarks.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import math
import re
import signal
import sys
import time
from collections import deque
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from http.client import responses
from typing import Any, Literal

import msgspec
from aiohttp import web

from gateway.testing.didomi import (
    FakeDidomi as FakeDidomi,  # the Consents API's fake, for one import
)
from gateway.testing.served import Served

MAX_TRACK_OBJECTS = 75  # attributes + events + purchases together, current contracts
DELETE_IDS_ACCEPTED = 50  # Braze's own limit, written here apart from the gateway's on purpose
UNLIMITED = 250_000  # what the headers say when no rate limit is configured
MAX_BODY_BYTES = 4 * 1024 * 1024  # Braze answers 413 above 4 MB
MAX_EXTERNAL_ID_BYTES = 987

# Braze's own words, so clients are tested against the strings they will really meet.
INVALID_DATA = "Valid data must be provided in the 'attributes', 'events', or 'purchases' fields."
PARSE_ERROR = "Error while parsing request body. Please check your syntax."
MISSING_ID = "'external_id', 'braze_id', 'user_alias', 'email' or 'phone' is required"
# Braze documents that a second primary identifier refuses the object, not the words it uses.
SEVERAL_IDS = "only one of 'external_id', 'braze_id' or 'user_alias' may be given"
NOT_AN_OBJECT = "each object must be a JSON object"  # undocumented wording, ours
BAD_UPDATE_EXISTING_ONLY = "'_update_existing_only' must be a boolean"  # ours, likewise
TOO_MANY_IDS = "The max number of external_ids and aliases per request was exceeded"
ONE_DELETE_KIND = "name the users by exactly one of 'external_ids' or 'email_addresses'"  # ours
# /users/delete's identifier arrays, and the prefix the fake's `users` keys carry for each.
DELETE_KINDS = {"external_ids": "", "email_addresses": "email:"}
# Braze's "Delete users" docs: by email, each entry is {"email", "prioritization"}, an ordered
# array of these values with at most one of identified and unidentified. Braze's wording of the
# refusal is not documented; these are ours.
DELETE_PRIORITIES = frozenset({"identified", "unidentified", "most_recently_updated"})
EMAIL_OBJECTS_REQUIRED = (
    "'email_addresses' must be an array of objects with 'email' and 'prioritization'"
)
BAD_PRIORITIZATION = (
    "'prioritization' must be a non-empty array of 'identified' or 'unidentified' (not both) "
    "and 'most_recently_updated'"
)

# Per-key permissions and the read-only routes (`gateway check --online`, reconcile). Braze's
# permission names per endpoint ("API keys", and each endpoint's "Prerequisites"); errors.md says
# a key without one gets "403 Access Denied" and a key of another instance a 401. The exact JSON
# words of both, and the answer to an unknown subscription group id, are not documented: ours.
PERMISSIONS = {
    "/users/track": "users.track",
    "/users/delete": "users.delete",
    "/users/export/ids": "users.export.ids",
    "/subscription/status/get": "subscription.status.get",
}
ALL_PERMISSIONS = frozenset(PERMISSIONS.values())
INVALID_KEY = "Invalid API key"
ACCESS_DENIED = "Access Denied"
UNKNOWN_GROUP = "Invalid subscription_group_id"
GROUP_STATUS = {"subscribed": "Subscribed", "unsubscribed": "Unsubscribed"}

PRIMARY_IDS = ("external_id", "user_alias", "braze_id")
EMAIL_STATES = frozenset({"opted_in", "subscribed", "unsubscribed"})
GROUP_STATES = frozenset({"subscribed", "unsubscribed"})
GROUP_KEYS = frozenset({"subscription_group_id", "subscription_state"})
NOT_ATTRIBUTES = frozenset({*PRIMARY_IDS, "_update_existing_only", "email_subscribe"})
UUID_RE = re.compile(r"[0-9a-fA-F]{8}-(?:[0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}")
EMAIL_RE = re.compile(r"[^@\s]+@[^@\s]+\.[^@\s]+")

Json = dict[str, Any]


@dataclass(frozen=True, slots=True)
class Recorded:
    """One request as the fake saw it, with the status it answered."""

    path: str
    status: int
    body: Any  # the decoded JSON, or None when it was not JSON
    at: float  # time.monotonic() on arrival
    object_count: int


@dataclass(slots=True)
class User:
    """What the fake knows of one Braze profile."""

    email_subscribe: str | None = None
    subscription_groups: dict[str, str] = field(default_factory=dict)
    attributes: dict[str, Any] = field(default_factory=dict)


class FakeBraze(Served):
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
        self.rate_limit = rate_limit
        self.rate_window_s = rate_window_s
        self.reset_style = reset_style
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
        self._window_start = -math.inf  # the first request opens the first window
        self._window_used = 0
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
        self.permissions: set[str] | None = None  # None: the key has every permission
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
        return _readable(200, {"users": [self.user_state(key) for key in sorted(self.users)]})

    async def _one_user(self, request: web.Request) -> web.Response:
        key = request.match_info["key"]
        state = self.user_state(key)
        if state is None:
            # An external id names itself; other identifiers carry their kind, as in `users`.
            detail = f"no user {key!r} (never updated, or deleted); an email is email:ADDRESS"
            return _readable(404, {"message": detail})
        return _readable(200, state)

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
            return status, payload, {**self._limit(consume=False)[1], **headers}, 0
        refused = self._authorize(request)
        if refused is not None:
            # No workspace is known yet, so nothing is counted against its rate limit.
            return *refused, self._limit(consume=False)[1], 0
        allowed, headers = self._limit(consume=True)
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

    def _limit(self, *, consume: bool) -> tuple[bool, dict[str, str]]:
        """Count one request in the current fixed window; say whether it fits, and the headers."""
        now = time.monotonic()
        if now - self._window_start >= self.rate_window_s:
            self._window_start, self._window_used = now, 0
        limit = self.rate_limit if self.rate_limit is not None else UNLIMITED
        allowed = self._window_used < limit
        if consume and allowed:
            self._window_used += 1
        left = max(0.0, self._window_start + self.rate_window_s - now)
        if not allowed and self.reset_style == "seconds":
            # Braze's newer contracts replace the three headers on a 429 by this one.
            return False, {"X-Ratelimit-Retry-After": str(math.ceil(left))}
        reset = math.ceil(time.time() + left) if self.reset_style == "epoch" else math.ceil(left)
        return allowed, {
            "X-RateLimit-Limit": str(limit),
            "X-RateLimit-Remaining": str(max(0, limit - self._window_used)),
            "X-RateLimit-Reset": str(reset),
        }

    def _apply_track(self, body: Json) -> tuple[int, Json, int]:
        arrays: dict[str, list[Any]] = {}
        for name in ("attributes", "events", "purchases"):
            value = body.get(name)
            if value is not None and not isinstance(value, list):
                return 400, {"message": INVALID_DATA}, 0
            arrays[name] = value or []
        count = sum(len(a) for a in arrays.values())
        if count > self.max_objects:
            return 400, {"message": "Max Input Length Exceeded"}, count
        errors: list[Json] = []
        if self.refuse_with_400 is not None:
            for index, obj in enumerate(arrays["attributes"]):
                if isinstance(obj, dict) and self.refuse_with_400(obj):
                    errors.append({"type": "refused", "input_array": "attributes", "index": index})
            if errors:
                return 400, {"message": INVALID_DATA, "errors": errors}, count
        valid: dict[str, list[Json]] = {}
        for name, objects in arrays.items():
            valid[name] = []
            for index, obj in enumerate(objects):
                problem = self._refuse(obj, attributes=name == "attributes")
                if problem is None:
                    valid[name].append(obj)
                else:
                    errors.append({"type": problem, "input_array": name, "index": index})
        if not any(valid.values()):
            # Braze refuses a call with nothing valid in it as a whole: 400, nothing applied.
            return 400, {"message": INVALID_DATA, **({"errors": errors} if errors else {})}, count
        messages: list[str] = []
        for obj in valid["attributes"]:
            said = [m for p in self._unattributed if (m := p(obj)) is not None]
            if said:
                messages.extend(said)  # not applied, and not said which object it was
                continue
            self._apply_attributes(obj)
        answer: Json = {"message": "success"}
        for name, objects in arrays.items():
            if objects:
                answer[f"{name}_processed"] = len(valid[name])
        if errors or messages:
            answer["errors"] = [*errors, *messages]
        return 201, answer, count

    def _refuse(self, obj: Any, *, attributes: bool) -> str | None:
        """The error type Braze would give this object, or None when it would take it."""
        if not isinstance(obj, dict):
            return NOT_AN_OBJECT
        key, problem = _identify(obj)
        if key is None or not attributes:
            return problem
        if obj.get("email") is not None and not _is_email(obj["email"]):
            return "EMAIL_BAD_FORMAT"
        if "email_subscribe" in obj and obj["email_subscribe"] not in EMAIL_STATES:
            return "BAD_EMAIL_SUBSCRIPTION_STATE"
        if "_update_existing_only" in obj and not isinstance(obj["_update_existing_only"], bool):
            return BAD_UPDATE_EXISTING_ONLY
        if "subscription_groups" in obj:
            problem = _check_groups(obj["subscription_groups"])
            if problem is not None:
                return problem
        for predicate in self._rejecters:
            problem = predicate(obj)
            if problem is not None:
                return problem
        return None

    def _apply_attributes(self, obj: Json) -> None:
        key, _ = _identify(obj)
        assert key is not None  # _refuse let only identified objects through
        # Braze's default: update-only for aliases, create for every other identifier.
        update_only = obj.get("_update_existing_only", key.startswith("alias:"))
        if self.known_users is not None and key not in self.known_users:
            if update_only:
                self.stats["ignored"] += 1
                if self.record:
                    self.ignored.append(obj)
                return
            self.known_users.add(key)
        user = self.users.setdefault(key, User())
        report = self.on_change
        for name, value in obj.items():
            if name == "email_subscribe":
                if report is not None and user.email_subscribe != value:
                    report(key, None, value)
                user.email_subscribe = value
            elif name == "subscription_groups":
                # Merged: a group the object does not name keeps its state.
                groups = {g["subscription_group_id"]: g["subscription_state"] for g in value}
                for group, state in groups.items():
                    if report is not None and user.subscription_groups.get(group) != state:
                        report(key, group, state)
                user.subscription_groups.update(groups)
            elif name in NOT_ATTRIBUTES:
                continue
            elif value is None:  # Braze removes an attribute set to null
                user.attributes.pop(name, None)
            else:
                user.attributes[name] = value

    def _apply_delete(self, body: Json) -> tuple[int, Json, int]:
        kinds = [name for name in DELETE_KINDS if name in body]
        if len(kinds) != 1:
            return 400, {"message": ONE_DELETE_KIND}, 0
        entries = body[kinds[0]]
        if not isinstance(entries, list):
            return 400, {"message": f"'{kinds[0]}' must be an array"}, 0
        if kinds[0] == "email_addresses":
            # An email address may name several profiles; Braze wants to be told which.
            if not all(isinstance(e, dict) and isinstance(e.get("email"), str) for e in entries):
                return 400, {"message": EMAIL_OBJECTS_REQUIRED}, 0
            if not all(_good_prioritization(e.get("prioritization")) for e in entries):
                return 400, {"message": BAD_PRIORITIZATION}, 0
            ids = [e["email"] for e in entries]
        else:
            ids = entries
        if not all(isinstance(i, str) for i in ids):
            return 400, {"message": f"'{kinds[0]}' must be an array of strings"}, 0
        if len(ids) > DELETE_IDS_ACCEPTED:
            return 400, {"message": TOO_MANY_IDS}, len(ids)
        prefix = DELETE_KINDS[kinds[0]]
        for identifier in ids:
            key = prefix + identifier
            self.users.pop(key, None)
            if self.known_users is not None:
                self.known_users.discard(key)
            if self.record:
                self.deleted.append(key)
        self.stats["deleted"] += len(ids)
        # Braze counts the ids queued for deletion, known or not.
        return 201, {"deleted": len(ids), "message": "success"}, len(ids)

    # -----------------------------------------------------------------------
    # Keys and their permissions; the reads of `gateway reconcile` and `check --online`:
    # /users/export/ids and /subscription/status/get.

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

    def _reading(self, request: web.Request, window: Window, permission: str) -> Any:
        """The refusal a read gets before its body is looked at (key, permission, limit),
        with the rate-limit headers to send, as (status, payload) or None to go on."""
        self.stats["requests"] += 1
        refused = self._authorize(request)
        if refused is None and self.permissions is not None and permission not in self.permissions:
            refused = 403, {"message": ACCESS_DENIED}
        if refused is not None:
            return refused, window.headers(consume=False)[1]
        allowed, headers = window.headers(consume=True)
        if not allowed:
            self.stats["rate_limited"] += 1
            return (429, {"message": "Rate Limited"}), headers
        return None, headers

    async def _export_ids(self, request: web.Request) -> web.Response:
        refused, headers = self._reading(request, self.export_limit.export, "users.export.ids")
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

    def _export_answer(self, body: Any) -> tuple[int, Json]:
        if not isinstance(body, dict):
            return 400, {"message": PARSE_ERROR}
        fields = body.get("fields_to_export")
        if fields is None and self.export_limit.fields_required:
            return 400, {"message": FIELDS_REQUIRED}
        if fields is not None and not (
            isinstance(fields, list) and all(isinstance(f, str) for f in fields)
        ):
            return 400, {"message": "'fields_to_export' must be an array of strings"}
        single = [k for k in ONE_AT_A_TIME if body.get(k) is not None]
        ids = body.get("external_ids")
        if (ids is not None) + len(single) != 1:
            return 400, {"message": ONE_IDENTIFIER}
        if single:
            value = body[single[0]]
            if not isinstance(value, str):
                return 400, {"message": ONE_IDENTIFIER}
            keys = [self._by_email(value)] if single[0] == "email_address" else [None]
            asked = [value]
        else:
            if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
                return 400, {"message": "'external_ids' must be an array of strings"}
            if len(ids) > MAX_EXPORT_IDS:
                return 400, {"message": TOO_MANY_IDS}
            keys, asked = list(ids), ids
        users, invalid = [], []
        for key, name in zip(keys, asked, strict=True):
            user = self.users.get(key) if key is not None else None
            if user is None or key is None:
                invalid.append(name)
            else:
                users.append(_exported(key, user, fields or EXPORT_DEFAULT_FIELDS))
        answer: Json = {"users": users, "message": "success"}
        if invalid:
            answer["invalid_user_ids"] = invalid
        return 201, answer

    def _by_email(self, address: str) -> str | None:
        if f"email:{address}" in self.users:
            return f"email:{address}"
        for key, user in self.users.items():
            if user.attributes.get("email") == address:
                return key
        return None

    async def _subscription_status(self, request: web.Request) -> web.Response:
        refused, headers = self._reading(
            request, self.export_limit.status, "subscription.status.get"
        )
        if refused is None:
            refused = self._status_answer(request.query)
        status, payload = refused
        self._record(request.path, status, None, 0)
        return await self._late(_json(status, payload, headers))

    def _status_answer(self, query: Any) -> tuple[int, Json]:
        group = query.get("subscription_group_id")
        if not group:
            return 400, {"message": "'subscription_group_id' is required"}
        ids = query.getall("external_id[]", [])
        emails = query.getall("email[]", [])
        phones = query.getall("phone[]", [])
        if not ids and emails and phones:
            return 400, {"message": "give an email or a phone, not both"}
        # With external ids, Braze applies those alone; else the emails (or phones).
        asked, prefix = (ids, "") if ids else ((emails, "email:") if emails else (phones, "phone:"))
        if not asked:
            return 400, {"message": "at least one external_id, email or phone is required"}
        if len(asked) > MAX_STATUS_IDS:
            return 400, {"message": TOO_MANY_IDS}
        if self.groups is not None and group.lower() not in {g.lower() for g in self.groups}:
            return 400, {"message": UNKNOWN_GROUP}
        out: dict[str, str] = {}
        for name in asked:
            key = self._by_email(name) if prefix == "email:" else prefix + name
            user = self.users.get(key) if key is not None else None
            # The last state the user had in the group, even after a global unsubscribe.
            state = user.subscription_groups.get(group.lower()) if user is not None else None
            out[name] = GROUP_STATUS.get(state or "", "Unknown")
        return 200, {"status": out, "message": "success"}

    def _record(self, path: str, status: int, body: Any, count: int) -> None:
        if self.record:
            self.requests.append(Recorded(path, status, body, time.monotonic(), count))

    async def _late(self, response: web.Response) -> web.Response:
        if self.latency_s > 0:
            await asyncio.sleep(self.latency_s)
        return response


# Braze's reads: at most 50 external ids a request; email, phone, device or Braze id one at a time.
MAX_EXPORT_IDS = 50
MAX_STATUS_IDS = 50
ONE_AT_A_TIME = ("email_address", "phone", "device_id", "braze_id")
# Braze requires the field for workspaces onboarded on or after 2024-08-22; its words are not
# documented, these are ours.
FIELDS_REQUIRED = "'fields_to_export' is required"
ONE_IDENTIFIER = (
    "give up to 50 'external_ids', or exactly one 'email_address', 'phone', 'device_id' or"
    " 'braze_id'"
)
EXPORT_DEFAULT_FIELDS = ("external_id", "email", "email_subscribe", "custom_attributes")
KEY_KINDS = ("email:", "phone:", "alias:", "braze:")  # `users` keys that are no external id


class Window:
    """One endpoint's fixed rate-limit window, with Braze's X-RateLimit-* headers.

    The window opens with the first request after the last one closed, as `FakeBraze._limit`'s
    does. A scaled-down minute scales Braze's clock too: the reset is rounded up to the
    window's own second (a sixtieth of it), as Braze rounds a real minute's to whole seconds.
    """

    def __init__(self, limit: int, window_s: float) -> None:
        self.limit = limit
        self.window_s = window_s
        self.used = 0
        self.started = -math.inf

    def headers(self, *, consume: bool) -> tuple[bool, dict[str, str]]:
        """Count one request if it fits; say whether it did, and the headers to answer with."""
        now = time.monotonic()
        if now - self.started >= self.window_s:
            self.started, self.used = now, 0
        allowed = self.used < self.limit
        if consume and allowed:
            self.used += 1
        second = self.window_s / 60
        ends = time.time() + max(0.0, self.started + self.window_s - now)
        reset = math.ceil(ends / second) * second
        return allowed, {
            "X-RateLimit-Limit": str(self.limit),
            "X-RateLimit-Remaining": str(max(0, self.limit - self.used)),
            "X-RateLimit-Reset": f"{reset:.3f}".rstrip("0").rstrip("."),
        }


@dataclass(slots=True)
class ExportLimits:
    """The limits of the reads: /users/export/ids per minute (250 for workspaces onboarded on
    or after 2024-08-22, 2,500 before) and /subscription/status/get (250,000 an hour)."""

    export: Window = field(default_factory=lambda: Window(250, 60.0))
    status: Window = field(default_factory=lambda: Window(250_000, 3600.0))
    fields_required: bool = True  # newer workspaces: a request without the field is a 400

    def scale(self, minute_s: float, *, per_minute: int = 250) -> None:
        """Make Braze's minute last `minute_s` (tests, benchmarks), at `per_minute` exports."""
        self.export = Window(per_minute, minute_s)
        self.status = Window(250_000, 60 * minute_s)


def _exported(key: str, user: User, fields: Sequence[str]) -> Json:
    """One profile as /users/export/ids lists it, with only the fields asked for."""
    whole: Json = {
        "external_id": None if key.startswith(KEY_KINDS) else key,
        "email": key[6:] if key.startswith("email:") else user.attributes.get("email"),
        # A profile is subscribed to email until it opts in or unsubscribes.
        "email_subscribe": user.email_subscribe or "subscribed",
        "custom_attributes": {k: v for k, v in user.attributes.items() if k != "email"},
    }
    return {name: whole[name] for name in fields if name in whole and whole[name] is not None}


def _identify(obj: Json) -> tuple[str | None, str | None]:
    """The `users` key this object names, or the error type that refuses it."""
    primaries = [name for name in PRIMARY_IDS if obj.get(name) is not None]
    if len(primaries) > 1:
        return None, SEVERAL_IDS
    if primaries == ["user_alias"]:
        alias = obj["user_alias"]
        if not isinstance(alias, dict) or not all(
            isinstance(alias.get(k), str) and alias[k] for k in ("alias_name", "alias_label")
        ):
            return None, MISSING_ID
        return f"alias:{alias['alias_label']}:{alias['alias_name']}", None
    if primaries:
        value = obj[primaries[0]]
        if not isinstance(value, str) or not value:
            return None, MISSING_ID
        if len(value.encode()) > MAX_EXTERNAL_ID_BYTES:
            return None, "EXTERNAL_USER_ID_TOO_LARGE"
        return (value if primaries == ["external_id"] else f"braze:{value}"), None
    # email and phone identify only without a primary identifier, email first.
    if obj.get("email") is not None:
        email = obj["email"]
        return (f"email:{email}", None) if _is_email(email) else (None, "EMAIL_BAD_FORMAT")
    if isinstance(obj.get("phone"), str) and obj["phone"]:
        return f"phone:{obj['phone']}", None
    return None, MISSING_ID


def _good_prioritization(order: Any) -> bool:
    if not isinstance(order, list) or not order:
        return False
    if not all(isinstance(v, str) and v in DELETE_PRIORITIES for v in order):
        return False
    return len(set(order)) == len(order) and not {"identified", "unidentified"} <= set(order)


def _is_email(value: Any) -> bool:
    return isinstance(value, str) and EMAIL_RE.fullmatch(value) is not None


def _check_groups(groups: Any) -> str | None:
    if not isinstance(groups, list):
        return "BAD_SUBSCRIPTION_GROUP_ARRAY"
    for group in groups:
        if not isinstance(group, dict) or not group.keys() >= GROUP_KEYS:
            return "BAD_SUBSCRIPTION_GROUP_HASH"
        group_id = group["subscription_group_id"]
        if not isinstance(group_id, str) or UUID_RE.fullmatch(group_id) is None:
            return "BAD_SUBSCRIPTION_GROUP_ID"
        if group["subscription_state"] not in GROUP_STATES:
            return "BAD_SUBSCRIPTION_GROUP_STATE"
    return None


def _json(status: int, payload: Json, headers: dict[str, str]) -> web.Response:
    return web.Response(
        status=status,
        body=msgspec.json.encode(payload),
        content_type="application/json",
        headers=headers,
    )


def _readable(status: int, payload: Json) -> web.Response:
    """JSON for people reading along (`curl` in a terminal): indented, ending in a newline."""
    body = msgspec.json.format(msgspec.json.encode(payload), indent=2) + b"\n"
    return web.Response(status=status, body=body, content_type="application/json")


async def _serve_forever(args: argparse.Namespace) -> None:
    fake = FakeBraze(
        api_key=args.api_key,
        latency_s=args.latency_ms / 1000,
        rate_limit=args.rate_limit,
        rate_window_s=args.rate_window_s,
        reset_style=args.reset_style,
        record=False,  # a long benchmark must not grow memory with every request
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    url = await fake.start(args.host, args.port)
    print(f"fake braze listening on {url}", flush=True)
    try:
        await stop.wait()
    finally:
        await fake.stop()


def main(argv: Sequence[str] | None = None) -> int:
    """Serve a fake Braze until SIGTERM or SIGINT."""
    parser = argparse.ArgumentParser(prog="python -m gateway.testing", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000)
    parser.add_argument("--latency-ms", type=float, default=0.0)
    parser.add_argument("--api-key", default="test-braze-key")
    parser.add_argument("--rate-limit", type=int, default=None)
    parser.add_argument("--rate-window-s", type=float, default=3.0)
    parser.add_argument("--reset-style", choices=("epoch", "seconds"), default="epoch")
    asyncio.run(_serve_forever(parser.parse_args(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
