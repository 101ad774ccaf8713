"""The fake Braze's reads: /users/export/ids and /subscription/status/get, as Braze answers them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from gateway.testing.braze_access import ExportLimits
from gateway.testing.braze_writes import PARSE_ERROR, TOO_MANY_IDS, Json, User

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
# The answer to an unknown subscription group id is not documented: ours.
UNKNOWN_GROUP = "Invalid subscription_group_id"
GROUP_STATUS = {"subscribed": "Subscribed", "unsubscribed": "Unsubscribed"}


class Reads:
    """The answers of the fake Braze's reads (a mixin of `FakeBraze`, which owns the state
    named here and serves the routes)."""

    users: dict[str, User]
    groups: set[str] | None
    export_limit: ExportLimits

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
