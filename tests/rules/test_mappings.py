"""gateway.mappings: the semantics table of DESIGN §5, the choice rules of §8, and rule errors."""

from __future__ import annotations

import json
import os
import textwrap
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
import pytest

from gateway.errors import ConfigError
from gateway.rules.mappings import (
    LoadedTest,
    Mapped,
    MappingTest,
    Options,
    RuleSet,
    Skipped,
    event_from_test,
    load_rules,
)
from gateway.shapes.webhooks import Webhook, decode

ROOT = Path(__file__).resolve().parents[2]
EVENTS = ROOT / "tests" / "events"
NEWS = "3b0a6f8e-5c1d-4e2f-9a7b-0c1d2e3f4a5b"
OFFERS = "7c1e2d3f-4a5b-4c6d-8e9f-0a1b2c3d4e5f"
EMAIL = "email_subscribe"
T0 = "2025-03-14T09:26:53Z"

# The repository's own rules, as DESIGN §5 shows them.
EMAIL_RULES = f"""\
[identity]
external_id = "organization_user_id"

[[map]]
to = "OPTED_IN"
purpose = "marketing_email"

[[map]]
to = "UNSUBSCRIBED"
purpose = "marketing_email"
preference = "frequency"
value = "never"

[[map]]
to = "{NEWS}"
purpose = "marketing_email"
preference = "topics"
value = "product_news"

[[map]]
to = "{OFFERS}"
purpose = "marketing_email"
preference = "topics"
value = "offers"

[[map]]
to = "attribute:consent_marketing"
purpose = "marketing_email"
"""


# ---------------------------------------------------------------------------
# Helpers.


def write(folder: Path, name: str, text: str) -> Path:
    """Write one (dedented) mapping file into `folder`, creating the folder."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def rules(tmp_path: Path, text: str, options: Options | None = None) -> RuleSet:
    """Load a rule set from one mapping file written to tmp_path/mappings."""
    folder = tmp_path / "mappings"
    write(folder, "rules.toml", text)
    return load_rules(folder, options)


def load_error(folder: Path) -> ConfigError:
    """Load `folder`, expecting a ConfigError, and return it."""
    with pytest.raises(ConfigError) as info:
        load_rules(folder)
    return info.value


def line_of(path: Path, needle: str, nth: int = 1) -> int:
    """The 1-based line of the `nth` line of `path` containing `needle`."""
    seen = 0
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if needle in line:
            seen += 1
            if seen == nth:
                return number
    raise AssertionError(f"{needle!r} not found {nth} time(s) in {path}")


def purpose(pid: str, enabled: bool | None, **values: str) -> dict[str, Any]:
    """A Didomi purpose choice; keyword arguments become its preference values."""
    out: dict[str, Any] = {"id": pid, "enabled": enabled}
    if values:
        out["values"] = {k: {"value": v} for k, v in values.items()}
    return out


def entity(
    kind: str = "event.created",
    purposes: list[dict[str, Any]] | None = None,
    *,
    person: str | None = "user-1",
    **fields: Any,
) -> dict[str, Any]:
    """A Didomi entity for `kind`: a consent event (user under `user`) or a user entity."""
    base: dict[str, Any] = {
        "id": "ent-1",
        "created_at": T0,
        "updated_at": T0,
        "consents": {"purposes": purposes or []},
    }
    if kind.startswith("event."):
        base["status"] = "confirmed"
        base["user"] = {"id": "didomi-1"}
        if person is not None:
            base["user"]["organization_user_id"] = person
    elif person is not None:
        base["organization_user_id"] = person
    base.update(fields)
    return base


def webhook(
    kind: str = "event.created",
    purposes: list[dict[str, Any]] | None = None,
    *,
    regulation: str | None = None,
    **fields: Any,
) -> Webhook:
    """A decoded webhook of `kind` carrying `purposes` (see `entity` for the other fields)."""
    subject = entity(kind, purposes, **fields)
    key = "new_entity" if kind.endswith(".updated") else "entity"
    envelope: dict[str, Any] = {"type": kind, "parameters": {key: subject}}
    if regulation is not None:
        envelope["regulation"] = regulation
    return decode(json.dumps(envelope).encode())


def fixture(name: str) -> Webhook:
    """A fixture from tests/events, decoded."""
    return decode((EVENTS / name).read_bytes())


def changes(ruleset: RuleSet, *purposes: dict[str, Any]) -> dict[str, Any]:
    """The Braze changes one confirmed event.created with `purposes` asks for ({} if none)."""
    result = ruleset.apply(webhook("event.created", list(purposes)))
    if isinstance(result, Skipped):
        assert result.reason == "no_rule", result
        return {}
    assert result.delete is False
    return result.changes


def rule(to: str, pid: str = "marketing_email", **extra: str) -> str:
    """One [[map]] table as TOML text."""
    lines = ["[[map]]", f'to = "{to}"', f'purpose = "{pid}"']
    lines += [f"{k} = {json.dumps(v)}" for k, v in extra.items()]
    return "\n".join(lines) + "\n\n"


# ---------------------------------------------------------------------------
# The semantics table of DESIGN §5, for rules on a purpose alone.

# to -> (the changes key, the chosen state, the refused state)
TABLE: dict[str, tuple[str, Any, Any]] = {
    "OPTED_IN": (EMAIL, "opted_in", "unsubscribed"),
    "UNSUBSCRIBED": (EMAIL, "unsubscribed", None),
    NEWS: (f"group:{NEWS}", "subscribed", "unsubscribed"),
    "attribute:consent_marketing": ("attr:consent_marketing", True, False),
}


@pytest.mark.parametrize("to", list(TABLE))
def test_purpose_rule_chosen(tmp_path: Path, to: str) -> None:
    """`enabled: true` gives the chosen column of the table for each kind of target."""
    key, chosen, _ = TABLE[to]
    rs = rules(tmp_path, rule(to))
    assert changes(rs, purpose("marketing_email", True)) == {key: chosen}


@pytest.mark.parametrize("to", list(TABLE))
def test_purpose_rule_refused(tmp_path: Path, to: str) -> None:
    """`enabled: false` gives the refused column of the table (UNSUBSCRIBED: no change)."""
    key, _, refused = TABLE[to]
    rs = rules(tmp_path, rule(to))
    expected = {} if refused is None else {key: refused}
    assert changes(rs, purpose("marketing_email", False)) == expected


def test_opted_in_refused_is_unsubscribed_and_unsubscribed_refused_is_nothing(
    tmp_path: Path,
) -> None:
    """OPTED_IN refused unsubscribes; UNSUBSCRIBED refused leaves email_subscribe alone."""
    rs = rules(tmp_path, rule("OPTED_IN", "a") + rule("UNSUBSCRIBED", "b"))
    assert changes(rs, purpose("a", False)) == {EMAIL: "unsubscribed"}
    assert changes(rs, purpose("b", False)) == {}
    assert changes(rs, purpose("b", True)) == {EMAIL: "unsubscribed"}


@pytest.mark.parametrize("to", list(TABLE))
def test_purpose_rule_null_choice_changes_nothing(tmp_path: Path, to: str) -> None:
    """`enabled: null` with no values changes nothing, for every target."""
    rs = rules(tmp_path, rule(to))
    assert changes(rs, purpose("marketing_email", None)) == {}


@pytest.mark.parametrize("to", list(TABLE))
def test_purpose_absent_changes_nothing(tmp_path: Path, to: str) -> None:
    """A purpose missing from the event changes nothing."""
    rs = rules(tmp_path, rule(to))
    assert changes(rs, purpose("analytics", True), purpose("other", False)) == {}
    assert rs.apply(webhook("event.created", [purpose("analytics", True)])) == Skipped("no_rule")


def test_group_ids_are_compared_in_lowercase(tmp_path: Path) -> None:
    """A group id written in uppercase targets the same, lowercase, group key."""
    rs = rules(tmp_path, rule(NEWS.upper()))
    assert changes(rs, purpose("marketing_email", True)) == {f"group:{NEWS}": "subscribed"}
    assert rs.groups == [NEWS]


# ---------------------------------------------------------------------------
# Rules on one value of a preference.

M = "marketing_email"
VALUE_CASES: list[tuple[str, dict[str, Any], str]] = [
    ("listed", purpose(M, True, topics="product_news"), "chosen"),
    ("listed among others", purpose(M, True, topics="offers,product_news"), "chosen"),
    ("listed with spaces", purpose(M, True, topics=" offers , product_news "), "chosen"),
    ("not listed", purpose(M, True, topics="offers"), "refused"),
    ("empty list", purpose(M, True, topics=""), "refused"),
    ("only a longer id", purpose(M, True, topics="product_news_weekly"), "refused"),
    ("preference absent", purpose(M, True, frequency="weekly"), "none"),
    ("no values at all", purpose(M, True), "none"),
    ("purpose refused, value listed", purpose(M, False, topics="product_news"), "refused"),
    ("purpose refused, no values", purpose(M, False), "refused"),
    ("purpose null, value listed", purpose(M, None, topics="product_news"), "chosen"),
    ("purpose null, value not listed", purpose(M, None, topics="offers"), "refused"),
    ("purpose null, no values", purpose(M, None), "none"),
    ("purpose absent", purpose("analytics", True, topics="product_news"), "none"),
]  # fmt: skip


@pytest.mark.parametrize("to", list(TABLE))
@pytest.mark.parametrize(
    ("case", "choice", "outcome"), VALUE_CASES, ids=[c[0] for c in VALUE_CASES]
)
def test_value_rule(
    tmp_path: Path, to: str, case: str, choice: dict[str, Any], outcome: str
) -> None:
    """A value rule follows DESIGN §5: listed is chosen, unlisted or purpose refused is refused."""
    key, chosen, refused = TABLE[to]
    rs = rules(tmp_path, rule(to, preference="topics", value="product_news"))
    state = {"chosen": chosen, "refused": refused, "none": None}[outcome]
    expected = {} if state is None else {key: state}
    assert changes(rs, choice) == expected, case


def test_purpose_refused_beats_a_listed_value_in_user_updated(tmp_path: Path) -> None:
    """user_updated.json keeps topics "offers" under enabled:false: every value rule is refused."""
    rs = rules(tmp_path, EMAIL_RULES)
    result = rs.apply(fixture("user_updated.json"))
    assert isinstance(result, Mapped)
    assert result.person == "user-789"
    assert result.changes == {
        EMAIL: "unsubscribed",
        f"group:{NEWS}": "unsubscribed",
        f"group:{OFFERS}": "unsubscribed",
        "attr:consent_marketing": False,
    }


def test_null_purpose_with_values_still_applies_value_rules_only(tmp_path: Path) -> None:
    """enabled:null with values applies value rules, while purpose rules change nothing."""
    rs = rules(tmp_path, EMAIL_RULES)
    assert changes(rs, purpose("marketing_email", None, topics="offers")) == {
        f"group:{NEWS}": "unsubscribed",
        f"group:{OFFERS}": "subscribed",
    }


def test_two_preferences_of_one_purpose(tmp_path: Path) -> None:
    """Rules on different preferences of one purpose each read their own preference."""
    rs = rules(tmp_path, EMAIL_RULES)
    assert changes(rs, purpose("marketing_email", None, frequency="weekly")) == {}
    assert changes(rs, purpose("marketing_email", None, frequency="never")) == {
        EMAIL: "unsubscribed"
    }


# ---------------------------------------------------------------------------
# Conflicts inside one event: unsubscribed wins.


@pytest.mark.parametrize("reverse", [False, True])
def test_unsubscribed_beats_opted_in(tmp_path: Path, reverse: bool) -> None:
    """OPTED_IN chosen and UNSUBSCRIBED chosen (frequency=never) in one event: unsubscribed."""
    parts = [
        rule("OPTED_IN"),
        rule("UNSUBSCRIBED", preference="frequency", value="never"),
    ]
    rs = rules(tmp_path, "".join(reversed(parts) if reverse else parts))
    result = rs.apply(fixture("unsubscribe_frequency.json"))
    assert isinstance(result, Mapped)
    assert result.changes == {EMAIL: "unsubscribed"}


def test_unsubscribe_frequency_fixture_with_the_full_rules(tmp_path: Path) -> None:
    """frequency=never unsubscribes email while the chosen topic's group is still subscribed."""
    rs = rules(tmp_path, EMAIL_RULES)
    result = rs.apply(fixture("unsubscribe_frequency.json"))
    assert isinstance(result, Mapped)
    assert result.person == "user-555"
    assert result.changes == {
        EMAIL: "unsubscribed",
        f"group:{NEWS}": "subscribed",
        f"group:{OFFERS}": "unsubscribed",
        "attr:consent_marketing": True,
    }


