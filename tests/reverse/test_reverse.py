"""gateway.reverse: the [[map]] rules read backwards, Braze changes to Didomi consent edits."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import pytest

from gateway.reverse.braze_webhooks import (
    BrazeChange,
    decode_currents_event,
    decode_step,
    split_currents,
)
from gateway.reverse.rules import SOURCE, ConsentEdit, PurposeEdit, ReverseRules
from gateway.rules.mappings import EMAIL, RuleSet, Target, load_rules
from gateway.shapes.webhooks import PreferenceValue, Purpose

ROOT = Path(__file__).resolve().parents[2]
MAPPING = ROOT / "mappings" / "email.toml"
BRAZE = ROOT / "tests" / "events" / "braze"
NEWS = "3b0a6f8e-5c1d-4e2f-9a7b-0c1d2e3f4a5b"
OFFERS = "7c1e2d3f-4a5b-4c6d-8e9f-0a1b2c3d4e5f"
OTHER = "9d8c7b6a-5f4e-4d3c-8b2a-1f0e9d8c7b6a"
PID = "marketing_email"
T = 1746531618.0
UNSUBSCRIBED_LINE = 'to = "UNSUBSCRIBED"'

SHIPPED = ReverseRules.from_ruleset(load_rules(ROOT / "mappings"))


def rules(tmp_path: Path, text: str) -> ReverseRules:
    """Reverse rules of one (dedented) mapping file written to tmp_path/mappings."""
    folder = tmp_path / "mappings"
    folder.mkdir(exist_ok=True)
    (folder / "rules.toml").write_text(textwrap.dedent(text), encoding="utf-8")
    return ReverseRules.from_ruleset(load_rules(folder))


def rule(to: str, pid: str = PID, **extra: str) -> str:
    """One [[map]] table as TOML text."""
    lines = ["[[map]]", f'to = "{to}"', f'purpose = "{pid}"']
    lines += [f'{k} = "{v}"' for k, v in extra.items()]
    return "\n".join(lines) + "\n\n"


def change(target: str, state: str, at: float = T, person: str | None = "user-1") -> BrazeChange:
    """One Braze change of `target` ("email" or a group id) for `person`."""
    resolved = EMAIL if target == "email" else Target.group(target)
    return BrazeChange(person, "a@example.com", resolved, state, at, None)


def current(enabled: bool | None = True, **values: str) -> list[Purpose]:
    """The person's current Didomi purposes: marketing_email with `values` per preference."""
    prefs = {k: PreferenceValue(value=v) for k, v in values.items()} if values else None
    return [Purpose(id=PID, enabled=enabled, values=prefs)]


def purposes(
    changes: list[BrazeChange], now: list[Purpose] | None = None, reverse: ReverseRules = SHIPPED
) -> list[dict[str, Any]]:
    """The consents.purposes the shipped rules write for `changes` against `now`."""
    edit = reverse.edit(changes)
    assert edit is not None
    return edit.apply(now)


def line_of(path: Path, needle: str) -> int:
    """The 1-based number of the [[map]] line opening the table that contains `needle`."""
    lines = path.read_text(encoding="utf-8").splitlines()
    found = next(i for i, line in enumerate(lines) if needle in line)
    return next(i for i in range(found, -1, -1) if lines[i].strip() == "[[map]]") + 1


# ---------------------------------------------------------------------------
# Every rule of mappings/email.toml, both ways.


def test_every_shipped_rule_is_reversed_or_reported() -> None:
    """Each rule of email.toml is either compiled backwards or listed with a reason."""
    ruleset: RuleSet = load_rules(ROOT / "mappings")
    compiled = sum(len(found) for found in SHIPPED.by_target.values())
    assert compiled + len(SHIPPED.unreversible) == len(ruleset.rules) == 5
    assert set(SHIPPED.by_target) == {EMAIL, Target.group(NEWS), Target.group(OFFERS)}


