"""Realistic, distinct Didomi webhook bodies, made from the fixtures in tests/events/.

Each fixture that asks Braze for an update is a template: compacted to the JSON Didomi sends,
then every entity, user and source id and the `organization_user_id` are swapped per request,
so each body is a new event (never a duplicate) for a new person (never coalesced, never stale).

`pairs` is the other stream, for the kill -9 check of `run.py --replicas`: two choices per
person (opt in, withdraw), dated apart, half of the persons sent the newer one first, so
Braze must end at each person's latest choice whatever the order of arrival.
"""

from __future__ import annotations

import itertools
import random
import re
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime, timedelta
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


# The fixtures are dated from February to June 2025. A run dates them anew, all by one shift
# that puts the latest a day before the run, so their order and spacing stay: left as they are,
# a choice older than `retention.applied_days` would be refused for everyone once a prune pass
# had raised the floor above it (942 of 6,000 persons of a `run.py --replicas` acknowledged so),
# and one in the future would be dated at its arrival.
_DATE = re.compile(rb'"(\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(?:\.\d+)?Z)"')
_LATEST = datetime(2025, 6, 12, 14, 3, 55, 731_000, tzinfo=UTC)  # tests/events' latest date
_SHIFT = datetime.now(UTC) - timedelta(days=1) - _LATEST


def redate(stamp: bytes) -> bytes:
    """A fixture's Didomi timestamp, moved by this run's shift (millisecond precision)."""
    moved = datetime.fromisoformat(stamp.decode().replace("Z", "+00:00")) + _SHIFT
    return moved.strftime("%Y-%m-%dT%H:%M:%S.").encode() + b"%03dZ" % (moved.microsecond // 1000)


class Template:
    """One fixture, compacted and dated anew, with the byte strings that change per request."""

    def __init__(self, path: Path) -> None:
        self.name = path.stem
        body = msgspec.json.encode(msgspec.json.decode(path.read_bytes()))
        self.body = _DATE.sub(lambda m: b'"' + redate(m.group(1)) + b'"', body)
        self.ids = list(dict.fromkeys(_UUID.findall(self.body)))
        self.persons = list(dict.fromkeys(_PERSON.findall(self.body)))

    def render(self, tag: int, n: int, person: bytes | None = None) -> bytes:
        """This template as request `n` of the run tagged `tag`: new ids, a new person (or
        `person`)."""
        body = self.body
        for slot, old in enumerate(self.ids):
            body = body.replace(old, b"%08x-%04x-4000-8000-%012x" % (tag, slot, n))
        person = person if person is not None else b"bench-%08x-%d" % (tag, n)
        for old in self.persons:
            body = body.replace(b'"' + old + b'"', b'"' + person + b'"')
        return body


def templates() -> list[Template]:
    """Every update-producing fixture, in a fixed order."""
    return [Template(EVENTS / name) for name in TEMPLATES]


def bodies(tag: int | None = None) -> Iterator[bytes]:
    """An endless stream of distinct webhook bodies cycling through the templates."""
    tag = random.getrandbits(32) if tag is None else tag
    for _, body in numbered("distinct", tag, itertools.count()):
        yield body


# The two choices of `pairs`, and the date that makes the opt-in the later one.
GIVEN, WITHDRAWN = "consent_given.json", "consent_withdrawn.json"
GIVEN_AT = redate(b"2025-03-14T09:26:53.589Z")  # as dated in the fixtures, then moved
WITHDRAWN_AT = redate(b"2025-03-21T17:02:11.204Z")
LATER_AT = redate(b"2025-03-28T09:26:53.589Z")


def pair_person(tag: int, k: int) -> str:
    """The person of pair `k` (webhooks 2k and 2k + 1 of the `pairs` stream)."""
    return f"bench-{tag:08x}-p{k}"


def latest_state(k: int) -> str:
    """The `email_subscribe` Braze must end at for pair `k`: its later-dated choice."""
    return "opted_in" if k % 2 else "unsubscribed"


class Pairs:
    """Webhook `n` of the `pairs` stream: person n // 2's older or newer choice.

    Even pairs withdraw last (opt-in on the 14th, withdrawal on the 21st), odd pairs opt in
    last (withdrawal on the 21st, opt-in on the 28th); pairs 2 and 3 of every 4 send the newer
    choice first, so it is the older one that arrives last and must change nothing.
    """

    def __init__(self, tag: int) -> None:
        self.tag = tag
        self.given, self.withdrawn = Template(EVENTS / GIVEN), Template(EVENTS / WITHDRAWN)

    def body(self, n: int) -> bytes:
        k, second = divmod(n, 2)
        newer = bool(second) != (k % 4 >= 2)
        given = newer == bool(k % 2)  # the newer choice is the opt-in for odd pairs
        template = self.given if given else self.withdrawn
        body = template.render(self.tag, n, pair_person(self.tag, k).encode())
        return body.replace(GIVEN_AT, LATER_AT) if given and newer else body


def numbered(stream: str, tag: int, indexes: Iterable[int]) -> Iterator[tuple[int, bytes]]:
    """Webhooks `indexes` of `stream` ("distinct": as `bodies`; "pairs"), with their index."""
    if stream == "pairs":
        pairs = Pairs(tag)
        return ((n, pairs.body(n)) for n in indexes)
    cycle = templates()
    return ((n, cycle[n % len(cycle)].render(tag, n)) for n in indexes)
