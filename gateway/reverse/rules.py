"""The `[[map]]` rules read backwards: Braze subscription changes as Didomi consent edits.

Forward, a rule says which Braze state a Didomi choice produces (DESIGN.md section 5). Read
backwards, a Braze state names a Didomi choice only for the table's symmetric rules, those whose
"chosen" and "refused" states are both written and differ:

    rule                           Braze state      Didomi edit
    OPTED_IN, purpose              opted_in         purpose enabled: true
                                   unsubscribed     purpose enabled: false
                                   subscribed       none (see below)
    group, purpose + value         subscribed       value added to the preference, and the
                                                    purpose enabled: true (forward, a refused
                                                    purpose unsubscribes all its groups)
                                   unsubscribed     value removed; the other values are kept
    group, purpose                 subscribed       purpose enabled: true
                                   unsubscribed     purpose enabled: false
    OPTED_IN, purpose + value      opted_in         value added, purpose enabled: true
                                   unsubscribed     value removed

`subscribed` is Braze's neutral global state, the one every new profile starts in: it is neither
a consent nor a withdrawal, and no default rule produces it forward, so it changes nothing.

Not reversible, each reported with its reason by `ReverseRules.unreversible`: `UNSUBSCRIBED`
rules (a Braze unsubscribe cannot tell which Didomi value was meant), `attribute:` rules (no
Braze shape reports attributes), rules with `on_chosen`/`on_refused` overrides, and every rule
when `[identity]` is not `organization_user_id` (the reverse write names the Didomi user by it).

Inside one report, as forward, withdrawal wins: `false` beats `true`, a removal beats an
addition, and a purpose being disabled takes no additions.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from gateway.reverse.braze_webhooks import BrazeChange
from gateway.rules.mappings import EMAIL, Rule, RuleSet, State, Target
from gateway.shapes.webhooks import GATEWAY_SOURCE, Purpose

# The tag every reverse write carries in its `metadata`, so the forward path can tell its own
# echoes from a person's choices (DESIGN.md section 7): one constant, where the forward path
# looks for it.
SOURCE = GATEWAY_SOURCE
# Forward defaults per target kind; any other pair was written with on_chosen/on_refused.
_OPTED_IN: tuple[State | None, State | None] = ("opted_in", "unsubscribed")
_UNSUBSCRIBED: tuple[State | None, State | None] = ("unsubscribed", None)
_GROUP: tuple[State | None, State | None] = ("subscribed", "unsubscribed")


@dataclass(frozen=True, slots=True)
class _Backward:
    """One reversible rule, indexed by its Braze target."""

    purpose: str
    preference: str | None
    value: str | None
    chosen: State  # the Braze state that means the Didomi choice was made
    refused: State  # the Braze state that means it was refused


@dataclass(frozen=True, slots=True)
class PurposeEdit:
    """What one report asks of one Didomi purpose: its `enabled`, and values per preference."""

    enabled: bool | None = None
    add: dict[str, frozenset[str]] = field(default_factory=dict)
    remove: dict[str, frozenset[str]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ConsentEdit:
    """The Didomi choices one Braze report asks for, for one person, conflicts resolved."""

    person: str  # the Didomi user's organization_user_id
    purposes: dict[str, PurposeEdit]
    targets: frozenset[Target]  # the Braze targets it came from, for stale checks
    at: float  # epoch seconds of the latest change it holds

    def apply(self, current_purposes: list[Purpose] | None) -> list[dict[str, Any]]:
        """The `consents.purposes` to POST, given the person's current Didomi purposes.

        A preference's value is computed from the person's current one: its values in their
        order, less the removed ones, then the added ones, sorted. A preference whose value
        would not change is left out (an unsubscribe must not turn "no choice" into "chose
        none"), and so is a purpose left with nothing to write: `[]` means nothing to send.
        """
        current = {p.id: p for p in current_purposes or ()}
        out: list[dict[str, Any]] = []
        for pid in sorted(self.purposes):
            edit = self.purposes[pid]
            item: dict[str, Any] = {"id": pid}
            if edit.enabled is not None:
                item["enabled"] = edit.enabled
            values: dict[str, dict[str, str]] = {}
            for preference in sorted(set(edit.add) | set(edit.remove)):
                before = _chosen(current.get(pid), preference)
                removed = edit.remove.get(preference, frozenset())
                after = [v for v in before or () if v not in removed]
                after += sorted(edit.add.get(preference, frozenset()) - set(after))
                if before is None and not after:
                    continue  # no choice before, none after: leave the preference unset
                if after != before:
                    values[preference] = {"value": ",".join(after)}
            if values:
                item["values"] = values
            if len(item) > 1:
                out.append(item)
        return out

    def body(self, current_purposes: list[Purpose] | None) -> dict[str, Any]:
        """The body of `POST /consents/events` (without the caller's event `id` or `regulation`)."""
        return {
            "user": {"organization_user_id": self.person},
            "consents": {"purposes": self.apply(current_purposes)},
            "metadata": {"source": SOURCE},
        }


@dataclass(frozen=True, slots=True)
class ReverseRules:
    """A rule set compiled once for reading Braze changes back into Didomi choices."""

    by_target: dict[Target, tuple[_Backward, ...]]
    unreversible: list[tuple[str, str]]  # (rule origin "file:line", why it cannot be reversed)
    identity: Literal["external_id", "email"]
    # Per target, the origins ("file:line") of the rules read backwards for it, for the audit.
    origins: dict[Target, str] = field(default_factory=dict)

    @classmethod
    def from_ruleset(cls, rules: RuleSet) -> ReverseRules:
        """Compile the reversible rules of `rules`, and the reason for every other one."""
        where: dict[int, tuple[str, str | None]] = {}  # id(rule) -> (purpose, preference)
        for purpose, purpose_rules in rules.by_purpose.items():
            for rule in purpose_rules:
                where[id(rule)] = (purpose, None)
        for purpose, preferences in rules.by_preference.items():
            for preference, preference_rules in preferences.items():
                for rule in preference_rules:
                    where[id(rule)] = (purpose, preference)
        identity_reason = _identity_reason(rules.identity_field)
        by_target: dict[Target, list[_Backward]] = {}
        unreversible: list[tuple[str, str]] = []
        for rule in rules.rules:
            reason = _rule_reason(rule) or identity_reason
            if reason is not None:
                unreversible.append((rule.origin, reason))
                continue
            # _rule_reason let through only the table's pairs, where both states are written.
            assert rule.chosen is not None
            assert rule.refused is not None
            pid, pref = where[id(rule)]
            backward = _Backward(pid, pref, rule.value, rule.chosen, rule.refused)
            by_target.setdefault(rule.target, []).append(backward)
        origins: dict[Target, list[str]] = {}
        unreversed = {origin for origin, _ in unreversible}
        for rule in rules.rules:
            if rule.origin not in unreversed:
                origins.setdefault(rule.target, []).append(rule.origin)
        return cls(
            {target: tuple(found) for target, found in by_target.items()},
            unreversible,
            rules.identity,
            {target: ", ".join(found) for target, found in origins.items()},
        )

    def person(self, changes: Iterable[BrazeChange]) -> str | None:
        """The Didomi organization_user_id the changes name, per `[identity]`; None if none."""
        for change in changes:
            name = change.external_id if self.identity == "external_id" else change.email
            if name:
                return name
        return None

    def edit(self, changes: list[BrazeChange]) -> ConsentEdit | None:
        """The Didomi edit one Braze report asks for; None when no rule maps it or no person.

        Tell the two apart with `person(changes)`: None there means the report does not name
        the person the way `[identity]` does (say, an email-only change with an external id).
        """
        person = self.person(changes)
        if person is None or not changes:
            return None
        enabled: dict[str, bool] = {}
        add: dict[tuple[str, str], set[str]] = {}
        remove: dict[tuple[str, str], set[str]] = {}
        targets: set[Target] = set()
        for change in changes:
            for rule in self.by_target.get(change.target, ()):
                if change.state == rule.chosen:
                    choose = True
                elif change.state == rule.refused:
                    choose = False
                else:
                    continue  # email `subscribed`: Braze's neutral state names no choice
                targets.add(change.target)
                if rule.preference is None:
                    _vote(enabled, rule.purpose, choose)
                    continue
                assert rule.value is not None  # a preference rule always names its value
                key = (rule.purpose, rule.preference)
                if choose:
                    add.setdefault(key, set()).add(rule.value)
                    _vote(enabled, rule.purpose, True)  # a subscription needs the purpose
                else:
                    remove.setdefault(key, set()).add(rule.value)
        if not targets:
            return None
        purposes: dict[str, PurposeEdit] = {}
        for pid in sorted({p for p, _ in add} | {p for p, _ in remove} | set(enabled)):
            state = enabled.get(pid)
            removes = {pref: frozenset(v) for (p, pref), v in remove.items() if p == pid}
            adds: dict[str, frozenset[str]] = {}
            if state is not False:  # a refused purpose takes no values, as forward
                for (p, pref), values in add.items():
                    kept = frozenset(values - removes.get(pref, frozenset()))
                    if p == pid and kept:
                        adds[pref] = kept
            purposes[pid] = PurposeEdit(state, adds, removes)
        return ConsentEdit(person, purposes, frozenset(targets), max(c.at for c in changes))


def _vote(enabled: dict[str, bool], purpose: str, choose: bool) -> None:
    enabled[purpose] = enabled.get(purpose, True) and choose  # false wins: withdrawal is kept


def _chosen(purpose: Purpose | None, preference: str) -> list[str] | None:
    """A preference's chosen values, in order and without repeats; None if never chosen."""
    present = purpose.values.get(preference) if purpose and purpose.values else None
    if present is None:
        return None
    out: list[str] = []
    for value in (present.value or "").split(","):
        value = value.strip()
        if value and value not in out:
            out.append(value)
    return out


def _rule_reason(rule: Rule) -> str | None:
    """Why one rule cannot be read backwards, whatever the identity; None if it can."""
    pair = (rule.chosen, rule.refused)
    if rule.target.kind == "attribute":
        return "an attribute rule: neither a webhook step nor Currents reports custom attributes"
    if rule.target == EMAIL and pair == _UNSUBSCRIBED:
        return (
            "an UNSUBSCRIBED rule: Braze's unsubscribe cannot tell which Didomi value "
            "(or purpose) was meant"
        )
    if pair != (_OPTED_IN if rule.target == EMAIL else _GROUP):
        return (
            "on_chosen/on_refused override the table: the Braze state no longer names "
            "one Didomi choice"
        )
    return None


def _identity_reason(identity_field: str) -> str | None:
    if identity_field == "organization_user_id":
        return None
    what = "Didomi's own user `id`" if identity_field == "id" else f"`{identity_field}`"
    return (
        f"[identity] names the person by {what}; the reverse write names the Didomi user "
        "by organization_user_id, so no rule can be reversed"
    )
