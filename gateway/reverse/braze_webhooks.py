"""Braze bodies for the reverse path, decoded into one normal form: a list of `BrazeChange`.

Two shapes reach the gateway (DESIGN.md section 9):

- a campaign or Canvas *webhook step*, whose JSON body Braze renders from the Liquid template
  the README shows: `external_id`, `email`, `email_subscribe`, `groups`, `time`;
- *Currents*' Custom HTTP connector: `{"events": [...]}`, batches of up to 100 events, of which
  the gateway reads `users.behaviors.subscription.GlobalStateChange` and
  `users.behaviors.subscriptiongroup.StateChange`.

Field names are Braze's, as its docs and its own sample events spell them:
https://www.braze.com/docs/user_guide/data/distribution/braze_currents/setting_up_currents/custom_http_connector/
(the envelope, `event_type`/`id`/`time`/`user`/`properties`, "400 splits the batch into
size-1 batches"), the "Message engagement events" glossary
https://www.braze.com/docs/user_guide/data/distribution/braze_currents/event_glossary/message_engagement_events/
(`subscription_status`, `subscription_group_id`, `state_change_source`, `email_address`,
`channel`), and https://github.com/Appboy/currents-examples, `sample-data/Custom HTTP/users/
behaviors/subscription/GlobalStateChange.json` and `.../subscriptiongroup/StateChange.json`.
The Liquid states come from https://www.braze.com/docs/api/endpoints/preference_center/
post_create_preference_center/ ("Liquid tags": `{{subscribed_state.${email_global}}}` gives
`opted_in`, `subscribed` or `unsubscribed`; a group's gives `subscribed` or `unsubscribed`).

Braze adds fields without notice, so every Struct here ignores what it does not name. A body the
gateway cannot use raises `BrazeWebhookError`, whose message is safe to return to Braze.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass, field
from typing import TypeVar

import msgspec

from gateway.errors import GatewayError
from gateway.rules.mappings import EMAIL, Target
from gateway.shapes.webhooks import MAX_DEPTH, nesting_depth

GLOBAL_STATE_CHANGE = "users.behaviors.subscription.GlobalStateChange"
GROUP_STATE_CHANGE = "users.behaviors.subscriptiongroup.StateChange"
CURRENTS_EVENT_TYPES = (GLOBAL_STATE_CHANGE, GROUP_STATE_CHANGE)
# Braze sends this header on every Currents request; version 1 is the only one there has been.
# Another is read all the same (unknown fields are ignored) and counted, never refused: Braze
# answers a refused batch by resending it one event at a time and dropping what fails again.
CURRENTS_VERSION_HEADER = "Braze-Currents-Version"
CURRENTS_VERSION = "1"

EMAIL_STATES = frozenset({"opted_in", "subscribed", "unsubscribed"})
GROUP_STATES = frozenset({"subscribed", "unsubscribed"})
# Higher rank wins when one report names a target twice: withdrawal is never lost.
_RANK = {"opted_in": 0, "subscribed": 1, "unsubscribed": 2}
_GROUP_ID = re.compile(
    r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"
)
_EPOCH = re.compile(r"^[0-9]+(?:\.[0-9]+)?$")
_T = TypeVar("_T")


class BrazeWebhookError(GatewayError, ValueError):
    """A Braze body is not JSON, or not of a shape the gateway reads; the message says where."""


@dataclass(frozen=True, slots=True)
class BrazeChange:
    """One Braze target's new state for one person, whichever Braze shape reported it."""

    external_id: str | None
    email: str | None
    target: Target  # mappings.EMAIL or Target.group(id)
    state: str  # "opted_in" | "subscribed" | "unsubscribed"
    at: float  # epoch seconds
    source: str | None  # Currents' state_change_source; None for a webhook step


@dataclass(frozen=True, slots=True)
class Skipped:
    """A Currents event the gateway does not write back, whom it names, and why."""

    event_type: str
    event_id: str | None
    external_id: str | None
    email: str | None
    reason: str  # short and fixed, for the audit trail; never a person


@dataclass(frozen=True, slots=True)
class CurrentsBatch:
    """One Currents request split into the events the gateway keeps, and counts of the rest."""

    # (dedupe key, that event's own JSON bytes, its changes), in batch order
    events: list[tuple[str, bytes, list[BrazeChange]]]
    ignored: int  # events of other types or channels
    invalid: int  # events of our types that do not decode; skipped so the batch still succeeds
    skipped: list[Skipped] = field(default_factory=list)  # the ignored ones, for the audit


# ---------------------------------------------------------------------------
# The shapes.


class BrazeLenient(msgspec.Struct, frozen=True, kw_only=True):
    """Base of every Braze shape: unknown fields are ignored, never fatal."""


class StepBody(BrazeLenient, frozen=True):
    """A webhook step's body, as Braze renders the README's Liquid template."""

    external_id: str | None = None
    email: str | None = None
    email_subscribe: str | None = None
    groups: dict[str, str] | None = None
    time: str | float | None = None


class CurrentsUser(BrazeLenient, frozen=True):
    user_id: str | None = None  # Braze's own id: the Didomi side cannot name a person by it
    external_user_id: str | None = None