def test_shipped_unsubscribed_and_attribute_rules_are_reported_at_their_lines() -> None:
    """The UNSUBSCRIBED frequency rule and the attribute rule are reported with file:line."""
    [(unsub_at, unsub), (attr_at, attr)] = SHIPPED.unreversible
    assert unsub_at == f"{MAPPING}:{line_of(MAPPING, UNSUBSCRIBED_LINE)}"
    assert "UNSUBSCRIBED" in unsub
    assert "which Didomi value" in unsub
    assert attr_at == f"{MAPPING}:{line_of(MAPPING, 'attribute:consent_marketing')}"
    assert "attribute" in attr


def test_email_unsubscribed_refuses_the_opted_in_purpose() -> None:
    """A global email unsubscribe writes the OPTED_IN purpose `enabled: false`."""
    assert purposes([change("email", "unsubscribed")]) == [{"id": PID, "enabled": False}]


def test_email_opted_in_chooses_the_opted_in_purpose() -> None:
    """A global email opt-in writes the OPTED_IN purpose `enabled: true`."""
    assert purposes([change("email", "opted_in")]) == [{"id": PID, "enabled": True}]


def test_email_subscribed_changes_nothing() -> None:
    """Braze's neutral `subscribed` names no Didomi choice: nothing is mapped."""
    assert SHIPPED.edit([change("email", "subscribed")]) is None


@pytest.mark.parametrize(("group", "value"), [(NEWS, "product_news"), (OFFERS, "offers")])
def test_group_subscribed_adds_its_value_and_chooses_the_purpose(group: str, value: str) -> None:
    """Subscribing to a group adds its value to `topics` and enables the purpose it needs."""
    assert purposes([change(group, "subscribed")]) == [
        {"id": PID, "enabled": True, "values": {"topics": {"value": value}}}
    ]


@pytest.mark.parametrize(
    ("group", "kept", "other"),
    [(NEWS, "offers", "product_news"), (OFFERS, "product_news", "offers")],
)
def test_group_subscribed_keeps_the_other_groups_value(group: str, kept: str, other: str) -> None:
    """The person's value for the other group stays, and the new one is appended."""
    written = purposes([change(group, "subscribed")], current(topics=kept))
    assert written == [
        {"id": PID, "enabled": True, "values": {"topics": {"value": f"{kept},{other}"}}}
    ]


@pytest.mark.parametrize(
    ("group", "kept"), [(NEWS, "offers,weekly_digest"), (OFFERS, "product_news,weekly_digest")]
)
def test_group_unsubscribed_removes_its_value_and_keeps_the_others(group: str, kept: str) -> None:
    """Unsubscribing removes only that group's value; the others keep their order; no `enabled`."""
    now = current(topics="product_news, offers,weekly_digest")
    written = purposes([change(group, "unsubscribed")], now)
    assert written == [{"id": PID, "values": {"topics": {"value": kept}}}]


def test_a_group_no_rule_names_maps_nothing() -> None:
    """A change of a group the rules do not mention gives no edit."""
    assert SHIPPED.edit([change(OTHER, "unsubscribed")]) is None


# ---------------------------------------------------------------------------
# Other rule shapes.


def test_purpose_only_group_rule_sets_the_purpose(tmp_path: Path) -> None:
    """A group mapped to a purpose alone makes the purpose true or false."""
    reverse = rules(tmp_path, rule(NEWS, "newsletter"))
    assert purposes([change(NEWS, "subscribed")], reverse=reverse) == [
        {"id": "newsletter", "enabled": True}
    ]
    assert purposes([change(NEWS, "unsubscribed")], reverse=reverse) == [
        {"id": "newsletter", "enabled": False}
    ]


def test_opted_in_value_rule_reads_back_as_its_value(tmp_path: Path) -> None:
    """OPTED_IN on a value: opted_in adds it and enables the purpose; unsubscribed removes it."""
    reverse = rules(tmp_path, rule("OPTED_IN", preference="channels", value="email"))
    assert purposes([change("email", "opted_in")], reverse=reverse) == [
        {"id": PID, "enabled": True, "values": {"channels": {"value": "email"}}}
    ]
    written = purposes([change("email", "unsubscribed")], current(channels="sms,email"), reverse)
    assert written == [{"id": PID, "values": {"channels": {"value": "sms"}}}]


