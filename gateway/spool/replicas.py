"""Several gateways on one PostgreSQL spool: who delivers which partition, and one Braze budget.

Every replica takes webhooks; delivery is split by partition (`store.PARTITIONS`, a hash of
the person). A replica holds a lease on each partition it delivers, renewed by a heartbeat
every `lease_s / 6`. The leases are rows in the spool database, timed by the database's clock
(replicas' clocks may disagree): a replica killed with `kill -9` stops renewing, and the
others take its partitions once the lease has run out. Each replica aims at an equal share of
the partitions among the replicas seen alive; one holding more gives the excess up, but only
once it has nothing of those partitions in flight, so that one person's updates are never
sent by two replicas at once. A replica that cannot renew its leases stops starting requests
on them a third of a lease before they run out, or the longest a request may take if that is
more (`guard_s`), so that none it started is still in flight when another may take over.

`Budget` is the request budget Braze counts per workspace: the next free turn, one row per
API in the database, that every replica takes before each request (`requests_per_second` is
the whole deployment's), and a stop that Braze's `X-RateLimit-*` answers to one replica put
on all of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import secrets
import socket
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from gateway.errors import SpoolError
from gateway.spool.postgres import PgConn, PgSpoolDB, connect
from gateway.spool.store import PARTITIONS

log = logging.getLogger("gateway.replicas")
T = TypeVar("T")

DEFAULT_LEASE_S = 20.0
CLOSE_S = 5.0  # how long a stop waits for the lease and budget connections
_NOW = "extract(epoch from clock_timestamp())"


def replica_name(configured: str = "") -> str:
    """This replica's name: `delivery.replica`, else host and process id."""
    return configured or f"{socket.gethostname()}-{os.getpid()}"


class _Thread:
    """One connection used from one thread of its own (psycopg connections are not shared)."""

    def __init__(self, url: str, name: str) -> None:
        self.url = url
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._conn: PgConn | None = None
        self._name = name

    def _db(self) -> PgConn:
        if self._conn is None or self._conn.raw.closed or self._conn.raw.broken:
            # Short statements only: one that hangs must fail, not hold leases or turns up.
            self._conn = connect(
                self.url,
                application_name=f"didomi-braze-gateway {self._name}",
                statement_timeout_ms=5000,
            )
        return self._conn

    async def run(self, work: Callable[[PgConn], T]) -> T:
        def call() -> T:
            try:
                return work(self._db())
            except SpoolError:
                raise
            except Exception as exc:  # psycopg's errors, and a connection that broke
                if self._conn is not None and self._conn.raw.broken:
                    self._conn = None
                raise SpoolError(f"the spool database failed: {exc}") from exc

        return await asyncio.get_running_loop().run_in_executor(self._executor, call)

    async def close(self) -> None:
        def close() -> None:
            if self._conn is not None:
                self._conn.raw.close()

        try:
            # Bounded: behind a call stuck on a dead connection, a shutdown must not wait.
            await asyncio.wait_for(
                asyncio.get_running_loop().run_in_executor(self._executor, close), CLOSE_S
            )
        except TimeoutError:
            log.warning(
                "the %s connection did not close in %.0f s; left behind", self._name, CLOSE_S
            )
        self._executor.shutdown(wait=False)


