"""The `gateway` command: its parser, and each command handed to the module of its family."""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from gateway import __version__
from gateway.cli.check import check as _check
from gateway.cli.check import print_problems as _problems
from gateway.cli.render import render as _render
from gateway.cli.render import test as _test
from gateway.config.settings import Config, load_config
from gateway.errors import ConfigError, GatewayError

DEFAULT_CONFIG = "gateway.toml"
# What a command that opens the spool needs even without the secrets: loaded with a variable
# of `retention.person_key` unset, it would key a new spool with a random key of its own (the
# gateway's key then refused) or fail on a written one with "another key".
SPOOL_NEEDS = frozenset({"retention.person_key"})
DIDOMI_API_KEYS = ("organization_id", "key", "secret")  # what reading Didomi's API needs


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

    # It reads Didomi (its API's credentials, for didomi-api only) and stores: no secret of the
    # webhook routes or of Braze, which it never serves nor calls.
    api_keys = DIDOMI_API_KEYS if "didomi-api" in args.sources else ()
    config = load_config(
        args.config,
        require_secrets=False,
        needed={  # a dry run opens no spool
            *(() if args.dry_run else SPOOL_NEEDS),
            *(f"didomi_api.{name}" for name in api_keys),
        },
    )
    if _said_empty(args.config, "gateway backfill didomi-api", _didomi_api(config, api_keys)):
        return 1
    return asyncio.run(run(config, args.sources, dry_run=args.dry_run, wait=args.wait))


def _didomi_api(config: Config, names: Sequence[str]) -> list[tuple[str, str, str]]:
    """`[didomi_api]`'s credentials named, as `_said_empty` takes them."""
    api = config.didomi_api
    return [(f"didomi_api.{n}", getattr(api, n), "reads Didomi's users with it") for n in names]


def _said_empty(path: str, command: str, settings: Sequence[tuple[str, str, str]]) -> bool:
    """Say which of (key, value, what the command does with it) is empty; whether any is."""
    empty = [(key, why) for key, value, why in settings if not value]
    for key, why in empty:
        print(
            f"{path}: {key} is empty: `{command}` {why}; set it, or the environment variable"
            " it names",
            file=sys.stderr,
        )
    return bool(empty)


# ---------------------------------------------------------------------------
# The commands below load their modules (the server, the spool, aiohttp) only when run.


def _run(args: argparse.Namespace) -> int:
    import logging
    import signal

    # Until the server's own handler takes SIGINT (aiohttp's, as the serving starts), an
    # interrupt ends the process as SIGINT does by default. Raised as KeyboardInterrupt, it could
    # land in an import's lock callback, be printed as "Exception ignored" and lost, and the
    # gateway then started as if it had never been interrupted.
    with contextlib.suppress(ValueError):  # not the main thread: not ours to change
        signal.signal(signal.SIGINT, signal.SIG_DFL)
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

    config = load_config(args.config, require_secrets=False, needed=SPOOL_NEEDS)
    return command(config, args.action, args.id)


def _trace(args: argparse.Namespace) -> int:
    from gateway.cli.trace import TraceError, command

    config = load_config(args.config, require_secrets=False, needed=SPOOL_NEEDS)
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
    # A config it cannot load is "could not finish" (2): 1 means drift to cron and scripts.
    # It needs Braze's key (and Didomi's API credentials to read didomi-api), not the secrets
    # of the webhook routes it never serves.
    api_keys = DIDOMI_API_KEYS if "didomi-api" in args.sources else ()
    try:
        config = load_config(
            args.config,
            require_secrets=False,
            needed={"braze.api_key", *SPOOL_NEEDS, *(f"didomi_api.{name}" for name in api_keys)},
        )
    except ConfigError as exc:
        _problems(exc.problems)
        return 2
    needed = [("braze.api_key", config.braze.api_key, "reads Braze with it")]
    if _said_empty(args.config, "gateway reconcile", needed + _didomi_api(config, api_keys)):
        return 2
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

    config = load_config(args.config, require_secrets=False, needed=SPOOL_NEEDS)
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