def test_one_group_on_two_purposes_edits_both(tmp_path: Path) -> None:
    """Every rule on a group is read backwards, each on its own purpose."""
    reverse = rules(
        tmp_path, rule(NEWS, "newsletter") + rule(NEWS, "product", preference="t", value="n")
    )
    assert purposes([change(NEWS, "subscribed")], reverse=reverse) == [
        {"id": "newsletter", "enabled": True},
        {"id": "product", "enabled": True, "values": {"t": {"value": "n"}}},
    ]


@pytest.mark.parametrize(
    "extra",
    [
        rule("OPTED_IN", on_chosen="subscribed"),
        rule("OPTED_IN", on_refused="none"),
        rule(NEWS, preference="topics", value="product_news", on_refused="none"),
        rule(NEWS, on_chosen="unsubscribed"),
    ],
    ids=["opted-in-chosen", "opted-in-refused-none", "group-refused-none", "group-inverted"],
)
def test_overridden_rules_are_not_reversible(tmp_path: Path, extra: str) -> None:
    """A rule with on_chosen/on_refused is reported, with its line, and never read backwards."""
    reverse = rules(tmp_path, extra)
    [(origin, reason)] = reverse.unreversible
    assert origin == f"{tmp_path / 'mappings' / 'rules.toml'}:1"
    assert "on_chosen/on_refused" in reason
    assert reverse.by_target == {}


def test_unsubscribed_on_a_purpose_is_not_reversible(tmp_path: Path) -> None:
    """UNSUBSCRIBED is reported on a purpose alone as on a value."""
    reverse = rules(tmp_path, rule("UNSUBSCRIBED", "opt_out") + rule("OPTED_IN"))
    [(origin, reason)] = reverse.unreversible
    assert origin.endswith("rules.toml:1")
    assert "UNSUBSCRIBED" in reason
    assert purposes([change("email", "unsubscribed")], reverse=reverse) == [
        {"id": PID, "enabled": False}
    ]


# ---------------------------------------------------------------------------
# Identity.


def test_the_person_is_the_external_id_by_default() -> None:
    """With the default identity the Didomi organization_user_id is Braze's external_id."""
    edit = SHIPPED.edit([change("email", "unsubscribed", person="user-9")])
    assert edit is not None
    assert edit.person == "user-9"


def test_an_email_only_change_names_no_person_for_an_external_id_identity() -> None:
    """A change with only an email cannot name an organization_user_id that is an external_id."""
    changes = [BrazeChange(None, "a@example.com", EMAIL, "unsubscribed", T, None)]
    assert SHIPPED.person(changes) is None
    assert SHIPPED.edit(changes) is None


def test_email_identity_names_the_person_by_email(tmp_path: Path) -> None:
    """With `[identity] email = "organization_user_id"` the Braze email is the Didomi user."""
    reverse = rules(tmp_path, '[identity]\nemail = "organization_user_id"\n\n' + rule("OPTED_IN"))
    edit = reverse.edit([BrazeChange("user-1", "a@example.com", EMAIL, "unsubscribed", T, None)])
    assert edit is not None
    assert edit.person == "a@example.com"
    assert reverse.edit([BrazeChange("user-1", None, EMAIL, "unsubscribed", T, None)]) is None


@pytest.mark.parametrize(
    ("name", "shown"), [("id", "Didomi's own user `id`"), ("metadata.crm", "`metadata.crm`")]
)
def test_identity_other_than_organization_user_id_reverses_nothing(
    tmp_path: Path, name: str, shown: str
) -> None:
    """With `external_id = "id"` or `metadata.*` every rule is reported and nothing maps."""
    text = f'[identity]\nexternal_id = "{name}"\n\n' + rule("OPTED_IN") + rule(NEWS)
    reverse = rules(tmp_path, text)
    assert reverse.by_target == {}
    assert [origin.rsplit(":", 1)[1] for origin, _ in reverse.unreversible] == ["4", "8"]
    for _, reason in reverse.unreversible:
        assert shown in reason
        assert "organization_user_id" in reason
    assert reverse.edit([change("email", "unsubscribed")]) is None


