"""`gateway dead-letters list|replay|purge`, on the spool file, also beside a running server."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import TextIO

from gateway.config.settings import Config
from gateway.spool.backend import open_store


def command(
    config: Config, action: str, ids: Sequence[int] | None, out: TextIO | None = None
) -> int:
    """Run one dead-letters action on the configured spool; returns the exit status."""
    out = out or sys.stdout
    db = open_store(config.delivery, config.retention.person_key, create=False)
    try:
        if ids and action != "list":
            # Checked before anything moves: a typo among the ids must not act on the others.
            found = {letter.id for letter in db.dead_letters(ids)}
            missing = sorted(set(ids) - found)
            if missing:
                shown = ", ".join(str(i) for i in missing)
                print(
                    f"gateway: no dead letter {shown}; nothing was done"
                    " (`gateway dead-letters list` shows the ids)",
                    file=sys.stderr,
                )
                return 1
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
    # An id gone between the check and the move (another purge beside this one) is an error too.
    return 1 if ids and count != len(set(ids)) else 0
