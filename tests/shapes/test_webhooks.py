"""gateway.webhooks: decoding Didomi bodies, the minimal shape, nesting depth and dedupe keys."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
import pytest

from gateway.shapes.webhooks import (
    EVENT_TYPES,
    MAX_DEPTH,
    Webhook,
    WebhookError,
    decode,
    nesting_depth,
)

EVENTS = Path(__file__).resolve().parents[1] / "events"
FIXTURES = sorted(EVENTS.glob("*.json"))


def body(value: Any) -> bytes:
    """JSON-encode a Python value as a webhook body."""
    return json.dumps(value).encode()


def event(**entity: Any) -> dict[str, Any]:
    """A minimal event.created envelope around `entity`."""
    return {"type": "event.created", "parameters": {"entity": entity}}


def fixture(name: str) -> dict[str, Any]:
    """A fixture from tests/events as a Python dict."""
    data: dict[str, Any] = json.loads((EVENTS / name).read_text(encoding="utf-8"))
    return data


# ---------------------------------------------------------------------------
# Fixtures and leniency.


def test_there_are_fixtures_for_every_known_type() -> None:
    """The fixture folder covers all six Didomi event types."""
    types = {json.loads(p.read_text(encoding="utf-8"))["type"] for p in FIXTURES}
    assert types == set(EVENT_TYPES)


@pytest.mark.parametrize("path", FIXTURES, ids=lambda p: p.name)
def test_every_fixture_decodes(path: Path) -> None:
    """Each fixture body decodes into a known Webhook with a subject entity."""
    webhook = decode(path.read_bytes())
    assert webhook.known
    assert webhook.subject is not None
    assert webhook.subject.id
    assert webhook.dedupe_key() is not None


def test_consent_given_fixture_fields() -> None:
    """The decoded consent event exposes its user, regulation, status and purposes."""
    webhook = decode((EVENTS / "consent_given.json").read_bytes())
    entity = webhook.subject
    assert entity is not None
    assert entity.user is not None
    assert entity.user.organization_user_id == "user-123"
    assert entity.regulation == "gdpr"
    assert entity.status == "confirmed"
    assert entity.consents is not None
    purposes = entity.consents.purposes or []
    assert [p.id for p in purposes] == ["marketing_email", "analytics"]
    values = purposes[0].values or {}
    assert values["topics"].value == "product_news,offers"
    assert purposes[1].values is None


def test_updated_subject_is_new_entity() -> None:
    """For *.updated the subject is new_entity, not old_entity."""
    webhook = decode((EVENTS / "event_updated_confirmed.json").read_bytes())
    assert webhook.subject is webhook.parameters.new_entity
    assert webhook.subject is not None
    assert webhook.subject.status == "confirmed"
    old = webhook.parameters.old_entity
    assert old is not None
    assert old.status == "pending_approval"


def test_user_updated_carries_envelope_regulation_and_source() -> None:
    """The top-level regulation and the source event id of user.updated are decoded."""
    webhook = decode((EVENTS / "user_updated.json").read_bytes())
    assert webhook.regulation == "gdpr"
    assert webhook.parameters.source is not None
    assert webhook.parameters.source.id == "f1e2d3c4-b5a6-4978-8a6b-5c4d3e2f1a0b"


def test_unknown_fields_are_ignored_everywhere() -> None:
    """Fields the gateway does not know, at any level, are ignored rather than fatal."""
    data = fixture("consent_given.json")
    data["future_field"] = {"nested": [1, 2, 3]}
    data["parameters"]["trace"] = "x"
    entity = data["parameters"]["entity"]
    entity["brand_new"] = True
    entity["user"]["country"] = "FR"
    entity["consents"]["purposes"][0]["extra"] = [{"a": 1}]
    entity["consents"]["purposes"][0]["values"]["topics"]["label"] = "Topics"
    webhook = decode(body(data))
    assert webhook.known
    assert webhook == decode((EVENTS / "consent_given.json").read_bytes())


def test_minimal_valid_shape_decodes() -> None:
    """An object with a string type and an entity object is enough; everything else is optional."""
    webhook = decode(body({"type": "event.created", "parameters": {"entity": {}}}))
    assert webhook.known
    assert webhook.subject is not None
    assert webhook.subject.consents is None
    assert webhook.dedupe_key() is None  # no entity id: nothing to dedupe on


def test_unknown_type_with_a_valid_envelope_decodes_as_unknown() -> None:
    """A type outside the six decodes, with known False, even with no entity at all."""
    webhook = decode(body({"type": "consent.exported", "parameters": {}}))
    assert webhook.type == "consent.exported"
    assert webhook.known is False
    webhook = decode(body({"type": "event.archived", "parameters": {"entity": {"id": "x"}}}))
    assert webhook.known is False


def test_webhook_is_frozen() -> None:
    """A decoded Webhook cannot be altered."""
    webhook = decode((EVENTS / "consent_given.json").read_bytes())
    with pytest.raises(AttributeError):
        webhook.type = "user.deleted"  # type: ignore[misc]


# ---------------------------------------------------------------------------
# Refused bodies: WebhookError with a message the sender can act on.


@pytest.mark.parametrize("raw", [b"", b"   \n\t "])
def test_an_empty_body_is_refused(raw: bytes) -> None:
    """An empty (or blank) body is a WebhookError saying it is empty."""
    with pytest.raises(WebhookError, match="the body is empty"):
        decode(raw)


@pytest.mark.parametrize("raw", [b"{not json", b'{"type": "event.created",', b"\xff\xfe", b"nul"])
def test_invalid_json_is_refused(raw: bytes) -> None:
    """A body that is not JSON is a WebhookError saying so."""
    with pytest.raises(WebhookError, match="the body is not valid JSON"):
        decode(raw)


def test_a_json_array_is_refused() -> None:
    """Valid JSON that is not an object is refused as not a Didomi webhook."""
    with pytest.raises(WebhookError, match="not a Didomi webhook: Expected `object`, got `array`"):
        decode(body([{"type": "event.created"}]))


@pytest.mark.parametrize("raw", [b"42", b'"event.created"', b"null"])
def test_a_json_scalar_is_refused(raw: bytes) -> None:
    """A JSON scalar is refused as not a Didomi webhook."""
    with pytest.raises(WebhookError, match="not a Didomi webhook"):
        decode(raw)


def test_missing_type_is_refused() -> None:
    """An object without `type` is refused naming the missing field."""
    with pytest.raises(WebhookError, match="missing required field `type`"):
        decode(body({"parameters": {"entity": {}}}))


def test_a_type_that_is_not_a_string_is_refused() -> None:
    """`type` must be a string."""
    with pytest.raises(WebhookError, match=r"Expected `str`, got `int` - at `\$.type`"):
        decode(body({"type": 7, "parameters": {}}))


def test_missing_parameters_is_refused() -> None:
    """An object without `parameters` is refused naming the missing field."""
    with pytest.raises(WebhookError, match="missing required field `parameters`"):
        decode(body({"type": "event.created"}))


@pytest.mark.parametrize("parameters", ["x", [], 3, None])
def test_parameters_not_an_object_is_refused(parameters: Any) -> None:
    """`parameters` must be an object; the message points at `$.parameters`."""
    with pytest.raises(WebhookError, match=r"at `\$.parameters`"):
        decode(body({"type": "event.created", "parameters": parameters}))


def test_an_entity_that_is_not_an_object_is_refused() -> None:
    """`entity` must be an object, whatever the type."""
    with pytest.raises(WebhookError, match=r"at `\$.parameters.entity`"):
        decode(body({"type": "event.created", "parameters": {"entity": "e"}}))


def test_purposes_not_a_list_is_refused() -> None:
    """`consents.purposes` must be a list; the message names its path."""
    data = event(consents={"purposes": {"id": "marketing_email"}})
    with pytest.raises(WebhookError) as info:
        decode(body(data))
    message = str(info.value)
    assert message.startswith("the body is not a Didomi webhook: ")
    assert "`$.parameters.entity.consents.purposes`" in message


def test_a_purpose_without_id_is_refused() -> None:
    """A purpose object without `id` is refused, pointing at that purpose."""
    data = event(consents={"purposes": [{"id": "a"}, {"enabled": True}]})
    with pytest.raises(WebhookError) as info:
        decode(body(data))
    message = str(info.value)
    assert "missing required field `id`" in message
    assert "`$.parameters.entity.consents.purposes[1]`" in message


@pytest.mark.parametrize("purpose_id", [5, None, True, ["a"]])
def test_a_purpose_id_that_is_not_a_string_is_refused(purpose_id: Any) -> None:
    """A purpose id must be a string."""
    data = event(consents={"purposes": [{"id": purpose_id, "enabled": True}]})
    with pytest.raises(WebhookError, match=r"purposes\[0\]\.id"):
        decode(body(data))


def test_a_purpose_that_is_not_an_object_is_refused() -> None:
    """Each element of `purposes` must be an object."""
    with pytest.raises(WebhookError, match=r"purposes\[0\]"):
        decode(body(event(consents={"purposes": ["marketing_email"]})))


@pytest.mark.parametrize("kind", ["event.created", "event.deleted", "user.created", "user.deleted"])
def test_missing_entity_for_a_known_type_is_refused(kind: str) -> None:
    """A created/deleted type without `entity` is refused naming `$.parameters.entity`."""
    with pytest.raises(WebhookError, match=r"`\$\.parameters\.entity` is missing"):
        decode(body({"type": kind, "parameters": {}}))


@pytest.mark.parametrize("kind", ["event.updated", "user.updated"])
def test_missing_new_entity_for_an_update_is_refused(kind: str) -> None:
    """An updated type without `new_entity` (or entity) is refused naming `new_entity`."""
    with pytest.raises(WebhookError, match=r"`\$\.parameters\.new_entity` is missing"):
        decode(body({"type": kind, "parameters": {"old_entity": {"id": "x"}}}))


def test_a_null_entity_counts_as_missing() -> None:
    """`"entity": null` for a known type is the same as no entity."""
    with pytest.raises(WebhookError, match="is missing"):
        decode(body({"type": "event.created", "parameters": {"entity": None}}))


def test_webhook_error_is_a_value_error() -> None:
    """WebhookError can be caught as ValueError by callers that do not import it."""
    with pytest.raises(ValueError, match="empty"):
        decode(b"")


# ---------------------------------------------------------------------------
# Nesting depth.


def test_nesting_depth_counts_brackets() -> None:
    """Depth is the deepest run of open arrays and objects."""
    assert nesting_depth(b"1") == 0
    assert nesting_depth(b"{}") == 1
    assert nesting_depth(b'{"a": [1, {"b": []}], "c": {}}') == 4
    assert nesting_depth(b"[[[]], [[[[]]]]]") == 5


def test_nesting_depth_ignores_brackets_inside_strings() -> None:
    """Brackets inside string values and keys do not count."""
    assert nesting_depth(b'{"a": "[[[[{{{{"}') == 1
    assert nesting_depth(b'{"[[[": "]]]", "b": ["{"]}') == 2


def test_nesting_depth_handles_escaped_quotes() -> None:
    """An escaped quote does not end a string, and an escaped backslash does not escape a quote."""
    assert nesting_depth(rb'{"a": "x\"[[[[\"]]"}') == 1
    assert nesting_depth(rb'{"a": "\\", "b": [[1]]}') == 3
    assert nesting_depth(rb'{"a": "\\\"[[[["}') == 1


def nested(levels: int) -> bytes:
    """A webhook body nesting `levels` deep in total (the envelope object counts as one)."""
    inner = b"[" * (levels - 1) + b"]" * (levels - 1)
    return b'{"type": "x.y", "parameters": {}, "deep": ' + inner + b"}"


def test_64_levels_of_nesting_pass() -> None:
    """A body nesting exactly 64 levels decodes."""
    raw = nested(MAX_DEPTH)
    assert MAX_DEPTH == 64
    assert nesting_depth(raw) == 64
    assert decode(raw).known is False


def test_65_levels_of_nesting_are_refused() -> None:
    """A body nesting 65 levels is refused before parsing."""
    raw = nested(MAX_DEPTH + 1)
    assert nesting_depth(raw) == 65
    with pytest.raises(WebhookError, match="nests deeper than 64 levels"):
        decode(raw)


def test_deep_brackets_inside_a_string_do_not_count() -> None:
    """1,000 brackets inside a string value do not make a body too deep."""
    raw = body({"type": "x.y", "parameters": {}, "text": "[" * 1000})
    assert nesting_depth(raw) == 2  # the envelope and `parameters`
    assert decode(raw).known is False


def test_very_deep_nesting_is_refused_without_recursion_error() -> None:
    """100,000 levels of nesting are refused cleanly."""
    with pytest.raises(WebhookError, match="nests deeper"):
        decode(b"[" * 100_000 + b"]" * 100_000)


# ---------------------------------------------------------------------------
# Dedupe keys.


def test_the_same_body_twice_has_the_same_dedupe_key() -> None:
    """Decoding one body twice gives equal dedupe keys."""
    raw = (EVENTS / "consent_given.json").read_bytes()
    assert decode(raw).dedupe_key() == decode(raw).dedupe_key()
    # Re-encoded (different bytes, same content) is still the same event.
    assert decode(body(json.loads(raw))).dedupe_key() == decode(raw).dedupe_key()


def test_dedupe_key_names_type_id_and_time() -> None:
    """The key is built from the type, the entity id and the update time."""
    key = decode((EVENTS / "consent_given.json").read_bytes()).dedupe_key()
    assert key is not None
    assert key.startswith("event.created|0b6f7e2c-4a1d-4f3b-9c8e-5d2a1b0c9e8f|")
    assert "2025-03-14" in key


def test_a_different_updated_at_gives_a_different_key() -> None:
    """The same entity updated at another time is not a duplicate."""
    first = fixture("consent_given.json")
    second = fixture("consent_given.json")
    second["parameters"]["entity"]["updated_at"] = "2025-03-14T09:26:54.589Z"
    assert decode(body(first)).dedupe_key() != decode(body(second)).dedupe_key()


def test_a_different_type_or_id_gives_a_different_key() -> None:
    """Type and entity id are both part of the key."""
    base = fixture("consent_given.json")
    other_type = fixture("consent_given.json")
    other_type["type"] = "event.deleted"
    other_id = fixture("consent_given.json")
    other_id["parameters"]["entity"]["id"] = "another"
    keys = {decode(body(d)).dedupe_key() for d in (base, other_type, other_id)}
    assert len(keys) == 3


def test_dedupe_key_falls_back_to_created_at() -> None:
    """Without updated_at, created_at dates the entity in the key."""
    data = event(id="e1", created_at="2025-01-02T03:04:05Z")
    key = decode(body(data)).dedupe_key()
    assert key is not None
    assert key.startswith("event.created|e1|2025-01-02T03:04:05")


def test_equal_instants_in_different_notations_are_duplicates() -> None:
    """`Z` and `+00:00` for the same instant give the same dedupe key."""
    a = decode(body(event(id="e1", updated_at="2025-01-02T03:04:05Z")))
    b = decode(body(event(id="e1", updated_at="2025-01-02T03:04:05+00:00")))
    assert a.dedupe_key() == b.dedupe_key()


def test_user_updated_dedupes_on_source_id() -> None:
    """For user.updated the key uses source.id, not the entity's updated_at."""
    data = fixture("user_updated.json")
    key = decode(body(data)).dedupe_key()
    assert key == (
        "user.updated|c3a9e7f1-2b4d-4e6a-8f0c-1d2e3f4a5b6c|f1e2d3c4-b5a6-4978-8a6b-5c4d3e2f1a0b"
    )
    same_source = fixture("user_updated.json")
    same_source["parameters"]["new_entity"]["updated_at"] = "2030-01-01T00:00:00Z"
    assert decode(body(same_source)).dedupe_key() == key
    other_source = fixture("user_updated.json")
    other_source["parameters"]["source"]["id"] = "another-event"
    assert decode(body(other_source)).dedupe_key() != key