def test_a_rule_with_its_own_reason_keeps_it_under_an_unusable_identity(tmp_path: Path) -> None:
    """An attribute rule says it is an attribute, whatever the identity."""
    reverse = rules(tmp_path, '[identity]\nexternal_id = "id"\n\n' + rule("attribute:x"))
    [(_, reason)] = reverse.unreversible
    assert reason.startswith("an attribute rule")


# ---------------------------------------------------------------------------
# Conflicts inside one report.


def test_email_unsubscribed_beats_a_group_subscribe_on_the_same_purpose() -> None:
    """The withdrawal wins: the purpose is refused and the group's value is not added."""
    edit = SHIPPED.edit([change(NEWS, "subscribed"), change("email", "unsubscribed")])
    assert edit is not None
    assert edit.purposes == {PID: PurposeEdit(False, {}, {})}
    assert edit.apply(current(topics="offers")) == [{"id": PID, "enabled": False}]


def test_a_refused_purpose_still_removes_unsubscribed_values() -> None:
    """Removals are kept when the purpose is refused, so the values match Braze's groups."""
    changes = [change("email", "unsubscribed"), change(OFFERS, "unsubscribed")]
    written = purposes(changes, current(topics="product_news,offers"))
    assert written == [
        {"id": PID, "enabled": False, "values": {"topics": {"value": "product_news"}}}
    ]


def test_one_report_opting_in_and_leaving_one_group() -> None:
    """An opt-in with one group left enables the purpose and removes only that value."""
    changes = [
        change("email", "opted_in"),
        change(NEWS, "subscribed"),
        change(OFFERS, "unsubscribed"),
    ]
    written = purposes(changes, current(topics="offers"))
    assert written == [
        {"id": PID, "enabled": True, "values": {"topics": {"value": "product_news"}}}
    ]


def test_a_value_added_and_removed_in_one_report_is_removed(tmp_path: Path) -> None:
    """Two groups on one value that disagree: the removal wins."""
    text = rule(NEWS, preference="topics", value="news") + rule(
        OTHER, preference="topics", value="news"
    )
    reverse = rules(tmp_path, text)
    edit = reverse.edit([change(NEWS, "subscribed"), change(OTHER, "unsubscribed")])
    assert edit is not None
    assert edit.purposes[PID].add == {}
    assert edit.purposes[PID].remove == {"topics": frozenset({"news"})}
    assert edit.apply(current(topics="news,x")) == [
        {"id": PID, "enabled": True, "values": {"topics": {"value": "x"}}}
    ]


def test_a_purpose_only_group_refusal_beats_an_opt_in(tmp_path: Path) -> None:
    """A purpose refused by one rule and chosen by another in one report ends refused."""
    reverse = rules(tmp_path, rule("OPTED_IN") + rule(NEWS))
    written = purposes([change("email", "opted_in"), change(NEWS, "unsubscribed")], reverse=reverse)
    assert written == [{"id": PID, "enabled": False}]


# ---------------------------------------------------------------------------
# apply against the person's current choices.


def test_apply_adding_a_value_already_chosen_is_a_no_op() -> None:
    """Adding a value the person already has leaves the preference out of the write."""
    assert purposes([change(NEWS, "subscribed")], current(topics="product_news")) == [
        {"id": PID, "enabled": True}
    ]


def test_apply_adding_to_a_purpose_with_no_values() -> None:
    """A purpose with no values at all, or absent, gets the added value alone."""
    expected = [{"id": PID, "enabled": True, "values": {"topics": {"value": "offers"}}}]
    assert purposes([change(OFFERS, "subscribed")], current(enabled=None)) == expected
    assert purposes([change(OFFERS, "subscribed")], []) == expected
    assert purposes([change(OFFERS, "subscribed")], None) == expected
    other = [Purpose(id="analytics", enabled=True)]
    assert purposes([change(OFFERS, "subscribed")], other) == expected


def test_apply_removing_from_a_preference_never_chosen_writes_nothing() -> None:
    """An unsubscribe must not turn "no choice" into "chose none": nothing is written."""
    edit = SHIPPED.edit([change(OFFERS, "unsubscribed")])
    assert edit is not None
    assert edit.apply(None) == []
    assert edit.apply(current(topics="product_news")) == []


