"""The `gateway reconcile` command: read the sources, compare with Braze, report, and fix.

Exit status: 0 when nothing drifted, 1 when something did, 2 when the run could not finish (a
source or Braze refused, the spool could not be opened): a nightly job tells drift from failure.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, BinaryIO, TextIO

import msgspec

from gateway.bulk import drift
from gateway.bulk.backfill import body_of  # the lane's row: the same bytes backfill stores
from gateway.bulk.reconcile import Difference, Person, Reconciler, Report, iso, persons, sample
from gateway.bulk.sources import SourceError, open_source
from gateway.config.settings import Config
from gateway.errors import GatewayError
from gateway.peers.braze_export import EXPORT, STATUS, BrazeReader
from gateway.rules.mappings import RuleSet, load_rules, options_of
from gateway.spool import audit as trail
from gateway.spool.backend import open_store
from gateway.spool.store import Store

_encoder = msgspec.json.Encoder()


@dataclass(slots=True)
class Options:
    """The command line's choices, and the test hooks (`minute_s`, `seed`)."""

    sources: Sequence[str]
    sample: int | None = None
    fix: bool = False
    as_json: bool = False
    show_persons: bool = False
    minute_s: float = 60.0  # how long Braze's minute lasts: scaled down by tests and benches
    seed: int | None = None
    stdin: BinaryIO | None = None
    out: TextIO = field(default_factory=lambda: sys.stdout)
    err: TextIO = field(default_factory=lambda: sys.stderr)


def command(config: Config, options: Options) -> int:
    """Run `gateway reconcile`; the exit status."""
    try:
        report = asyncio.run(run(config, options))
    except GatewayError as exc:
        print(f"gateway reconcile: {exc}", file=options.err)
        return 2
    return 1 if report.drifting else 0


async def run(config: Config, options: Options, rules: RuleSet | None = None) -> Report:
    """Compare every person (or a sample) of the sources with Braze, print the report and
    record its ratios in the spool (for `gateway_drift_ratio`)."""
    rules = rules or load_rules(config.mappings.dir, options_of(config))
    store = open_store(config.delivery, config.retention.person_key)
    try:
        report = await _compare(config, options, rules, store)
    finally:
        store.close()
    _print(report, options)
    return report


async def _compare(config: Config, options: Options, rules: RuleSet, store: Store) -> Report:
    sources = [
        open_source(s, didomi=config.didomi_api, stdin=options.stdin) for s in options.sources
    ]
    for source in sources:
        for warning in source.warnings:
            print(f"warning: {warning}", file=options.err)
    report = Report(
        missing_is_drift=not config.braze.update_existing_only, sampled=options.sample is not None
    )
    fixes = _Fixer(store) if options.fix else None
    show = _shower(store, options)

    async def on_difference(difference: Difference) -> None:
        counts = bool(difference.targets) if not difference.missing else report.missing_is_drift
        if options.as_json and counts:
            print(show(difference), file=options.out)
        if fixes is not None and counts:
            await fixes(difference.person)

    reader = BrazeReader(config.braze, minute_s=options.minute_s)
    started = time.monotonic()
    try:
        stream = persons(rules, sources, report)
        chosen: Any = stream
        if options.sample is not None:
            chosen = await sample(stream, options.sample, options.seed)
        await Reconciler(rules, reader, report, on_difference).run(chosen)
    finally:
        await reader.close()
    if fixes is not None:
        await fixes(None)
        print(
            f"reconcile --fix: {fixes.stored} person(s) in drift stored for the gateway to deliver"
            " (the backfill lane, behind live webhooks); run again once delivered to see none",
            file=options.err,
        )
    stats = reader.stats
    print(
        f"Braze: {stats.requests[EXPORT]} export and {stats.requests[STATUS]} subscription-status"
        f" request(s) in {time.monotonic() - started:.1f} s, {stats.rate_limited} rate-limited,"
        f" {stats.retried} retried",
        file=options.err,
    )
    for source in sources:
        if source.malformed:
            print(f"{source.label}: {source.malformed} malformed line(s) skipped", file=options.err)
            for where in source.malformed_at:
                print(f"  {where}", file=options.err)
    if report.population == 0:
        # Not an export (a config file, a CSV), an export job that wrote nothing, or one of
        # users the rules never map (another organization's): "no drift" would clear
        # gateway_drift_ratio and silence BrazeDrift while the job reads it.
        skipped = ", ".join(f"{reason} {n}" for reason, n in sorted(report.skipped.items()))
        raise SourceError(
            f"none of the {report.read} user(s) read is one the rules map ({skipped}): nothing"
            " was compared; give the export of the organization and regulation the rules read"
            if report.read
            else "no line of the sources is a Didomi user; give a Didomi export (one user a"
            " line, as the batch export writes them)"
            if any(source.malformed for source in sources)
            else "the sources hold no user (an empty export?): nothing was compared"
        )
    drift.save(store, drift.LastRun(time.time(), report.sampled, report.ratios()))
    return report


