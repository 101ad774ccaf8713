"""The dispatcher's reading of the backfill lane: a spoiled read costs it neither share nor time."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from gateway.errors import SpoolError
from gateway.forward.batcher import Batcher
from gateway.forward.pages import Lane
from gateway.spool.store import Pending


class LaneSpool:
    """The two things `Lane.page` asks of the spool; `fail` or `move` spoil the next read."""

    def __init__(self) -> None:
        self.generation = 0
        self.reads: list[int] = []  # the limit of each read
        self.fail = False
        self.move = False

    async def fetch_backfill(self, after_id: int, limit: int) -> list[Pending]:
        self.reads.append(limit)
        if self.fail:
            self.fail = False
            raise SpoolError("the lane cannot be read (injected)")
        if self.move:
            self.move = False
            self.generation += 1  # another replica took partitions meanwhile
        ids = (after_id + 1, after_id + 2)
        return [Pending(i, 0.0, "user.updated", b"{}", backfill=True) for i in ids]


@pytest.mark.parametrize("spoil", ["spool error", "partitions moved"])
async def test_a_lane_read_that_fails_or_is_discarded_is_read_again_at_once_with_its_share(
    spoil: str,
) -> None:
    """A lane read that raises, or whose rows are discarded because the partitions moved during
    it, gives its share back and leaves the lane to be read at the loop's next turn, not after
    the gauges' next count."""
    spool: Any = LaneSpool()
    lane = Lane(lambda: 1000.0)  # objects a second: a second's worth at most, refilled at once
    await asyncio.sleep(0.05)
    if spoil == "spool error":
        spool.fail = True
        with pytest.raises(SpoolError):
            await lane.page(spool, Batcher(), slots=100)
    else:
        spool.move = True
        assert await lane.page(spool, Batcher(), slots=100) == ([], 0)
    first = spool.reads[-1]
    rows, cursor = await lane.page(spool, Batcher(), slots=100)
    assert len(spool.reads) == 2, "the lane was not read again"
    assert spool.reads[1] >= first  # what the spoiled read was allowed is allowed again
    assert [row.id for row in rows] == [1, 2]
    assert cursor == 2
