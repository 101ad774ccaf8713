"""`gateway reconcile`: compare what the rules make of Didomi's status with what Braze holds.

For each person of the sources, the rules turn the Didomi user into target states exactly as
for a `user.updated` webhook; Braze's side is read through `braze_export.BrazeReader`, 50
persons at a time, so memory stays flat whatever the number of persons (`--sample N` keeps a
reservoir of N). Which side wins is not in question here: Didomi is the record of consent, and
a difference is Braze's drift; `--fix` sends Didomi's state again, dated by its `updated_at`,
so a choice made since (a live webhook) still wins over it.

What is compared is what decides whether Braze sends mail:
- A group's state under a global email unsubscribe: Braze keeps the group's last status but
  sends nothing, so when the rules also set the email state, a group counts as unsubscribed on
  either side whose email state is `unsubscribed`. A group Braze has no history of (`Unknown`)
  sends nothing either, and agrees with `unsubscribed`.
- A person Braze does not know is "missing". With `braze.update_existing_only` (the default)
  the gateway never creates profiles, so a missing person is reported but is no drift; without
  it, the gateway would have created the profile, so it is.
"""

from __future__ import annotations

import asyncio
import math
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from gateway.bulk.sources import Source, UserRecord
from gateway.peers.braze_export import MAX_EXPORT_IDS, BrazeReader, ExportedUser
from gateway.rules.mappings import EMAIL, Mapped, RuleSet, State, Target
from gateway.shapes.webhooks import Parameters, Webhook

CHUNK = MAX_EXPORT_IDS  # persons compared together: one export request by external id
Z95 = 1.959963984540054
_GROUP_STATE = {"Subscribed": "subscribed", "Unsubscribed": "unsubscribed"}


@dataclass(frozen=True, slots=True)
class Person:
    """One person of a source, as the rules see them."""

    person: str
    changes: dict[Target, State]
    at: float  # Didomi's updated_at, epoch seconds
    record: UserRecord


@dataclass(slots=True)
class Counts:
    """One Braze target's comparison: agree, differ, missing in Braze."""

    agree: int = 0
    differ: int = 0
    missing: int = 0


@dataclass(frozen=True, slots=True)
class Difference:
    """One person whose Braze state drifted: per target, (Didomi's, Braze's), and why."""

    person: Person
    targets: dict[Target, tuple[Any, Any]]
    missing: bool


@dataclass(slots=True)
class Report:
    """What a run found, per target and for persons as a whole."""

    missing_is_drift: bool
    read: int = 0  # users read from the sources
    skipped: dict[str, int] = field(default_factory=dict)  # why the rules asked nothing
    population: int = 0  # persons the rules map: the sample's frame
    compared: int = 0
    drifting: int = 0  # persons with at least one target in drift
    missing: int = 0
    targets: dict[Target, Counts] = field(default_factory=dict)
    sampled: bool = False

    def drifted(self, counts: Counts) -> int:
        """A target's persons in drift."""
        return counts.differ + (counts.missing if self.missing_is_drift else 0)

    def ratio(self, target: Target | None = None) -> float:
        """The share of compared persons in drift, for one target or any."""
        if target is None:
            return self.drifting / self.compared if self.compared else 0.0
        counts = self.targets[target]
        total = counts.agree + counts.differ + counts.missing
        return self.drifted(counts) / total if total else 0.0

    def interval(self, target: Target | None = None) -> tuple[float, float] | None:
        """The 95 % Wilson interval of `ratio` under `--sample`; None for a census."""
        if not self.sampled or self.compared >= self.population:
            return None
        if target is None:
            n = self.compared
        else:
            counts = self.targets[target]
            n = counts.agree + counts.differ + counts.missing
        return wilson(self.ratio(target), n)

    def ratios(self) -> dict[str, float]:
        """Every target's ratio, and `any`: what `gateway_drift_ratio{target}` shows."""
        out = {str(t): self.ratio(t) for t in sorted(self.targets)}
        out["any"] = self.ratio()
        return out


