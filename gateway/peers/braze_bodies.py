"""The bodies the gateway sends to Braze's /users/track and /users/delete (no aiohttp)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

from gateway.rules.mappings import State, Target

TRACK = "/users/track"
DELETE = "/users/delete"
MAX_OBJECTS = 75  # Braze refuses a /users/track request with more objects (400)
MAX_DELETE_IDS = 50  # Braze's /users/delete takes at most this many identifiers a request


# /users/delete names people by one identifier kind per request.
_DELETE_FIELDS = {"external_id": "external_ids", "email": "email_addresses"}
DEFAULT_PRIORITIZATION = ("identified", "most_recently_updated")


def track_object(
    identity: str, person: str, changes: Mapping[Target, State], *, update_existing_only: bool
) -> dict[str, Any]:
    """One `/users/track` attributes object for one person's changes."""
    obj: dict[str, Any] = {identity: person, "_update_existing_only": update_existing_only}
    groups = []
    for target, state in changes.items():
        kind = target.kind
        if kind == "group":
            groups.append({"subscription_group_id": target.name, "subscription_state": state})
        else:  # email_subscribe, or a custom attribute by its own name
            obj[target.name] = state
    if groups:
        obj["subscription_groups"] = groups
    return obj


def delete_body(
    identity: str, persons: Sequence[str], prioritization: Sequence[str] = DEFAULT_PRIORITIZATION
) -> dict[str, Any]:
    """The `/users/delete` body erasing `persons`, all named by the same identifier kind.

    An email address is not unique in Braze: each is an object whose `prioritization` says
    which profile it means (Braze refuses plain strings there).
    """
    kind = _DELETE_FIELDS[identity]
    if kind == "email_addresses":
        order = list(prioritization)
        return {kind: [{"email": person, "prioritization": order} for person in persons]}
    return {kind: list(persons)}


def chunks(items: list[Any], size: int) -> Iterator[list[Any]]:
    """Consecutive slices of at most `size` items."""
    for start in range(0, len(items), size):
        yield items[start : start + size]


def track_bodies(
    objects: Iterable[dict[str, Any]], batch_size: int = MAX_OBJECTS
) -> list[dict[str, Any]]:
    """The request bodies that carry `objects`, at most `batch_size` to a request."""
    return [{"attributes": batch} for batch in chunks(list(objects), min(batch_size, MAX_OBJECTS))]