class Replicas:
    """This replica's partition leases, kept by a heartbeat; `db.owned` follows them."""

    def __init__(
        self,
        db: PgSpoolDB,
        name: str,
        *,
        lease_s: float = DEFAULT_LEASE_S,
        request_bound_s: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.db = db
        self.name = name
        # Who holds the leases: the name and a token of this process, so that two processes
        # given one name by mistake still never hold the same partition.
        self.owner = f"{name}/{secrets.token_hex(4)}"
        self.lease_s = lease_s
        # Delivery stops this long before the leases could run out: a third of the lease, or
        # the longest a request may take, whichever is more, so no request started on a
        # partition can still be in flight when another replica may take it over.
        self.guard_s = max(lease_s / 3, request_bound_s)
        self.clock = clock
        # Callables that name the partitions with work in flight (the dispatcher's, the
        # writeback's): a partition is given up only once none of them names it.
        self.busy: list[Callable[[], set[int]]] = []
        self.on_change: list[Callable[[], None]] = []  # told when `db.owned` changes
        self.held: set[int] = set()  # leases this replica holds in the database
        self.draining: set[int] = set()  # held, no longer delivered, given up once idle
        self.live = 1  # replicas seen alive at the last heartbeat
        self._valid_until = -math.inf  # monotonic: the leases held are surely ours until then
        self._thread = _Thread(db.url, "replicas")
        self._task: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._stop = asyncio.Event()
        db.set_owned(frozenset())  # nothing is delivered before the first lease is held

    async def start(self) -> None:
        """Take a first share of the partitions, then keep the leases in the background."""
        try:
            await self.beat()
        except SpoolError as exc:
            log.warning("could not take partition leases yet (will retry): %s", exc)
        self._task = asyncio.create_task(self._run(), name="gateway-replicas")

    async def stop(self) -> None:
        """Stop renewing and give every lease up, so the others take over at once."""
        self._stop.set()
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)
        if self._timer is not None:
            self._timer.cancel()
        self._own(frozenset())
        try:
            await asyncio.wait_for(self._thread.run(self._leave), CLOSE_S)
            self.held.clear()
        except (SpoolError, TimeoutError) as exc:
            log.warning("could not give the partition leases up; they expire: %s", exc)
        await self._thread.close()

    async def _run(self) -> None:
        interval = self.lease_s / 3
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), timeout=interval / 2)
            if self._stop.is_set():
                return
            self.check()
            try:
                # Bounded: a database that stops answering must not hold the loop up.
                await asyncio.wait_for(self.beat(), timeout=interval)
            except (SpoolError, TimeoutError) as exc:
                log.warning("could not renew the partition leases: %s", exc or "no answer")
            except Exception:
                # A bug must not leave this replica delivering on leases nobody renews.
                log.exception("the partition lease heartbeat failed; delivery stops until it works")
                self._own(frozenset())
            self.check()

    def check(self) -> None:
        """Stop delivering leases that may have run out: renewals failed for too long."""
        if self.db.owned and self.clock() > self._valid_until - self.guard_s:
            log.error(
                "partition leases could not be renewed for %.0f s; delivery stops until they are",
                self.lease_s - self.guard_s,
            )
            self._own(frozenset())

    def _own(self, owned: frozenset[int]) -> None:
        before = self.db.generation
        self.db.set_owned(owned)
        if self.db.generation != before:
            for listener in self.on_change:
                listener()

    async def beat(self) -> None:
        """One heartbeat: renew, rebalance, give up idle excess, take free partitions."""
        started = self.clock()
        # Only partitions given up at an earlier beat may be released now: they have not been
        # delivered since `owned` left them out, so `busy` (read before the round trip) cannot
        # miss a batch started meanwhile.
        releasable = frozenset(self.draining)
        busy: set[int] = set()
        for names in self.busy:
            busy |= names()
        held, draining, live = await self._thread.run(
            lambda conn: self._beat(conn, busy, releasable)
        )
        if held != self.held:
            log.info(
                "partition leases: %d held of %d, %d replica(s) alive",
                len(held),
                PARTITIONS,
                live,
                extra={"held": len(held), "live": live},
            )
        self.held, self.draining, self.live = held, draining, live
        self._valid_until = started + self.lease_s
        self._own(frozenset(held - draining))
        self._arm()

    def _arm(self) -> None:
        """Run `check` when the leases reach their last third, whatever the loop is doing."""
        if self._timer is not None:
            self._timer.cancel()
        delay = self._valid_until - self.guard_s - self.clock()
        self._timer = asyncio.get_running_loop().call_later(max(0.0, delay) + 0.01, self.check)

    def _beat(
        self, conn: PgConn, busy: set[int], releasable: frozenset[int]
    ) -> tuple[set[int], set[int], int]:
        """(held, draining, replicas alive), from the database, which is the truth of it."""
        lease, me = self.lease_s, self.owner
        with conn.raw.transaction():
            now = float(conn.execute(f"SELECT {_NOW}").fetchone()[0])
            conn.execute(
                "INSERT INTO replicas(name, seen_at) VALUES (?, ?) ON CONFLICT (name)"
                " DO UPDATE SET seen_at = excluded.seen_at",
                (me, now),
            )
            conn.execute("DELETE FROM replicas WHERE seen_at < ?", (now - 10 * lease,))
            live = int(
                conn.execute(
                    "SELECT count(*) FROM replicas WHERE seen_at >= ?", (now - lease,)
                ).fetchone()[0]
            )
            share = math.ceil(PARTITIONS / max(1, live))
            held = {
                int(row[0])
                for row in conn.execute(
                    "UPDATE leases SET until = ? WHERE owner = ? RETURNING part", (now + lease, me)
                ).fetchall()
            }
            draining = set(releasable & held)
            idle = [part for part in draining if part not in busy]
            if idle:
                conn.execute(
                    "UPDATE leases SET owner = NULL, until = 0 WHERE owner = ? AND part = ANY(?)",
                    (me, idle),
                )
                held -= set(idle)
                draining -= set(idle)
            # More than a fair share: stop delivering the highest now, give them up later.
            keep = sorted(held - draining)
            if len(keep) > share:
                draining |= set(keep[share:])
            want = share - len(held)
            if want > 0:
                taken = conn.execute(
                    "UPDATE leases SET owner = ?, until = ? WHERE part IN"
                    " (SELECT part FROM leases WHERE owner IS NULL OR until < ?"
                    " ORDER BY part LIMIT ? FOR UPDATE SKIP LOCKED) RETURNING part",
                    (me, now + lease, now, want),
                ).fetchall()
                held |= {int(row[0]) for row in taken}
        return held, draining, live

    def _leave(self, conn: PgConn) -> None:
        with conn.raw.transaction():
            conn.execute("UPDATE leases SET owner = NULL, until = 0 WHERE owner = ?", (self.owner,))
            conn.execute("DELETE FROM replicas WHERE name = ?", (self.owner,))