def wilson(p: float, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a proportion `p` seen in `n` trials."""
    if n <= 0:
        return 0.0, 1.0
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def person_of(rules: RuleSet, record: UserRecord) -> Person | str:
    """The person a user record maps to, or why the rules ask nothing of Braze for it."""
    webhook = Webhook(type="user.updated", parameters=Parameters(new_entity=record.user))
    result = rules.apply(webhook)
    if not isinstance(result, Mapped) or result.delete:
        return "deleted" if isinstance(result, Mapped) else result.reason
    return Person(result.person, result.changes, result.at, record)


async def persons(
    rules: RuleSet, sources: Sequence[Source], report: Report
) -> AsyncIterator[Person]:
    """Every mapped person of the sources, in order, counting what the rules skip."""
    for source in sources:
        async for batch in source.batches(CHUNK):
            for record in batch:
                report.read += 1
                found = person_of(rules, record)
                if isinstance(found, str):
                    report.skipped[found] = report.skipped.get(found, 0) + 1
                    continue
                report.population += 1
                yield found


class Reconciler:
    """Compares persons with Braze, 50 at a time, several chunks in flight."""

    def __init__(
        self,
        rules: RuleSet,
        reader: BrazeReader,
        report: Report,
        on_difference: Callable[[Difference], Awaitable[None]] | None = None,
        *,
        workers: int = 16,
    ) -> None:
        self.rules = rules
        self.reader = reader
        self.report = report
        self.on_difference = on_difference
        self.workers = workers
        targets = {rule.target for rule in rules.rules}
        self.fields = ["email" if rules.identity == "email" else "external_id"]
        if EMAIL in targets:
            self.fields.append("email_subscribe")
        if any(t.kind == "attribute" for t in targets):
            self.fields.append("custom_attributes")

    async def run(self, stream: AsyncIterator[Person] | Sequence[Person]) -> Report:
        """Compare every person of `stream`; the report is filled as chunks are answered."""
        queue: asyncio.Queue[list[Person] | None] = asyncio.Queue(maxsize=self.workers)
        tasks = [asyncio.create_task(self._work(queue)) for _ in range(self.workers)]
        try:
            chunk: list[Person] = []
            async for found in _iterate(stream):
                chunk.append(found)
                if len(chunk) >= CHUNK:
                    await _put(queue, chunk, tasks)
                    chunk = []
            if chunk:
                await _put(queue, chunk, tasks)
            for _ in tasks:
                await _put(queue, None, tasks)
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        return self.report

    async def _work(self, queue: asyncio.Queue[list[Person] | None]) -> None:
        while (chunk := await queue.get()) is not None:
            await self.compare(chunk)

    async def compare(self, chunk: list[Person]) -> None:
        """Read one chunk's Braze state and count each target of each person."""
        by_person: dict[str, Person] = {}
        for found in chunk:  # a person twice in a chunk: the newer Didomi state stands
            if found.person not in by_person or found.at >= by_person[found.person].at:
                by_person[found.person] = found
        names = list(by_person)
        identity = self.rules.identity
        users: dict[str, ExportedUser] = {}
        if identity == "email":
            for name in names:
                users.update((await self.reader.export(identity, [name], self.fields)).users)
        else:
            users = (await self.reader.export(identity, names, self.fields)).users
        statuses: dict[str, dict[str, str]] = {}
        for group in self.rules.groups:
            asked = [n for n in names if n in users and Target.group(group) in by_person[n].changes]
            if asked:
                statuses[group] = await self.reader.group_status(group, identity, asked)
        for name, found in by_person.items():
            await self._count(found, users.get(name), statuses)

    async def _count(
        self, found: Person, user: ExportedUser | None, statuses: dict[str, dict[str, str]]
    ) -> None:
        report = self.report
        report.compared += 1
        differ: dict[Target, tuple[Any, Any]] = {}
        for target, want in found.changes.items():
            counts = report.targets.setdefault(target, Counts())
            if user is None:
                counts.missing += 1
                continue
            have, shown = self._braze_state(target, found, user, statuses)
            if _agree(target, want, have, found.changes.get(EMAIL), user.email_subscribe):
                counts.agree += 1
            else:
                counts.differ += 1
                differ[target] = (want, shown)
        if user is None:
            report.missing += 1
        drift = bool(differ) or (user is None and report.missing_is_drift)
        if drift:
            report.drifting += 1
        if (drift or user is None) and self.on_difference is not None:
            if user is None:
                differ = {t: (want, None) for t, want in found.changes.items()}
            await self.on_difference(Difference(found, differ, user is None))

    def _braze_state(
        self,
        target: Target,
        found: Person,
        user: ExportedUser,
        statuses: dict[str, dict[str, str]],
    ) -> tuple[Any, Any]:
        """Braze's state for one target, and how to show it."""
        if target.kind == "email":
            return user.email_subscribe, user.email_subscribe
        if target.kind == "attribute":
            value = (user.custom_attributes or {}).get(target.name)
            return value, value
        status = statuses.get(target.name, {}).get(found.person, "Unknown")
        return _GROUP_STATE.get(status, "unsubscribed"), status


def _agree(
    target: Target, want: State, have: Any, want_email: State | None, have_email: str | None
) -> bool:
    if target.kind == "attribute":
        return type(have) is type(want) and have == want
    if target.kind == "group" and want_email is not None:
        # Braze keeps a group's last status under a global unsubscribe, and sends nothing.
        want = "unsubscribed" if want_email == "unsubscribed" else want
        have = "unsubscribed" if have_email == "unsubscribed" else have
    return bool(have == want)


async def _iterate(stream: AsyncIterator[Person] | Sequence[Person]) -> AsyncIterator[Person]:
    if isinstance(stream, Sequence):
        for item in stream:
            yield item
    else:
        async for item in stream:
            yield item


async def _put(
    queue: asyncio.Queue[list[Person] | None],
    item: list[Person] | None,
    tasks: list[asyncio.Task[None]],
) -> None:
    """Queue `item`, but raise a worker's error at once instead of waiting on a dead queue."""
    put = asyncio.ensure_future(queue.put(item))
    while not put.done():
        done, _ = await asyncio.wait([put, *tasks], return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            failed = task.exception() if task is not put else None
            if failed is not None:
                put.cancel()
                raise failed


async def sample(stream: AsyncIterator[Person], n: int, seed: int | None = None) -> list[Person]:
    """A uniform random sample of `n` persons of the stream, in O(n) memory (reservoir)."""
    rng = random.Random(seed)  # noqa: S311 - a statistical sample, not a secret
    kept: list[Person] = []
    seen = 0
    async for found in stream:
        seen += 1
        if len(kept) < n:
            kept.append(found)
        else:
            slot = rng.randrange(seen)
            if slot < n:
                kept[slot] = found
    return kept


def iso(at: float) -> str:
    """An epoch time as Didomi writes dates."""
    return datetime.fromtimestamp(at, UTC).isoformat().replace("+00:00", "Z")
