"""Summarise a py-spy raw (collapsed) profile: where the samples went, by function.

    python bench/profile_top.py PROFILE [--under receive_webhook] [--top 25]

`run.py --profile DIR` writes DIR/gateway.collapsed (py-spy --threads --format raw). For each
function (name and file, lines merged) this prints the share of all samples spent inside it
(inclusive) and in its own code (self). `--under F` keeps only the stacks that pass through F
and ranks what F calls, which separates the intake path from the dispatcher path.
"""

from __future__ import annotations

import argparse
import collections
import re
import sys
from pathlib import Path

_LINE = re.compile(r"\s*\(([^()]*?)(?::\d+)?\)$")


def frame(text: str) -> str:
    """`name (path/file.py:123)` -> `name (file.py)`; threads and bare names unchanged."""
    match = _LINE.search(text)
    if match is None:
        return text.strip()
    return f"{text[: match.start()].strip()} ({Path(match.group(1)).name})"


def stacks(path: Path) -> list[tuple[list[str], int]]:
    out = []
    for line in path.read_text().splitlines():
        body, _, count = line.rpartition(" ")
        if body and count.isdigit():
            out.append(([frame(f) for f in body.split(";")], int(count)))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="bench/profile_top.py", description=__doc__.split("\n")[0]
    )
    parser.add_argument("profile", type=Path)
    parser.add_argument("--under", help="only stacks through this function (name prefix)")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args(argv)

    all_stacks = stacks(args.profile)
    grand = sum(n for _, n in all_stacks) or 1
    threads: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    kept = 0
    for frames, n in all_stacks:
        threads[frames[0].split(": ", 1)[-1]] += n  # "thread (123): MainThread"
        if args.under:
            at = next((i for i, f in enumerate(frames) if f.startswith(args.under)), None)
            if at is None:
                continue
            frames = frames[at:]
        kept += n
        for name in set(frames):
            inclusive[name] += n
        own[frames[-1]] += n
    print(f"{grand} samples; by thread:")
    for name, n in threads.most_common():
        print(f"  {100 * n / grand:5.1f} %  {name}")
    scope = f"stacks through {args.under}: {kept} samples" if args.under else "all stacks"
    print(f"\n{scope} ({100 * kept / grand:.1f} % of all); % of all samples, inclusive / self:")
    for name, n in inclusive.most_common(args.top):
        print(f"  {100 * n / grand:5.1f} %  {100 * own[name] / grand:5.1f} %  {name}")
    print("\nmost self time:")
    for name, n in own.most_common(args.top):
        print(f"  {100 * n / grand:5.1f} %  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
