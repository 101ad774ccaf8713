"""The `gateway` command: run, check, render, test, dead-letters, trace, backfill."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, TextIO

import msgspec

from gateway import __version__
from gateway.config.settings import (
    Config,
    braze_base_url,
    fake_braze_address,
    is_postgresql,
    load_config,
)
from gateway.errors import ConfigError, GatewayError, Problem
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
    Options,
    RuleSet,
    State,
    Target,
    event_from_test,
    load_rules,
    options_of,
)
from gateway.shapes.webhooks import WebhookError, decode
from gateway.spool.sqlite import AUDIT_CHANGE_BYTES, AUDIT_RECORD_BYTES

DEFAULT_CONFIG = "gateway.toml"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: parse the command line, run one command, return its exit status."""
    try:
        args = _parser().parse_args(argv)
        status: int = args.func(args)
    except ConfigError as exc:
        _problems(exc.problems)
        return 1
    except GatewayError as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return status


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gateway", description="Keep Braze in step with the consent choices made in Didomi."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.add_argument("--config", default=DEFAULT_CONFIG, help="path to gateway.toml")
        return p

    run = command("run", "serve webhooks until SIGTERM/SIGINT, then drain and exit")
    run.add_argument("--log-format", choices=("text", "json"), default=None)
    run.add_argument("--log-level", default="INFO")
    run.set_defaults(func=_run)

    check = command("check", "validate the config and every mapping file")
    check.add_argument(
        "--changes-per-day",
        type=int,
        metavar="N",
        help="also say whether the spool's volume holds retention.audit_days of audit records"
        " at N consent changes a day (a warning, never an error)",
    )
    check.add_argument(
        "--online",
        action="store_true",
        help="also ask Braze and Didomi, reading only, whether the keys, permissions,"
        " subscription group ids, purpose ids and preference value ids exist",
    )
    check.add_argument(
        "--allow-unreachable",
        action="store_true",
        help="with --online: a Braze or Didomi that does not answer (connection, timeout, 429,"
        " 5xx) is a warning, not an error; what they do answer is still checked",
    )
    check.set_defaults(func=_check)

    render = command(
        "render",
        "print the Braze requests one Didomi webhook produces, or the Didomi requests one "
        "Braze webhook step or Currents batch produces",
    )
    render.add_argument(
        "event",
        type=Path,
        help="a Didomi webhook, Braze webhook step or Currents body (JSON); `-` reads it from"
        " standard input",
    )
    render.add_argument("--mappings", type=Path, help="mapping folder; no gateway.toml needed")
    render.set_defaults(func=_render)

    test = command("test", "run the [[test]] tables of the mapping files")
    test.add_argument("--mappings", type=Path, help="mapping folder; no gateway.toml needed")
    test.set_defaults(func=_test)

    dead = command("dead-letters", "inspect and re-send what Braze refused")
    dead.add_argument("action", choices=("list", "replay", "purge"))
    dead.add_argument("--id", type=int, action="append", help="only this dead letter (repeatable)")
    dead.set_defaults(func=_dead_letters)

    trace = command(
        "trace", "a person's history: what Didomi said, what was sent, what the other side answered"
    )
    trace.add_argument(
        "person",
        nargs="?",
        help="the person's external id (or email); `-` reads it from standard input, so it"
        " stays out of the shell history and the process list",
    )
    trace.add_argument("--event", help="instead of a person: one event id's records")
    trace.add_argument("--since", help="only records from this ISO date on")
    trace.add_argument("--json", action="store_true", help="JSON lines instead of text")
    trace.set_defaults(func=_trace)

    migrate = command(
        "migrate", "create the spool's tables, or bring them up to this version's schema"
    )
    migrate.set_defaults(func=_migrate)

    # -- reconcile (issue 25) --------------------------------------------------------------
    reconcile = command(
        "reconcile",
        "compare what the rules make of Didomi's status with what Braze holds; exit 1 on drift",
    )
    reconcile.add_argument(
        "sources",
        nargs="+",
        metavar="SOURCE",
        help="a Didomi export file (.json, .json.gz), a folder of them, - (standard input) or"
        " didomi-api",
    )
    reconcile.add_argument(
        "--sample", type=int, metavar="N", help="compare a uniform random sample of N persons"
    )
    reconcile.add_argument(
        "--fix", action="store_true", help="store Didomi's state for each person in drift"
    )
    reconcile.add_argument(
        "--json", action="store_true", help="one JSON line per person in drift, on stdout"
    )
    reconcile.add_argument(
        "--show-persons", action="store_true", help="name persons in --json instead of hashing"
    )
    reconcile.set_defaults(func=_reconcile)

    # -- backfill (issue 24) ----------------------------------------------------------------
    backfill = command(
        "backfill",
        "store the consents people gave before the gateway ran, for the gateway to deliver",
    )
    backfill.add_argument(
        "sources",
        nargs="+",
        metavar="SOURCE",
        help="a Didomi batch-export file (.json, .json.gz) or folder, - for standard input,"
        " or didomi-api (every user through GET /consents/users)",
    )
    backfill.add_argument(
        "--dry-run", action="store_true", help="store nothing; print what would change in Braze"
    )
    backfill.add_argument(
        "--wait", action="store_true", help="then follow delivery to the end (exit 2: none runs)"
    )
    backfill.set_defaults(func=_backfill)
    return parser


