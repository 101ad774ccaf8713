"""Realistic, distinct Didomi webhook bodies, made from the fixtures in tests/events/.

Each fixture that asks Braze for an update is a template: compacted to the JSON Didomi sends,
then every entity, user and source id and the `organization_user_id` are swapped per request,
so each body is a new event (never a duplicate) for a new person (never coalesced, never stale).
"""

from __future__ import annotations

import itertools
import random
import re
from collections.abc import Iterator
from pathlib import Path

import msgspec

EVENTS = Path(__file__).resolve().parent.parent / "tests" / "events"
# The fixtures that map to one Braze object each with the example mappings; the others
# (pending, deleted, cpra, null choice, no identity) change nothing and would only be skipped.
TEMPLATES = (
    "consent_given.json",
    "consent_withdrawn.json",
    "event_updated_confirmed.json",
    "user_created.json",
    "user_updated.json",
    "unsubscribe_frequency.json",
)
_UUID = re.compile(rb"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_PERSON = re.compile(rb'"organization_user_id":"([^"]+)"')


class Template:
    """One fixture, compacted, with the byte strings that change per request."""

    def __init__(self, path: Path) -> None:
        self.name = path.stem
        self.body = msgspec.json.encode(msgspec.json.decode(path.read_bytes()))
        self.ids = list(dict.fromkeys(_UUID.findall(self.body)))
        self.persons = list(dict.fromkeys(_PERSON.findall(self.body)))

    def render(self, tag: int, n: int) -> bytes:
        """This template as request `n` of the run tagged `tag`: new ids, a new person."""
        body = self.body
        for slot, old in enumerate(self.ids):
            body = body.replace(old, b"%08x-%04x-4000-8000-%012x" % (tag, slot, n))
        for old in self.persons:
            body = body.replace(b'"' + old + b'"', b'"bench-%08x-%d"' % (tag, n))
        return body


def templates() -> list[Template]:
    """Every update-producing fixture, in a fixed order."""
    return [Template(EVENTS / name) for name in TEMPLATES]


def bodies(tag: int | None = None) -> Iterator[bytes]:
    """An endless stream of distinct webhook bodies cycling through the templates."""
    tag = random.getrandbits(32) if tag is None else tag
    cycle = templates()
    for n in itertools.count():
        yield cycle[n % len(cycle)].render(tag, n)
