"""`gateway dead-letters list|replay|purge`, on the spool file, also beside a running server."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import TextIO

from .config import Config
from .store import open_store


def command(
    config: Config, action: str, ids: Sequence[int] | None, out: TextIO | None = None
) -> int:
    """Run one dead-letters action on the configured spool; returns the exit status."""
    out = out or sys.stdout
    db = open_store(config.delivery, config.retention.person_key)
    try:
        if action == "list":
            letters = db.dead_letters(ids)
            for letter in letters:
                when = datetime.fromtimestamp(letter.created_at, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
                print(
                    f"{letter.id}\t{when}\t{letter.type}\t{letter.person or '-'}\t{letter.reason}",
                    file=out,
                )
            print(f"{len(letters)} dead letter(s)", file=out)
            return 0
        if action == "replay":
            count = db.replay(ids)
            print(f"{count} dead letter(s) moved back to the spool for delivery", file=out)
        else:
            count = db.purge(ids)
            print(f"{count} dead letter(s) deleted", file=out)
    finally:
        db.close()
    # An id named on the command line that did not exist is an error: a typo must not pass.
    return 1 if ids and count != len(set(ids)) else 0
