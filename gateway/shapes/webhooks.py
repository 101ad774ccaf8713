"""Didomi webhook bodies: their shapes as lenient msgspec Structs, and the one decoder for them.

Didomi adds fields over time, so these Structs ignore what they do not name; they type only what
the gateway reads. A body that breaks the minimal shape of DESIGN.md section 8 raises
`WebhookError`, whose message is safe to return to the sender.
"""

from __future__ import annotations

import re
import uuid
from datetime import datetime
from typing import Any

import msgspec

from gateway.errors import GatewayError
from gateway.words import Direction

# The six types Didomi sends; one endpoint takes them all, routed on `type`.
EVENT_TYPES = (
    "event.created",
    "event.updated",
    "event.deleted",
    "user.created",
    "user.updated",
    "user.deleted",
)
_KNOWN = frozenset(EVENT_TYPES)
# How the consent events the gateway writes to Didomi (the reverse path) are recognised when
# Didomi's webhook reports them back: their metadata tag, or their id's first group.
GATEWAY_SOURCE = "didomi-braze-gateway"
GATEWAY_ID_MARK = "db9a7e00-"
_ID_NAMESPACE = uuid.UUID("6f1c3e1a-8d1e-4f4e-9a51-0d3b7c2e9f10")


def gateway_event_id(seed: str) -> str:
    """A UUID-shaped id for a consent event the gateway writes, the same for the same seed.

    Deterministic, so a retried write carries the same id and Didomi records it once;
    marked, so the webhook Didomi sends back for it is known as the gateway's own.
    """
    tail = str(uuid.uuid5(_ID_NAMESPACE, seed))[len(GATEWAY_ID_MARK) :]
    return GATEWAY_ID_MARK + tail


# What the reverse routes store: a Braze webhook step's body, or one Braze Currents event.
BRAZE_TYPES = ("braze.step", "braze.currents")


def direction_of(kind: str) -> Direction:
    """Which way a stored webhook of this type goes: Didomi's to Braze, Braze's to Didomi."""
    return "to_didomi" if kind.startswith("braze.") else "to_braze"


MAX_DEPTH = 64


class Lenient(msgspec.Struct, frozen=True, kw_only=True):
    """Base of every Didomi shape: unknown fields are ignored, never fatal."""


class PreferenceValue(Lenient, frozen=True):
    value: str | None = None


class Purpose(Lenient, frozen=True):
    id: str
    enabled: bool | None = None
    values: dict[str, PreferenceValue] | None = None


class Consents(Lenient, frozen=True):
    purposes: list[Purpose] | None = None


class DidomiUser(Lenient, frozen=True):
    id: str | None = None
    organization_user_id: str | None = None
    metadata: dict[str, Any] | None = None


# The regulation ids Didomi documents (developers.didomi.io, Data Manager > Regulations), in its
# order. Didomi adds regulations over time, so another id is warned about, never refused.
DOCUMENTED_REGULATIONS = ("gdpr", "cpra", "cpa", "ctdpa", "vcdpa")


class Entity(Lenient, frozen=True):
    """A consent event or a user, whichever the webhook carries."""

    id: str | None = None
    created_at: datetime | None = None
    updated_at: datetime | None = None
    organization_id: str | None = None
    regulation: str | None = None
    status: str | None = None
    user: DidomiUser | None = None  # consent events name their user here
    organization_user_id: str | None = None  # user entities carry it themselves
    metadata: dict[str, Any] | None = None
    consents: Consents | None = None


class Source(Lenient, frozen=True):
    id: str | None = None
    type: str | None = None


class Parameters(Lenient, frozen=True):
    entity: Entity | None = None
    old_entity: Entity | None = None
    new_entity: Entity | None = None
    source: Source | None = None


class Webhook(Lenient, frozen=True):
    """One Didomi webhook request body."""

    type: str
    parameters: Parameters
    regulation: str | None = None

    @property
    def subject(self) -> Entity | None:
        """The entity whose state this webhook reports: `new_entity` for updates."""
        p = self.parameters
        if self.type.endswith(".updated"):
            return p.new_entity if p.new_entity is not None else p.entity
        return p.entity

    @property
    def from_gateway(self) -> bool:
        """Whether this reports a choice the gateway itself wrote to Didomi (an echo)."""
        entity = self.subject
        if entity is not None:
            if (entity.metadata or {}).get("source") == GATEWAY_SOURCE:
                return True
            if entity.id is not None and entity.id.startswith(GATEWAY_ID_MARK):
                return True
        source = self.parameters.source  # a user.updated names the event that changed the user
        return bool(source and source.id and source.id.startswith(GATEWAY_ID_MARK))

    @property
    def known(self) -> bool:
        """Whether the gateway handles this event type at all."""
        return self.type in _KNOWN

    def dedupe_key(self) -> str | None:
        """Type, entity id and update time (or source event id); equal keys are duplicates."""
        entity = self.subject
        if entity is None or entity.id is None:
            return None
        if self.type == "user.updated" and self.parameters.source and self.parameters.source.id:
            version = self.parameters.source.id
        else:
            stamp = entity.updated_at or entity.created_at
            version = stamp.isoformat() if stamp else ""
        return f"{self.type}|{entity.id}|{version}"


class WebhookError(GatewayError, ValueError):
    """A webhook body is not JSON, or not of Didomi's shape; the message says where."""


_decoder = msgspec.json.Decoder(Webhook)
_STRINGS = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_NOT_BRACKETS = re.compile(rb"[^\[\]{}]+")


def nesting_depth(body: bytes) -> int:
    """How deeply arrays and objects nest in a JSON text, ignoring brackets inside strings."""
    brackets = _NOT_BRACKETS.sub(b"", _STRINGS.sub(b"", body))
    depth = deepest = 0
    for byte in brackets:
        if byte in b"[{":
            depth += 1
            if depth > deepest:
                deepest = depth
        else:
            depth -= 1
    return deepest


def decode(body: bytes) -> Webhook:
    """Decode a webhook body, raising WebhookError with a reason a sender can act on."""
    if not body.strip():
        raise WebhookError("the body is empty; send a Didomi webhook as a JSON object")
    # Nesting never exceeds the number of openers: two counts spare most bodies the scan.
    if body.count(b"[") + body.count(b"{") > MAX_DEPTH and nesting_depth(body) > MAX_DEPTH:
        raise WebhookError(f"JSON nests deeper than {MAX_DEPTH} levels")
    try:
        webhook = _decoder.decode(body)
    except msgspec.DecodeError as exc:
        # Tell "not JSON" apart from "JSON of the wrong shape": the sender fixes different things.
        try:
            msgspec.json.decode(body)
        except msgspec.DecodeError:
            raise WebhookError(f"the body is not valid JSON: {exc}") from None
        raise WebhookError(f"the body is not a Didomi webhook: {exc}") from None
    if webhook.known and webhook.subject is None:
        where = "new_entity" if webhook.type.endswith(".updated") else "entity"
        raise WebhookError(f"the body is not a Didomi webhook: `$.parameters.{where}` is missing")
    return webhook
