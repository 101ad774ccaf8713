"""The stale check's read-ahead for the backfill lane: used only while it is exact."""

from __future__ import annotations

from collections.abc import Iterable

import pytest

from gateway.forward.batcher import Item
from gateway.forward.stale import applied_for, read_ahead
from gateway.spool.face import Spool
from gateway.spool.postgres import PgSpoolDB

TARGET = "email_subscribe"


def _moved_and_acked_elsewhere(db: PgSpoolDB) -> None:
    """The lease lost, the new owner acks p's newer live choice, and the lease taken back, all
    before the dispatcher looked at its partitions again (`_follow_partitions`)."""
    db.set_owned(frozenset())
    db.ack([], [("p", TARGET, 9.0)])
    db.set_owned(None)


@pytest.mark.parametrize("when", ["during the read", "after the read"])
async def test_a_read_ahead_spanning_a_change_of_partitions_is_not_used(
    pg_url: str, monkeypatch: pytest.MonkeyPatch, when: str
) -> None:
    """Partitions given up and taken back during a lane page's read-ahead, or after it before
    its request leaves (another replica acked the person meanwhile, which this process's
    `Known` cannot see): the request reads the newer applied time afresh, not the older one."""
    db = PgSpoolDB(pg_url)
    spool = Spool(db)
    try:
        db.ack([], [("p", TARGET, 5.0)])
        real = db.applied_times

        def moved_meanwhile(persons: Iterable[str]) -> dict[tuple[str, str], float]:
            times = real(persons)
            _moved_and_acked_elsewhere(db)
            return times

        if when == "during the read":
            monkeypatch.setattr(db, "applied_times", moved_meanwhile)
        await read_ahead(spool, {"p"})
        monkeypatch.undo()
        if when == "after the read":
            _moved_and_acked_elsewhere(db)
        found = await applied_for(spool, [Item("external_id", "p")], ahead=True)
        assert found == {("p", TARGET): 9.0}
    finally:
        await spool.close()