class Budget:
    """A request budget every replica shares: the next free turn, in the spool database.

    `take` grants a request its turn only once the turn is due (0.0), else says how long to
    wait before asking again: granted turns are spaced `1 / rate` apart across all replicas
    (a generic cell rate, burst of one), and none falls before a stop that `block` set (Braze
    said to wait). Granting at the moment of sending, rather than reserving a turn ahead and
    sleeping to it, keeps late wake-ups on a busy event loop from bunching requests together.
    """

    def __init__(self, url: str, name: str = "braze") -> None:
        self.name = name
        self._thread = _Thread(url, f"budget-{name}")

    async def take(self, rate: float) -> float:
        """0.0: send now (the turn is taken); else the seconds to wait before asking again."""
        return await self._thread.run(lambda conn: self._take(conn, rate))

    def _take(self, conn: PgConn, rate: float) -> float:
        with conn.raw.transaction():
            conn.execute(
                "INSERT INTO budgets(name, at) VALUES (?, 0) ON CONFLICT (name) DO NOTHING",
                (self.name,),
            )
            at, blocked, now = conn.execute(
                f"SELECT at, blocked_until, {_NOW} FROM budgets WHERE name = ? FOR UPDATE",  # noqa: S608 - a constant
                (self.name,),
            ).fetchone()
            turn = max(float(at), float(blocked))
            if turn > now:
                return turn - float(now)
            conn.execute(
                "UPDATE budgets SET at = ? WHERE name = ?",
                (max(float(at), float(now)) + 1.0 / rate, self.name),
            )
            return 0.0

    async def block(self, seconds: float) -> None:
        """Hold every replica's requests for `seconds` (Braze said to wait)."""
        await self._thread.run(lambda conn: self._block(conn, seconds))

    def _block(self, conn: PgConn, seconds: float) -> None:
        conn.execute(
            f"INSERT INTO budgets AS b (name, at, blocked_until)"  # noqa: S608 - a constant
            f" VALUES (?, 0, {_NOW} + ?) ON CONFLICT (name) DO UPDATE"
            f" SET blocked_until = greatest(b.blocked_until, {_NOW} + ?)",
            (self.name, seconds, seconds),
        )

    async def close(self) -> None:
        """Close the budget's connection."""
        await self._thread.close()
