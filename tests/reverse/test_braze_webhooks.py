"""gateway.braze_webhooks: a webhook step's body and Currents batches, decoded into BrazeChange."""

from __future__ import annotations

import contextlib
import copy
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.reverse.braze_webhooks import (
    GLOBAL_STATE_CHANGE,
    GROUP_STATE_CHANGE,
    BrazeChange,
    BrazeWebhookError,
    currents_dedupe_key,
    decode_currents_event,
    decode_step,
    split_currents,
    step_dedupe_key,
)
from gateway.rules.mappings import EMAIL, Target, load_rules

ROOT = Path(__file__).resolve().parents[2]
BRAZE = ROOT / "tests" / "events" / "braze"
NEWS = "3b0a6f8e-5c1d-4e2f-9a7b-0c1d2e3f4a5b"
OFFERS = "7c1e2d3f-4a5b-4c6d-8e9f-0a1b2c3d4e5f"
T = 1746531618


def body(value: Any) -> bytes:
    """JSON-encode a Python value as a request body."""
    return json.dumps(value).encode()


def step(**fields: Any) -> dict[str, Any]:
    """A rendered webhook step for user-1 at time T, with `fields` replacing or adding keys."""
    out: dict[str, Any] = {
        "external_id": "user-1",
        "email": "",
        "email_subscribe": "",
        "groups": {},
        "time": str(T),
    }
    out.update(fields)
    return out


def key_of(event_id: str, kind: str = GLOBAL_STATE_CHANGE) -> str:
    """The spool key of a Currents event: its type and id together."""
    return currents_dedupe_key(kind, event_id)


def event(kind: str = GLOBAL_STATE_CHANGE, **properties: Any) -> dict[str, Any]:
    """A Currents event of `kind` for user-1, shaped like Braze's Custom HTTP sample events."""
    props: dict[str, Any] = {"channel": "email", "subscription_status": "Unsubscribed"}
    if kind == GROUP_STATE_CHANGE:
        props["subscription_group_id"] = NEWS
    props.update(properties)
    return {
        "event_type": kind,
        "id": "e-1",
        "time": T,
        "user": {"user_id": "6639a1f2c4e5d60012ab34cd", "external_user_id": "user-1"},
        "properties": props,
    }


def fixture(name: str) -> bytes:
    """A body from tests/events/braze."""
    return (BRAZE / name).read_bytes()


# ---------------------------------------------------------------------------
# The webhook step.


def test_step_fixture_gives_email_and_both_groups() -> None:
    """The shipped webhook-step body decodes into one change per target, dated by its time."""
    changes = decode_step(fixture("webhook_step_unsubscribed.json"))
    assert changes == [
        BrazeChange("user-123", "ada.lovelace@example.com", EMAIL, "unsubscribed", T, None),
        BrazeChange(
            "user-123", "ada.lovelace@example.com", Target.group(NEWS), "subscribed", T, None
        ),
        BrazeChange(
            "user-123", "ada.lovelace@example.com", Target.group(OFFERS), "unsubscribed", T, None
        ),
    ]


def test_step_empty_states_change_nothing_for_their_target() -> None:
    """An empty email_subscribe or group state (Liquid rendered nothing) yields no change there."""
    changes = decode_step(body(step(groups={NEWS: "", OFFERS: "subscribed"})))
    assert [(c.target, c.state) for c in changes] == [(Target.group(OFFERS), "subscribed")]


def test_step_with_every_state_empty_changes_nothing() -> None:
    """A step whose every state is empty or whitespace decodes to no change at all."""
    assert decode_step(body(step(email_subscribe="  ", groups={NEWS: ""}))) == []
    assert decode_step(body({"external_id": "user-1", "time": T})) == []


@pytest.mark.parametrize("state", ["opted_in", "subscribed", "unsubscribed"])
def test_step_email_states(state: str) -> None:
    """Each of Braze's three global email states is read as written."""
    [change] = decode_step(body(step(email_subscribe=f" {state}\n")))
    assert (change.target, change.state) == (EMAIL, state)


@pytest.mark.parametrize("state", ["Unsubscribed", "opted in", "yes", "{{subscribed_state}}"])
def test_step_unknown_email_state_is_an_error(state: str) -> None:
    """A global state outside Liquid's spelling is refused, naming the field and the value."""
    with pytest.raises(BrazeWebhookError, match="email_subscribe") as info:
        decode_step(body(step(email_subscribe=state)))
    assert repr(state) in str(info.value)