def test_event_updated_dedupes_on_new_entity_time() -> None:
    """event.updated keys on new_entity's updated_at (source.id is only for user.updated)."""
    data = fixture("event_updated_confirmed.json")
    key = decode(body(data)).dedupe_key()
    assert key is not None
    assert key.startswith("event.updated|7e4a2c1b-9f8d-4b6e-a5c3-2d1e0f9a8b7c|2025-04-02T08:31:07")


# ---------------------------------------------------------------------------
# Timestamps.


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2025-03-14T09:26:53.589Z", datetime(2025, 3, 14, 9, 26, 53, 589_000, tzinfo=UTC)),
        ("2025-03-14T09:26:53Z", datetime(2025, 3, 14, 9, 26, 53, tzinfo=UTC)),
        ("2025-03-14T10:26:53+01:00", datetime(2025, 3, 14, 9, 26, 53, tzinfo=UTC)),
    ],
)
def test_timestamps_with_and_without_milliseconds_decode(text: str, expected: datetime) -> None:
    """Didomi timestamps decode with or without milliseconds and with any UTC offset."""
    webhook = decode(body(event(id="e", created_at=text, updated_at=text)))
    assert webhook.subject is not None
    assert webhook.subject.updated_at == expected
    assert webhook.subject.created_at == expected


def test_an_unparsable_timestamp_is_refused() -> None:
    """A timestamp that is not RFC 3339 is refused naming its path."""
    with pytest.raises(WebhookError, match=r"\$\.parameters\.entity\.updated_at"):
        decode(body(event(id="e", updated_at="yesterday")))


def test_decode_returns_a_webhook() -> None:
    """decode returns the Webhook Struct, equal to msgspec's own decoding of a valid body."""
    raw = (EVENTS / "user_created.json").read_bytes()
    assert decode(raw) == msgspec.json.decode(raw, type=Webhook)