def _backfill(args: argparse.Namespace) -> int:
    import asyncio

    from gateway.bulk.backfill import run  # the readers and the spool load only for this command

    # Didomi's key and secret are needed only to read through its API.
    config = load_config(args.config, require_secrets="didomi-api" in args.sources)
    return asyncio.run(run(config, args.sources, dry_run=args.dry_run, wait=args.wait))


def _problems(problems: Sequence[Problem], out: TextIO | None = None) -> None:
    out = out or sys.stderr
    for problem in problems:
        print(problem, file=out)
    print(f"{len(problems)} problem(s) found", file=out)


# ---------------------------------------------------------------------------
# check


def _check(args: argparse.Namespace) -> int:
    problems: list[Problem] = []
    config: Config | None = None
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        problems.extend(exc.problems)
    mappings_dir = _mappings_dir(args.config, config)
    rules: RuleSet | None = None
    try:
        rules = load_rules(mappings_dir, _options(config))
    except ConfigError as exc:
        problems.extend(exc.problems)
    if problems:
        _problems(problems)
        return 1
    assert config is not None
    assert rules is not None
    braze = f"Braze {config.braze.server}"
    if fake_braze_address(config.braze.server) is not None:
        braze = (
            f"a DEMO: Braze is the fake served by `gateway run` itself at"
            f" {braze_base_url(config.braze.server)}, nothing reaches a real Braze"
        )
    print(f"{args.config}: ok ({braze}, auth {config.auth.mode})")
    print(rules.summary())
    # Information, not a problem: a forward-only rule is legitimate, and the reverse path is
    # optional, so these never change the exit status.
    for origin, reason in ReverseRules.from_ruleset(rules).unreversible:
        print(f"{origin}: warning: not reversible (Braze -> Didomi): {reason}")
    if args.changes_per_day is not None:
        print(f"{args.config}: {_capacity(config, rules, args.changes_per_day)}")
    if args.online:
        return _check_online(config, rules, args.config, args.allow_unreachable)
    return 0


def _check_online(config: Config, rules: RuleSet, config_path: str, allow_unreachable: bool) -> int:
    """`check --online`: what Braze and Didomi say; warnings never change the exit status."""
    from gateway.cli.online import run  # aiohttp and the probes: only when asked for

    report = run(config, rules, config_path)
    errors = list(report.errors)
    warnings = list(report.warnings)
    if allow_unreachable:
        # An outage must not keep replicas from starting: they spool webhooks until it ends.
        warnings += [
            Problem(p.file, f"warning: {p.message}", p.line, p.path) for p in report.unreachable
        ]
    else:
        errors += report.unreachable
    for warning in warnings:
        print(warning, file=sys.stderr)
    if errors:
        _problems(errors)
        return 1
    for line in report.summary:
        print(f"online: {line}")
    return 0


def _capacity(config: Config, rules: RuleSet, per_day: int) -> str:
    """Whether the spool's volume holds the audit trail `retention.audit_days` asks for."""
    spool = config.delivery.spool
    if is_postgresql(spool):
        return "--changes-per-day not checked: a PostgreSQL spool's disk is the database's"
    folder = Path(spool).parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent  # the spool is created at the first start
    disk = os.statvfs(folder)
    volume = disk.f_blocks * disk.f_frsize
    # One record per change, packing at most every target of the rules.
    targets = max(1, len({rule.target for rule in rules.rules}))
    per_change = AUDIT_RECORD_BYTES + targets * AUDIT_CHANGE_BYTES
    days = config.retention.audit_days
    needed = days * per_day * per_change + config.delivery.min_free_bytes
    said = (
        f"the spool's volume ({_size(volume)} at {folder}) {{}} retention.audit_days = {days:g}"
        f" of audit records at {per_day} consent changes a day: {_size(needed)} with"
        f" delivery.min_free_bytes, at one record of about {per_change} bytes a change"
        f" ({targets} target(s))"
    )
    if needed <= volume:
        return said.format("holds")
    return (
        "warning: "
        + said.format("cannot hold")
        + (
            "; the oldest will be shed under disk pressure (gateway_audit_shed_total): make the"
            " volume larger or lower retention.audit_days"
        )
    )


