"""`gateway backfill`: Didomi users from SOURCE... into the spool's backfill lane, resumably.

Each user is the `user.updated` webhook that would report its current status, mapped by the
same rules (regulations, identity, `[[map]]`) and dated by its `updated_at`; users the rules ask
nothing of (no identity, no rule, another regulation) are counted and not stored. Rows are stored
many to a transaction with the source's position (`lane`), so a kill at any moment loses
nothing and a rerun stores nobody twice. The running gateway(s) deliver them (`dispatcher`).

Which choice wins: the newest by its date, whichever arrives first. A live webhook newer than
the snapshot overrides it in Braze, or finds the snapshot stale if it came first; a snapshot
older than the retention floor still applies when nothing is known of that person and target.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import BinaryIO, TextIO

from gateway.bulk.sources import Source, UserRecord, open_source
from gateway.config.settings import Config, is_postgresql
from gateway.errors import SpoolFull
from gateway.rules.mappings import Mapped, RuleSet, load_rules, options_of
from gateway.shapes.webhooks import Parameters, Webhook
from gateway.spool import lane
from gateway.spool.audit import state_text
from gateway.spool.backend import open_store, take_turns
from gateway.spool.store import Store

PLAIN_EVERY_S = 10.0  # a progress line this often when not on a terminal
BAR_EVERY_S = 0.25
STALL_S = 60.0  # --wait: no delivery progress for this long and no gateway holds the spool
MALFORMED_SHOWN = 5
EXIT_NOT_DELIVERING = 2


def body_of(raw: bytes) -> bytes:
    """The webhook body a backfilled user is stored as: Didomi's `user.updated` shape."""
    return b'{"type":"user.updated","parameters":{"new_entity":' + raw + b"}}"


class Report:
    """Progress while reading (a bar on a terminal, a line every 10 s elsewhere) and totals."""

    def __init__(
        self, out: TextIO, clock: Callable[[], float] = time.monotonic, *, dry: bool = False
    ) -> None:
        self.out = out
        self.stored = "would be stored" if dry else "stored"  # a dry run stores nobody
        self.tty = out.isatty()
        self.clock = clock
        self.started = clock()
        self.shown = -float("inf") if self.tty else clock()
        self.counts: Counter[str] = Counter()

    def tick(
        self, source: Source, counts: Counter[str], *, note: str = "", force: bool = False
    ) -> None:
        """Show progress if it is time to."""
        now = self.clock()
        if not force and now - self.shown < (BAR_EVERY_S if self.tty else PLAIN_EVERY_S):
            return
        self.shown = now
        elapsed = max(now - self.started, 1e-6)
        rate = counts["read"] / elapsed
        eta = ""
        if source.size and source.done:
            left = elapsed * (source.size - source.done) / source.done
            eta = f", ETA {_duration(left)}"
        line = (
            f"{source.label}: {counts['read']:,} read ({rate:,.0f}/s), "
            f"{counts['stored']:,} {self.stored}{eta}{note}"
        )
        if self.tty:
            done = source.done / source.size if source.size else 0.0
            bar = "#" * int(done * 20)
            print(f"\r[{bar:<20}] {line}\x1b[K", end="", file=self.out, flush=True)
        else:
            print(line, file=self.out, flush=True)

    def end_line(self) -> None:
        """Leave the bar's line."""
        if self.tty:
            print(file=self.out)


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return (
        f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
        if seconds >= 3600
        else (f"{seconds // 60}m{seconds % 60:02d}s")
    )


