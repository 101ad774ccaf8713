"""The spool's size per 100k people after repeated updates of the same people: flat.

    .venv/bin/python bench/spool_size.py [--people 20000] [--rounds 6] [--audit-days 2]

Drives `SpoolDB` directly (no server, no Braze): each round is one simulated day in which every
person changes three targets once, stored, acknowledged with its applied times and audit
records, then pruned per `[retention]` (`audit_days` as given, so the trail keeps that many
days). Prints, per round, the file size (after a checkpoint) scaled to 100k people: once the
retention window is full it stops growing, since `applied` holds one row per person and target
and the inbox empties on every acknowledgement.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gateway.app.retention import DAY_S, TABLES  # noqa: E402
from gateway.spool.audit import Record  # noqa: E402 - after the path is set
from gateway.spool.sqlite import SpoolDB  # noqa: E402

TARGETS = ("email_subscribe", "group:3b0a6f8e-5c1d-4e2f-9a7b-0c1d2e3f4a5b", "attr:consent")


def body(person: str, day: int) -> bytes:
    """A Didomi-sized consent webhook for `person` on `day`."""
    entity = {
        "id": f"ev-{person}-{day}",
        "updated_at": f"2025-01-{day + 1:02d}T00:00:00Z",
        "status": "confirmed",
        "user": {"id": f"didomi-{person}", "organization_user_id": person},
        "consents": {"purposes": [{"id": "marketing_email", "enabled": day % 2 == 0}]},
    }
    return json.dumps({"type": "event.created", "parameters": {"entity": entity}}).encode()


def size(db: SpoolDB) -> int:
    """Bytes of the spool file and its WAL, after folding the WAL in."""
    db.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    wal = db.path.with_name(db.path.name + "-wal")
    return db.path.stat().st_size + (wal.stat().st_size if wal.exists() else 0)


def main() -> int:
    """Run the rounds and print one line per round."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--people", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--audit-days", type=float, default=2.0)
    args = parser.parse_args()
    now = [100 * DAY_S]
    scale = 100_000 / args.people
    with tempfile.TemporaryDirectory() as tmp:
        db = SpoolDB(Path(tmp) / "spool.db", clock=lambda: now[0])
        print(f"{'round':>5} {'MB per 100k people':>19} {'audit rows':>11}")
        for day in range(args.rounds):
            people = [f"person-{n:07d}" for n in range(args.people)]
            for start in range(0, len(people), 1000):
                chunk = people[start : start + 1000]
                db.put_many([(f"k-{p}-{day}", "event.created", body(p, day)) for p in chunk])
                rows = db.fetch(0, len(chunk))
                applied = [(p, t, now[0]) for p in chunk for t in TARGETS]
                trail = [
                    Record(p, "to_braze", "delivered", now[0], event_id=f"ev-{p}-{day}", target=t)
                    for p in chunk
                    for t in TARGETS
                ]
                db.ack([row.id for row in rows], applied, audit=trail)
            cutoffs = {"audit": args.audit_days, "dead_letters": 30.0, "applied": 400.0}
            cutoffs["sent"] = cutoffs["applied"]
            for table in TABLES:
                cutoff = now[0] - cutoffs[table] * DAY_S
                _, cursor = db.prune(table, cutoff, 500)
                while cursor is not None:  # as the server's task does, 500 rows a transaction
                    _, cursor = db.prune(table, cutoff, 500, cursor)
            audit_rows = db.db.execute("SELECT count(*) FROM audit").fetchone()[0]
            print(f"{day + 1:>5} {size(db) * scale / 1e6:>19.1f} {audit_rows:>11}")
            now[0] += DAY_S
        db.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