@pytest.mark.parametrize("state", ["opted_in", "Subscribed", "maybe"])
def test_step_unknown_group_state_is_an_error(state: str) -> None:
    """Groups only have subscribed and unsubscribed; anything else is refused with the group id."""
    with pytest.raises(BrazeWebhookError, match=f"groups.{NEWS}"):
        decode_step(body(step(groups={NEWS: state})))


@pytest.mark.parametrize(
    "time", [str(T), T, float(T), f" {T} ", f"{T}.0"], ids=["str", "int", "float", "spaces", "dot"]
)
def test_step_time_as_a_string_or_a_number(time: Any) -> None:
    """`time` is epoch seconds, as Liquid's string or as a JSON number."""
    [change] = decode_step(body(step(email_subscribe="opted_in", time=time)))
    assert change.at == T


@pytest.mark.parametrize("time", ["", "now", "-5", "2025-05-06T11:40:18Z", "1e9", -1, True, None])
def test_step_bad_or_missing_time_is_an_error(time: Any) -> None:
    """A time that is not epoch seconds, or none at all, is refused and says how to render it."""
    with pytest.raises(BrazeWebhookError, match=r"time"):
        decode_step(body(step(email_subscribe="opted_in", time=time)))


def test_step_without_time_is_an_error() -> None:
    """A body with no `time` key is refused: the step cannot be dated or told from a retry."""
    fields = step(email_subscribe="opted_in")
    del fields["time"]
    with pytest.raises(BrazeWebhookError, match="`time` is missing"):
        decode_step(body(fields))


@pytest.mark.parametrize(
    "person",
    [{}, {"external_id": "", "email": ""}, {"external_id": "  ", "email": None}],
    ids=["absent", "empty", "blank"],
)
def test_step_without_a_person_is_an_error(person: dict[str, Any]) -> None:
    """A step needs a non-empty external_id or email, and says which Liquid renders them."""
    fields = step(email_subscribe="unsubscribed")
    del fields["external_id"], fields["email"]
    fields.update(person)
    with pytest.raises(BrazeWebhookError, match="names no person"):
        decode_step(body(fields))


def test_step_email_alone_names_the_person() -> None:
    """An email address without an external id is enough, and is kept stripped."""
    [change] = decode_step(
        body(step(external_id="", email=" a@example.com ", email_subscribe="unsubscribed"))
    )
    assert (change.external_id, change.email) == (None, "a@example.com")


def test_step_group_ids_compare_in_lower_case() -> None:
    """A group id in upper case becomes the same Target as its lower-case spelling."""
    [change] = decode_step(body(step(groups={NEWS.upper(): "unsubscribed"})))
    assert change.target == Target.group(NEWS)
    assert change.target.name == NEWS


def test_step_one_group_twice_in_two_cases_unsubscribed_wins() -> None:
    """A template naming one group twice yields one change, the withdrawal."""
    changes = decode_step(body(step(groups={NEWS: "subscribed", NEWS.upper(): "unsubscribed"})))
    assert [(c.target, c.state) for c in changes] == [(Target.group(NEWS), "unsubscribed")]


@pytest.mark.parametrize("key", ["<group id>", "{{subscribed_state.${news}}}", "news", ""])
def test_step_group_key_that_is_not_a_group_id_is_an_error(key: str) -> None:
    """A `groups` key that is not a UUID (a template placeholder left in) is refused."""
    with pytest.raises(BrazeWebhookError, match="not a Braze subscription group id"):
        decode_step(body(step(groups={key: "subscribed"})))


def test_step_ignores_unknown_fields() -> None:
    """Fields the gateway does not read are ignored, never fatal."""
    fields = step(email_subscribe="opted_in", campaign="spring", extra={"nested": [1, 2]})
    assert len(decode_step(body(fields))) == 1


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"", "empty"),
        (b"{not json", "not valid JSON"),
        (b"[]", "not a Braze webhook step"),
        (body(step(groups=[NEWS])), "not a Braze webhook step"),
        (body(step(external_id=42)), "not a Braze webhook step"),
        (b"[" * 70 + b"]" * 70, "nests deeper"),
    ],
    ids=["empty", "not-json", "array", "groups-list", "id-number", "deep"],
)
def test_step_that_is_not_a_step_says_why(raw: bytes, reason: str) -> None:
    """Bodies that are not a step are refused with a reason Braze's webhook log can show."""
    with pytest.raises(BrazeWebhookError, match=reason):
        decode_step(raw)