@pytest.mark.parametrize("reverse", [False, True])
def test_group_unsubscribed_beats_subscribed(tmp_path: Path, reverse: bool) -> None:
    """One group on two values, one chosen and one refused: the group is unsubscribed."""
    parts = [
        rule(NEWS, preference="topics", value="product_news"),
        rule(NEWS, preference="topics", value="offers"),
    ]
    rs = rules(tmp_path, "".join(reversed(parts) if reverse else parts))
    for topics in ("product_news", "offers"):
        got = changes(rs, purpose("marketing_email", True, topics=topics))
        assert got == {f"group:{NEWS}": "unsubscribed"}
    both = changes(rs, purpose("marketing_email", True, topics="offers,product_news"))
    assert both == {f"group:{NEWS}": "subscribed"}


@pytest.mark.parametrize("reverse", [False, True])
def test_group_conflict_across_purposes(tmp_path: Path, reverse: bool) -> None:
    """One group on two purposes, one enabled and one refused: the group is unsubscribed."""
    rs = rules(tmp_path, rule(NEWS, "a") + rule(NEWS, "b"))
    choices = [purpose("a", True), purpose("b", False)]
    got = changes(rs, *(reversed(choices) if reverse else choices))
    assert got == {f"group:{NEWS}": "unsubscribed"}


@pytest.mark.parametrize("reverse", [False, True])
def test_attribute_false_beats_true(tmp_path: Path, reverse: bool) -> None:
    """One attribute on two purposes, true and false in one event: false wins."""
    parts = [rule("attribute:marketing", "a"), rule("attribute:marketing", "b")]
    rs = rules(tmp_path, "".join(reversed(parts) if reverse else parts))
    choices = [purpose("a", True), purpose("b", False)]
    got = changes(rs, *(reversed(choices) if reverse else choices))
    assert got == {"attr:marketing": False}


def test_unsubscribed_beats_subscribed_on_email(tmp_path: Path) -> None:
    """An on_chosen "subscribed" and an OPTED_IN refused in one event: email unsubscribed."""
    rs = rules(tmp_path, rule("OPTED_IN", "a", on_chosen="subscribed") + rule("OPTED_IN", "b"))
    assert changes(rs, purpose("a", True), purpose("b", False)) == {EMAIL: "unsubscribed"}


# ---------------------------------------------------------------------------
# on_chosen / on_refused overrides.


