"""Mapping cost: microseconds for `RuleSet.apply` on one decoded webhook, with 10 to 10,000 rules.

    python bench/mapping_cost.py [--rules 10,1000,10000] [--json]

Each rule set is the example `mappings/email.toml` (the rules the events actually hit) plus
filler rules spread over many other purposes, four to a purpose (one attribute rule and three
subscription-group rules on a preference's values), written as TOML files in a temp dir and
loaded with `load_rules` like the gateway does. The events are the benchmark's templates,
decoded once; the timing is the best of seven repeats of mapping all of them, in-process, the
repeats interleaved across rule counts.
Flat means: rules on purposes an event does not carry cost it nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import events

from gateway.rules.mappings import Mapped, RuleSet, load_rules
from gateway.shapes.webhooks import Webhook, decode

EXAMPLE = Path(__file__).resolve().parent.parent / "mappings" / "email.toml"
PER_PURPOSE = 4
PER_FILE = 2_500


def filler(count: int) -> list[str]:
    """`count` [[map]] tables on purposes no benchmark event carries."""
    tables = []
    for i in range(count):
        purpose = f"purpose_{i // PER_PURPOSE:05d}"
        if i % PER_PURPOSE == 0:
            tables.append(f'[[map]]\nto = "attribute:consent_{i:05d}"\npurpose = "{purpose}"\n')
        else:
            group = f"{i:08x}-0000-4000-8000-000000000000"
            tables.append(
                f'[[map]]\nto = "{group}"\npurpose = "{purpose}"\n'
                f'preference = "topics"\nvalue = "topic_{i % PER_PURPOSE}"\n'
            )
    return tables


def rule_set(total: int, folder: Path) -> RuleSet:
    """The example rules plus filler up to `total` rules, loaded from TOML files in `folder`."""
    folder.mkdir()
    example = EXAMPLE.read_text()
    # The example's [[test]] tables point at fixtures relative to the repo; rules are all we need.
    (folder / "00-email.toml").write_text(example.split("[[test]]")[0])
    base = len(load_rules(folder).rules)
    tables = filler(max(0, total - base))
    for start in range(0, len(tables), PER_FILE):
        chunk = "\n".join(tables[start : start + PER_FILE])
        (folder / f"filler-{start // PER_FILE:02d}.toml").write_text(chunk)
    return load_rules(folder)


def calibrate(rules: RuleSet, webhooks: list[Webhook], budget_s: float) -> int:
    """How many passes over `webhooks` take about `budget_s` (and warm everything up)."""
    loops = 1
    while True:
        took = one_pass(rules, webhooks, loops)
        if took >= budget_s / 5:
            return max(1, int(loops * budget_s / took))
        loops *= 2


def one_pass(rules: RuleSet, webhooks: list[Webhook], loops: int) -> float:
    started = time.perf_counter()
    for _ in range(loops):
        for webhook in webhooks:
            rules.apply(webhook)
    return time.perf_counter() - started


def per_event_us(
    rule_sets: list[RuleSet], webhooks: list[Webhook], budget_s: float = 0.3, repeats: int = 7
) -> list[float]:
    """Best-of-`repeats` microseconds per `apply` for each rule set, the repeats interleaved
    so that a noisy moment on the machine hits every rule count alike."""
    loops = calibrate(rule_sets[0], webhooks, budget_s)
    best = [float("inf")] * len(rule_sets)
    for _ in range(repeats):
        for index, rules in enumerate(rule_sets):
            best[index] = min(best[index], one_pass(rules, webhooks, loops))
    return [b / (loops * len(webhooks)) * 1e6 for b in best]


def decode_us(bodies: list[bytes], loops: int = 2_000) -> float:
    """Best-of-five microseconds to decode one body (the same for every rule count)."""
    best = float("inf")
    for _ in range(5):
        started = time.perf_counter()
        for _ in range(loops):
            for body in bodies:
                decode(body)
        best = min(best, time.perf_counter() - started)
    return best / (loops * len(bodies)) * 1e6


def measure(counts: list[int]) -> dict[str, object]:
    bodies = [t.render(0, n) for n, t in enumerate(events.templates())]
    webhooks = [decode(body) for body in bodies]
    rule_sets: list[RuleSet] = []
    load_times: list[float] = []
    reference: list[object] | None = None
    with tempfile.TemporaryDirectory(prefix="bench-rules-") as tmp:
        for count in counts:
            started = time.perf_counter()
            rules = rule_set(count, Path(tmp) / f"rules-{count}")
            load_times.append(time.perf_counter() - started)
            mapped = [rules.apply(w) for w in webhooks]
            produced = [m.changes if isinstance(m, Mapped) else m for m in mapped]
            if reference is None:
                reference = produced
            elif produced != reference:
                raise SystemExit(f"{count} rules map the events differently from {counts[0]}")
            rule_sets.append(rules)
    costs = per_event_us(rule_sets, webhooks)
    results = [
        {
            "rules": len(rules.rules),
            "purposes": len(set(rules.by_purpose) | set(rules.by_preference)),
            "apply_us": cost,
            "load_s": load_s,
        }
        for rules, cost, load_s in zip(rule_sets, costs, load_times, strict=True)
    ]
    return {"events": len(webhooks), "decode_us": decode_us(bodies), "results": results}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="bench/mapping_cost.py", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--rules", default="10,1000,10000", help="comma-separated rule counts")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    report = measure([int(n) for n in args.rules.split(",")])
    if args.json:
        json.dump(report, sys.stdout)
        print()
        return 0
    print(f"decode: {report['decode_us']:.1f} µs/event (any rule count)")
    for row in report["results"]:  # type: ignore[attr-defined]
        print(
            f"{row['rules']:>6} rules over {row['purposes']:>5} purposes: "
            f"apply {row['apply_us']:.2f} µs/event (loading took {row['load_s']:.2f} s)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
