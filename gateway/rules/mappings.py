"""Mapping rules: `mappings/*.toml` compiled into lookup tables, and applied to Didomi webhooks.

Rules are indexed by purpose id (and preference id), so mapping one event costs a dict look-up
per purpose it carries, however many rules there are. Conflicts inside one event resolve towards
withdrawal: `unsubscribed` (or `false`) wins, so consent withdrawal is never lost.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC
from pathlib import Path
from typing import Any, Literal

import msgspec

from gateway.config.located import Located, convert, read_toml
from gateway.config.settings import Config, Strict
from gateway.errors import ConfigError, Problem
from gateway.shapes.webhooks import Entity, Webhook

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

_GROUP_ID = re.compile(
    r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"
)
_ATTRIBUTE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_ .-]*$")
# Braze's own profile fields: an `attribute:` rule must not overwrite them by accident.
BRAZE_PROFILE_FIELDS = frozenset(
    {
        "external_id", "user_alias", "braze_id", "email", "email_subscribe", "push_subscribe",
        "subscription_groups", "_update_existing_only", "first_name", "last_name", "phone",
        "country", "city", "home_city", "language", "gender", "dob", "time_zone", "bio",
        "image_url", "facebook", "twitter", "push_tokens", "email_open_tracking_disabled",
        "email_click_tracking_disabled", "date_of_first_session", "date_of_last_session",
        "marked_email_as_spam_at", "current_location", "attributes",
    }
)  # fmt: skip
_STATES: dict[str, frozenset[State]] = {
    "email": frozenset({"opted_in", "subscribed", "unsubscribed"}),
    "group": frozenset({"subscribed", "unsubscribed"}),
    "attribute": frozenset({True, False}),
}
# Higher rank wins a conflict inside one event: the less permissive choice.
_RANK: dict[State, int] = {"opted_in": 0, "subscribed": 1, "unsubscribed": 2, True: 0, False: 2}
IDENTITY_FIELDS = ("organization_user_id", "id")
_LAST_SECOND = 253_402_300_799.0  # 9999-12-31T23:59:59Z, for dates past what a float holds


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


@dataclass(slots=True)
class RuleSet:
    """Every rule of a mapping folder, indexed for mapping one event in a few look-ups."""

    by_purpose: dict[str, list[Rule]] = field(default_factory=dict)
    by_preference: dict[str, dict[str, list[Rule]]] = field(default_factory=dict)
    identity: Literal["external_id", "email"] = "external_id"
    identity_field: str = "organization_user_id"
    options: Options = field(default_factory=Options)
    tests: list[LoadedTest] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    rules: list[Rule] = field(default_factory=list)
    references: list[Reference] = field(default_factory=list)

    @property
    def groups(self) -> list[str]:
        """Every subscription group id some rule targets."""
        return sorted({r.target.name for r in self.rules if r.target.kind == "group"})

    def apply(self, webhook: Webhook, received_at: float | None = None) -> Mapped | Skipped:
        """Map one decoded webhook to the Braze changes it asks for, or the reason it asks none.

        `received_at` (epoch seconds) is when the gateway accepted it: a choice dated later than
        that plus `max_clock_skew_s` is dated at that time, and so are an undated one and an
        erasure, since a sender's clock must never decide whether a withdrawal counts.
        """
        if not webhook.known:
            return Skipped("ignored")
        if webhook.from_gateway:
            return Skipped("echo")  # Braze told us first; sending it back would loop
        entity = webhook.subject
        if entity is None or webhook.type == "event.deleted":
            return Skipped("deleted")
        person = self._person(webhook.type, entity)
        if not person:
            return Skipped("no_identity")
        regulation = entity.regulation or webhook.regulation or "gdpr"
        if regulation not in self.options.regulations:
            return Skipped("regulation")
        at, clamped = self._date(entity, received_at)
        if webhook.type == "user.deleted":
            # Erasure is dated at its arrival (the entity's own date is the profile's, often
            # older than the last choice applied); the dispatcher also lifts it above that.
            erased_at = max(at, received_at) if received_at is not None else at
            return self._deleted(person, erased_at, entity.id)
        if webhook.type.startswith("event.") and (entity.status or "confirmed") != "confirmed":
            return Skipped("not_confirmed")
        changes, origins = self.changes_with_origins(entity)
        if not changes:
            return Skipped("no_rule")
        return Mapped(
            self.identity, person, changes, at, clamped=clamped, origins=origins, event_id=entity.id
        )

    def person(self, webhook: Webhook) -> str | None:
        """Who a webhook is about, per `[identity]`, or None."""
        entity = webhook.subject
        return self._person(webhook.type, entity) if entity is not None else None

    def _date(self, entity: Entity, received_at: float | None) -> tuple[float, bool]:
        """The choice's time, and whether it had to be clamped to the arrival plus the skew."""
        stamp = entity.updated_at or entity.created_at
        if stamp is None:
            return (received_at if received_at is not None else 0.0), False
        if stamp.tzinfo is None:
            stamp = stamp.replace(tzinfo=UTC)  # Didomi writes UTC; never the host's time zone
        try:
            at = stamp.timestamp()
        except (OverflowError, OSError, ValueError):  # year 9999 with an offset, and the like
            at = _LAST_SECOND
        if received_at is not None and at > received_at + self.options.max_clock_skew_s:
            # At the arrival itself, not at the bound: dated at the bound, it would still make
            # every withdrawal of the next `max_clock_skew_s` seconds stale.
            return received_at, True
        return at, False

    def changes(self, entity: Entity) -> dict[Target, State]:
        """The target states one entity's consents ask for, conflicts resolved."""
        return self.changes_with_origins(entity)[0]

    def changes_with_origins(self, entity: Entity) -> tuple[dict[Target, State], dict[Target, str]]:
        """`changes`, and per target the origin ("file:line") of the rule whose state won."""
        changes: dict[Target, State] = {}
        origins: dict[Target, str] = {}
        purposes = entity.consents.purposes if entity.consents else None
        for purpose in purposes or ():
            for rule in self.by_purpose.get(purpose.id, ()):
                if purpose.enabled is not None:
                    state = rule.chosen if purpose.enabled else rule.refused
                    _put(changes, origins, rule, state)
            preferences = self.by_preference.get(purpose.id)
            if not preferences:
                continue
            for preference, rules in preferences.items():
                if purpose.enabled is False:
                    chosen: set[str] = set()  # no consent to the purpose, none through its values
                else:
                    present = purpose.values.get(preference) if purpose.values else None
                    if present is None:
                        continue
                    chosen = {v.strip() for v in (present.value or "").split(",")}
                for rule in rules:
                    _put(
                        changes,
                        origins,
                        rule,
                        rule.chosen if rule.value in chosen else rule.refused,
                    )
        return changes, origins

    def _person(self, kind: str, entity: Entity) -> str | None:
        holder: Any = entity if kind.startswith("user.") else entity.user
        if holder is None:
            return None
        name = self.identity_field
        if name.startswith("metadata."):
            metadata = holder.metadata or {}
            value = metadata.get(name[9:])
            return value if isinstance(value, str) and value else None
        value = getattr(holder, name, None)
        return value if isinstance(value, str) and value else None

    def _deleted(self, person: str, at: float, event_id: str | None) -> Mapped | Skipped:
        mode = self.options.on_user_deleted
        if mode == "delete":
            return Mapped(
                self.identity, person, {}, at, delete=True, erasure=True, event_id=event_id
            )
        if mode == "unsubscribe":
            changes: dict[Target, State] = {EMAIL: "unsubscribed"}
            changes.update({Target.group(g): "unsubscribed" for g in self.groups})
            origins = dict.fromkeys(changes, ON_USER_DELETED)
            return Mapped(
                self.identity, person, changes, at, erasure=True, origins=origins, event_id=event_id
            )
        return Skipped("deleted")

    def summary(self) -> str:
        """A one-screen description of the rule set, for `gateway check`."""
        targets: dict[str, int] = {}
        for rule in self.rules:
            targets[rule.target] = targets.get(rule.target, 0) + 1
        purposes = sorted(set(self.by_purpose) | set(self.by_preference))
        lines = [
            f"{len(self.rules)} rules in {len(self.files)} file(s), {len(self.tests)} test(s)",
            f"identity: Braze {self.identity} <- Didomi user {self.identity_field}",
            "rules per target:",
            *(f"  {target:<48} {n}" for target, n in sorted(targets.items())),
            f"purposes referenced ({len(purposes)}): {', '.join(purposes)}",
        ]
        return "\n".join(lines)


