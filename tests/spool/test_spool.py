"""gateway.spool: dedupe, bounds, grouped commits, acks, dead letters, and what survives a close."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from gateway.config.settings import is_postgresql
from gateway.errors import SpoolError, SpoolFull, SpoolLocked
from gateway.spool.face import Spool
from gateway.spool.handoff import Handoff
from gateway.spool.lock import SpoolLock, WriteTurns
from gateway.spool.postgres import PgSpoolDB
from gateway.spool.sqlite import Dead, SpoolDB
from gateway.spool.sqlite_schema import SCHEMA_VERSION
from gateway.spool.store import Pending

WINDOW = 100.0
T0 = 1_700_000_000.0
NO_DISK_HAS_THIS_MUCH = 10**18  # as min_free_bytes: any write would eat into the reserve
MIB = 1024 * 1024
SQLITE_IOERR_WRITE = 778


class Clock:
    """A settable clock, so the dedupe window is crossed without sleeping."""

    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "var" / "spool.db"


MakeStore = Callable[..., Any]


@pytest.fixture
def make_store(spool_url: str) -> Iterator[MakeStore]:
    """`make_store(**options)`: the spool backend under test, on the same file or database
    each call (so a second call reopens it, or is a second connection, as the CLI's is)."""
    opened: list[Any] = []

    def make(**options: Any) -> Any:
        store = PgSpoolDB(spool_url, **options) if is_postgresql(spool_url) else None
        if store is None:
            store = SpoolDB(spool_url, **options)
        opened.append(store)
        return store

    yield make
    for store in opened:
        with contextlib.suppress(Exception):
            store.close()


@pytest.fixture
def db(make_store: MakeStore, clock: Clock) -> Any:
    """The backend under test, with the test clock and a short dedupe window."""
    return make_store(dedupe_window_s=WINDOW, clock=clock)


def item(n: int, key: str | None = "") -> tuple[str | None, str, bytes]:
    """A spool item; `key` "" means a key derived from n, None means no dedupe key."""
    return (f"event.created|e{n}|t" if key == "" else key, "event.created", b'{"n": %d}' % n)


def bodies(db: SpoolDB) -> list[bytes]:
    return [row.body for row in db.fetch(0, 1_000_000)]


def test_put_stores_and_a_duplicate_is_stored_once(db: SpoolDB) -> None:
    """A repeated key answers False and adds no row; a different key is a new row."""
    assert db.put_many([item(1)]) == [True]
    assert db.put_many([item(1)]) == [False]
    assert db.put_many([item(2), item(2)]) == [True, False]
    assert bodies(db) == [b'{"n": 1}', b'{"n": 2}']
    assert db.pending == db.count_pending() == 2


def test_rows_without_a_key_are_never_deduplicated(db: SpoolDB) -> None:
    """An entity without an id has no dedupe key: every delivery of it is stored."""
    assert db.put_many([item(1, None), item(1, None)]) == [True, True]
    assert db.count_pending() == 2


def test_dedupe_window_expires(db: SpoolDB, clock: Clock) -> None:
    """Inside the window a key is a duplicate; once the window has passed it is new again."""
    assert db.put_many([item(1)]) == [True]
    clock.now = T0 + WINDOW - 1
    assert db.put_many([item(1)]) == [False]
    clock.now = T0 + WINDOW + 1
    assert db.put_many([item(1)]) == [True]
    clock.now = T0 + WINDOW + 2  # the window now runs from the second delivery
    assert db.put_many([item(1)]) == [False]
    assert db.count_pending() == 2


def test_prune_forgets_only_keys_older_than_the_window(db: SpoolDB, clock: Clock) -> None:
    """prune_seen drops expired keys and keeps the ones still inside the window."""
    db.put_many([item(1)])
    clock.now = T0 + WINDOW / 2
    db.put_many([item(2)])
    clock.now = T0 + WINDOW + 1
    db.prune_seen()
    keys = {key for (key,) in db.db.execute("SELECT key FROM seen")}
    assert keys == {"event.created|e2|t"}


def test_max_pending_refuses_beyond_the_bound_and_forgets_the_refused_key(
    make_store: MakeStore,
) -> None:
    """Over max_pending a put is SpoolFull, not stored, and not remembered as seen."""
    db = make_store(max_pending=2)
    try:
        results = db.put_many([item(1), item(2), item(3)])
        assert results[:2] == [True, True]
        assert isinstance(results[2], SpoolFull)
        assert db.count_pending() == db.pending == 2
        # A duplicate is still recognised as such when the spool is full.
        assert db.put_many([item(1)]) == [False]
        # Once a row is delivered there is room, and the refused webhook's retry is accepted.
        first = db.fetch(0, 1)[0]
        db.ack([first.id])
        assert db.put_many([item(3)]) == [True]
    finally:
        db.close()


@pytest.mark.sqlite_only
def test_disk_full_is_spool_full_and_stores_nothing(db: SpoolDB) -> None:
    """A write that finds no room on disk raises SpoolFull and leaves no row and no key."""
    db.put_many([item(1)])
    db.db.execute("PRAGMA max_page_count = 1")  # cannot shrink below the current size
    with pytest.raises(SpoolFull):
        db.put_many([("big", "event.created", b"x" * 200_000)])
    assert db.count_pending() == 1
    assert db.db.execute("SELECT count(*) FROM seen WHERE key = 'big'").fetchone() == (0,)
    db.db.execute("PRAGMA max_page_count = 1000000")
    assert db.put_many([("big", "event.created", b"x" * 200_000)]) == [True]


def test_intake_leaves_min_free_bytes_to_acknowledgements(path: Path) -> None:
    """While a webhook would leave less than min_free_bytes free on the disk, put is SpoolFull and
    forgets its key, an acknowledgement still commits, and intake resumes once there is room."""
    db = SpoolDB(path)
    try:
        assert db.put_many([item(1)]) == [True]
        db.min_free_bytes = NO_DISK_HAS_THIS_MUCH
        (refused,) = db.put_many([item(2)])
        assert isinstance(refused, SpoolFull)
        assert "delivery.min_free_bytes" in str(refused)
        assert db.low_on_disk is not None
        assert db.count_pending() == 1
        db.ack([db.fetch(0, 1)[0].id])  # what the reserve is kept for
        assert db.count_pending() == 0
        assert db.low_on_disk is not None
        db.min_free_bytes = MIB
        db.recount()
        assert db.low_on_disk is None
        assert db.put_many([item(2)]) == [True]  # a retry, not a duplicate
    finally:
        db.close()


@pytest.mark.sqlite_only
def test_replay_does_not_spend_the_reserve(db: SpoolDB) -> None:
    """Replaying dead letters is intake too: without room above min_free_bytes it is SpoolFull and
    the letters stay where they are."""
    db.put_many([item(1)])
    db.ack([], dead=[Dead(db.fetch(0, 1)[0].id, "refused")])
    db.min_free_bytes = NO_DISK_HAS_THIS_MUCH
    with pytest.raises(SpoolFull, match="min_free_bytes"):
        db.replay()
    assert (db.count_pending(), db.count_dead()) == (0, 1)
    db.min_free_bytes = MIB
    assert db.replay() == 1


@pytest.mark.sqlite_only
def test_deleting_rows_does_not_rewrite_their_pages(db: SpoolDB) -> None:
    """secure_delete is FAST (2): an acknowledgement on a full disk writes little, not its rows."""
    assert db.db.execute("PRAGMA secure_delete").fetchone() == (2,)


class FailingCommits(sqlite3.Connection):
    """A real connection whose COMMIT fails with the SQLite error code `fail_with`, while set."""

    fail_with: int | None = None

    def execute(self, sql: str, *args: Any) -> sqlite3.Cursor:
        if self.fail_with is not None and sql == "COMMIT":
            error = sqlite3.OperationalError("disk I/O error")
            error.sqlite_errorcode = self.fail_with
            raise error
        return super().execute(sql, *args)


def test_an_io_error_is_a_spool_error_and_spool_full_on_a_disk_short_of_room(path: Path) -> None:
    """A disk I/O error on commit is a SpoolError naming the file, SpoolFull when the disk has no
    room above min_free_bytes (ENOSPC can surface so), and nothing is stored either way."""
    db = SpoolDB(path)
    db.db.close()
    db.db = connection = sqlite3.connect(path, isolation_level=None, factory=FailingCommits)
    try:
        connection.fail_with = SQLITE_IOERR_WRITE
        with pytest.raises(SpoolError, match="disk I/O error") as caught:
            db.put_many([item(1)])
        assert not isinstance(caught.value, SpoolFull)
        assert str(path) in str(caught.value)
        db.min_free_bytes = NO_DISK_HAS_THIS_MUCH
        with pytest.raises(SpoolFull):
            db.put_many([item(1)])
        assert db.count_pending() == 0
        connection.fail_with = None
        db.min_free_bytes = MIB
        assert db.put_many([item(1)]) == [True]
    finally:
        db.close()


READS: dict[str, Callable[[SpoolDB], object]] = {
    "fetch": lambda db: db.fetch(0, 10),
    "applied_times": lambda db: db.applied_times(["user-1"]),
    "recount": lambda db: db.recount(),
    "count_pending": lambda db: db.count_pending(),
    "count_dead": lambda db: db.count_dead(),
    "dead_letters": lambda db: db.dead_letters(),
    "oldest_pending_at": lambda db: db.oldest_pending_at(),
}


@pytest.mark.parametrize("read", list(READS))
def test_reads_raise_a_spool_error_naming_the_file(path: Path, tmp_path: Path, read: str) -> None:
    """A read the file cannot answer (a file without the spool's tables) is a SpoolError that
    names the spool, never a raw sqlite3 error."""
    db = SpoolDB(path)
    db.db.close()
    db.db = sqlite3.connect(tmp_path / "no-tables.db", isolation_level=None)
    try:
        with pytest.raises(SpoolError, match=re.escape(str(path))):
            READS[read](db)
    finally:
        db.close()


def test_oldest_pending_at_is_when_the_oldest_waiting_row_arrived(
    db: SpoolDB, clock: Clock
) -> None:
    """oldest_pending_at is the arrival time of the oldest row still waiting, None when none is."""
    assert db.oldest_pending_at() is None
    db.put_many([item(1)])
    clock.now = T0 + 5
    db.put_many([item(2)])
    assert db.oldest_pending_at() == T0
    first, second = db.fetch(0, 10)
    db.ack([first.id])
    assert db.oldest_pending_at() == T0 + 5
    db.ack([second.id])
    assert db.oldest_pending_at() is None


def test_a_spool_that_cannot_be_opened_is_a_spool_error(tmp_path: Path) -> None:
    """A path whose folder is a file is reported as SpoolError, naming the path."""
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(SpoolError, match="cannot open the spool"):
        SpoolDB(tmp_path / "file" / "spool.db")


async def test_concurrent_puts_share_transactions(
    db: SpoolDB, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Many concurrent puts are committed in fewer put_many calls (transactions) than puts."""
    calls: list[int] = []
    original = db.put_many

    def counting(items: Sequence[tuple[str | None, str, bytes]], *rest: Any) -> list[Any]:
        calls.append(len(items))
        return list(original(items, *rest))

    monkeypatch.setattr(db, "put_many", counting)
    spool = Spool(db)
    try:
        results = await asyncio.gather(*(spool.put(*item(n)) for n in range(500)))
        assert results == [True] * 500
        assert sum(calls) == 500
        assert len(calls) < 500 / 10, calls
        # A second wave, arriving while nothing is in flight, is grouped as well.
        more = await asyncio.gather(*(spool.put(*item(n)) for n in range(400, 600)))
        assert more == [False] * 100 + [True] * 100
        assert spool.pending == db.count_pending() == 600
    finally:
        await spool.close()


async def test_spool_full_fails_only_the_futures_beyond_the_bound(make_store: MakeStore) -> None:
    """In one grouped transaction, puts within max_pending succeed and the rest raise SpoolFull."""
    spool = Spool(make_store(max_pending=3))
    try:
        results = await asyncio.gather(
            *(spool.put(*item(n)) for n in range(5)), return_exceptions=True
        )
        assert results[:3] == [True, True, True]
        assert all(isinstance(r, SpoolFull) for r in results[3:])
        assert spool.pending == 3
    finally:
        await spool.close()


@pytest.mark.parametrize("failure", ["raises", "cancelled"])
async def test_a_failed_intake_commit_strands_no_put_queued_behind_it(
    make_store: MakeStore, monkeypatch: pytest.MonkeyPatch, failure: str
) -> None:
    """When the intake commit on the spool thread raises something other than a SpoolError,
    or the task writing it is cancelled, its puts get a SpoolError (a 503), the puts queued
    behind it are answered without waiting for another request, and the spool still closes."""
    db = make_store()
    entered, release = threading.Event(), threading.Event()
    original = db.put_many

    def put_many(*args: Any, **kwargs: Any) -> Any:
        if not entered.is_set():  # the first commit holds the spool thread, then fails
            entered.set()
            assert release.wait(30)
            raise RuntimeError("a bug on the spool thread")
        return original(*args, **kwargs)

    monkeypatch.setattr(db, "put_many", put_many)
    spool = Spool(db)
    try:
        first = asyncio.create_task(spool.put(*item(0)))
        assert await asyncio.to_thread(entered.wait, 30)
        queued = [asyncio.create_task(spool.put(*item(n))) for n in range(1, 6)]
        for _ in range(5):
            await asyncio.sleep(0)
        writer = spool._writer
        assert writer is not None
        if failure == "cancelled":
            writer.cancel()
            await asyncio.gather(writer, return_exceptions=True)
        release.set()
        with pytest.raises(SpoolError):
            await asyncio.wait_for(first, 30)
        answers = await asyncio.wait_for(
            asyncio.gather(*queued, return_exceptions=True), timeout=30
        )
        # Stored, or refused with a SpoolError the client retries: never left waiting.
        assert all(a is True or isinstance(a, SpoolError) for a in answers), answers
        stored = sum(1 for a in answers if a is True)
        assert db.count_pending() == stored
    finally:
        release.set()
        await asyncio.wait_for(spool.close(), 30)


async def test_close_commits_queued_puts_first(make_store: MakeStore) -> None:
    """Spool.close waits for puts already queued, so nothing accepted is lost at shutdown."""
    spool = Spool(make_store())
    puts = [asyncio.create_task(spool.put(*item(n))) for n in range(50)]
    await asyncio.sleep(0)  # the puts are queued; the writer has not finished
    await spool.close()
    assert [p.result() for p in puts] == [True] * 50
    reopened = make_store()
    try:
        assert reopened.count_pending() == 50
    finally:
        reopened.close()


def test_ack_removes_rows_moves_dead_ones_and_keeps_the_latest_applied_time(
    db: SpoolDB, clock: Clock
) -> None:
    """ack drops done rows, moves refused ones with their reason, and applied times only grow."""
    db.put_many([item(n) for n in range(4)])
    rows = db.fetch(0, 10)
    clock.now = T0 + 5
    db.ack(
        [rows[0].id],
        applied=[("user-1", "email_subscribe", 200.0), ("user-1", "group:a", 100.0)],
        dead=[Dead(rows[1].id, "INVALID_GROUP", person="user-1")],
    )
    assert [r.id for r in db.fetch(0, 10)] == [rows[2].id, rows[3].id]
    assert db.pending == db.count_pending() == 2
    (letter,) = db.dead_letters()
    assert (letter.reason, letter.person, letter.body) == ("INVALID_GROUP", "user-1", rows[1].body)
    assert (letter.created_at, letter.received_at) == (T0 + 5, rows[1].received_at)

    db.ack([], applied=[("user-1", "email_subscribe", 150.0), ("user-1", "group:a", 300.0)])
    assert db.applied_times(["user-1", "user-2"]) == {
        ("user-1", "email_subscribe"): 200.0,  # an older time never overwrites a newer one
        ("user-1", "group:a"): 300.0,
    }


def test_applied_times_handles_more_persons_than_sqlite_parameters(db: SpoolDB) -> None:
    """Looking up thousands of persons works (the query is chunked under SQLite's limit)."""
    db.ack([], applied=[(f"p{n}", "t", float(n)) for n in range(2000)])
    times = db.applied_times(f"p{n}" for n in range(2500))
    assert len(times) == 2000
    assert times[("p1999", "t")] == 1999.0


def test_replay_and_purge_dead_letters(db: SpoolDB, clock: Clock) -> None:
    """replay moves named (or all) dead letters back to the inbox; purge deletes them."""
    db.put_many([item(n) for n in range(3)])
    rows = db.fetch(0, 10)
    db.ack([], dead=[Dead(r.id, "refused") for r in rows])
    letters = db.dead_letters()
    assert db.count_pending() == 0
    assert db.count_dead() == 3

    clock.now = T0 + 60
    assert db.replay([letters[0].id]) == 1
    (back,) = db.fetch(0, 10)
    # Its dating stays the first arrival's; only the give-up clock starts again.
    assert (back.body, back.received_at, back.queued_at) == (rows[0].body, T0, T0 + 60)
    assert db.oldest_pending_at() == T0 + 60
    assert back.id > rows[-1].id  # ids are never reused, so a dispatcher cursor never skips it
    assert db.pending == 1

    assert db.purge([letters[1].id]) == 1
    assert [d.id for d in db.dead_letters()] == [letters[2].id]
    assert db.dead_letters([letters[2].id, 999]) == db.dead_letters()
    assert db.replay() == 1
    assert db.purge() == 0
    assert db.count_pending() == 2


def test_data_survives_close_and_reopen(make_store: MakeStore) -> None:
    """Rows, seen keys and dead letters are all still there after the file is reopened."""
    db = make_store()
    db.put_many([item(1), item(2)])
    db.ack([], dead=[Dead(db.fetch(0, 1)[0].id, "refused")])
    db.close()

    again = make_store()
    try:
        assert again.pending == 1
        assert bodies(again) == [b'{"n": 2}']
        assert again.count_dead() == 1
        assert again.put_many([item(2)]) == [False]
    finally:
        again.close()


def test_a_second_connection_sees_the_rows_of_the_first(make_store: MakeStore) -> None:
    """The CLI opens its own SpoolDB beside a running server; each sees the other's commits."""
    server = make_store()
    cli = make_store()
    try:
        server.put_many([item(1), item(2)])
        assert bodies(cli) == [b'{"n": 1}', b'{"n": 2}']
        server.ack([], dead=[Dead(server.fetch(0, 1)[0].id, "refused")])
        assert cli.replay() == 1
        assert server.count_pending() == 2
        assert cli.put_many([item(2)]) == [False]  # dedupe state is shared through the file
    finally:
        cli.close()
        server.close()


@pytest.mark.sqlite_only
def test_the_spool_file_is_in_wal_mode_with_full_sync(db: SpoolDB) -> None:
    """A commit survives power loss: WAL journal and synchronous=FULL (2)."""
    assert db.db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    assert db.db.execute("PRAGMA synchronous").fetchone() == (2,)


async def test_a_recount_never_loses_a_concurrent_put(tmp_path: Path) -> None:
    """Re-reading the counts from the file runs between writes, so a put racing it still counts."""
    spool = Spool(SpoolDB(tmp_path / "spool.db"))
    try:
        recount = asyncio.ensure_future(spool.run(spool.db.recount))
        put = asyncio.ensure_future(spool.put("k", "event.created", b"{}"))
        for _ in range(3):
            await asyncio.sleep(0)  # both reach the spool thread, the recount first
        time.sleep(0.02)  # noqa: ASYNC251 - the loop stays busy while the thread runs both
        await asyncio.gather(recount, put)
        assert spool.pending == 1
        assert spool.db.count_pending() == 1
    finally:
        await spool.close()


def test_a_second_lock_on_a_spool_is_refused_until_the_first_is_released(path: Path) -> None:
    """Only one SpoolLock holds a spool at a time; the refusal names the spool and the holder's
    pid, never waits, and the spool can be locked again once released."""
    first, second = SpoolLock(path), SpoolLock(path)
    first.acquire()
    try:
        assert first.path == path.with_name("spool.db.lock")
        with pytest.raises(SpoolLocked) as refused:
            second.acquire()
        assert isinstance(refused.value, SpoolError)
        message = str(refused.value)
        assert f"another gateway (pid {os.getpid()}) is running on the spool {path}" in message
        assert "delivery.spool" in message
        db = SpoolDB(path)  # what the dead-letters command opens: no lock needed beside it
        assert db.count_dead() == 0
        db.close()
    finally:
        first.release()
    second.acquire()
    second.release()


def test_a_spool_written_before_the_reverse_path_opens_and_keeps_its_rows(tmp_path: Path) -> None:
    """A spool file from before the direction column gains it: its rows stay Braze-bound."""
    path = tmp_path / "old.db"
    old = sqlite3.connect(path)
    old.executescript(
        "CREATE TABLE inbox (id INTEGER PRIMARY KEY AUTOINCREMENT, received_at REAL NOT NULL,"
        " type TEXT NOT NULL, body BLOB NOT NULL);"
        "INSERT INTO inbox(received_at, type, body) VALUES (1.0, 'event.created', x'7b7d');"
    )
    old.commit()
    old.close()
    db = SpoolDB(path)
    try:
        assert [row.type for row in db.fetch(0, 10)] == ["event.created"]
        assert db.fetch(0, 10, "to_didomi") == []
        assert db.put_many([("k", "braze.step", b"{}")]) == [True]
        assert [row.type for row in db.fetch(0, 10, "to_didomi")] == ["braze.step"]
        assert (db.pending_of("to_braze"), db.pending_of("to_didomi")) == (1, 1)
    finally:
        db.close()


def test_a_spool_file_carries_its_schema_version_and_an_older_one_is_brought_up_to_it(
    tmp_path: Path,
) -> None:
    """A new file and a migrated pre-version file both say the schema this gateway wrote."""
    fresh = SpoolDB(tmp_path / "new.db")
    fresh.close()
    path = tmp_path / "old.db"
    old = sqlite3.connect(path)
    old.execute(
        "CREATE TABLE inbox (id INTEGER PRIMARY KEY AUTOINCREMENT, received_at REAL NOT NULL,"
        " type TEXT NOT NULL, body BLOB NOT NULL)"
    )
    old.commit()
    old.close()
    SpoolDB(path).close()
    for file in (tmp_path / "new.db", path):
        version = sqlite3.connect(file).execute("PRAGMA user_version").fetchone()[0]
        assert version == SCHEMA_VERSION >= 1


def test_a_spool_written_by_a_newer_gateway_is_refused_untouched(tmp_path: Path) -> None:
    """An older gateway must not misread (or migrate) a newer schema: it says which to run."""
    path = tmp_path / "gateway.db"
    SpoolDB(path).close()
    newer = sqlite3.connect(path)
    newer.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    newer.execute("PRAGMA journal_mode = DELETE")  # any change to it would show below
    newer.execute("CREATE TABLE later_feature (x)")
    newer.commit()
    newer.close()
    expected = rf"newer gateway \(schema version {SCHEMA_VERSION + 1}\b.*run that version"
    with pytest.raises(SpoolError, match=expected) as err:
        SpoolDB(path)
    assert str(path) in str(err.value)
    check = sqlite3.connect(path)
    assert check.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION + 1
    assert check.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
    check.close()
    assert not (tmp_path / "gateway.db-wal").exists()


# ---------------------------------------------------------------------------
# The hand-off: rows intake stored, given to delivery in memory


def _row(n: int) -> Pending:
    return Pending(n, T0, "event.created", b"{}")


def test_the_handoff_gives_rows_after_the_cursor_and_keeps_them_until_passed() -> None:
    """Below `complete_after` the spool must be read (None); a failed page is taken again,
    since rows go only once the cursor has passed them."""
    handoff = Handoff(complete_after=10)
    for n in (11, 12, 13):
        handoff.add(_row(n))
    assert handoff.take(5, 100) is None  # rows 6..10 are only in the spool
    assert [r.id for r in handoff.take(10, 2) or []] == [11, 12]
    assert [r.id for r in handoff.take(10, 2) or []] == [11, 12]  # not consumed: cursor unmoved
    assert [r.id for r in handoff.take(12, 100) or []] == [13]
    handoff.gap(20)  # another process wrote ids up to 20
    assert handoff.take(13, 100) is None


def test_a_shared_handoff_sends_delivery_to_the_spool_once_its_own_rows_are_taken() -> None:
    """With intake-only processes writing the file too, an empty hand-off is no proof that
    nothing waits: delivery reads the spool (None) instead of waiting for the next poll."""
    handoff = Handoff(complete_after=0)
    handoff.shared = True
    handoff.add(_row(1))
    assert [r.id for r in handoff.take(0, 100) or []] == [1]
    assert handoff.take(1, 100) is None  # row 2, if any, was written by another process
    handoff.shared = False
    assert handoff.take(1, 100) == []


def test_rows_read_from_the_spool_come_decoded_when_this_process_stored_them() -> None:
    """Read back with another process's rows between them (`server.intake_processes`), this
    process's own rows are its hand-off copies, with the webhook it decoded; the spool's read
    still decides which rows there are and their order."""
    handoff = Handoff(complete_after=0)
    handoff.shared = True
    mine = [Pending(n, T0, "event.created", b"{}", decoded=f"decoded {n}") for n in (2, 4, 5)]
    for row in mine:
        handoff.add(row)
    read = [_row(n) for n in (1, 2, 3, 4, 6)]  # 5 was acknowledged meanwhile: not read
    swapped = handoff.swap_in(read)
    assert [r.id for r in swapped] == [1, 2, 3, 4, 6]
    assert [r.decoded for r in swapped] == [None, "decoded 2", None, "decoded 4", None]
    assert handoff.swap_in([_row(7)]) == [_row(7)]  # nothing of ours in the range


def test_a_full_handoff_leaves_delivery_to_read_the_spool(monkeypatch: pytest.MonkeyPatch) -> None:
    """Past its bound the hand-off forgets its rows and says where reading must go up to."""
    monkeypatch.setattr(Handoff, "LIMIT", 3)
    handoff = Handoff(complete_after=0)
    for n in range(1, 5):
        handoff.add(_row(n))
    assert handoff.take(0, 100) is None
    handoff.add(_row(5))
    assert [r.id for r in handoff.take(4, 100) or []] == [5]


async def test_an_intake_only_spool_hands_nothing_over(path: Path) -> None:
    """`Spool(deliver=False)` (an intake-only process) stores rows and keeps no hand-off."""
    spool = Spool(SpoolDB(path), deliver=False)
    try:
        assert spool.handoff is None
        assert await spool.put(*item(1))
    finally:
        await spool.close()


async def test_intake_hands_its_rows_over_and_notices_rows_it_did_not_write(
    path: Path,
) -> None:
    """Stored rows reach the hand-off with the decoded webhook; ids another process used
    in between (a CLI replay) move `complete_after` past them."""
    db = SpoolDB(path)
    db.put_many([item(1)])  # before the server: only in the spool
    spool = Spool(db)
    try:
        assert spool.handoff is not None
        assert spool.handoff.complete_after == 1
        marker = object()
        assert await spool.put(*item(2), None, marker)
        (row,) = spool.handoff.take(1, 10) or []
        assert (row.id, row.decoded) == (2, marker)
        other = SpoolDB(path)
        try:
            other.put_many([item(3)])  # as `gateway dead-letters replay` would
        finally:
            other.close()
        assert await spool.put(*item(4))
        assert spool.handoff.complete_after == 3
        assert spool.handoff.take(2, 10) is None
        assert [r.id for r in spool.handoff.take(3, 10) or []] == [4]
    finally:
        await spool.close()


async def test_a_failed_hand_over_answers_its_puts_and_leaves_the_rows_to_the_spool(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug handing committed rows over to delivery neither leaves their requests (or those
    queued behind) waiting nor hides the rows from delivery: it reads them from the spool."""
    spool = Spool(SpoolDB(path))
    try:
        handoff = spool.handoff
        assert handoff is not None
        add, calls = handoff.add, 0

        def broken(row: Pending) -> None:
            nonlocal calls
            calls += 1
            if calls == 1:
                raise RuntimeError("a bug handing a row over")
            add(row)

        monkeypatch.setattr(handoff, "add", broken)
        puts = [asyncio.create_task(spool.put(*item(n))) for n in (1, 2)]
        answers = await asyncio.wait_for(asyncio.gather(*puts, return_exceptions=True), 10)
        assert answers == [True, True]  # committed, whatever became of the hand-over
        assert await asyncio.wait_for(spool.put(*item(3)), 10)
        # Row 1 is not held: delivery must read the spool up to it, not skip it.
        taken = handoff.take(0, 10)
        assert taken is None or [r.id for r in taken][:1] == [1], taken
    finally:
        await asyncio.wait_for(spool.close(), 30)


@pytest.mark.sqlite_only  # an flock beside the spool file
async def test_a_writer_wedged_on_the_write_turns_costs_a_spool_error_not_a_hang(
    path: Path,
) -> None:
    """While another process holds `<spool>.writers` and commits nothing, a put and an
    acknowledgement each wait the bound, then fail with SpoolError, the row staying pending;
    once the lock is free they commit, and a wait given up never keeps the lock from others."""
    db = SpoolDB(path)
    db.put_many([item(1)])
    db.writers = turns = WriteTurns(path, timeout_s=0.3)
    spool = Spool(db)
    wedged = os.open(turns.path, os.O_RDWR)  # another open file: as another process's
    fcntl.flock(wedged, fcntl.LOCK_EX)
    try:
        with pytest.raises(SpoolError, match="write lock"):
            await asyncio.wait_for(spool.put(*item(2)), timeout=30)
        with pytest.raises(SpoolError, match="write lock"):
            await asyncio.wait_for(spool.ack([1], stopping=lambda: True), timeout=30)
        assert db.count_pending() == 1  # nothing of either is written, the row stays
        fcntl.flock(wedged, fcntl.LOCK_UN)
        assert await asyncio.wait_for(spool.put(*item(2)), timeout=30) is True
        await asyncio.wait_for(spool.ack([1], stopping=lambda: False), timeout=30)
        assert bodies(db) == [b'{"n": 2}']
        # The helper that queued for the first writer dropped the lock it got: free for others.
        for _ in range(300):
            try:
                fcntl.flock(wedged, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                await asyncio.sleep(0.05)
        else:
            raise AssertionError("the write lock stayed held after every writer was done")
    finally:
        with contextlib.suppress(OSError):
            fcntl.flock(wedged, fcntl.LOCK_UN)
        os.close(wedged)
        await spool.close()
        turns.close()
