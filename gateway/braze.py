"""Braze's REST API: the `/users/track` bodies the gateway sends."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from .mappings import EMAIL, State

TRACK = "/users/track"
DELETE = "/users/delete"
MAX_OBJECTS = 75  # Braze refuses a /users/track request with more objects (400)
MAX_DELETE_IDS = 50


def track_object(
    identity: str, person: str, changes: dict[str, State], *, update_existing_only: bool
) -> dict[str, Any]:
    """One `/users/track` attributes object for one person's changes."""
    obj: dict[str, Any] = {identity: person, "_update_existing_only": update_existing_only}
    groups = []
    for target, state in changes.items():
        if target == EMAIL:
            obj[EMAIL] = state
        elif target.startswith("group:"):
            groups.append({"subscription_group_id": target[6:], "subscription_state": state})
        else:
            obj[target[5:]] = state
    if groups:
        obj["subscription_groups"] = groups
    return obj


def chunks(items: list[Any], size: int) -> Iterator[list[Any]]:
    """Consecutive slices of at most `size` items."""
    for start in range(0, len(items), size):
        yield items[start : start + size]


def track_bodies(
    objects: Iterable[dict[str, Any]], batch_size: int = MAX_OBJECTS
) -> list[dict[str, Any]]:
    """The request bodies that carry `objects`, at most `batch_size` to a request."""
    return [{"attributes": batch} for batch in chunks(list(objects), min(batch_size, MAX_OBJECTS))]