def _shower(store: Store, options: Options) -> Callable[[Difference], str]:
    """How a differing person is written as a JSON line: hashed as the audit trail does."""
    key = getattr(store, "person_key", b"")

    def show(difference: Difference) -> str:
        found = difference.person
        name = found.person if options.show_persons else trail.person_hash(key, found.person)
        line = {
            "person": name,
            "hashed": not options.show_persons,
            "updated_at": iso(found.at),
            "missing_in_braze": difference.missing,
            "targets": {
                str(t): {"didomi": want, "braze": have}
                for t, (want, have) in sorted(difference.targets.items())
            },
        }
        return _encoder.encode(line).decode()

    return show


FIX_SOURCE = "reconcile --fix"  # the lane's progress row of the corrections (never resumed)
FIX_BATCH = 500  # corrections a transaction


class _Fixer:
    """Stores each drifting person's Didomi status through the backfill lane (None: flush).

    The row is the `user.updated` webhook backfill stores, so delivery maps and dates it as
    any backfilled user: by Didomi's `updated_at`, never over a newer choice applied since.
    Its key names this run, so a snapshot backfilled (or fixed) before does not hide it.
    """

    def __init__(self, store: Store) -> None:
        self.store = store
        self.run_id = f"{time.time():.6f}"
        self.rows: list[tuple[str, bytes, str]] = []
        self.stored = 0  # persons written to the lane so far, for the closing line

    async def __call__(self, found: Person | None) -> None:
        rows = self.rows
        if found is not None:
            user_id = found.record.user.id or ""
            key = f"reconcile|{self.run_id}|{found.person}|{user_id}|{found.at:.3f}"
            rows.append((key, body_of(found.record.raw), found.person))
        if rows and (found is None or len(rows) >= FIX_BATCH):
            batch = list(rows)
            rows.clear()
            await asyncio.to_thread(
                self.store.put_backfill, batch, FIX_SOURCE, "", {"fixed": len(batch)}, finished=True
            )
            self.stored += len(batch)


def _print(report: Report, options: Options) -> None:
    out = options.err if options.as_json else options.out
    skipped = ", ".join(f"{reason} {n}" for reason, n in sorted(report.skipped.items()))
    frame = f"{report.population} mapped"
    if report.sampled:
        frame = f"a uniform sample of {report.compared} of the {report.population} mapped"
    print(
        f"reconcile: {report.read} user(s) read, {frame} person(s) compared"
        + (f" (the rules ask nothing of: {skipped})" if skipped else ""),
        file=out,
    )
    print(f"{'target':<48} {'agree':>8} {'differ':>8} {'missing':>8} {'drift':>8}", file=out)
    for target in sorted(report.targets):
        c = report.targets[target]
        line = (
            f"{target:<48} {c.agree:>8} {c.differ:>8} {c.missing:>8} {_pct(report.ratio(target))}"
        )
        print(line + _interval(report.interval(target)), file=out)
    line = (
        f"{'any target (persons)':<48} {'':>8} {'':>8} {report.missing:>8} {_pct(report.ratio())}"
    )
    print(line + _interval(report.interval()), file=out)
    if report.missing and not report.missing_is_drift:
        print(
            f"{report.missing} person(s) missing in Braze are not drift: with"
            " braze.update_existing_only = true the gateway never creates profiles",
            file=out,
        )
    verdict = "no drift" if not report.drifting else f"{report.drifting} person(s) in drift"
    print(verdict, file=out)


def _pct(ratio: float) -> str:
    return f"{100 * ratio:>7.2f}%"


def _interval(bounds: tuple[float, float] | None) -> str:
    if bounds is None:
        return ""
    return f"  (95 % interval {100 * bounds[0]:.2f}% to {100 * bounds[1]:.2f}%)"