def test_on_chosen_subscribed_produces_email_subscribed(tmp_path: Path) -> None:
    """`on_chosen = "subscribed"` on OPTED_IN yields email_subscribe = "subscribed"."""
    rs = rules(tmp_path, rule("OPTED_IN", on_chosen="subscribed"))
    assert changes(rs, purpose("marketing_email", True)) == {EMAIL: "subscribed"}
    assert changes(rs, purpose("marketing_email", False)) == {EMAIL: "unsubscribed"}


def test_on_refused_none_keeps_email_on_refusal(tmp_path: Path) -> None:
    """`on_refused = "none"` makes a refusal change nothing."""
    rs = rules(tmp_path, rule("OPTED_IN", on_refused="none"))
    assert changes(rs, purpose("marketing_email", True)) == {EMAIL: "opted_in"}
    assert changes(rs, purpose("marketing_email", False)) == {}


def test_on_chosen_none_on_a_group(tmp_path: Path) -> None:
    """`on_chosen = "none"` on a group: choosing changes nothing, refusing still unsubscribes."""
    rs = rules(tmp_path, rule(NEWS, preference="topics", value="product_news", on_chosen="none"))
    assert changes(rs, purpose("marketing_email", True, topics="product_news")) == {}
    assert changes(rs, purpose("marketing_email", True, topics="offers")) == {
        f"group:{NEWS}": "unsubscribed"
    }


def test_on_refused_on_unsubscribed(tmp_path: Path) -> None:
    """UNSUBSCRIBED with `on_refused = "subscribed"` subscribes when the value is not chosen."""
    rs = rules(
        tmp_path,
        rule("UNSUBSCRIBED", preference="frequency", value="never", on_refused="subscribed"),
    )
    assert changes(rs, purpose("marketing_email", True, frequency="weekly")) == {
        EMAIL: "subscribed"
    }
    assert changes(rs, purpose("marketing_email", True, frequency="never")) == {
        EMAIL: "unsubscribed"
    }


def test_attribute_overrides_are_booleans(tmp_path: Path) -> None:
    """An attribute rule may invert itself with boolean on_chosen / on_refused."""
    rs = rules(
        tmp_path,
        '[[map]]\nto = "attribute:do_not_email"\npurpose = "marketing_email"\n'
        "on_chosen = false\non_refused = true\n",
    )
    assert changes(rs, purpose("marketing_email", True)) == {"attr:do_not_email": False}
    assert changes(rs, purpose("marketing_email", False)) == {"attr:do_not_email": True}


def test_attribute_override_none(tmp_path: Path) -> None:
    """`on_refused = "none"` works for attributes too."""
    rs = rules(tmp_path, rule("attribute:x", on_refused="none"))
    assert changes(rs, purpose("marketing_email", True)) == {"attr:x": True}
    assert changes(rs, purpose("marketing_email", False)) == {}


# ---------------------------------------------------------------------------
# Fixtures through the example rules.


def test_consent_given_with_topic_rules(tmp_path: Path) -> None:
    """consent_given.json opts in and subscribes both chosen topics."""
    rs = rules(tmp_path, EMAIL_RULES)
    result = rs.apply(fixture("consent_given.json"))
    assert result == Mapped(
        "external_id",
        "user-123",
        {
            EMAIL: "opted_in",
            f"group:{NEWS}": "subscribed",
            f"group:{OFFERS}": "subscribed",
            "attr:consent_marketing": True,
        },
        datetime(2025, 3, 14, 9, 26, 53, 589_000, tzinfo=UTC).timestamp(),
    )


def test_consent_withdrawn_unsubscribes_everything(tmp_path: Path) -> None:
    """consent_withdrawn.json (enabled:false, no values) refuses every rule on the purpose."""
    rs = rules(tmp_path, EMAIL_RULES)
    result = rs.apply(fixture("consent_withdrawn.json"))
    assert isinstance(result, Mapped)
    assert result.changes == {
        EMAIL: "unsubscribed",
        f"group:{NEWS}": "unsubscribed",
        f"group:{OFFERS}": "unsubscribed",
        "attr:consent_marketing": False,
    }


def test_null_choice_fixture_changes_nothing(tmp_path: Path) -> None:
    """null_choice.json (enabled:null, no values) asks for nothing."""
    rs = rules(tmp_path, EMAIL_RULES)
    assert rs.apply(fixture("null_choice.json")) == Skipped("no_rule")


def test_user_created_fixture(tmp_path: Path) -> None:
    """user_created.json names its user on the entity itself and applies its full status."""
    rs = rules(tmp_path, EMAIL_RULES)
    result = rs.apply(fixture("user_created.json"))
    assert isinstance(result, Mapped)
    assert result.identity == "external_id"
    assert result.person == "user-789"
    assert result.changes[f"group:{OFFERS}"] == "subscribed"
    assert result.changes[f"group:{NEWS}"] == "unsubscribed"


def test_the_repository_mapping_tests_pass(tmp_path: Path) -> None:
    """Every [[test]] of the shipped mappings/ folder holds for the compiled rules."""
    rs = load_rules(ROOT / "mappings")
    assert rs.tests
    for test in rs.tests:
        result = rs.apply(decode(event_from_test(test)))
        assert isinstance(result, Mapped), test.origin
        expect = test.spec.expect
        if expect.email_subscribe is not None:
            assert result.changes.get(EMAIL) == expect.email_subscribe, test.origin
        for group, state in (expect.subscription_groups or {}).items():
            assert result.changes.get(f"group:{group}") == state, test.origin
        for name, value in (expect.attributes or {}).items():
            assert result.changes.get(f"attr:{name}") == value, test.origin


def test_event_from_test_reads_a_relative_file_or_an_inline_table(tmp_path: Path) -> None:
    """A [[test]] event is a path relative to its mapping file, or an inline table as JSON."""
    folder = tmp_path / "mappings"
    (tmp_path / "events").mkdir()
    (tmp_path / "events" / "e.json").write_bytes((EVENTS / "consent_given.json").read_bytes())
    write(
        folder,
        "rules.toml",
        rule("OPTED_IN")
        + textwrap.dedent(
            """\
            [[test]]
            name = "from a file"
            event = "../events/e.json"
            expect = { email_subscribe = "opted_in" }

            [[test]]
            name = "inline"
            event = { type = "user.created", parameters = { entity = { id = "u" } } }
            """
        ),
    )
    rs = load_rules(folder)
    from_file, inline = rs.tests
    assert from_file.spec.name == "from a file"
    assert from_file.base == folder
    assert from_file.origin == f"{folder / 'rules.toml'}:5"
    assert event_from_test(from_file) == (EVENTS / "consent_given.json").read_bytes()
    assert json.loads(event_from_test(inline)) == {
        "type": "user.created",
        "parameters": {"entity": {"id": "u"}},
    }
    direct = LoadedTest(MappingTest(name="n", event={"type": "x"}), tmp_path, "here:1")
    assert json.loads(event_from_test(direct)) == {"type": "x"}


# ---------------------------------------------------------------------------
# Identity.


def test_default_identity_is_organization_user_id_of_the_user(tmp_path: Path) -> None:
    """Without [identity], event.* use entity.user.organization_user_id as external_id."""
    rs = rules(tmp_path, rule("OPTED_IN"))
    result = rs.apply(webhook("event.created", [purpose("marketing_email", True)]))
    assert isinstance(result, Mapped)
    assert (result.identity, result.person) == ("external_id", "user-1")