class CurrentsProperties(BrazeLenient, frozen=True):
    subscription_status: str | None = None
    subscription_group_id: str | None = None
    state_change_source: str | None = None
    email_address: str | None = None
    channel: str | None = None


class CurrentsEvent(BrazeLenient, frozen=True):
    """One Currents event of the two types the gateway reads."""

    event_type: str
    id: str
    time: float
    user: CurrentsUser | None = None
    properties: CurrentsProperties | None = None


class _Head(BrazeLenient, frozen=True):
    # Only what routing needs, so an event of another type is never decoded further.
    event_type: str | None = None
    id: str | None = None


class _Whom(BrazeLenient, frozen=True):
    # Whom an ignored event names, so its audit record is found under that person.
    user: CurrentsUser | None = None
    properties: CurrentsProperties | None = None


class _Envelope(BrazeLenient, frozen=True):
    # Raw keeps each event's own bytes: the spool stores one event per row, exactly as sent.
    events: list[msgspec.Raw]


_step_decoder = msgspec.json.Decoder(StepBody)
_event_decoder = msgspec.json.Decoder(CurrentsEvent)
_head_decoder = msgspec.json.Decoder(_Head)
_whom_decoder = msgspec.json.Decoder(_Whom)
_envelope_decoder = msgspec.json.Decoder(_Envelope)


# ---------------------------------------------------------------------------
# The webhook step.


def decode_step(body: bytes) -> list[BrazeChange]:
    """Decode a webhook step's body into one change per target whose state it names."""
    step = _decode(body, _step_decoder, "a Braze webhook step")
    external_id = _text(step.external_id)
    email = _text(step.email)
    if external_id is None and email is None:
        raise BrazeWebhookError(
            "the body names no person: render `external_id` from {{${user_id}}} "
            "or `email` from {{${email_address}}}"
        )
    at = _step_time(step.time)
    states: dict[Target, str] = {}
    email_state = _text(step.email_subscribe)
    if email_state is not None:  # Liquid renders nothing for an unknown state: no change
        if email_state not in EMAIL_STATES:
            raise BrazeWebhookError(
                f"`email_subscribe` is {email_state!r}; expected opted_in, subscribed, "
                "unsubscribed or empty"
            )
        states[EMAIL] = email_state
    for group_id, raw_state in (step.groups or {}).items():
        key = group_id.strip()
        if not _GROUP_ID.match(key):
            raise BrazeWebhookError(
                f"`groups` key {group_id!r} is not a Braze subscription group id (a UUID)"
            )
        state = _text(raw_state)
        if state is None:
            continue
        if state not in GROUP_STATES:
            raise BrazeWebhookError(
                f"`groups.{key}` is {state!r}; expected subscribed, unsubscribed or empty"
            )
        # Ids compare in lower case; if a template names one group twice, withdrawal wins.
        target = Target.group(key)
        if target not in states or _RANK[state] > _RANK[states[target]]:
            states[target] = state
    return [BrazeChange(external_id, email, t, s, at, None) for t, s in states.items()]


def step_dedupe_key(changes: list[BrazeChange]) -> str:
    """Person, states and time of one step's changes; equal keys are the same delivery.

    Liquid has no change id, so a retried step is recognised by its content. The key is a
    digest: it is stored and may be logged, and must not carry an email address.
    """
    people = sorted({(c.external_id or "", c.email or "") for c in changes})
    states = sorted(f"{c.target}={c.state}" for c in changes)
    times = sorted({repr(c.at) for c in changes})
    canonical = msgspec.json.encode([people, states, times])
    return "braze-step|" + hashlib.sha256(canonical).hexdigest()[:32]


def _step_time(value: str | float | None) -> float:
    if isinstance(value, str):
        value = value.strip()
        if not _EPOCH.match(value):
            raise BrazeWebhookError(
                f"`time` is {value!r}; render epoch seconds with {{{{'now' | date: '%s'}}}}"
            )
        return float(value)
    if value is None:
        raise BrazeWebhookError(
            "`time` is missing; render epoch seconds with {{'now' | date: '%s'}}"
        )
    if not math.isfinite(value) or value < 0:
        raise BrazeWebhookError(f"`time` is {value!r}; expected epoch seconds")
    return value


# ---------------------------------------------------------------------------
# Currents.