def test_apply_removing_the_last_value_writes_an_empty_choice() -> None:
    """Removing the only chosen value writes the preference empty: a choice of none."""
    assert purposes([change(OFFERS, "unsubscribed")], current(topics="offers")) == [
        {"id": PID, "values": {"topics": {"value": ""}}}
    ]


def test_apply_cleans_the_current_value_and_keeps_other_preferences_out() -> None:
    """Spaces and repeats in the current value are dropped; untouched preferences are not sent."""
    now = current(topics=" offers , offers,,product_news", frequency="weekly")
    assert purposes([change(NEWS, "unsubscribed")], now) == [
        {"id": PID, "values": {"topics": {"value": "offers"}}}
    ]


def test_apply_adds_several_values_sorted_after_the_existing_ones(tmp_path: Path) -> None:
    """New values come after the current ones, in sorted order, whatever the report's order."""
    reverse = rules(
        tmp_path,
        rule(OTHER, preference="topics", value="b") + rule(NEWS, preference="topics", value="a"),
    )
    changes = [change(OTHER, "subscribed"), change(NEWS, "subscribed")]
    written = purposes(changes, current(topics="z"), reverse)
    assert written == [{"id": PID, "enabled": True, "values": {"topics": {"value": "z,a,b"}}}]
    assert purposes(list(reversed(changes)), current(topics="z"), reverse) == written


def test_apply_only_writes_the_purposes_it_edits() -> None:
    """The person's other Didomi purposes are never part of the write."""
    now = [*current(topics="offers"), Purpose(id="analytics", enabled=True)]
    assert [p["id"] for p in purposes([change("email", "unsubscribed")], now)] == [PID]


def test_body_names_the_user_and_tags_the_source() -> None:
    """body() is the /consents/events body: the user, the purposes and the loop-breaking tag."""
    edit = SHIPPED.edit([change("email", "unsubscribed", person="user-7")])
    assert edit is not None
    assert edit.body(None) == {
        "user": {"organization_user_id": "user-7"},
        "consents": {"purposes": [{"id": PID, "enabled": False}]},
        "metadata": {"source": SOURCE},
    }
    assert SOURCE == "didomi-braze-gateway"


def test_edit_records_its_targets_and_latest_time() -> None:
    """targets lists each Braze target that mapped; at is the latest change's time."""
    changes = [
        change("email", "subscribed", at=T + 5),
        change(NEWS, "subscribed", at=T),
        change(OFFERS, "unsubscribed", at=T + 2),
    ]
    edit = SHIPPED.edit(changes)
    assert isinstance(edit, ConsentEdit)
    assert edit.targets == {Target.group(NEWS), Target.group(OFFERS)}
    assert edit.at == T + 5


def test_no_changes_is_no_edit() -> None:
    """An empty report maps to nothing."""
    assert SHIPPED.edit([]) is None


# ---------------------------------------------------------------------------
# The Braze fixtures, end to end.


def test_the_webhook_step_fixture_refuses_the_purpose() -> None:
    """The step fixture (email unsubscribed, news subscribed, offers not) refuses the purpose."""
    edit = SHIPPED.edit(decode_step((BRAZE / "webhook_step_unsubscribed.json").read_bytes()))
    assert edit is not None
    assert edit.person == "user-123"
    assert edit.apply(current(topics="product_news,offers")) == [
        {"id": PID, "enabled": False, "values": {"topics": {"value": "product_news"}}}
    ]


def test_the_currents_fixture_events_each_edit_their_person() -> None:
    """Each stored Currents event maps alone: a global unsubscribe, then a group subscribe."""
    batch = split_currents((BRAZE / "currents_batch.json").read_bytes())
    edits = [SHIPPED.edit(decode_currents_event(raw)) for _, raw, _ in batch.events]
    assert [(e.person, e.apply(None)) for e in edits if e is not None] == [
        ("user-123", [{"id": PID, "enabled": False}]),
        ("user-456", [{"id": PID, "enabled": True, "values": {"topics": {"value": "offers"}}}]),
    ]
