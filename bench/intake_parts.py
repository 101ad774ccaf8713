"""Isolated costs of the parts of a webhook that `bench/wrk.py --profile` points at.

    .venv/bin/python bench/intake_parts.py SPOOL [--repeats 7]

SPOOL is a gateway spool file with its schema (e.g. `bench/wrk.py --keep` leaves
`/tmp/gateway-wrk-*/gateway/gateway.db`); it is copied, never written. On the copy, with the
gateway's pragmas (WAL, `synchronous=FULL`), each transaction below is run, committed, and
timed twice: CPU of this thread (`time.thread_time`, what the spool thread spends) and wall
(what the webhooks in it wait, fsync included). Best of `--repeats`, per webhook:

- intake group of 28 webhooks (the mean group under wrk): `seen` upsert and `inbox` insert,
  one `execute` per row as `SpoolDB.put_many` does, and the same with `executemany`;
- acknowledgement of one Braze request (75 webhooks, one new person each, four targets with
  the example mappings): the `inbox` delete, 4 `applied` upserts and 4 `audit` records per
  webhook as now; then 1 audit record per webhook; then 1 `applied` row per person too.

Then the log line (`gateway.logs.configure_logging` to a file, `webhook accepted` with its
extras, as `receive_webhook` writes it) and one prometheus_client counter `inc` (a bound child).
"""

from __future__ import annotations

import argparse
import logging
import secrets
import shutil
import sqlite3
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import events
import procs  # noqa: F401 - puts this checkout's gateway first on sys.path
from prometheus_client import CollectorRegistry, Counter

from gateway.logs import configure_logging

BODY = events.templates()[0].render(1, 1)
TARGETS = ("email_subscribe", "subscription_group:marketing", "subscription_group:news", "attr")


def timed(fn: Callable[[], object], repeats: int, per: int) -> tuple[float, float]:
    """Best (CPU µs, wall µs) per item of `repeats` calls of `fn`, each over `per` items."""
    cpu = wall = float("inf")
    for _ in range(repeats):
        c0, w0 = time.thread_time(), time.perf_counter()
        fn()
        cpu = min(cpu, (time.thread_time() - c0) * 1e6 / per)
        wall = min(wall, (time.perf_counter() - w0) * 1e6 / per)
    return cpu, wall


def sql_parts(spool: Path, repeats: int) -> list[tuple[str, float, float]]:
    folder = Path(tempfile.mkdtemp(prefix="intake-parts-"))
    try:
        source = sqlite3.connect(f"file:{spool}?mode=ro", uri=True)
        copy = sqlite3.connect(folder / "spool.db")
        source.backup(copy)
        source.close()
        copy.close()
        db = sqlite3.connect(folder / "spool.db", isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute("PRAGMA secure_delete=FAST")
        return _run_sql(db, repeats)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _run_sql(db: sqlite3.Connection, repeats: int) -> list[tuple[str, float, float]]:
    now = time.time()
    out = []

    def intake(many: bool) -> Callable[[], None]:
        def go() -> None:
            keys = [secrets.token_hex(16) for _ in range(28)]
            db.execute("BEGIN IMMEDIATE")
            if many:
                db.executemany(
                    "INSERT INTO seen(key, at) VALUES (?, ?) ON CONFLICT(key) DO UPDATE"
                    " SET at = excluded.at WHERE seen.at < ?",
                    [(k, now, now - 7 * 86400) for k in keys],
                )
                db.executemany(
                    "INSERT INTO inbox(received_at, type, body, direction) VALUES (?, ?, ?, ?)",
                    [(now, "event.created", BODY, 0) for _ in keys],
                )
            else:
                for k in keys:
                    db.execute(
                        "INSERT INTO seen(key, at) VALUES (?, ?) ON CONFLICT(key) DO UPDATE"
                        " SET at = excluded.at WHERE seen.at < ?",
                        (k, now, now - 7 * 86400),
                    )
                    db.execute(
                        "INSERT INTO inbox(received_at, type, body, direction) VALUES (?, ?, ?, ?)",
                        (now, "event.created", BODY, 0),
                    )
            db.execute("COMMIT")

        return go

    def ack(audit_per: int, applied_per: int) -> Callable[[], None]:
        def go() -> None:
            newest = db.execute("SELECT id FROM inbox ORDER BY id DESC LIMIT 75")
            ids = [row[0] for row in newest] or [0]
            persons = [secrets.token_hex(32) for _ in range(75)]
            db.execute("BEGIN IMMEDIATE")
            db.execute(
                f"DELETE FROM inbox WHERE id IN ({','.join('?' * len(ids))})",  # noqa: S608
                ids,
            )
            db.executemany(
                "INSERT INTO applied(person, target, at) VALUES (?, ?, ?) ON CONFLICT DO UPDATE"
                " SET at = max(at, excluded.at)",
                [(p, t, now) for p in persons for t in TARGETS[:applied_per]],
            )
            db.executemany(
                "INSERT INTO audit(at, person, direction, event_id, event_type, event_at,"
                " endpoint, target, state, rule, status, outcome, detail)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (now, p, "to_braze", str(uuid.uuid4()), "event.created", now,
                     "/users/track", t, "opted_in", "email.toml:1", 201, "delivered", "")
                    for p in persons
                    for t in TARGETS[:audit_per]
                ],
            )  # fmt: skip
            db.execute("COMMIT")

        return go

    for label, fn, per in (
        ("intake group of 28, execute per row (now)", intake(False), 28),
        ("intake group of 28, executemany", intake(True), 28),
        ("ack of 75: 4 audit + 4 applied per webhook (now)", ack(4, 4), 75),
        ("ack of 75: 1 audit + 4 applied per webhook", ack(1, 4), 75),
        ("ack of 75: 1 audit + 1 applied per webhook", ack(1, 1), 75),
    ):
        cpu, wall = timed(fn, repeats, per)
        out.append((label, cpu, wall))
    return out


def log_line(repeats: int) -> tuple[float, float]:
    folder = Path(tempfile.mkdtemp(prefix="intake-parts-"))
    try:
        with (folder / "log").open("w") as stream:
            configure_logging("json", "INFO", stream)
            log = logging.getLogger("gateway.server")
            event_id = str(uuid.uuid4())

            def go() -> None:
                for _ in range(1000):
                    log.info(
                        "webhook %s",
                        "accepted",
                        extra={"event_id": event_id, "type": "event.created", "outcome": "x"},
                    )

            return timed(go, repeats, 1000)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def counter_inc(repeats: int) -> tuple[float, float]:
    child = Counter("c", "c", ["a", "b"], registry=CollectorRegistry()).labels("x", "y")

    def go() -> None:
        for _ in range(10000):
            child.inc()

    return timed(go, repeats, 10000)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="bench/intake_parts.py", description=__doc__.split("\n")[0]
    )
    parser.add_argument("spool", type=Path, help="a gateway spool file, copied")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    print(f"{'per webhook, best of ' + str(args.repeats):<52} {'CPU µs':>8} {'wall µs':>8}")
    for label, cpu, wall in sql_parts(args.spool, args.repeats):
        print(f"{label:<52} {cpu:8.1f} {wall:8.1f}")
    for label, (cpu, wall) in (
        ("log line `webhook accepted` (json, to a file)", log_line(args.repeats)),
        ("one prometheus counter inc (bound child)", counter_inc(args.repeats)),
    ):
        print(f"{label:<52} {cpu:8.1f} {wall:8.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
