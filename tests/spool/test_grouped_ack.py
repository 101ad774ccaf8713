"""Delivery outcomes settled together share one acknowledging transaction, on both backends,
and every failure of a grouped acknowledgement leaves each caller's rows pending."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from typing import Any

import pytest

from gateway.errors import SpoolError
from gateway.spool.audit import Record
from gateway.spool.face import Spool
from tests.spool.test_spool import MakeStore, make_store  # noqa: F401 - a fixture

PEOPLE = 30


def _stored(db: Any) -> list[int]:
    db.put_many([(None, "event.created", b'{"n": %d}' % n) for n in range(PEOPLE)])
    return [row.id for row in db.fetch(0, PEOPLE)]


def _calls(
    db: Any, monkeypatch: pytest.MonkeyPatch, fail: Any = None
) -> list[tuple[list[int], Sequence[str]]]:
    """Wrap `db.ack` to note the rows and erasures of each call, and to raise SpoolError when
    `fail(rows)` says."""
    calls: list[tuple[list[int], Sequence[str]]] = []
    original = db.ack

    def ack(done: Sequence[int], *args: Any, **kwargs: Any) -> None:
        calls.append((list(done), kwargs.get("erase", ())))
        if fail is not None and fail(done):
            raise SpoolError("the spool cannot be written (the test says so)")
        original(done, *args, **kwargs)

    monkeypatch.setattr(db, "ack", ack)
    return calls


def _hold_first_ack(
    db: Any, monkeypatch: pytest.MonkeyPatch
) -> tuple[threading.Event, threading.Event]:
    """The first acknowledgement holds the spool thread: set `entered` once it does, and waits
    for `release`; the later ones run as written."""
    entered, release = threading.Event(), threading.Event()
    original = db.ack

    def ack(*args: Any, **kwargs: Any) -> None:
        if not entered.is_set():
            entered.set()
            assert release.wait(30)
        original(*args, **kwargs)

    monkeypatch.setattr(db, "ack", ack)
    return entered, release


async def _settle(spool: Spool, row: int, n: int, *, stopping: bool = False) -> None:
    await spool.ack(
        [row],
        [(f"p{n}", "email_subscribe", float(n))],
        audit=[Record(f"p{n}", "to_braze", "delivered", 1.0, event_id=f"ev-{n}")],
        stopping=lambda: stopping,
    )


async def test_outcomes_settled_together_share_one_transaction(
    make_store: MakeStore,  # noqa: F811 - the imported fixture
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Thirty requests settled at once are acknowledged in a few transactions, each outcome
    in full: rows gone, applied times and audit records stored."""
    db = make_store()
    ids = _stored(db)
    calls = _calls(db, monkeypatch)
    spool = Spool(db)
    try:
        await asyncio.gather(*(_settle(spool, row, n) for n, row in enumerate(ids)))
        assert sorted(i for call, _ in calls for i in call) == ids
        assert len(calls) <= 3, calls
        assert db.count_pending() == 0
        assert len(db.applied_times([f"p{n}" for n in range(PEOPLE)])) == PEOPLE
        assert [r.event_id for r in db.trail("p7")] == ["ev-7"]
    finally:
        await spool.close()


