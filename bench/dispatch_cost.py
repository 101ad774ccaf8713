"""The dispatcher's per-object Python on the event loop, timed in isolation (issue 27).

    .venv/bin/python bench/dispatch_cost.py [--webhooks 7500] [--repeats 7]

Takes the benchmark's webhooks (`events.py`, one new person each) as intake hands them over
(decoded, `Pending` rows) and runs what the dispatcher runs per object between the hand-off
and the acknowledgement, without sockets or SQL: mapping a page (`map_page`), the backlog
(`Batcher.add`, `take` of 75 with `Item.merge`), the Braze objects (`track_object`) and their
JSON, and `_ack`'s per-item work with the audit records (`records_of`). Prints the best of
`--repeats` in µs per webhook, per stage: the loop's CPU a change there saves, without the
noise of a shared machine.
"""

from __future__ import annotations

import argparse
import time
from collections import Counter
from pathlib import Path

import events
import msgspec

from gateway.forward.batcher import Batcher
from gateway.forward.pages import map_page
from gateway.forward.trail import records_of
from gateway.peers.braze_bodies import track_object
from gateway.rules.mappings import ERASED, load_rules
from gateway.shapes.webhooks import decode
from gateway.spool.store import Pending

MAPPINGS = Path(__file__).resolve().parent.parent / "mappings"
_encode = msgspec.json.Encoder().encode


def rows(count: int) -> list[Pending]:
    """`count` rows as intake hands them over: stored, and decoded."""
    out = []
    now = time.time()
    for n, body in enumerate(events.bodies(7)):
        if n == count:
            break
        out.append(Pending(n + 1, now, decode(body).type, body, decoded=decode(body)))
    return out


def once(rules: object, page: list[Pending]) -> dict[str, float]:
    """One pass over `page`; seconds per stage."""
    spent: Counter[str] = Counter()
    t = time.perf_counter()
    mapped = map_page(rules, page, Counter(), time.time)  # type: ignore[arg-type]
    spent["map_page"] += time.perf_counter() - t
    batcher = Batcher()
    t = time.perf_counter()
    batcher.add(mapped.entries)
    spent["Batcher.add"] += time.perf_counter() - t
    while True:
        t = time.perf_counter()
        batch = batcher.take(75)
        spent["Batcher.take"] += time.perf_counter() - t
        if batch is None:
            break
        t = time.perf_counter()
        objects = [
            track_object(
                item.identity,
                item.person,
                {target: c.state for target, c in item.changes.items()},
                update_existing_only=False,
            )
            for item in batch.items
        ]
        _encode({"attributes": objects})
        spent["track_object + JSON"] += time.perf_counter() - t
        t = time.perf_counter()
        now = time.time()
        done, applied, trail = [], [], []
        for item in batch.items:
            trail.extend(records_of(item, "delivered", now, "/users/track", 201))
            done.extend(row.id for row in item.rows)
            applied.extend((item.person, target, c.at) for target, c in item.changes.items())
            if item.erased_at is not None:
                applied.append((item.person, ERASED, item.erased_at))
        spent["_ack + records_of"] += time.perf_counter() - t
        t = time.perf_counter()
        for item in batch.items:
            item.settled = True
        batcher.release(batch)
        spent["Batcher.release"] += time.perf_counter() - t
    return dict(spent)


def main(argv: list[str] | None = None) -> int:
    """Time the stages and print µs per webhook."""
    parser = argparse.ArgumentParser(
        prog="bench/dispatch_cost.py", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--webhooks", type=int, default=7500)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    rules = load_rules(MAPPINGS)
    page = rows(args.webhooks)
    best: dict[str, float] = {}
    for _ in range(args.repeats):
        for stage, seconds in once(rules, page).items():
            best[stage] = min(best.get(stage, seconds), seconds)
    for stage, seconds in best.items():
        print(f"{seconds / len(page) * 1e6:7.2f} µs  {stage}")
    print(f"{sum(best.values()) / len(page) * 1e6:7.2f} µs  in all, per webhook ({len(page)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