def test_user_types_read_identity_from_the_entity_itself(tmp_path: Path) -> None:
    """user.* take organization_user_id from the entity, not from a nested user."""
    rs = rules(tmp_path, rule("OPTED_IN"))
    for kind in ("user.created", "user.updated"):
        result = rs.apply(webhook(kind, [purpose("marketing_email", True)], person="u-9"))
        assert isinstance(result, Mapped), kind
        assert result.person == "u-9"


def test_event_types_do_not_read_the_entity_level_field(tmp_path: Path) -> None:
    """An event.* naming organization_user_id only on the entity (not its user) has no identity."""
    rs = rules(tmp_path, rule("OPTED_IN"))
    hook = webhook(
        "event.created", [purpose("marketing_email", True)], person=None, organization_user_id="x"
    )
    assert rs.apply(hook) == Skipped("no_identity")


@pytest.mark.parametrize(
    ("kind", "expected"),
    [("event.created", "didomi-1"), ("user.created", "ent-1"), ("event.updated", "didomi-1")],
)
def test_identity_by_didomi_id(tmp_path: Path, kind: str, expected: str) -> None:
    """`external_id = "id"` takes the Didomi user id: entity.user.id or the user entity's id."""
    rs = rules(tmp_path, '[identity]\nexternal_id = "id"\n\n' + rule("OPTED_IN"))
    assert rs.identity_field == "id"
    result = rs.apply(webhook(kind, [purpose("marketing_email", True)]))
    assert isinstance(result, Mapped)
    assert (result.identity, result.person) == ("external_id", expected)


def test_identity_from_user_metadata_for_events(tmp_path: Path) -> None:
    """`metadata.KEY` for event.* reads entity.user.metadata, not the event's metadata."""
    rs = rules(tmp_path, '[identity]\nexternal_id = "metadata.crm_id"\n\n' + rule("OPTED_IN"))
    hook = webhook(
        "event.created",
        [purpose("marketing_email", True)],
        user={"id": "d", "organization_user_id": "o", "metadata": {"crm_id": "crm-7"}},
        metadata={"crm_id": "wrong"},
    )
    result = rs.apply(hook)
    assert isinstance(result, Mapped)
    assert result.person == "crm-7"


def test_identity_from_entity_metadata_for_users(tmp_path: Path) -> None:
    """`metadata.KEY` for user.* reads the user entity's own metadata."""
    rs = rules(tmp_path, '[identity]\nexternal_id = "metadata.crm_id"\n\n' + rule("OPTED_IN"))
    hook = webhook("user.created", [purpose("marketing_email", True)], metadata={"crm_id": "c-1"})
    result = rs.apply(hook)
    assert isinstance(result, Mapped)
    assert result.person == "c-1"


def test_metadata_identity_missing_or_not_a_string_is_no_identity(tmp_path: Path) -> None:
    """A metadata key that is absent, empty or not a string gives no identity."""
    rs = rules(tmp_path, '[identity]\nexternal_id = "metadata.crm_id"\n\n' + rule("OPTED_IN"))
    for metadata in ({}, {"crm_id": ""}, {"crm_id": 42}, None):
        hook = webhook("user.created", [purpose("marketing_email", True)], metadata=metadata)
        assert rs.apply(hook) == Skipped("no_identity"), metadata


@pytest.mark.parametrize("kind", ["event.created", "user.created"])
def test_email_identity(tmp_path: Path, kind: str) -> None:
    """`[identity] email = ...` makes the person an email address, for both entity kinds."""
    rs = rules(tmp_path, '[identity]\nemail = "metadata.email"\n\n' + rule("OPTED_IN"))
    assert rs.identity == "email"
    if kind.startswith("event."):
        extra: dict[str, Any] = {"user": {"id": "d", "metadata": {"email": "a@example.com"}}}
    else:
        extra = {"metadata": {"email": "a@example.com"}}
    result = rs.apply(webhook(kind, [purpose("marketing_email", True)], **extra))
    assert isinstance(result, Mapped)
    assert (result.identity, result.person) == ("email", "a@example.com")
    assert result.changes == {EMAIL: "opted_in"}


def test_no_identity_is_skipped(tmp_path: Path) -> None:
    """no_identity.json (a user with no organization_user_id) is skipped as no_identity."""
    rs = rules(tmp_path, EMAIL_RULES)
    assert rs.apply(fixture("no_identity.json")) == Skipped("no_identity")


@pytest.mark.parametrize("kind", ["event.created", "user.created", "user.deleted"])
def test_missing_identity_is_skipped_for_every_kind(tmp_path: Path, kind: str) -> None:
    """Without the identity field, events and users alike are skipped as no_identity."""
    rs = rules(tmp_path, rule("OPTED_IN"))
    hook = webhook(kind, [purpose("marketing_email", True)], person=None)
    assert rs.apply(hook) == Skipped("no_identity")


def test_event_without_user_has_no_identity(tmp_path: Path) -> None:
    """An event entity with no `user` object has no identity."""
    rs = rules(tmp_path, rule("OPTED_IN"))
    hook = webhook("event.created", [purpose("marketing_email", True)], user=None)
    assert rs.apply(hook) == Skipped("no_identity")


# ---------------------------------------------------------------------------
# Status, deletion, unknown types.


def test_pending_event_is_not_confirmed(tmp_path: Path) -> None:
    """event_pending.json (status pending_approval) is skipped as not_confirmed."""
    rs = rules(tmp_path, EMAIL_RULES)
    assert rs.apply(fixture("event_pending.json")) == Skipped("not_confirmed")


def test_event_updated_applies_a_confirmed_new_entity(tmp_path: Path) -> None:
    """event_updated_confirmed.json applies new_entity, dated by its updated_at."""
    rs = rules(tmp_path, EMAIL_RULES)
    result = rs.apply(fixture("event_updated_confirmed.json"))
    assert isinstance(result, Mapped)
    assert result.person == "user-456"
    assert result.changes[EMAIL] == "opted_in"
    assert result.changes[f"group:{NEWS}"] == "subscribed"
    assert result.at == datetime(2025, 4, 2, 8, 31, 7, 902_000, tzinfo=UTC).timestamp()


def test_event_updated_to_pending_is_not_applied(tmp_path: Path) -> None:
    """An event.updated whose new_entity is pending is not applied, whatever old_entity was."""
    rs = rules(tmp_path, rule("OPTED_IN"))
    hook = webhook("event.updated", [purpose("marketing_email", True)], status="pending_approval")
    assert rs.apply(hook) == Skipped("not_confirmed")


def test_user_entities_are_confirmed(tmp_path: Path) -> None:
    """user.* apply even if they carry a status field: user entities are confirmed."""
    rs = rules(tmp_path, rule("OPTED_IN"))
    hook = webhook("user.created", [purpose("marketing_email", True)], status="pending_approval")
    assert isinstance(rs.apply(hook), Mapped)


def test_event_deleted_is_skipped(tmp_path: Path) -> None:
    """event_deleted.json is counted and ignored as deleted."""
    rs = rules(tmp_path, EMAIL_RULES)
    assert rs.apply(fixture("event_deleted.json")) == Skipped("deleted")


def test_user_deleted_ignored_by_default(tmp_path: Path) -> None:
    """With the default on_user_deleted = ignore, user.deleted is skipped as deleted."""
    rs = rules(tmp_path, EMAIL_RULES)
    assert rs.options.on_user_deleted == "ignore"
    assert rs.apply(fixture("user_deleted.json")) == Skipped("deleted")


