"""The spool thread's cost of acknowledging one Braze request, through `SpoolDB.ack` itself.

    .venv/bin/python bench/ack_cost.py [--rounds 40] [--batch 75] [--targets 4] [--group 1]

A fresh spool file (WAL, `synchronous=FULL`, as the gateway opens it) takes `--rounds` x
`--batch` webhooks, one new person each; then each round acknowledges one request's worth:
the `inbox` delete, one `applied` time per target, and the audit trail as the dispatcher
hands it over (`_trail`'s records). Prints the best and median CPU (`time.thread_time`: what
the spool thread spends) and wall time per webhook, and the file's growth per acknowledged
webhook after a checkpoint, and the audit trail's pages per webhook and per record (`dbstat`).
`--group N` acknowledges N requests per transaction, as `Spool.ack` groups those that finish
together.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import procs  # noqa: F401 - puts this checkout's gateway first on sys.path

from gateway.spool.audit import Record
from gateway.spool.sqlite import SpoolDB

TARGETS = ("email_subscribe", "subscription_group:marketing", "subscription_group:news", "attr")
BODY = b'{"type": "event.created", "parameters": {"entity": {"id": "x"}}}' * 12


def records(person: str, at: float, targets: int) -> list[Record]:
    """The records `Dispatcher._trail` writes for one delivered object."""
    event = str(uuid.uuid4())
    changes = tuple((t, "opted_in", f"mappings/email.toml:{n + 1}") for n, t in enumerate(TARGETS))
    common = {
        "event_id": event,
        "event_type": "event.created",
        "event_at": at,
        "endpoint": "/users/track",
        "status": 201,
    }
    if "changes" in Record.__slots__:  # one record per object, its changes packed
        return [Record(person, "to_braze", "delivered", at, changes=changes[:targets], **common)]  # type: ignore[call-arg]
    return [
        Record(person, "to_braze", "delivered", at, target=t, state=s, rule=r, **common)  # type: ignore[arg-type]
        for t, s, r in changes[:targets]
    ]


def main(argv: list[str] | None = None) -> int:
    """Time the acknowledgements and print the figures."""
    parser = argparse.ArgumentParser(prog="bench/ack_cost.py", description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--batch", type=int, default=75)
    parser.add_argument("--targets", type=int, default=4)
    parser.add_argument("--group", type=int, default=1, help="requests per transaction")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="ack-cost-") as tmp:
        db = SpoolDB(Path(tmp) / "spool.db", min_free_bytes=0)
        total = args.rounds * args.batch
        for start in range(0, total, 500):
            db.put_many([(None, "event.created", BODY)] * min(500, total - start))
        ids = [row.id for row in db.fetch(0, total)]
        db.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        before = db.path.stat().st_size
        cpu: list[float] = []
        wall: list[float] = []
        per = args.batch * args.group
        for n in range(args.rounds // args.group):
            now = time.time()
            persons = [uuid.uuid4().hex for _ in range(per)]
            done = ids[n * per : (n + 1) * per]
            applied = [(p, t, now) for p in persons for t in TARGETS[: args.targets]]
            c0, w0 = time.thread_time(), time.perf_counter()
            audit = [r for p in persons for r in records(p, now, args.targets)]
            db.ack(done, applied, audit=audit)
            cpu.append((time.thread_time() - c0) * 1e6 / per)
            wall.append((time.perf_counter() - w0) * 1e6 / per)
        db.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        grown = (db.path.stat().st_size - before) / total
        trail = db.db.execute(
            "SELECT sum(pgsize) FROM dbstat WHERE name IN ('audit', 'audit_person', 'audit_event')"
        ).fetchone()[0]
        records_stored = db.db.execute("SELECT count(*) FROM audit").fetchone()[0]
        db.close()
    print(
        f"per webhook ({args.targets} targets, {args.batch} a request, {args.rounds} requests,"
        f" {args.group} a transaction)"
    )
    print(f"  CPU  best {min(cpu):7.1f} µs  median {statistics.median(cpu):7.1f} µs")
    print(f"  wall best {min(wall):7.1f} µs  median {statistics.median(wall):7.1f} µs")
    print(f"  file growth {grown:7.0f} bytes (audit trail, applied times, indexes)")
    print(
        f"  audit trail {trail / total:7.0f} bytes per webhook, {records_stored} record(s),"
        f" {trail / records_stored:.0f} bytes each with its index entries (pages, dbstat)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
