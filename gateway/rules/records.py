"""What the mapping rules are made of: targets, the file's Structs, compiled rules, results."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from gateway.config.settings import Config, Strict

State = str | bool
TargetKind = Literal["email", "group", "attribute"]


class Target(str):
    """One Braze field a rule sets, spelled as the spool stores it.

    `email_subscribe`, `group:<subscription group id>` or `attr:<attribute name>`: a `str`, so
    it keys the spool's `applied` table and compares equal to its spelling, while `kind` and
    `name` say what it is without anyone slicing prefixes.
    """

    __slots__ = ()

    @classmethod
    def group(cls, group_id: str) -> Target:
        """A subscription group's state; ids compare in lower case, as Braze prints them."""
        return cls(f"group:{group_id.lower()}")

    @classmethod
    def attribute(cls, name: str) -> Target:
        """A custom attribute set to true or false."""
        return cls(f"attr:{name}")

    @property
    def kind(self) -> TargetKind:
        """Which Braze field family this is."""
        if self.startswith("group:"):
            return "group"
        if self.startswith("attr:"):
            return "attribute"
        return "email"

    @property
    def name(self) -> str:
        """The group id or attribute name, or `email_subscribe`."""
        return self.partition(":")[2] if self.kind != "email" else str(self)


EMAIL = Target("email_subscribe")


def braze_side(target: str) -> str:
    """The applied-times key of a change Braze reported for `target` (the reverse path)."""
    return f"braze:{target}"


# A pseudo-target in the spool's applied times: when the person was erased. A choice older than
# it is stale for every target, so a late retry never brings an erased person back.
ERASED = "erased"
# The audit's "rule" for the changes of an erasure: the setting that asked for them.
ON_USER_DELETED = "didomi.on_user_deleted"

# ---------------------------------------------------------------------------
# The file format.


class IdentitySpec(Strict, frozen=True):
    external_id: str | None = None
    email: str | None = None


class MapRule(Strict, frozen=True):
    to: str
    purpose: str | None = None
    preference: str | None = None
    value: str | None = None
    on_chosen: str | bool | None = None
    on_refused: str | bool | None = None


class Expect(Strict, frozen=True):
    email_subscribe: str | None = None
    subscription_groups: dict[str, str] | None = None
    attributes: dict[str, Any] | None = None


class MappingTest(Strict, frozen=True):
    name: str
    event: str | dict[str, Any]
    expect: Expect = Expect()


# ---------------------------------------------------------------------------
# The compiled form.


@dataclass(frozen=True, slots=True)
class Rule:
    """One compiled `[[map]]` entry: which target it sets to what, and where it was written."""

    target: Target
    chosen: State | None
    refused: State | None
    value: str | None
    origin: str  # "file:line", for messages


@dataclass(frozen=True, slots=True)
class Reference:
    """One id a rule names in Braze or Didomi, at the line that names it (for check --online)."""

    kind: Literal["group", "purpose", "preference", "value"]
    id: str
    file: str
    line: int
    purpose: str | None = None  # a preference's or value's purpose
    preference: str | None = None  # a value's preference


@dataclass(frozen=True, slots=True)
class LoadedTest:
    """A `[[test]]` table with the folder its relative event path starts from."""

    spec: MappingTest
    base: Path
    origin: str


@dataclass(frozen=True, slots=True)
class Mapped:
    """What one webhook asks of one Braze user."""

    identity: Literal["external_id", "email"]
    person: str
    changes: dict[Target, State]
    at: float  # epoch seconds of the choice, for ordering, never after arrival plus the skew
    delete: bool = False
    erasure: bool = False  # a user.deleted: dated at arrival, never stale, recorded as such
    clamped: bool = False  # its own date was past arrival plus the skew: dated at arrival
    # Per target, the rule ("file:line") whose state won, and the Didomi event id: for the audit
    # only, so two results asking the same of Braze still compare equal.
    origins: dict[Target, str] = field(default_factory=dict, compare=False)
    event_id: str | None = field(default=None, compare=False)


@dataclass(frozen=True, slots=True)
class Skipped:
    """A webhook that changes nothing in Braze, and why (a metric label)."""

    reason: str


@dataclass(frozen=True, slots=True)
class Options:
    """The parts of gateway.toml that change how events map."""

    regulations: frozenset[str] = frozenset({"gdpr"})
    on_user_deleted: Literal["ignore", "unsubscribe", "delete"] = "ignore"
    max_clock_skew_s: float = 300.0


def options_of(config: Config) -> Options:
    """The mapping options that gateway.toml sets."""
    didomi = config.didomi
    return Options(frozenset(didomi.regulations), didomi.on_user_deleted, didomi.max_clock_skew_s)
