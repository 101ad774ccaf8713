"""`gateway check`: the config, the mapping files and the spool's room, offline."""

from __future__ import annotations

import argparse
import difflib
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from gateway.config.located import LineIndex, format_path
from gateway.config.settings import (
    Config,
    braze_base_url,
    didomi_base_url,
    fake_braze_address,
    fake_didomi_address,
    is_postgresql,
    load_config,
)
from gateway.errors import ConfigError, Problem
from gateway.reverse.rules import ReverseRules
from gateway.rules.mappings import Options, RuleSet, load_rules, options_of
from gateway.shapes.webhooks import DOCUMENTED_REGULATIONS
from gateway.spool.sqlite import AUDIT_CHANGE_BYTES, AUDIT_RECORD_BYTES


def print_problems(problems: Sequence[Problem], out: TextIO | None = None) -> None:
    """Each problem on its line (file:line: message), then how many: every command's way."""
    out = out or sys.stderr
    for problem in problems:
        print(problem, file=out)
    print(f"{len(problems)} problem(s) found", file=out)


def check(args: argparse.Namespace) -> int:
    """`gateway check`: 0 when the config and the rules hold, 1 with the problems listed."""
    # Usage first, as `gateway reconcile --sample 0` does: a flag that would do nothing, or
    # a rate that would shrink the estimate, is a mistake to say before reading anything.
    if args.changes_per_day is not None and args.changes_per_day < 0:
        print(
            "gateway check: --changes-per-day takes a number of consent changes a day, 0 or more",
            file=sys.stderr,
        )
        return 2
    if args.allow_unreachable and not args.online:
        print(
            "gateway check: --allow-unreachable only applies with --online: write both",
            file=sys.stderr,
        )
        return 2
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
        print_problems(problems)
        return 1
    assert config is not None
    assert rules is not None
    braze = f"Braze {config.braze.server}"
    if fake_braze_address(config.braze.server) is not None:
        braze = (
            f"a DEMO: Braze is the fake served by `gateway run` itself at"
            f" {braze_base_url(config.braze.server)}, nothing reaches a real Braze"
        )
    if config.didomi_api.enabled and fake_didomi_address(config.didomi_api.base_url) is not None:
        url = didomi_base_url(config.didomi_api.base_url).removesuffix("/v1")
        braze += f"; Didomi the fake it serves at {url}, nothing reaches Didomi"
    print(f"{args.config}: ok ({braze}, auth {config.auth.mode})")
    print(rules.summary())
    # Information, not a problem: a forward-only rule is legitimate, and the reverse path is
    # optional, so these never change the exit status.
    for origin, reason in ReverseRules.from_ruleset(rules).unreversible:
        print(f"{origin}: warning: not reversible (Braze -> Didomi): {reason}")
    for warning in _regulation_warnings(args.config, config):
        print(warning, file=sys.stderr)
    if args.changes_per_day is not None:
        print(f"{args.config}: {_capacity(config, rules, args.changes_per_day)}")
    if args.online:
        return _check_online(config, rules, args.config, args.allow_unreachable)
    return 0


def _regulation_warnings(config_path: str, config: Config) -> list[Problem]:
    """Regulation ids Didomi does not document: a typo would skip (or read) no event of it."""
    lines = LineIndex(Path(config_path).read_text(encoding="utf-8"))
    known = ", ".join(DOCUMENTED_REGULATIONS)
    named = [(("didomi", "regulations"), r) for r in config.didomi.regulations]
    # What the reverse path and `backfill didomi-api` ask for; the latter reads [didomi_api]
    # without `enabled`, so it is checked either way (its default, gdpr, never warns).
    named.append((("didomi_api", "regulation"), config.didomi_api.regulation))
    out = []
    for key, regulation in named:
        if regulation in DOCUMENTED_REGULATIONS:
            continue
        hint = difflib.get_close_matches(regulation, DOCUMENTED_REGULATIONS, n=1)
        did_you_mean = f"; did you mean {hint[0]!r}?" if hint else ""
        message = (
            f"warning: {format_path(key)}: {regulation!r} is not a regulation id Didomi"
            f" documents ({known}){did_you_mean} If it is a typo, the events of the regulation"
            " meant are skipped as `regulation`; kept as written, since Didomi adds regulations"
        )
        out.append(Problem(config_path, message, lines.line(key)))
    return out


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
        print_problems(errors)
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