def test_user_deleted_unsubscribe(tmp_path: Path) -> None:
    """on_user_deleted = unsubscribe unsubscribes email and every group any rule targets."""
    rs = rules(tmp_path, EMAIL_RULES, Options(on_user_deleted="unsubscribe"))
    result = rs.apply(fixture("user_deleted.json"))
    assert result == Mapped(
        "external_id",
        "user-789",
        {EMAIL: "unsubscribed", f"group:{NEWS}": "unsubscribed", f"group:{OFFERS}": "unsubscribed"},
        datetime(2025, 6, 12, 14, 3, 55, 731_000, tzinfo=UTC).timestamp(),
        erasure=True,
    )


def test_user_deleted_delete(tmp_path: Path) -> None:
    """on_user_deleted = delete asks for the Braze user to be deleted."""
    rs = rules(tmp_path, EMAIL_RULES, Options(on_user_deleted="delete"))
    result = rs.apply(fixture("user_deleted.json"))
    assert isinstance(result, Mapped)
    assert result.delete is True
    assert result.person == "user-789"
    assert result.changes == {}


def test_unknown_type_is_ignored(tmp_path: Path) -> None:
    """A type outside the six is skipped as ignored."""
    rs = rules(tmp_path, rule("OPTED_IN"))
    hook = decode(b'{"type": "consent.exported", "parameters": {"entity": {"id": "x"}}}')
    assert rs.apply(hook) == Skipped("ignored")


def test_no_matching_rule_is_skipped(tmp_path: Path) -> None:
    """An event whose purposes no rule names is skipped as no_rule."""
    rs = rules(tmp_path, EMAIL_RULES)
    hook = webhook("event.created", [purpose("analytics", True), purpose("cookies", False)])
    assert rs.apply(hook) == Skipped("no_rule")
    assert rs.apply(webhook("event.created", [])) == Skipped("no_rule")


# ---------------------------------------------------------------------------
# Regulations.


def test_cpra_event_is_skipped_with_default_regulations(tmp_path: Path) -> None:
    """cpra_event.json is not applied with the default ["gdpr"]."""
    rs = rules(tmp_path, EMAIL_RULES)
    assert rs.apply(fixture("cpra_event.json")) == Skipped("regulation")


def test_cpra_event_applies_when_configured(tmp_path: Path) -> None:
    """Listing cpra in Options.regulations applies cpra events."""
    rs = rules(tmp_path, EMAIL_RULES, Options(regulations=frozenset({"gdpr", "cpra"})))
    result = rs.apply(fixture("cpra_event.json"))
    assert isinstance(result, Mapped)
    assert result.person == "user-321"


def test_entity_regulation_beats_the_envelope(tmp_path: Path) -> None:
    """The entity's regulation is used before the envelope's."""
    rs = rules(tmp_path, rule("OPTED_IN"))
    choice = [purpose("marketing_email", True)]
    hook = webhook("event.created", choice, regulation="cpra")
    assert rs.apply(hook) == Skipped("regulation")  # envelope only: cpra
    hook = decode(
        json.dumps(
            {
                "type": "event.created",
                "regulation": "cpra",
                "parameters": {"entity": entity("event.created", choice, regulation="gdpr")},
            }
        ).encode()
    )
    assert isinstance(rs.apply(hook), Mapped)


def test_envelope_regulation_is_used_without_an_entity_regulation(tmp_path: Path) -> None:
    """Without an entity regulation, the envelope's decides."""
    choice = [purpose("marketing_email", True)]
    gdpr_only = rules(tmp_path / "a", rule("OPTED_IN"))
    cpra_only = rules(tmp_path / "b", rule("OPTED_IN"), Options(regulations=frozenset({"cpra"})))
    hook = webhook("user.created", choice, regulation="cpra")
    assert gdpr_only.apply(hook) == Skipped("regulation")
    assert isinstance(cpra_only.apply(hook), Mapped)


def test_regulation_defaults_to_gdpr(tmp_path: Path) -> None:
    """With no regulation anywhere, the event counts as gdpr."""
    choice = [purpose("marketing_email", True)]
    gdpr_only = rules(tmp_path / "a", rule("OPTED_IN"))
    cpra_only = rules(tmp_path / "b", rule("OPTED_IN"), Options(regulations=frozenset({"cpra"})))
    hook = webhook("event.created", choice)
    assert hook.regulation is None
    assert isinstance(gdpr_only.apply(hook), Mapped)
    assert cpra_only.apply(hook) == Skipped("regulation")


# ---------------------------------------------------------------------------
# Dating a choice.


def test_at_is_updated_at_in_epoch_seconds(tmp_path: Path) -> None:
    """Mapped.at is the entity's updated_at as epoch seconds, milliseconds kept."""
    rs = rules(tmp_path, rule("OPTED_IN"))
    hook = webhook(
        "event.created",
        [purpose("marketing_email", True)],
        created_at="2025-01-01T00:00:00Z",
        updated_at="2025-01-02T00:00:00.250Z",
    )
    result = rs.apply(hook)
    assert isinstance(result, Mapped)
    assert result.at == datetime(2025, 1, 2, tzinfo=UTC).timestamp() + 0.25


def test_at_falls_back_to_created_at(tmp_path: Path) -> None:
    """Without updated_at, Mapped.at is created_at as epoch seconds."""
    rs = rules(tmp_path, rule("OPTED_IN"))
    hook = webhook(
        "user.created",
        [purpose("marketing_email", True)],
        created_at="2025-01-01T12:00:00+02:00",
        updated_at=None,
    )
    result = rs.apply(hook)
    assert isinstance(result, Mapped)
    assert result.at == datetime(2025, 1, 1, 10, tzinfo=UTC).timestamp()


# ---------------------------------------------------------------------------
# Mapping errors: each as `file:line: message`.


def test_unknown_top_level_key_and_table(tmp_path: Path) -> None:
    """A top-level key or [table] that is not identity/map/test is an error on its line."""
    folder = tmp_path / "m"
    path = write(folder, "a.toml", 'colour = "x"\n\n' + rule("OPTED_IN") + "[identty]\nid = 1\n")
    error = load_error(folder)
    allowed = "a mapping file holds [identity], [[map]], [[test]]"
    assert [str(p) for p in error.problems] == [
        f"{path}:1: unknown key 'colour'; {allowed}",
        f"{path}:{line_of(path, '[identty]')}: unknown key 'identty'; {allowed}",
    ]


def test_unknown_array_of_tables_is_on_its_line(tmp_path: Path) -> None:
    """A misspelt [[maps]] is reported on its header line like every other problem."""
    folder = tmp_path / "m"
    path = write(folder, "a.toml", rule("OPTED_IN") + '[[maps]]\nto = "OPTED_IN"\n')
    error = load_error(folder)
    line = line_of(path, "[[maps]]")
    assert [str(p) for p in error.problems] == [
        f"{path}:{line}: unknown key 'maps'; a mapping file holds [identity], [[map]], [[test]]"
    ]


def test_unknown_key_inside_map(tmp_path: Path) -> None:
    """A typo inside [[map]] is reported on its line with a did-you-mean and the allowed keys."""
    folder = tmp_path / "m"
    path = write(folder, "a.toml", rule("OPTED_IN") + rule("OPTED_IN", "b", prefrence="x"))
    error = load_error(folder)
    assert [str(p) for p in error.problems] == [
        f"{path}:{line_of(path, 'prefrence')}: unknown key 'prefrence' (did you mean "
        "'preference'?); allowed: on_chosen, on_refused, preference, purpose, to, value"
    ]