def test_step_dedupe_key_is_stable_for_the_same_content() -> None:
    """Key order, time as string or number and group id case do not change the key."""
    a = step(email_subscribe="unsubscribed", groups={NEWS: "subscribed", OFFERS: "unsubscribed"})
    b = {
        "time": T,
        "groups": {OFFERS.upper(): "unsubscribed", NEWS: "subscribed"},
        "email_subscribe": "unsubscribed",
        "external_id": "user-1",
    }
    assert step_dedupe_key(decode_step(body(a))) == step_dedupe_key(decode_step(body(b)))


@pytest.mark.parametrize(
    "changed",
    [
        {"email_subscribe": "opted_in"},
        {"groups": {NEWS: "unsubscribed"}},
        {"groups": {}},
        {"time": str(T + 1)},
        {"external_id": "user-2"},
        {"email": "a@example.com"},
    ],
    ids=["email-state", "group-state", "group-gone", "time", "person", "email"],
)
def test_step_dedupe_key_differs_for_other_states_times_or_people(changed: dict[str, Any]) -> None:
    """Another state, time or person is another delivery, with another key."""
    base = step(email_subscribe="unsubscribed", groups={NEWS: "subscribed"})
    other = {**base, **changed}
    assert step_dedupe_key(decode_step(body(base))) != step_dedupe_key(decode_step(body(other)))


def test_step_dedupe_key_holds_no_email_address() -> None:
    """The key is a digest: it may be stored and logged, so no address appears in it."""
    key = step_dedupe_key(decode_step(fixture("webhook_step_unsubscribed.json")))
    assert key.startswith("braze-step|")
    assert "example.com" not in key
    assert "user-123" not in key


def test_the_readme_template_names_every_mapped_group_and_decodes_once_rendered() -> None:
    """The README's webhook-step template, rendered as Braze would, decodes for every group."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    template = readme.split("```liquid\n", 1)[1].split("```", 1)[0]
    groups = load_rules(ROOT / "mappings").groups
    rendered = (
        template.replace("{{${user_id}}}", "user-1")
        .replace("{{${email_address}}}", "a@example.com")
        .replace("{{subscribed_state.${email_global}}}", "unsubscribed")
        .replace("{{'now' | date: '%s'}}", str(T))
    )
    for group in groups:
        rendered = rendered.replace(f"{{{{subscribed_state.${{{group}}}}}}}", "subscribed")
    assert "{{" not in rendered
    changes = decode_step(rendered.encode())
    assert {c.target for c in changes} == {EMAIL, *(Target.group(g) for g in groups)}
    assert {c.at for c in changes} == {T}


# ---------------------------------------------------------------------------
# Currents.


def test_currents_fixture_keeps_two_events_ignores_one_skips_one() -> None:
    """The shipped batch: two subscription events kept, an email open ignored, a bad one skipped."""
    batch = split_currents(fixture("currents_batch.json"))
    assert [key for key, _, _ in batch.events] == [
        f"braze-currents|{GLOBAL_STATE_CHANGE}|0f6c7a1e-2b3d-4c5e-8f90-a1b2c3d4e5f6",
        f"braze-currents|{GROUP_STATE_CHANGE}|1a7d8b2f-3c4e-4d6f-9a01-b2c3d4e5f607",
    ]
    assert (batch.ignored, batch.invalid) == (1, 1)


def test_split_keeps_each_events_own_bytes() -> None:
    """Each kept event's bytes are that event's JSON exactly, ready for one spool row."""
    raw = fixture("currents_batch.json")
    batch = split_currents(raw)
    source = json.loads(raw)["events"]
    for (key, event_bytes, _), original in zip(batch.events, source, strict=False):
        assert json.loads(event_bytes) == original
        assert event_bytes in raw
        assert key == currents_dedupe_key(original["event_type"], original["id"])


def test_currents_fixture_events_decode() -> None:
    """The stored events decode: a global unsubscribe and a group subscribe, lower-cased."""
    batch = split_currents(fixture("currents_batch.json"))
    [[glob], [group]] = [decode_currents_event(raw) for _, raw, _ in batch.events]
    assert glob == BrazeChange(
        "user-123", "ada.lovelace@example.com", EMAIL, "unsubscribed", T, "Subscription Page"
    )
    assert group == BrazeChange(
        "user-456",
        "grace.hopper@example.com",
        Target.group(OFFERS),
        "subscribed",
        1746531702,
        "Preference Center",
    )


def test_braze_sample_event_decodes() -> None:
    """Braze's own Custom HTTP sample (lower-case status, coded source) decodes as it stands."""
    sample = {
        "event_type": "users.behaviors.subscription.GlobalStateChange",
        "id": "a1234567-89ab-cdef-0123-456789abcdef",
        "time": 1477502783,
        "user": {
            "user_id": "0123456789abcdef01234567",
            "external_user_id": "user_id",
            "timezone": "America/Chicago",
        },
        "properties": {
            "app_id": "01234567-89ab-cdef-0123-456789abcdef",
            "subscription_status": "subscribed",
            "channel": "email",
            "email_address": "test@test.com",
            "send_id": "f123456789abcdef01234567",
            "state_change_source": "r",
        },
    }
    [change] = decode_currents_event(body(sample))
    assert (change.external_id, change.state, change.at, change.source) == (
        "user_id",
        "subscribed",
        1477502783,
        "r",
    )