def _put(
    changes: dict[Target, State], origins: dict[Target, str], rule: Rule, state: State | None
) -> None:
    if state is None:
        return
    target = rule.target
    current = changes.get(target)
    if current is None or _RANK[state] > _RANK[current]:
        changes[target] = state
        origins[target] = rule.origin


# ---------------------------------------------------------------------------
# Loading and compiling.


def load_rules(directory: str | Path, options: Options | None = None) -> RuleSet:
    """Read every `*.toml` in `directory` into one RuleSet; ConfigError lists every problem."""
    directory = Path(directory)
    problems: list[Problem] = []
    try:
        paths = sorted(p for p in directory.iterdir() if p.suffix == ".toml" and p.is_file())
    except OSError as exc:
        raise ConfigError(
            [Problem(str(directory), f"cannot read the mappings folder: {exc.strerror or exc}")]
        ) from None
    if not paths:
        raise ConfigError([Problem(str(directory), "no *.toml mapping files in this folder")])
    ruleset = RuleSet(options=options or Options())
    seen: dict[tuple[str, str | None, str | None, str | None], str] = {}
    identity_at: str | None = None
    for path in paths:
        located = Located(str(path))
        ruleset.files.append(str(path))
        raw = read_toml(path, located)
        if raw is not None:
            identity_at = _compile_file(raw, path, located, ruleset, seen, identity_at)
        problems.extend(located.problems)
    if not ruleset.rules and not problems:
        problems.append(Problem(str(directory), "the mapping files hold no [[map]] rules"))
    if problems:
        raise ConfigError(problems)
    return ruleset


