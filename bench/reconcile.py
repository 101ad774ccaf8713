"""`gateway reconcile`'s speed against a fake Braze that enforces the export limit: persons
compared per (Braze) minute at braze.export_requests_per_minute = 250.

    .venv/bin/python bench/reconcile.py [--minutes 10] [--minute-s 6] [--per-minute 250]

Braze's minute is scaled down (a `--minute-s` second "minute", 6 s by default) on both sides:
the fake Braze's fixed windows (`FakeBraze.export_limit.scale`, its X-RateLimit-Reset rounded
to the scaled second) and the reader's window (`reconcile_cli.Options.minute_s`). The figure
reported is persons per scaled minute, which is persons per real minute at real Braze's
pace, counting only the persons after the first window (which leaves at once) over the whole
run's time; the target is 95 % of 250 x 50 = 12,500. The run reads an export file of
`minutes` x 12,500 users with the default mappings (two groups, the email state, an attribute)
and must draw no 429. The peak RSS is printed too: it stays flat in the number of persons.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gateway.cli.reconcile import Options, run  # noqa: E402
from gateway.config.settings import load_config  # noqa: E402 - after the path is set
from gateway.testing.braze import FakeBraze  # noqa: E402

NEWS = "3b0a6f8e-5c1d-4e2f-9a7b-0c1d2e3f4a5b"
OFFERS = "7c1e2d3f-4a5b-4c6d-8e9f-0a1b2c3d4e5f"
KEY = "bench-braze-key"


def user(n: int) -> dict[str, object]:
    """A Didomi user who chose the newsletter and one topic."""
    topics = "product_news" if n % 2 else "offers"
    return {
        "id": f"didomi-{n}",
        "organization_user_id": f"user-{n}",
        "updated_at": "2025-03-14T09:26:53Z",
        "consents": {
            "purposes": [
                {"id": "marketing_email", "enabled": True, "values": {"topics": {"value": topics}}}
            ]
        },
    }


async def bench(args: argparse.Namespace) -> dict[str, float]:
    persons = int(args.minutes * args.per_minute * 50)
    fake = FakeBraze(api_key=KEY, record=False)
    fake.export_limit.scale(args.minute_s, per_minute=args.per_minute)
    for n in range(persons):
        news, offers = ("subscribed", "unsubscribed") if n % 2 else ("unsubscribed", "subscribed")
        fake.seed(
            f"user-{n}",
            email_subscribe="opted_in",
            groups={NEWS: news, OFFERS: offers},
            attributes={"consent_marketing": True},
        )
    await fake.start()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        export = folder / "users.json"
        with export.open("w") as out:
            for n in range(persons):
                out.write(json.dumps({"user": user(n)}) + "\n")
        (folder / "mappings").mkdir()
        (folder / "mappings" / "email.toml").write_text(
            (ROOT / "mappings" / "email.toml").read_text().split("[[test]]")[0]
        )
        (folder / "gateway.toml").write_text(
            f'[braze]\nserver = "{fake.url}"\napi_key = "{KEY}"\n'
            f"export_requests_per_minute = {args.per_minute}\n"
            f'[delivery]\nspool = "{folder / "spool.db"}"\n'
            '[auth]\nmode = "none"\n[mappings]\ndir = "mappings"\n'
        )
        config = load_config(folder / "gateway.toml")
        err = io.StringIO()
        started = time.monotonic()
        options = Options([str(export)], out=io.StringIO(), err=err, minute_s=args.minute_s)
        report = await run(config, options)
        elapsed = time.monotonic() - started
    await fake.stop()
    assert report.compared == persons, (report.compared, persons)
    assert report.drifting == 0
    # The first window's requests leave at once: counting them over the run's time would credit
    # a window never waited for. Those after it, over the whole time, are the steady pace.
    per_minute = (persons - args.per_minute * 50) / (elapsed / args.minute_s)
    return {
        "persons": persons,
        "seconds": round(elapsed, 2),
        "minute_s": args.minute_s,
        "persons_per_minute": round(per_minute),
        "of_ideal": round(per_minute / (args.per_minute * 50), 4),
        "rate_limited": fake.stats["rate_limited"],
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--minute-s", type=float, default=6.0)
    parser.add_argument("--per-minute", type=int, default=250)
    result = asyncio.run(bench(parser.parse_args()))
    print(json.dumps(result))
    return 0 if result["of_ideal"] >= 0.95 and result["rate_limited"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
