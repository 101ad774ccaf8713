"""`gateway render` and `gateway test`: what the mapping rules make of one event, offline."""

from __future__ import annotations

import argparse
import sys
from typing import Any, Literal

import msgspec

from gateway.config.settings import Config, load_config
from gateway.peers.braze_bodies import (
    DEFAULT_PRIORITIZATION,
    delete_body,
    track_bodies,
    track_object,
)
from gateway.reverse.braze_webhooks import (
    BrazeChange,
    BrazeWebhookError,
    decode_step,
    split_currents,
)
from gateway.reverse.rules import ConsentEdit, ReverseRules
from gateway.rules.mappings import (
    EMAIL,
    LoadedTest,
    Mapped,
    RuleSet,
    State,
    Target,
    event_from_test,
    load_rules,
    options_of,
)
from gateway.shapes.webhooks import WebhookError, decode


def _offline(args: argparse.Namespace) -> tuple[RuleSet, Config | None]:
    """Rules for render and test: from --mappings alone, or from gateway.toml without secrets."""
    if args.mappings is not None:
        return load_rules(args.mappings), None
    config = load_config(args.config, require_secrets=False)
    return load_rules(config.mappings.dir, options_of(config)), config


# ---------------------------------------------------------------------------
# render


def render(args: argparse.Namespace) -> int:
    """`gateway render`: print the requests one webhook body produces, sending nothing."""
    rules, config = _offline(args)
    # `-` is standard input, as for `trace -`: a body piped in needs no file.
    source = "standard input" if str(args.event) == "-" else str(args.event)
    try:
        body = sys.stdin.buffer.read() if source == "standard input" else args.event.read_bytes()
    except OSError as exc:
        print(f"gateway: cannot read {source}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    kind = _braze_kind(body)
    if kind is not None:
        return _render_reverse(rules, body, kind, source)
    try:
        webhook = decode(body)
    except WebhookError as exc:
        print(f"gateway: {source}: {exc}", file=sys.stderr)
        return 1
    result = rules.apply(webhook)
    if not isinstance(result, Mapped):
        print(f"# nothing to send: {result.reason}", file=sys.stderr)
        print("[]")
        return 0
    existing_only = config.braze.update_existing_only if config else True
    batch_size = config.braze.batch_size if config else 75
    if result.delete:
        order = config.braze.delete_prioritization if config else DEFAULT_PRIORITIZATION
        body = delete_body(result.identity, [result.person], order)
        print(_json([{"endpoint": "/users/delete", "body": body}]))
        return 0
    obj = track_object(
        result.identity, result.person, result.changes, update_existing_only=existing_only
    )
    print(_json(track_bodies([obj], batch_size)))
    return 0


def _braze_kind(body: bytes) -> Literal["currents", "step"] | None:
    """Which Braze shape a body is, or None for anything else (a Didomi webhook)."""
    try:
        value = msgspec.json.decode(body)
    except msgspec.DecodeError:
        return None  # Didomi's decoder says what is wrong with it
    if not isinstance(value, dict):
        return None
    if "type" in value:  # every Didomi webhook has one; neither Braze shape does
        return None
    if "events" in value:
        return "currents"
    if "time" in value and ("external_id" in value or "email" in value):
        return "step"
    return None


def _render_reverse(
    rules: RuleSet, body: bytes, kind: Literal["currents", "step"], source: str
) -> int:
    """Print the Didomi requests a Braze body produces, for a person with no current choices."""
    reverse = ReverseRules.from_ruleset(rules)
    reports: list[list[BrazeChange]]
    try:
        if kind == "currents":
            batch = split_currents(body)
            reports = [changes for _, _, changes in batch.events]
            if batch.ignored or batch.invalid:
                print(
                    f"# {batch.ignored} event(s) of other types ignored, "
                    f"{batch.invalid} invalid event(s) skipped",
                    file=sys.stderr,
                )
        else:
            reports = [decode_step(body)]
    except BrazeWebhookError as exc:
        print(f"gateway: {source}: {exc}", file=sys.stderr)
        return 1
    print(
        "# assumes no other Didomi choices; the gateway reads the person's current ones first",
        file=sys.stderr,
    )
    requests: list[dict[str, Any]] = []
    for changes in reports:
        edit = reverse.edit(changes)
        request = edit.body(None) if edit is not None else None
        if request is None or not request["consents"]["purposes"]:
            print(f"# nothing to send: {_reverse_skip(reverse, changes, edit)}", file=sys.stderr)
            continue
        requests.append({"endpoint": "/consents/events", "body": request})
    if not reports:
        print("# nothing to send: no events", file=sys.stderr)
    print(_json(requests))
    return 0


def _reverse_skip(
    reverse: ReverseRules, changes: list[BrazeChange], edit: ConsentEdit | None
) -> str:
    if not changes:
        return "no_state"
    if reverse.person(changes) is None:
        return "no_identity"
    return "no_rule" if edit is None else "no_change"


def _json(value: Any) -> str:
    return msgspec.json.format(msgspec.json.encode(value), indent=2).decode()


# ---------------------------------------------------------------------------
# test


def test(args: argparse.Namespace) -> int:
    """`gateway test`: run the [[test]] tables; 1 when any fails."""
    rules, _ = _offline(args)
    passed = failed = 0
    for test in rules.tests:
        errors = _run_test(rules, test)
        if errors:
            failed += 1
            print(f"FAIL {test.spec.name} ({test.origin})")
            for line in errors:
                print(f"     {line}")
        else:
            passed += 1
            print(f"ok   {test.spec.name}")
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


def _run_test(rules: RuleSet, test: LoadedTest) -> list[str]:
    """What differs between a test's expectation and what the rules produce; empty if nothing."""
    try:
        webhook = decode(event_from_test(test))
    except OSError as exc:
        read = test.base / str(test.spec.event)
        return [
            f"cannot read the event {test.spec.event!r} at {read}: {exc.strerror or exc}"
            " (an event path is relative to its mapping file)"
        ]
    except WebhookError as exc:
        return [f"the event cannot be used: {exc}"]  # which says why, in the body's terms
    result = rules.apply(webhook)
    produced: dict[Target, State] = result.changes if isinstance(result, Mapped) else {}
    expected: dict[Target, Any] = {}
    expect = test.spec.expect
    if expect.email_subscribe is not None:
        expected[EMAIL] = expect.email_subscribe
    for group, state in (expect.subscription_groups or {}).items():
        expected[Target.group(group)] = state
    for name, value in (expect.attributes or {}).items():
        expected[Target.attribute(name)] = value
    diff = []
    for target, want in expected.items():
        got = produced.get(target)
        if got != want:
            shown = "no change" if got is None else _show(got)
            diff.append(f"{_label(target)}: expected {_show(want)}, produced {shown}")
    if diff and not isinstance(result, Mapped):
        diff.append(f"(the event changes nothing: {result.reason})")
    return diff


def _label(target: Target) -> str:
    if target.kind == "group":
        return f"subscription_groups[{target.name}]"
    if target.kind == "attribute":
        return f"attributes.{target.name}"
    return str(target)


def _show(value: Any) -> str:
    return msgspec.json.encode(value).decode()