def _compile_file(
    raw: dict[str, Any],
    path: Path,
    located: Located,
    ruleset: RuleSet,
    seen: dict[tuple[str, str | None, str | None, str | None], str],
    identity_at: str | None,
) -> str | None:
    for key in raw:
        if key not in ("identity", "map", "test"):
            located.add(
                (key,), f"unknown key {key!r}; a mapping file holds [identity], [[map]], [[test]]"
            )
    if "identity" in raw:
        spec = convert(raw["identity"], IdentitySpec, located, ("identity",))
        here = f"{path}:{located.index.line(('identity',)) or 1}"
        if identity_at is not None:
            located.add(("identity",), f"a second [identity]; the first is at {identity_at}")
        elif spec is not None:
            identity_at = here
            _set_identity(spec, located, ruleset)
    for i, entry in enumerate(_array(raw, "map", located)):
        rule = convert(entry, MapRule, located, ("map", i))
        if rule is not None:
            _add_rule(rule, ("map", i), located, ruleset, seen)
    for i, entry in enumerate(_array(raw, "test", located)):
        test = convert(entry, MappingTest, located, ("test", i))
        if test is not None:
            origin = f"{path}:{located.index.line(('test', i)) or 1}"
            ruleset.tests.append(LoadedTest(test, path.parent, origin))
    return identity_at


def _array(raw: dict[str, Any], key: str, located: Located) -> Iterable[Any]:
    value = raw.get(key, [])
    if not isinstance(value, list):
        located.add((key,), f"{key} must be an array of tables: write [[{key}]]")
        return ()
    return value


def _set_identity(spec: IdentitySpec, located: Located, ruleset: RuleSet) -> None:
    given = [(k, v) for k, v in (("external_id", spec.external_id), ("email", spec.email)) if v]
    if len(given) != 1:
        located.add(("identity",), "[identity] names exactly one of external_id or email")
        return
    kind, name = given[0]
    if name not in IDENTITY_FIELDS and not (name.startswith("metadata.") and len(name) > 9):
        located.add(
            ("identity", kind),
            f"unknown Didomi user field {name!r}; use organization_user_id, id or metadata.KEY",
        )
        return
    ruleset.identity = "external_id" if kind == "external_id" else "email"
    ruleset.identity_field = name