def split_currents(body: bytes) -> CurrentsBatch:
    """Split a Currents request into its events of our types; only a bad envelope raises.

    A `400` makes Braze resend the batch one event at a time and drop those refused again, so
    one malformed event must never fail its batch: it is counted in `invalid` and skipped.
    """
    if not body.strip():
        # Braze's docs: an empty body or no events is a no-op, answered like any other batch.
        return CurrentsBatch([], 0, 0)
    envelope = _decode(body, _envelope_decoder, 'a Currents batch, `{"events": [...]}`')
    kept: list[tuple[str, bytes, list[BrazeChange]]] = []
    skipped: list[Skipped] = []
    invalid = 0
    for raw in envelope.events:
        event = bytes(raw)
        try:
            head = _head_decoder.decode(event)
        except msgspec.DecodeError:
            invalid += 1  # not even an object with a string type and id: nothing to route on
            continue
        if head.event_type is None:
            invalid += 1
            continue
        if head.event_type not in CURRENTS_EVENT_TYPES:
            skipped.append(_skipped(head, event, _OTHER_TYPE))
            continue
        try:
            changes = decode_currents_event(event)
        except BrazeWebhookError:
            invalid += 1
            continue
        if not changes:
            skipped.append(_skipped(head, event, _OTHER_CHANNEL))  # push or SMS: not email
            continue
        assert head.id is not None  # decode_currents_event requires it
        kept.append((currents_dedupe_key(head.event_type, head.id), event, changes))
    return CurrentsBatch(kept, len(skipped), invalid, skipped)


# Why an event is not written back, as the audit trail says it.
_OTHER_TYPE = "not a subscription state change: the gateway reads GlobalStateChange and StateChange"
_OTHER_CHANNEL = "a state change of another channel than email"


def currents_dedupe_key(event_type: str, event_id: str) -> str:
    """The spool key of one Currents event: its type and id together.

    Braze's own sample events reuse one `id` across a GlobalStateChange and a subscription
    group StateChange, so an `id` is only unique within its event type.
    """
    return f"braze-currents|{event_type}|{event_id}"


def _skipped(head: _Head, event: bytes, reason: str) -> Skipped:
    try:
        whom = _whom_decoder.decode(event)
    except msgspec.DecodeError:
        whom = _Whom()  # a field of an unexpected shape: counted, named nobody
    external_id = _text(whom.user.external_user_id) if whom.user else None
    email = _text(whom.properties.email_address) if whom.properties else None
    assert head.event_type is not None
    return Skipped(head.event_type, head.id, external_id, email, reason)


def decode_currents_event(raw: bytes) -> list[BrazeChange]:
    """Decode one stored Currents event: one change, or none for another type or channel."""
    try:
        event = _event_decoder.decode(raw)
    except msgspec.DecodeError as exc:
        raise BrazeWebhookError(f"the event is not a Currents subscription event: {exc}") from None
    if event.event_type not in CURRENTS_EVENT_TYPES:
        return []
    if not event.id.strip():
        raise BrazeWebhookError("the event has an empty `id`")
    if not math.isfinite(event.time) or event.time < 0:
        raise BrazeWebhookError(f"`time` is {event.time!r}; expected epoch seconds")
    props = event.properties or CurrentsProperties()
    # GlobalStateChange also reports push; only email maps. Braze documents `channel` as
    # optional, and its sample events always carry it: absent is taken to mean email.
    channel = _text(props.channel)
    if channel is not None and channel.lower() != "email":
        return []
    external_id = _text(event.user.external_user_id) if event.user else None
    email = _text(props.email_address)
    if external_id is None and email is None:
        raise BrazeWebhookError(
            "the event names no person: no `user.external_user_id` nor `properties.email_address`"
        )
    state = _status(props.subscription_status)
    if event.event_type == GLOBAL_STATE_CHANGE:
        if state not in EMAIL_STATES:
            raise BrazeWebhookError(f"`properties.subscription_status` {state!r} is unknown")
        target = EMAIL
    else:
        group_id = _text(props.subscription_group_id)
        if group_id is None or not _GROUP_ID.match(group_id):
            raise BrazeWebhookError(
                "`properties.subscription_group_id` is missing or not a subscription group id"
            )
        if state not in GROUP_STATES:
            raise BrazeWebhookError(f"`properties.subscription_status` {state!r} is unknown")
        target = Target.group(group_id)
    source = _text(props.state_change_source)
    return [BrazeChange(external_id, email, target, state, event.time, source)]


def _status(value: str | None) -> str:
    # Braze's glossary spells "Subscribed", "Unsubscribed", "Opted In"; its own sample file
    # spells "subscribed". Compare without case or spaces, into the Liquid and REST spelling.
    return "_".join((value or "").lower().split())


# ---------------------------------------------------------------------------
# Shared.


def _decode(body: bytes, decoder: msgspec.json.Decoder[_T], what: str) -> _T:
    if not body.strip():
        raise BrazeWebhookError(f"the body is empty; send {what} as a JSON object")
    if body.count(b"[") + body.count(b"{") > MAX_DEPTH and nesting_depth(body) > MAX_DEPTH:
        raise BrazeWebhookError(f"JSON nests deeper than {MAX_DEPTH} levels")
    try:
        return decoder.decode(body)
    except msgspec.DecodeError as exc:
        # Tell "not JSON" apart from "JSON of the wrong shape": the sender fixes different things.
        try:
            msgspec.json.decode(body)
        except msgspec.DecodeError:
            raise BrazeWebhookError(f"the body is not valid JSON: {exc}") from None
        raise BrazeWebhookError(f"the body is not {what}: {exc}") from None


def _text(value: str | None) -> str | None:
    """A Liquid-rendered string, stripped; empty means absent."""
    if value is None:
        return None
    value = value.strip()
    return value or None