def test_unknown_key_inside_a_tests_expect_table_has_a_hint(tmp_path: Path) -> None:
    """A typo inside a [[test]]'s `expect` is reported on its line with a did-you-mean and the
    allowed keys, as a typo one level up is."""
    folder = tmp_path / "m"
    path = write(
        folder,
        "a.toml",
        rule("OPTED_IN")
        + '[[test]]\nname = "t"\nevent = "e.json"\nexpect = { emailsubscribe = "opted_in" }\n',
    )
    assert [str(p) for p in load_error(folder).problems] == [
        f"{path}:{line_of(path, 'emailsubscribe')}: test[0].expect: unknown key 'emailsubscribe'"
        " (did you mean 'email_subscribe'?); allowed: attributes, email_subscribe,"
        " subscription_groups"
    ]


def test_unknown_key_inside_identity_and_test(tmp_path: Path) -> None:
    """Typos inside [identity] and [[test]] are reported on their lines too."""
    folder = tmp_path / "m"
    path = write(
        folder,
        "a.toml",
        '[identity]\nexternal_idd = "id"\n\n'
        + rule("OPTED_IN")
        + '[[test]]\nname = "t"\nevent = "e.json"\nexpected = {}\n',
    )
    text = str(load_error(folder))
    assert f"{path}:2: unknown key 'external_idd' (did you mean 'external_id'?)" in text
    assert f"{path}:{line_of(path, 'expected')}: unknown key 'expected' (did you mean" in text


def test_wrong_types_in_a_mapping(tmp_path: Path) -> None:
    """Values of the wrong type are reported as `file:line: map[i].key: expected ...`."""
    folder = tmp_path / "m"
    path = write(
        folder,
        "a.toml",
        rule("OPTED_IN")
        + '[[map]]\nto = "OPTED_IN"\npurpose = 5\n\n'
        + '[[map]]\nto = ["OPTED_IN"]\npurpose = "c"\n\n'
        + '[[test]]\nname = 3\nevent = "e.json"\n',
    )
    assert [str(p) for p in load_error(folder).problems] == [
        f"{path}:{line_of(path, 'purpose = 5')}: map[1].purpose: expected `str | null`, got `int`",
        f"{path}:{line_of(path, 'to = [')}: map[2].to: expected `str`, got `array`",
        f"{path}:{line_of(path, 'name = 3')}: test[0].name: expected `str`, got `int`",
    ]


def test_map_that_is_not_an_array_of_tables(tmp_path: Path) -> None:
    """`map = "x"` is reported on its line, saying to write [[map]]."""
    folder = tmp_path / "m"
    path = write(folder, "a.toml", 'map = "OPTED_IN"\n')
    problems = load_error(folder).problems
    assert str(problems[0]) == f"{path}:1: map must be an array of tables: write [[map]]"


@pytest.mark.parametrize("to", ["opted_in", "group:abc", "OPTEDIN", "3b0a6f8e-5c1d-4e2f-9a7b", ""])
def test_unknown_to_kind(tmp_path: Path, to: str) -> None:
    """A `to` that is no target kind is reported on the `to` line listing the four kinds."""
    folder = tmp_path / "m"
    path = write(folder, "a.toml", rule("OPTED_IN") + rule(to, "b"))
    (problem,) = load_error(folder).problems
    assert str(problem) == (
        f"{path}:{line_of(path, 'to = ', 2)}: unknown `to` {to!r}: use OPTED_IN, UNSUBSCRIBED, "
        "a subscription group id (UUID) or attribute:NAME"
    )


@pytest.mark.parametrize("name", ["", "bad/name", "-dash"])
def test_invalid_attribute_name(tmp_path: Path, name: str) -> None:
    """`attribute:` with an empty or odd name is refused on its `to` line."""
    folder = tmp_path / "m"
    path = write(folder, "a.toml", rule("OPTED_IN") + rule(f"attribute:{name}", "b"))
    (problem,) = load_error(folder).problems
    assert str(problem) == (
        f"{path}:{line_of(path, 'attribute:')}: 'attribute:{name}': an attribute name needs "
        "letters, digits or _"
    )


@pytest.mark.parametrize("field", ["email", "external_id", "email_subscribe", "first_name"])
def test_attribute_may_not_name_a_braze_profile_field(tmp_path: Path, field: str) -> None:
    """`attribute:email` and other Braze profile fields are refused on the `to` line."""
    folder = tmp_path / "m"
    path = write(folder, "a.toml", rule("OPTED_IN") + rule(f"attribute:{field}", "b"))
    (problem,) = load_error(folder).problems
    assert str(problem) == (
        f"{path}:{line_of(path, 'attribute:')}: 'attribute:{field}' would overwrite Braze's "
        f"profile field {field!r}"
    )


def test_a_preference_without_a_purpose(tmp_path: Path) -> None:
    """A preference rule with no purpose is refused on its [[map]] line."""
    folder = tmp_path / "m"
    path = write(
        folder,
        "a.toml",
        rule("OPTED_IN") + '[[map]]\nto = "OPTED_IN"\npreference = "topics"\nvalue = "x"\n',
    )
    (problem,) = load_error(folder).problems
    assert str(problem) == (
        f"{path}:{line_of(path, '[[map]]', 2)}: a preference without a purpose: "
        'add purpose = "<Didomi purpose id>"'
    )


def test_a_rule_without_a_purpose(tmp_path: Path) -> None:
    """A rule with neither purpose nor preference is refused on its [[map]] line."""
    folder = tmp_path / "m"
    path = write(folder, "a.toml", rule("OPTED_IN") + '[[map]]\nto = "UNSUBSCRIBED"\n')
    (problem,) = load_error(folder).problems
    assert str(problem) == (
        f"{path}:{line_of(path, '[[map]]', 2)}: a rule without a purpose: "
        'add purpose = "<Didomi purpose id>"'
    )


@pytest.mark.parametrize("extra", [{"preference": "topics"}, {"value": "offers"}])
def test_a_preference_needs_both_preference_and_value(
    tmp_path: Path, extra: dict[str, str]
) -> None:
    """A preference without value (or a value without preference) is refused on its line."""
    folder = tmp_path / "m"
    path = write(folder, "a.toml", rule("OPTED_IN") + rule(NEWS, **extra))
    (problem,) = load_error(folder).problems
    assert str(problem) == (
        f"{path}:{line_of(path, '[[map]]', 2)}: a preference rule needs both `preference` and "
        "`value`"
    )


def test_duplicate_rules_name_the_first(tmp_path: Path) -> None:
    """A rule repeating target, purpose, preference and value names where the first one is."""
    folder = tmp_path / "m"
    path = write(
        folder,
        "a.toml",
        rule(NEWS, preference="topics", value="news")
        + rule("OPTED_IN")
        + rule(NEWS, preference="topics", value="news", on_chosen="none"),
    )
    (problem,) = load_error(folder).problems
    first, third = line_of(path, "[[map]]", 1), line_of(path, "[[map]]", 3)
    assert str(problem) == (
        f"{path}:{third}: duplicate rule: the same target, purpose and value as {path}:{first}"
    )


def test_duplicate_rules_across_files(tmp_path: Path) -> None:
    """A duplicate in a second file names the first file's place."""
    folder = tmp_path / "m"
    a = write(folder, "a.toml", "\n" + rule("OPTED_IN"))
    b = write(folder, "b.toml", rule("OPTED_IN"))
    (problem,) = load_error(folder).problems
    assert str(problem) == f"{b}:1: duplicate rule: the same target, purpose and value as {a}:2"


def test_a_second_identity_across_files(tmp_path: Path) -> None:
    """Only one [identity] may exist in the folder; the second names the first."""
    folder = tmp_path / "m"
    a = write(folder, "a.toml", rule("OPTED_IN") + '[identity]\nexternal_id = "id"\n')
    b = write(folder, "b.toml", '\n[identity]\nemail = "metadata.email"\n')
    (problem,) = load_error(folder).problems
    assert str(problem) == (
        f"{b}:2: a second [identity]; the first is at {a}:{line_of(a, '[identity]')}"
    )