@pytest.mark.parametrize(
    ("status", "state"),
    [
        ("Subscribed", "subscribed"),
        ("Unsubscribed", "unsubscribed"),
        ("Opted In", "opted_in"),
        ("subscribed", "subscribed"),
        ("opted_in", "opted_in"),
    ],
)
def test_currents_global_statuses(status: str, state: str) -> None:
    """Currents' spellings of the global state map onto Braze's REST and Liquid spelling."""
    [change] = decode_currents_event(body(event(subscription_status=status)))
    assert (change.target, change.state) == (EMAIL, state)


@pytest.mark.parametrize(
    ("status", "state"), [("Subscribed", "subscribed"), ("Unsubscribed", "unsubscribed")]
)
def test_currents_group_statuses(status: str, state: str) -> None:
    """A group state change names its group, lower-cased, and its state."""
    raw = body(
        event(GROUP_STATE_CHANGE, subscription_status=status, subscription_group_id=NEWS.upper())
    )
    [change] = decode_currents_event(raw)
    assert (change.target, change.state) == (Target.group(NEWS), state)


def test_currents_push_and_sms_changes_are_not_email() -> None:
    """A global push state change (or an SMS group one) changes no email target and is ignored."""
    push = event(channel="push", subscription_status="Opted In")
    sms = event(GROUP_STATE_CHANGE, channel="sms", subscription_status="Subscribed")
    assert decode_currents_event(body(push)) == []
    assert decode_currents_event(body(sms)) == []
    batch = split_currents(body({"events": [push, sms]}))
    assert (batch.events, batch.ignored, batch.invalid) == ([], 2, 0)


def test_currents_event_without_channel_is_taken_as_email() -> None:
    """Braze documents `channel` as optional: an event without it is an email change."""
    fields = event()
    del fields["properties"]["channel"]
    [change] = decode_currents_event(body(fields))
    assert change.target == EMAIL


def test_currents_email_alone_names_the_person() -> None:
    """An event with no external id but an email address still names its person."""
    fields = event(email_address="a@example.com")
    del fields["user"]
    [change] = decode_currents_event(body(fields))
    assert (change.external_id, change.email) == (None, "a@example.com")


def _broken(change: str) -> dict[str, Any]:
    fields = event(GROUP_STATE_CHANGE)
    broken = copy.deepcopy(fields)
    if change == "no-person":
        broken["user"] = {"user_id": "6639a1f2c4e5d60012ab34cd"}
    elif change == "no-id":
        del broken["id"]
    elif change == "empty-id":
        broken["id"] = " "
    elif change == "time-string":
        broken["time"] = "yesterday"
    elif change == "status-unknown":
        broken["properties"]["subscription_status"] = "Maybe"
    elif change == "group-opted-in":
        broken["properties"]["subscription_status"] = "Opted In"
    elif change == "no-group":
        del broken["properties"]["subscription_group_id"]
    elif change == "group-not-uuid":
        broken["properties"]["subscription_group_id"] = "news"
    return broken


