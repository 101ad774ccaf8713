"""`mappings/*.toml` compiled into a `RuleSet`; the one import path for the rules.

Each problem is reported at its line; `rules.records` holds the rules' parts and `rules.ruleset`
applies them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import msgspec

from gateway.config.located import Located, convert, read_toml
from gateway.errors import ConfigError, Problem
from gateway.rules.records import (
    EMAIL,
    ERASED,
    ON_USER_DELETED,
    Expect,
    IdentitySpec,
    LoadedTest,
    Mapped,
    MappingTest,
    MapRule,
    Options,
    Reference,
    Rule,
    Skipped,
    State,
    Target,
    TargetKind,
    braze_side,
    options_of,
)
from gateway.rules.ruleset import RuleSet

# The rules' public names, wherever they are defined: callers import them from here.
__all__ = [
    "EMAIL",
    "ERASED",
    "ON_USER_DELETED",
    "Expect",
    "IdentitySpec",
    "LoadedTest",
    "MapRule",
    "Mapped",
    "MappingTest",
    "Options",
    "Reference",
    "Rule",
    "RuleSet",
    "Skipped",
    "State",
    "Target",
    "TargetKind",
    "braze_side",
    "event_from_test",
    "load_rules",
    "options_of",
]

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
IDENTITY_FIELDS = ("organization_user_id", "id")


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