def test_identity_names_exactly_one_field(tmp_path: Path) -> None:
    """[identity] with both external_id and email (or neither) is refused on its line."""
    folder = tmp_path / "m"
    path = write(
        folder,
        "a.toml",
        '[identity]\nexternal_id = "id"\nemail = "metadata.email"\n\n' + rule("OPTED_IN"),
    )
    (problem,) = load_error(folder).problems
    assert str(problem) == f"{path}:1: [identity] names exactly one of external_id or email"

    empty = tmp_path / "e"
    path = write(empty, "a.toml", "[identity]\n\n" + rule("OPTED_IN"))
    (problem,) = load_error(empty).problems
    assert str(problem) == f"{path}:1: [identity] names exactly one of external_id or email"


@pytest.mark.parametrize("field", ["uid", "user.organization_user_id", "metadata.", "email"])
def test_unknown_identity_field(tmp_path: Path, field: str) -> None:
    """An identity field that is not organization_user_id, id or metadata.KEY is refused."""
    folder = tmp_path / "m"
    path = write(folder, "a.toml", f'[identity]\nexternal_id = "{field}"\n\n' + rule("OPTED_IN"))
    (problem,) = load_error(folder).problems
    assert str(problem) == (
        f"{path}:2: unknown Didomi user field {field!r}; use organization_user_id, id or "
        "metadata.KEY"
    )


@pytest.mark.parametrize(
    ("to", "key", "value", "allowed"),
    [
        (NEWS, "on_chosen", '"opted_in"', "'subscribed', 'unsubscribed', 'none'"),
        ("OPTED_IN", "on_chosen", "true", "'opted_in', 'subscribed', 'unsubscribed', 'none'"),
        ("UNSUBSCRIBED", "on_refused", '"maybe"', "'opted_in', 'subscribed', 'unsubscribed'"),
        ("attribute:x", "on_refused", '"unsubscribed"', "false, true, 'none'"),
        ("attribute:x", "on_chosen", '"true"', "false, true, 'none'"),
        (NEWS, "on_refused", "false", "'subscribed', 'unsubscribed', 'none'"),
    ],
)
def test_invalid_override_for_the_target(
    tmp_path: Path, to: str, key: str, value: str, allowed: str
) -> None:
    """on_chosen / on_refused must be a state valid for the target or "none"; else an error."""
    folder = tmp_path / "m"
    path = write(
        folder,
        "a.toml",
        rule("OPTED_IN", "other") + f'[[map]]\nto = "{to}"\npurpose = "p"\n{key} = {value}\n',
    )
    (problem,) = load_error(folder).problems
    text = str(problem)
    assert text.startswith(f"{path}:{line_of(path, key)}: {key} = ")
    assert f"is not valid for {to}; use {allowed}" in text


def test_invalid_toml_in_a_mapping(tmp_path: Path) -> None:
    """A TOML syntax error is reported on the line tomllib names."""
    folder = tmp_path / "m"
    path = write(folder, "a.toml", rule("OPTED_IN") + "[[map]\nto = 1\n")
    (problem,) = load_error(folder).problems
    line = line_of(path, "[[map]", 2)
    assert (
        str(problem)
        == f"{path}:{line}: invalid TOML: Expected ']]' at the end of an array declaration"
    )


def test_invalid_utf8_mapping_is_unreadable(tmp_path: Path) -> None:
    """A mapping file that is not UTF-8 is reported as unreadable."""
    folder = tmp_path / "m"
    write(folder, "a.toml", rule("OPTED_IN"))
    bad = folder / "b.toml"
    bad.write_bytes(b"\xff\xfe[[map]]\n")
    (problem,) = load_error(folder).problems
    assert str(problem).startswith(f"{bad}: cannot read the file: 'utf-8' codec can't decode")


@pytest.mark.skipif(
    hasattr(os, "geteuid") and os.geteuid() == 0, reason="root can read a chmod 000 file"
)
def test_unreadable_mapping_file(tmp_path: Path) -> None:
    """A mapping file without read permission is reported as unreadable."""
    folder = tmp_path / "m"
    write(folder, "a.toml", rule("OPTED_IN"))
    bad = write(folder, "b.toml", rule("OPTED_IN", "b"))
    bad.chmod(0)
    try:
        (problem,) = load_error(folder).problems
    finally:
        bad.chmod(0o600)
    assert str(problem) == f"{bad}: cannot read the file: Permission denied"


def test_a_directory_named_toml_is_skipped(tmp_path: Path) -> None:
    """A sub-folder called x.toml is not a mapping file and is silently skipped."""
    folder = tmp_path / "m"
    write(folder, "a.toml", rule("OPTED_IN"))
    (folder / "x.toml").mkdir()
    rs = load_rules(folder)
    assert rs.files == [str(folder / "a.toml")]


def test_other_files_are_not_read(tmp_path: Path) -> None:
    """Only *.toml files are mapping files; README.md and backups are ignored."""
    folder = tmp_path / "m"
    write(folder, "a.toml", rule("OPTED_IN"))
    write(folder, "README.md", "[[map]] not toml")
    write(folder, "a.toml.bak", "not toml = = =")
    assert load_rules(folder).files == [str(folder / "a.toml")]


def test_an_empty_folder_is_an_error(tmp_path: Path) -> None:
    """A folder with no *.toml is an error naming the folder."""
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "x.toml").mkdir()
    (problem,) = load_error(folder).problems
    assert str(problem) == f"{folder}: no *.toml mapping files in this folder"


def test_a_missing_folder_is_an_error(tmp_path: Path) -> None:
    """A mappings folder that does not exist is an error naming it."""
    folder = tmp_path / "absent"
    (problem,) = load_error(folder).problems
    assert str(problem).startswith(f"{folder}: cannot read the mappings folder: ")
    assert "No such file or directory" in str(problem)


def test_files_without_rules_are_an_error(tmp_path: Path) -> None:
    """Mapping files holding no [[map]] rule at all are an error."""
    folder = tmp_path / "m"
    write(folder, "a.toml", '[identity]\nexternal_id = "id"\n')
    (problem,) = load_error(folder).problems
    assert str(problem) == f"{folder}: the mapping files hold no [[map]] rules"


def test_all_problems_across_files_are_reported_together(tmp_path: Path) -> None:
    """Problems in several files come back in one ConfigError, each on its file and line."""
    folder = tmp_path / "m"
    a = write(folder, "a.toml", rule("OPTED_IN") + rule("attribute:email", "b"))
    b = write(folder, "b.toml", "[[map]\n")
    c = write(folder, "c.toml", rule("OPTED_IN") + rule("nope", "c", colour="red"))
    (folder / "d.toml").write_bytes(b"\xff")
    error = load_error(folder)
    files = [p.file for p in error.problems]
    assert files == [str(a), str(b), str(c), str(c), str(c), str(folder / "d.toml")]
    text = str(error)
    assert f"{a}:{line_of(a, 'attribute:email')}: 'attribute:email' would overwrite" in text
    assert f"{b}:1: invalid TOML" in text
    assert f"{c}:{line_of(c, 'colour')}: unknown key 'colour'" in text
    assert f"{c}:1: duplicate rule" in text
    assert f"{folder / 'd.toml'}: cannot read the file" in text
    assert len(text.splitlines()) == len(error.problems)


# ---------------------------------------------------------------------------
# Compiled tables.


