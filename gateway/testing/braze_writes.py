"""The fake Braze's writes: /users/track and /users/delete checked as Braze does, and applied.

From Braze's docs: "POST: Track users", "User attributes object", "Delete users".
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

MAX_TRACK_OBJECTS = 75  # attributes + events + purchases together, current contracts
DELETE_IDS_ACCEPTED = 50  # Braze's own limit, written here apart from the gateway's on purpose
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

PRIMARY_IDS = ("external_id", "user_alias", "braze_id")
EMAIL_STATES = frozenset({"opted_in", "subscribed", "unsubscribed"})
GROUP_STATES = frozenset({"subscribed", "unsubscribed"})
GROUP_KEYS = frozenset({"subscription_group_id", "subscription_state"})
NOT_ATTRIBUTES = frozenset({*PRIMARY_IDS, "_update_existing_only", "email_subscribe"})
IDENTIFYING = frozenset({*PRIMARY_IDS, "_update_existing_only"})  # what changes nothing
UUID_RE = re.compile(r"[0-9a-fA-F]{8}-(?:[0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}")
EMAIL_RE = re.compile(r"[^@\s]+@[^@\s]+\.[^@\s]+")

Json = dict[str, Any]


@dataclass(slots=True)
class User:
    """What the fake knows of one Braze profile."""

    email_subscribe: str | None = None
    subscription_groups: dict[str, str] = field(default_factory=dict)
    attributes: dict[str, Any] = field(default_factory=dict)


class TrackAndDelete:
    """The fake Braze's /users/track and /users/delete, applied to its profiles (a mixin of
    `FakeBraze`, which owns the state named here)."""

    users: dict[str, User]
    known_users: set[str] | None
    deleted: list[str]
    ignored: list[Json]
    record: bool
    stats: dict[str, int]
    max_objects: int
    refuse_with_400: Callable[[Json], bool] | None
    on_change: Callable[[str, str | None, str], None] | None
    _rejecters: list[Callable[[Json], str | None]]
    _unattributed: list[Callable[[Json], str | None]]

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
        elif (
            self.known_users is None
            and update_only
            and key not in self.users
            and _sets_nothing(obj)
        ):
            # Every user is taken to exist, but an update that sets nothing leaves no profile to
            # show: `gateway check --online`'s probe must not appear in the demo's /fake/users.
            return
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


def _sets_nothing(obj: Json) -> bool:
    """Whether an attributes object only names its user (a probe), changing nothing."""
    return all(name in IDENTIFYING for name in obj)