class Backfill:
    """Reads sources, maps each user, stores the lane's rows (or tallies them, dry)."""

    def __init__(
        self,
        config: Config,
        store: Store | None,
        rules: RuleSet,
        out: TextIO,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.store = store  # None: a dry run, nothing is written
        self.rules = rules
        self.out = out
        self.clock = clock
        self.report = Report(out, dry=store is None)
        self.changes: Counter[tuple[str, str]] = Counter()  # dry run: (target, state) -> users
        self.malformed_at: list[str] = []
        self.totals: Counter[str] = Counter()
        self._waiting_estimate = 0

    async def source(self, source: Source) -> Counter[str]:
        """Read one source to its end (from where it stopped), storing as it goes."""
        store = self.store
        resumable = store is not None and source.identity != "stdin"
        counts: Counter[str] = Counter()
        resume: str | None = None
        if resumable and store is not None:
            done = await asyncio.to_thread(store.backfill_progress, source.identity)
            if done is not None and done.finished_at is None:
                counts.update(done.counts)
                resume = done.position
                print(
                    f"{source.label}: going on after {counts['read']:,} users read"
                    f" ({counts['stored']:,} stored) by an earlier run",
                    file=self.out,
                )
        for warning in source.warnings:
            print(f"warning: {warning}", file=self.out)
        base_malformed = counts["malformed"]
        size = self.config.backfill.users_per_transaction
        async for batch in source.batches(size, resume):
            rows = self._map(batch, counts)
            counts["malformed"] = base_malformed + source.malformed
            if store is not None:
                await self._room(source, counts)
                before = counts["stored"]
                while True:
                    try:
                        counts["stored"] += await asyncio.to_thread(
                            store.put_backfill,
                            rows,
                            source.identity,
                            batch[-1].resume,
                            {k: v for k, v in counts.items() if k != "stored"} | {"stored": before},
                        )
                        break
                    except SpoolFull as exc:
                        # The spool's disk keeps its reserve for acknowledgements: delivery
                        # frees room (or an operator does), then this batch goes on.
                        self.report.tick(source, counts, note=f", waiting for room: {exc}")
                        await asyncio.sleep(1.0)
                counts["duplicate"] += len(rows) - (counts["stored"] - before)
                self._waiting_estimate += counts["stored"] - before
            self.report.tick(source, counts)
        counts["malformed"] = base_malformed + source.malformed
        if store is not None and resumable:
            # Finished: a rerun reads the source again from its start (the keys dedupe).
            await asyncio.to_thread(
                store.put_backfill, [], source.identity, "", dict(counts), finished=True
            )
        self.report.tick(source, counts, force=True)
        self.report.end_line()
        self.malformed_at.extend(source.malformed_at)
        return counts

    def _map(
        self, batch: Sequence[UserRecord], counts: Counter[str]
    ) -> list[tuple[str, bytes, str]]:
        """The lane rows of a batch; what the rules skip is counted by its reason."""
        rows: list[tuple[str, bytes, str]] = []
        now = self.clock()
        for record in batch:
            counts["read"] += 1
            webhook = Webhook(type=lane.KIND, parameters=Parameters(new_entity=record.user))
            result = self.rules.apply(webhook, received_at=now)
            if not isinstance(result, Mapped):
                counts[f"skipped:{result.reason}"] += 1
                continue
            if self.store is None:
                counts["stored"] += 1  # would be
                for target, state in result.changes.items():
                    self.changes[(str(target), state_text(state))] += 1
                continue
            key = lane.key(result.person, record.user.id, result.at)
            rows.append((key, body_of(record.raw), result.person))
        return rows

    async def _room(self, source: Source, counts: Counter[str]) -> None:
        """Wait while the lane holds `backfill.max_pending` users: live webhooks keep room."""
        assert self.store is not None
        limit = self.config.backfill.max_pending
        if self._waiting_estimate < limit:
            return
        while True:
            waiting = await asyncio.to_thread(self.store.count_backfill)
            self._waiting_estimate = waiting
            if waiting < limit:
                return
            self.report.tick(source, counts, note=f", waiting for delivery ({waiting:,} queued)")
            await asyncio.sleep(0.5)

    def summary(self, dry_run: bool) -> None:
        """The totals: read, stored, skipped by reason, malformed with the first places."""
        t = self.totals
        verb = "would be stored" if dry_run else "stored"
        print(f"backfill: {t['read']:,} users read, {t['stored']:,} {verb}", file=self.out)
        if t["duplicate"]:
            print(f"  {t['duplicate']:,} already stored before (not stored twice)", file=self.out)
        for key in sorted(k for k in t if k.startswith("skipped:")):
            print(f"  {t[key]:,} skipped: {key.partition(':')[2]}", file=self.out)
        if t["malformed"]:
            print(f"  {t['malformed']:,} malformed line(s) skipped, first at:", file=self.out)
            for where in self.malformed_at[:MALFORMED_SHOWN]:
                print(f"    {where}", file=self.out)
        if dry_run:
            print("what would change in Braze (target: state -> users):", file=self.out)
            for (target, state), n in sorted(self.changes.items()):
                print(f"  {target}: {state} -> {n:,}", file=self.out)


def delivering(config: Config, store: Store) -> bool:
    """Whether some gateway holds the spool for delivery: the SQLite lock, or a live lease."""
    spool = config.delivery.spool
    if is_postgresql(spool):
        from gateway.spool.postgres import PgSpoolDB

        assert isinstance(store, PgSpoolDB)
        with store._reading("the partition leases") as db:
            row = db.execute(
                "SELECT count(*) FROM leases WHERE owner IS NOT NULL"
                " AND until > extract(epoch from clock_timestamp())"
            ).fetchone()
        return bool(row and row[0])
    path = Path(spool).with_name(Path(spool).name + ".lock")
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        # A shared probe, dropped at once: it fails while a gateway holds the exclusive lock.
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


async def follow(config: Config, store: Store, out: TextIO, stall_s: float = STALL_S) -> int:
    """--wait: until the lane is delivered (0), or 2 when nothing delivers it."""
    last, since = -1, time.monotonic()
    shown = -float("inf")
    while True:
        waiting = await asyncio.to_thread(store.count_backfill)
        if waiting == 0:
            print("backfill: every stored user is delivered", file=out)
            return 0
        now = time.monotonic()
        if waiting != last:
            last, since = waiting, now
        elif now - since > stall_s and not await asyncio.to_thread(delivering, config, store):
            print(
                f"backfill: {waiting:,} users wait and no gateway delivers this spool"
                f" ({config.delivery.spool}): start one (`gateway run`)",
                file=out,
            )
            return EXIT_NOT_DELIVERING
        if now - shown >= (BAR_EVERY_S if out.isatty() else PLAIN_EVERY_S):
            shown = now
            end = "\r" if out.isatty() else "\n"
            print(
                f"backfill: {waiting:,} users waiting for delivery", end=end, file=out, flush=True
            )
        await asyncio.sleep(0.5)


async def run(
    config: Config,
    specs: Sequence[str],
    *,
    dry_run: bool = False,
    wait: bool = False,
    out: TextIO | None = None,
    stdin: BinaryIO | None = None,
    stall_s: float = STALL_S,
) -> int:
    """The command: 0 when done (and delivered, with `wait`), 1 when no line was a user, 2 when
    nothing delivers."""
    out = out or sys.stderr
    rules = load_rules(config.mappings.dir, options_of(config))
    sources = [open_source(spec, didomi=config.didomi_api, stdin=stdin) for spec in specs]
    store = None if dry_run else open_store(config.delivery, config.retention.person_key)
    turns = None
    try:
        if store is not None:
            # The gateway delivering meanwhile commits on the same file: both queue on its
            # write turns, each woken when the other commits, not in SQLite's 1-100 ms sleeps.
            turns = take_turns(store)
        job = Backfill(config, store, rules, out)
        try:
            for source in sources:
                job.totals.update(await job.source(source))
        except (KeyboardInterrupt, asyncio.CancelledError):
            job.report.end_line()
            print("backfill: interrupted; run the same command again to go on", file=out)
            raise
        job.summary(dry_run)
        if job.totals["read"] == 0 and job.totals["malformed"] > 0:
            # Not an export at all (a config file, a CSV): success would hide the mistake.
            print(
                "backfill: no line of the source is a Didomi user; give a Didomi export"
                " (one user a line, as the batch export writes them)",
                file=out,
            )
            return 1
        if wait and store is not None:
            return await follow(config, store, out, stall_s)
        return 0
    finally:
        if store is not None:
            store.close()
        if turns is not None:
            turns.close()