def test_rules_are_indexed_by_purpose_and_preference(tmp_path: Path) -> None:
    """Purpose rules go to by_purpose, value rules to by_preference[purpose][preference]."""
    rs = rules(tmp_path, EMAIL_RULES + rule("OPTED_IN", "newsletter"))
    assert sorted(rs.by_purpose) == ["marketing_email", "newsletter"]
    assert [r.target for r in rs.by_purpose["marketing_email"]] == [
        EMAIL,
        "attr:consent_marketing",
    ]
    prefs = rs.by_preference["marketing_email"]
    assert sorted(prefs) == ["frequency", "topics"]
    assert [(r.target, r.value) for r in prefs["topics"]] == [
        (f"group:{NEWS}", "product_news"),
        (f"group:{OFFERS}", "offers"),
    ]
    assert "newsletter" not in rs.by_preference
    assert len(rs.rules) == 6
    assert rs.groups == sorted([NEWS, OFFERS])
    origin = rs.by_purpose["newsletter"][0].origin
    assert origin == f"{tmp_path / 'mappings' / 'rules.toml'}:{EMAIL_RULES.count(chr(10)) + 1}"


def test_ten_thousand_purposes_map_one_event_to_its_rules_only(tmp_path: Path) -> None:
    """10,000 rules on 10,000 purposes: an event on one purpose gets only that purpose's rule."""
    n = 10_000
    text = "".join(rule(f"attribute:a{i}", f"p{i}") for i in range(n))
    rs = rules(tmp_path, text)
    assert len(rs.rules) == n
    assert len(rs.by_purpose) == n
    assert all(len(v) == 1 for v in rs.by_purpose.values())
    assert rs.by_purpose["p4242"][0].target == "attr:a4242"
    assert rs.by_preference == {}
    assert changes(rs, purpose("p4242", True)) == {"attr:a4242": True}
    assert changes(rs, purpose("p9999", False), purpose("unknown", True)) == {"attr:a9999": False}


def test_summary_mentions_counts_targets_and_purposes(tmp_path: Path) -> None:
    """RuleSet.summary gives rule, file and test counts, rules per target and the purposes."""
    rs = rules(
        tmp_path,
        EMAIL_RULES + rule("OPTED_IN", "newsletter") + '[[test]]\nname = "t"\nevent = "e.json"\n',
    )
    summary = rs.summary()
    assert "6 rules in 1 file(s), 1 test(s)" in summary
    assert "identity: Braze external_id <- Didomi user organization_user_id" in summary
    lines = summary.splitlines()
    per_target = {line.split()[0]: int(line.split()[-1]) for line in lines if line.startswith("  ")}
    assert per_target == {
        EMAIL: 3,
        f"group:{NEWS}": 1,
        f"group:{OFFERS}": 1,
        "attr:consent_marketing": 1,
    }
    assert "purposes referenced (2): marketing_email, newsletter" in summary


def test_summary_names_an_email_identity(tmp_path: Path) -> None:
    """The summary says which Braze identifier the identity field fills."""
    rs = rules(tmp_path, '[identity]\nemail = "metadata.email"\n\n' + rule("OPTED_IN"))
    assert "identity: Braze email <- Didomi user metadata.email" in rs.summary()


# ---------------------------------------------------------------------------
# Edges found in review.


def test_a_timestamp_without_offset_is_utc(tmp_path: Path) -> None:
    """A Didomi time written without an offset is read as UTC, never the host's time zone."""
    ruleset = rules(tmp_path, rule("OPTED_IN"))
    naive = ruleset.apply(
        webhook(
            "event.created", [purpose("marketing_email", True)], updated_at="2025-03-14T09:00:00"
        )
    )
    aware = ruleset.apply(
        webhook(
            "event.created", [purpose("marketing_email", True)], updated_at="2025-03-14T09:00:00Z"
        )
    )
    assert isinstance(naive, Mapped)
    assert isinstance(aware, Mapped)
    assert naive.at == aware.at


def test_the_same_group_in_two_letter_cases_is_a_duplicate(tmp_path: Path) -> None:
    """Group ids compile to lowercase, so the same id written twice in two cases is a duplicate."""
    folder = tmp_path / "m"
    path = write(folder, "a.toml", rule(NEWS) + rule(NEWS.upper()))
    error = load_error(folder)
    assert len(error.problems) == 1
    assert "duplicate rule" in str(error.problems[0])
    assert f"{path}:1" in str(error.problems[0])


def test_both_invalid_overrides_are_reported(tmp_path: Path) -> None:
    """A rule with a wrong on_chosen and a wrong on_refused gets two problems, not one."""
    folder = tmp_path / "m"
    write(folder, "a.toml", rule("OPTED_IN", on_chosen="maybe", on_refused="later"))
    error = load_error(folder)
    assert [p.message.split(" =")[0] for p in error.problems] == ["on_chosen", "on_refused"]


def test_erasure_by_deletion_works_with_an_email_identity(tmp_path: Path) -> None:
    """on_user_deleted = "delete" with an email identity maps to a deletion by email address."""
    folder = tmp_path / "m"
    write(folder, "a.toml", '[identity]\nemail = "organization_user_id"\n\n' + rule("OPTED_IN"))
    rs = load_rules(folder, Options(on_user_deleted="delete"))
    body = {
        "type": "user.deleted",
        "parameters": {"entity": {"id": "u1", "organization_user_id": "ann@example.com"}},
    }
    result = rs.apply(decode(msgspec.json.encode(body)), received_at=1_000.0)
    assert isinstance(result, Mapped)
    assert (result.identity, result.person, result.delete) == ("email", "ann@example.com", True)


def test_a_choice_dated_past_arrival_plus_the_skew_is_clamped(tmp_path: Path) -> None:
    """A date later than arrival + max_clock_skew_s becomes the arrival, and says so."""
    rs = rules(tmp_path, EMAIL_RULES, Options(max_clock_skew_s=300))
    arrival = datetime(2025, 3, 14, 9, 0, tzinfo=UTC).timestamp()
    future = webhook(
        purposes=[purpose("marketing_email", True)],
        updated_at="2096-01-01T00:00:00Z",
        created_at="2096-01-01T00:00:00Z",
    )
    result = rs.apply(future, received_at=arrival)
    assert isinstance(result, Mapped)
    assert (result.at, result.clamped) == (arrival, True)
    near = webhook(
        purposes=[purpose("marketing_email", True)],
        updated_at="2025-03-14T09:04:00Z",
        created_at="2025-03-14T09:04:00Z",
    )
    kept = rs.apply(near, received_at=arrival)
    assert isinstance(kept, Mapped)
    assert (kept.at, kept.clamped) == (arrival + 240, False)


def test_an_undated_choice_is_dated_at_its_arrival(tmp_path: Path) -> None:
    """Without updated_at or created_at, a choice takes its arrival time, not 1970."""
    rs = rules(tmp_path, EMAIL_RULES)
    undated = webhook(
        purposes=[purpose("marketing_email", False)], updated_at=None, created_at=None
    )
    result = rs.apply(undated, received_at=1_700_000_000.0)
    assert isinstance(result, Mapped)
    assert result.at == 1_700_000_000.0


def test_erasure_is_dated_at_its_arrival_not_the_profiles_date(tmp_path: Path) -> None:
    """A user.deleted carries the profile's old dates; the erasure counts from its arrival."""
    rs = rules(tmp_path, EMAIL_RULES, Options(on_user_deleted="unsubscribe"))
    arrival = datetime(2026, 1, 1, tzinfo=UTC).timestamp()
    result = rs.apply(fixture("user_deleted.json"), received_at=arrival)
    assert isinstance(result, Mapped)
    assert (result.at, result.erasure) == (arrival, True)