def _add_rule(
    rule: MapRule,
    where: tuple[str, int],
    located: Located,
    ruleset: RuleSet,
    seen: dict[tuple[str, str | None, str | None, str | None], str],
) -> None:
    origin = f"{located.file}:{located.index.line(where) or 1}"
    if not rule.purpose:
        what = "a preference" if rule.preference else "a rule"
        located.add(where, f'{what} without a purpose: add purpose = "<Didomi purpose id>"')
        return
    if (rule.preference is None) != (rule.value is None):
        located.add(where, "a preference rule needs both `preference` and `value`")
        return
    compiled = _target(rule, where, located)
    if compiled is None:
        return
    target, kind, chosen, refused = compiled
    states = _STATES[kind]
    valid = True
    for name, override in (("on_chosen", rule.on_chosen), ("on_refused", rule.on_refused)):
        if override is None or override == "none":
            continue
        if override not in states or isinstance(override, bool) != (kind == "attribute"):
            allowed = ", ".join(sorted(f"{s!r}".lower() for s in states)) + ", 'none'"
            located.add(
                (*where, name), f"{name} = {override!r} is not valid for {rule.to}; use {allowed}"
            )
            valid = False
    if not valid:
        return
    if rule.on_chosen is not None:
        chosen = None if rule.on_chosen == "none" else rule.on_chosen
    if rule.on_refused is not None:
        refused = None if rule.on_refused == "none" else rule.on_refused
    key = (target, rule.purpose, rule.preference, rule.value)  # compiled: group ids lowercased
    if key in seen:
        located.add(where, f"duplicate rule: the same target, purpose and value as {seen[key]}")
        return
    seen[key] = origin
    compiled_rule = Rule(target, chosen, refused, rule.value, origin)
    ruleset.rules.append(compiled_rule)
    ruleset.references.extend(_references(rule, target, where, located))
    if rule.preference is None:
        ruleset.by_purpose.setdefault(rule.purpose, []).append(compiled_rule)
    else:
        prefs = ruleset.by_preference.setdefault(rule.purpose, {})
        prefs.setdefault(rule.preference, []).append(compiled_rule)


def _references(
    rule: MapRule, target: Target, where: tuple[str, int], located: Located
) -> list[Reference]:
    """The ids a compiled rule names, each at its own key's line."""

    def at(key: str) -> int:
        return located.index.line((*where, key)) or 1

    assert rule.purpose is not None  # _add_rule refused a rule without one
    refs = [Reference("purpose", rule.purpose, located.file, at("purpose"))]
    if target.kind == "group":  # the id as the gateway sends it (lower case)
        refs.append(Reference("group", target.name, located.file, at("to")))
    if rule.preference is not None and rule.value is not None:
        refs.append(
            Reference("preference", rule.preference, located.file, at("preference"), rule.purpose)
        )
        refs.append(
            Reference("value", rule.value, located.file, at("value"), rule.purpose, rule.preference)
        )
    return refs


def _target(
    rule: MapRule, where: tuple[str, int], located: Located
) -> tuple[Target, str, State | None, State | None] | None:
    to = rule.to
    if to == "OPTED_IN":
        return EMAIL, "email", "opted_in", "unsubscribed"
    if to == "UNSUBSCRIBED":
        return EMAIL, "email", "unsubscribed", None
    if _GROUP_ID.match(to):
        return Target.group(to), "group", "subscribed", "unsubscribed"
    if to.startswith("attribute:"):
        name = to[10:]
        if not _ATTRIBUTE.match(name):
            located.add((*where, "to"), f"{to!r}: an attribute name needs letters, digits or _")
            return None
        if name in BRAZE_PROFILE_FIELDS:
            located.add((*where, "to"), f"{to!r} would overwrite Braze's profile field {name!r}")
            return None
        return Target.attribute(name), "attribute", True, False
    located.add(
        (*where, "to"),
        f"unknown `to` {to!r}: use OPTED_IN, UNSUBSCRIBED, a subscription group id (UUID) "
        "or attribute:NAME",
    )
    return None


def event_from_test(test: LoadedTest) -> bytes:
    """The webhook body a `[[test]]` names: a file next to the mapping, or an inline table."""
    if isinstance(test.spec.event, dict):
        return msgspec.json.encode(test.spec.event)
    return (test.base / test.spec.event).read_bytes()