BROKEN = [
    "no-person",
    "no-id",
    "empty-id",
    "time-string",
    "status-unknown",
    "group-opted-in",
    "no-group",
    "group-not-uuid",
]


@pytest.mark.parametrize("change", BROKEN)
def test_currents_broken_event_is_an_error_alone(change: str) -> None:
    """Decoding one broken event of our types raises BrazeWebhookError."""
    with pytest.raises(BrazeWebhookError):
        decode_currents_event(body(_broken(change)))


@pytest.mark.parametrize("change", BROKEN)
def test_currents_broken_event_does_not_fail_its_batch(change: str) -> None:
    """A broken event is counted invalid and skipped; the good events around it are kept."""
    good = event()
    other = {**event(), "id": "e-2"}
    batch = split_currents(body({"events": [good, _broken(change), other]}))
    assert [key for key, _, _ in batch.events] == [key_of("e-1"), key_of("e-2")]
    assert (batch.ignored, batch.invalid) == (0, 1)


@pytest.mark.parametrize(
    "item", [3, "x", None, [], {}, {"id": "e-9"}, {"event_type": 7, "id": "e"}]
)
def test_currents_items_that_are_not_events_are_invalid(item: Any) -> None:
    """Array items that are not events at all are counted invalid, never fatal."""
    batch = split_currents(body({"events": [item, event()]}))
    assert ([key for key, _, _ in batch.events], batch.invalid) == ([key_of("e-1")], 1)


def test_currents_other_event_types_are_ignored_and_counted() -> None:
    """Events of other types are counted in `ignored`, whatever their properties."""
    others = [
        {"event_type": "users.messages.email.Open", "id": f"o-{i}", "time": T} for i in range(3)
    ]
    batch = split_currents(body({"events": others}))
    assert (batch.events, batch.ignored, batch.invalid) == ([], 3, 0)
    assert decode_currents_event(body(others[0])) == []


@pytest.mark.parametrize("raw", [b"", b"  \n", b'{"events": []}'])
def test_currents_empty_body_or_no_events_is_a_no_op(raw: bytes) -> None:
    """Braze's docs: an empty body or zero events is a no-op that still succeeds."""
    batch = split_currents(raw)
    assert (batch.events, batch.ignored, batch.invalid) == ([], 0, 0)


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"[]", "not a Currents batch"),
        (b'{"events": {}}', "not a Currents batch"),
        (b'{"events": null}', "not a Currents batch"),
        (b'{"evts": []}', "not a Currents batch"),
        (b"{oops", "not valid JSON"),
        (b'{"events": ' + b"[" * 70 + b"]" * 70 + b"}", "nests deeper"),
    ],
    ids=["array", "events-object", "events-null", "no-events", "not-json", "deep"],
)
def test_currents_bad_envelope_fails_the_batch(raw: bytes, reason: str) -> None:
    """Only an envelope that is not `{"events": [...]}` raises, with a reason."""
    with pytest.raises(BrazeWebhookError, match=reason):
        split_currents(raw)


# ---------------------------------------------------------------------------
# Hostile input.


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_decoders_take_arbitrary_bytes(raw: bytes) -> None:
    """Any bytes either decode or raise BrazeWebhookError, never another exception."""
    for decoder in (decode_step, split_currents, decode_currents_event):
        with contextlib.suppress(BrazeWebhookError):
            decoder(raw)


JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=200, deadline=None)
@given(
    st.fixed_dictionaries(
        {},
        optional={
            "external_id": JSON,
            "email": JSON,
            "email_subscribe": JSON | st.sampled_from(["opted_in", "unsubscribed", ""]),
            "groups": JSON | st.just({NEWS: "subscribed"}),
            "time": JSON | st.just(str(T)),
            "event_type": st.sampled_from([GLOBAL_STATE_CHANGE, GROUP_STATE_CHANGE]),
            "id": JSON,
            "user": JSON,
            "properties": JSON,
        },
    )
)
def test_decoders_take_near_miss_json(value: dict[str, Any]) -> None:
    """Objects close to either shape decode or raise BrazeWebhookError; a batch never raises."""
    raw = json.dumps(value).encode()
    for decoder in (decode_step, decode_currents_event):
        with contextlib.suppress(BrazeWebhookError):
            decoder(raw)
    split_currents(body({"events": [value]}))