def _size(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _mappings_dir(config_path: str, config: Config | None) -> Path:
    """Where the mappings are, even when gateway.toml itself has problems."""
    if config is not None:
        return Path(config.mappings.dir)
    try:
        return Path(load_config(config_path, require_secrets=False).mappings.dir)
    except ConfigError:
        return Path(config_path).parent / "mappings"


def _options(config: Config | None) -> Options:
    return Options() if config is None else options_of(config)


def _offline(args: argparse.Namespace) -> tuple[RuleSet, Config | None]:
    """Rules for render and test: from --mappings alone, or from gateway.toml without secrets."""
    if args.mappings is not None:
        return load_rules(args.mappings), None
    config = load_config(args.config, require_secrets=False)
    return load_rules(config.mappings.dir, _options(config)), config


# ---------------------------------------------------------------------------
# render


def _render(args: argparse.Namespace) -> int:
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


def _test(args: argparse.Namespace) -> int:
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
        return [f"cannot read the event {test.spec.event!r}: {exc.strerror or exc}"]
    except WebhookError as exc:
        return [f"the event is not a Didomi webhook: {exc}"]
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


# ---------------------------------------------------------------------------
# run and dead-letters live with the server and the spool.


def _run(args: argparse.Namespace) -> int:
    import logging

    from gateway.app.server import serve  # the server pulls in aiohttp; check/render/test need not
    from gateway.logs import configure_logging

    log_format: Literal["text", "json"] = args.log_format or (
        "text" if sys.stderr.isatty() else "json"
    )
    # Logging first: a server's stderr is read by a log collector, so even the problems that
    # keep it from starting are log lines in its format (JSON lines), not plain text.
    try:
        configure_logging(log_format, args.log_level)
    except ValueError as exc:
        configure_logging(log_format)
        logging.getLogger("gateway.server").error("cannot start: %s", exc)
        return 1
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        log = logging.getLogger("gateway.server")
        for problem in exc.problems:
            log.error("cannot start: %s", problem)
        log.error("cannot start: %d problem(s) found", len(exc.problems))
        return 1
    return serve(config, config_path=args.config, log_format=log_format, log_level=args.log_level)


def _dead_letters(args: argparse.Namespace) -> int:
    from gateway.cli.deadletters import command

    config = load_config(args.config, require_secrets=False)
    return command(config, args.action, args.id)


def _trace(args: argparse.Namespace) -> int:
    from gateway.cli.trace import TraceError, command

    config = load_config(args.config, require_secrets=False)
    person = args.person
    if person == "-":
        person = sys.stdin.readline().strip()
        if not person:
            raise TraceError(
                "standard input gave no PERSON: pipe their external id or email into"
                " `gateway trace -`"
            )
    return command(config, person, event_id=args.event, since=args.since, as_json=args.json)


def _reconcile(args: argparse.Namespace) -> int:
    from gateway.cli.reconcile import Options, command  # aiohttp and the sources: only when run

    if args.sample is not None and args.sample < 1:
        print("gateway reconcile: --sample takes a number of persons, 1 or more", file=sys.stderr)
        return 2
    config = load_config(args.config)
    options = Options(
        args.sources,
        sample=args.sample,
        fix=args.fix,
        as_json=args.json,
        show_persons=args.show_persons,
    )
    return command(config, options)


def _migrate(args: argparse.Namespace) -> int:
    from gateway.config.settings import is_postgresql
    from gateway.spool.backend import open_store

    config = load_config(args.config, require_secrets=False)
    spool = config.delivery.spool
    if is_postgresql(spool):
        from gateway.spool.postgres import VERSION, connect, migrate, redact

        conn = connect(spool)
        try:
            before, after = migrate(conn)
        finally:
            conn.raw.close()
        if before == after:
            print(f"the spool database {redact(spool)} is at schema version {after}: up to date")
        else:
            print(f"the spool database {redact(spool)} migrated from version {before} to {VERSION}")
        return 0
    # SQLite migrates as it opens; opening beside a running server is safe (WAL mode).
    existed = Path(spool).exists()
    open_store(config.delivery, config.retention.person_key).close()
    print(f"the spool {spool} {'is up to date' if existed else 'was created'}")
    return 0