async def test_a_failing_grouped_acknowledgement_leaves_every_row_pending(
    make_store: MakeStore,  # noqa: F811 - the imported fixture
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """While the spool cannot be written, a grouped acknowledgement commits nothing: stopping,
    every caller gets the error and its row stays pending, with no applied time nor audit;
    not stopping, every caller retries until its outcome is written."""
    db = make_store()
    ids = _stored(db)
    broken = [True]
    _calls(db, monkeypatch, fail=lambda done: broken[0])
    spool = Spool(db)
    try:
        half = PEOPLE // 2
        results = await asyncio.gather(
            *(_settle(spool, row, n, stopping=True) for n, row in enumerate(ids[:half])),
            return_exceptions=True,
        )
        assert all(isinstance(r, SpoolError) for r in results), results
        assert db.count_pending() == PEOPLE
        assert db.applied_times([f"p{n}" for n in range(half)]) == {}
        assert db.trail("p3") == []
        retrying = [
            asyncio.create_task(_settle(spool, row, n + half)) for n, row in enumerate(ids[half:])
        ]
        await asyncio.sleep(0.3)
        assert not any(task.done() for task in retrying)
        assert db.count_pending() == PEOPLE
        broken[0] = False  # the disk has room again
        await asyncio.wait_for(asyncio.gather(*retrying), timeout=30)
        assert db.count_pending() == half
    finally:
        await spool.close()


async def test_an_outcome_the_spool_refuses_holds_back_no_other(
    make_store: MakeStore,  # noqa: F811 - the imported fixture
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """When a group fails because of one outcome, the others are written on their own; the
    refused one's caller gets the error and its row stays pending."""
    db = make_store()
    ids = _stored(db)
    poison = ids[4]
    calls = _calls(db, monkeypatch, fail=lambda done: poison in done)
    spool = Spool(db)
    try:
        results = await asyncio.gather(
            *(_settle(spool, row, n, stopping=True) for n, row in enumerate(ids)),
            return_exceptions=True,
        )
        assert [type(r) for r in results] == [
            SpoolError if row == poison else type(None) for row in ids
        ]
        assert [row.id for row in db.fetch(0, PEOPLE)] == [poison]
        assert db.applied_times(["p4"]) == {}
        assert len(db.applied_times([f"p{n}" for n in range(PEOPLE)])) == PEOPLE - 1
        assert any(len(call) > 1 for call, _ in calls), calls  # it was grouped, then split
    finally:
        await spool.close()


async def test_an_erasure_is_acknowledged_alone(
    make_store: MakeStore,  # noqa: F811 - the imported fixture
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An acknowledgement that erases a person is its own transaction: its scrub reaches only
    the rows received before those it settles, whatever else settles at the same time."""
    db = make_store()
    ids = _stored(db)
    calls = _calls(db, monkeypatch)
    spool = Spool(db)
    try:
        others = [_settle(spool, row, n) for n, row in enumerate(ids[1:], start=1)]
        erase = spool.ack([ids[0]], [("p0", "erased", 1.0)], erase=["p0"], stopping=lambda: False)
        await asyncio.gather(erase, *others)
        assert [call for call in calls if call[1]] == [([ids[0]], ["p0"])]
        assert db.count_pending() == 0
    finally:
        await spool.close()


async def test_an_erasure_is_written_after_the_outcomes_settled_before_it(
    make_store: MakeStore,  # noqa: F811 - the imported fixture
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An outcome about a person settled while another acknowledgement runs, then their
    erasure: the outcome is written first, so the scrub leaves no applied time nor audit
    record under their identifier."""
    db = make_store()
    ids = _stored(db)
    entered, release = _hold_first_ack(db, monkeypatch)
    spool = Spool(db)
    try:
        running = asyncio.create_task(_settle(spool, ids[1], 1))
        assert await asyncio.to_thread(entered.wait, 30)
        before = asyncio.create_task(_settle(spool, ids[2], 0))  # p0's, queued
        for _ in range(5):
            await asyncio.sleep(0)
        erasure = asyncio.create_task(
            spool.ack([ids[0]], [("p0", "erased", 9.0)], erase=["p0"], stopping=lambda: False)
        )
        for _ in range(5):
            await asyncio.sleep(0)
        release.set()
        await asyncio.wait_for(asyncio.gather(running, before, erasure), timeout=30)
        with db._reading("the applied times") as conn:
            named = conn.execute("SELECT person FROM applied WHERE person = ?", ("p0",))
            assert named.fetchall() == []
        assert [r.event_id for r in db.trail("p0")] == []  # only p0's erasure had an audit
        assert db.count_pending() == PEOPLE - 3
    finally:
        release.set()
        await spool.close()


async def test_a_cancelled_settler_releases_every_waiter_and_their_rows_are_settled_on_retry(
    make_store: MakeStore,  # noqa: F811 - the imported fixture
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """When the task writing grouped acknowledgements is cancelled with one group on the spool
    thread and others queued, no caller hangs nor sees itself cancelled: each gets an error,
    retries, and every row is settled once the spool thread is free."""
    db = make_store()
    ids = _stored(db)
    entered, release = _hold_first_ack(db, monkeypatch)
    spool = Spool(db)
    try:
        running = asyncio.create_task(_settle(spool, ids[0], 0))
        assert await asyncio.to_thread(entered.wait, 30)
        queued = [asyncio.create_task(_settle(spool, row, n)) for n, row in enumerate(ids[1:], 1)]
        for _ in range(5):
            await asyncio.sleep(0)
        settler = spool._settler
        assert settler is not None
        assert spool._settling  # outcomes queued behind the group on the spool thread
        settler.cancel()
        await asyncio.gather(settler, return_exceptions=True)
        release.set()
        await asyncio.wait_for(asyncio.gather(running, *queued), timeout=30)
        assert db.count_pending() == 0
        assert len(db.applied_times([f"p{n}" for n in range(PEOPLE)])) == PEOPLE
    finally:
        release.set()
        await spool.close()
