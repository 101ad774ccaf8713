"""`RuleSet`: the compiled rules, indexed to map one Didomi webhook to the Braze changes it asks.

Rules are indexed by purpose id (and preference id), so mapping one event costs a dict look-up
per purpose it carries, however many rules there are. Conflicts inside one event resolve towards
withdrawal: `unsubscribed` (or `false`) wins, so consent withdrawal is never lost.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC
from typing import TYPE_CHECKING, Any, Literal

from gateway.rules.records import EMAIL, ON_USER_DELETED, Mapped, Options, Skipped, Target
from gateway.shapes.webhooks import Entity, Webhook

if TYPE_CHECKING:
    from gateway.rules.records import LoadedTest, Reference, Rule, State

# Higher rank wins a conflict inside one event: the less permissive choice.
_RANK: dict[State, int] = {"opted_in": 0, "subscribed": 1, "unsubscribed": 2, True: 0, False: 2}
_LAST_SECOND = 253_402_300_799.0  # 9999-12-31T23:59:59Z, for dates past what a float holds


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
