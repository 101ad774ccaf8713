"""Several gateways on one PostgreSQL spool: partition leases, the shared Braze budget, and two
`gateway run` replicas, one killed with `kill -9` under load, losing nothing and keeping order.

All against a real PostgreSQL server (conftest's `postgres`), on loopback.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import signal
import time
from collections import defaultdict
from pathlib import Path

import aiohttp
import pytest

from gateway.cli.trace import as_dict
from gateway.config.settings import DeliveryConfig
from gateway.delivery.pacing import RateLimiter
from gateway.errors import SpoolError
from gateway.spool.backend import open_store
from gateway.spool.postgres import PgSpoolDB, partition
from gateway.spool.replicas import Budget, Replicas
from gateway.spool.sqlite import SpoolDB
from gateway.spool.store import PARTITIONS
from gateway.testing.braze import FakeBraze, FakeDidomi
from tests.conftest import BRAZE_API_KEY, choice, free_port, write_config
from tests.system.test_reliability import STATES, GatewayProcess, at, eventually


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def leases(url: str) -> dict[int, str | None]:
    db = PgSpoolDB(url)
    try:
        rows = db.db.execute("SELECT part, owner FROM leases").fetchall()
    finally:
        db.close()
    # Owners are "name/token": the token tells two processes given one name apart.
    return {int(part): owner.split("/")[0] if owner else None for part, owner in rows}


# ---------------------------------------------------------------------------
# Partition leases


async def test_two_replicas_split_the_partitions_and_never_both_deliver_one(pg_url: str) -> None:
    """The first replica takes all; a second one joining gets half once the first has given
    them up, and at no moment do the two deliver the same partition."""
    first_db, second_db = PgSpoolDB(pg_url), PgSpoolDB(pg_url)
    first = Replicas(first_db, "a", lease_s=30)
    second = Replicas(second_db, "b", lease_s=30)
    try:
        await first.start()
        assert first_db.owned == frozenset(range(PARTITIONS))
        await second.start()
        assert second_db.owned == frozenset()  # nothing is free yet
        for _ in range(3):
            for replica in (first, second):
                await replica.beat()
                assert not (first_db.owned or set()) & (second_db.owned or set())
        assert len(first_db.owned or ()) == len(second_db.owned or ()) == PARTITIONS // 2
        owners = leases(pg_url)
        assert {p for p, o in owners.items() if o == "a"} == first_db.owned
        assert {p for p, o in owners.items() if o == "b"} == second_db.owned
    finally:
        await second.stop()
        await first.stop()
        first_db.close()
        second_db.close()
    assert set(leases(pg_url).values()) == {None}  # a stop gives every lease up


async def test_a_partition_with_work_in_flight_is_given_up_only_once_idle(pg_url: str) -> None:
    """Rebalancing waits for in-flight work: the partition stops being delivered at once, but
    its lease is held (so no one else sends that person) until nothing of it is in flight."""
    first_db, second_db = PgSpoolDB(pg_url), PgSpoolDB(pg_url)
    first = Replicas(first_db, "a", lease_s=30)
    second = Replicas(second_db, "b", lease_s=30)
    busy = {PARTITIONS - 1}  # the highest partition: among those the first gives up
    first.busy.append(lambda: set(busy))
    try:
        await first.start()
        await second.start()
        await first.beat()  # sees two replicas: stops delivering half of its partitions
        assert PARTITIONS - 1 not in (first_db.owned or ())  # not delivered any more
        assert set(leases(pg_url).values()) == {"a"}  # every lease still held, busy or not
        await first.beat()  # the idle ones go, the busy one stays
        assert leases(pg_url)[PARTITIONS - 1] == "a"
        await second.beat()
        assert PARTITIONS - 1 not in (second_db.owned or ())
        assert len(second_db.owned or ()) == PARTITIONS // 2 - 1
        busy.clear()
        await first.beat()
        await second.beat()
        assert PARTITIONS - 1 in (second_db.owned or ())
    finally:
        await second.stop()
        await first.stop()
        first_db.close()
        second_db.close()


async def test_a_dead_replicas_partitions_are_taken_over_once_its_lease_ran_out(
    pg_url: str,
) -> None:
    """A replica that stops renewing (killed) keeps its partitions for one lease, no longer."""
    dead_db, alive_db = PgSpoolDB(pg_url), PgSpoolDB(pg_url)
    dead = Replicas(dead_db, "dead", lease_s=1.0)
    alive = Replicas(alive_db, "alive", lease_s=1.0)
    try:
        started = time.monotonic()
        await dead.start()
        assert dead._task is not None
        dead._task.cancel()  # it never beats again, as after a kill -9
        await alive.start()
        assert alive_db.owned == frozenset()
        while alive_db.owned != frozenset(range(PARTITIONS)):
            assert time.monotonic() - started < 5, alive_db.owned
            await asyncio.sleep(0.1)
            await alive.beat()
        assert time.monotonic() - started >= 0.5  # not before the lease ran out
    finally:
        await alive.stop()
        await dead._thread.close()
        dead_db.close()
        alive_db.close()


async def test_a_replica_that_cannot_renew_stops_delivering_before_its_lease_ends(
    pg_url: str,
) -> None:
    """Renewals failing: delivery stops with a third of the lease left, before anyone else may
    take the partitions (the others wait for the whole lease, on the database's clock)."""
    clock = Clock()
    db = PgSpoolDB(pg_url)
    replica = Replicas(db, "a", lease_s=30, clock=clock)
    try:
        await replica.start()
        assert db.owned
        clock.now += 15
        replica.check()
        assert db.owned  # 15 s left: still surely ours
        clock.now += 6
        replica.check()  # 9 s left, under a third of the lease
        assert db.owned == frozenset()
    finally:
        await replica.stop()
        db.close()


def test_a_persons_rows_all_go_to_one_partition(pg_url: str) -> None:
    """The partition comes from the person, so every row of theirs is delivered by one owner."""
    db = PgSpoolDB(pg_url)
    try:
        db.put_many([(f"k{n}", "event.created", b"{}", "alice") for n in range(5)])
        db.put_many([("b", "braze.step", b"{}", "alice"), ("c", "event.created", b"{}", "bob")])
        rows = db.fetch(0, 100) + db.fetch(0, 100, "to_didomi")
        parts = {row.part for row in rows if row.id != rows[5].id}
        assert parts == {partition("alice")}
        db.set_owned(frozenset({partition("bob")}))
        assert [row.part for row in db.fetch(0, 100)] == [partition("bob")]
        db.set_owned(frozenset())
        assert db.fetch(0, 100) == []
    finally:
        db.close()


def test_ids_commit_in_order_across_concurrent_intake(pg_url: str) -> None:
    """Two replicas' intake transactions: a row committed later never has a lower id than one a
    delivery cursor has passed (the intake lock), so no row is ever skipped."""
    import threading

    dbs = [PgSpoolDB(pg_url) for _ in range(3)]
    seen: list[int] = []
    cursor = 0
    stop = threading.Event()

    def intake(db: PgSpoolDB, name: str) -> None:
        for n in range(150):
            db.put_many([(None, "event.created", b"{}", f"{name}{n}")] * 3)

    def deliver() -> None:
        nonlocal cursor
        while not stop.is_set():
            rows = dbs[2].fetch(cursor, 1000)
            if rows:
                seen.extend(r.id for r in rows)
                cursor = rows[-1].id

    reader = threading.Thread(target=deliver)
    reader.start()
    writers = [threading.Thread(target=intake, args=(dbs[i], str(i))) for i in range(2)]
    for w in writers:
        w.start()
    for w in writers:
        w.join()
    stop.set()
    reader.join()
    rows = dbs[2].fetch(cursor, 10_000)
    seen.extend(r.id for r in rows)
    try:
        assert len(seen) == len(set(seen)) == 900  # every row read exactly once
    finally:
        for db in dbs:
            db.close()


# ---------------------------------------------------------------------------
# The shared budget


async def _turn(budget: Budget, rate: float) -> float:
    """Wait for a turn as braze.RateLimiter does; returns when it was granted (monotonic)."""
    while (wait := await budget.take(rate)) > 0:
        await asyncio.sleep(wait)
    return time.monotonic()


async def _timed_turn(budget: Budget, rate: float) -> tuple[float, float]:
    """As `_turn`, with when the granting `take` was asked as well: the turn was granted in
    the database between the two, however late this event loop saw the answer."""
    while True:
        asked = time.monotonic()
        wait = await budget.take(rate)
        if wait <= 0:
            return asked, time.monotonic()
        await asyncio.sleep(wait)


def _surely_within(turns: list[tuple[float, float]], width: float) -> int:
    """The most turns surely granted inside one window of `width` seconds, as Braze counts
    requests per window: those asked at its start or later and answered by its end."""
    return max(
        sum(1 for asked, granted in turns if start <= asked and granted <= start + width)
        for start, _ in turns
    )


async def test_replicas_share_one_request_rate(pg_url: str) -> None:
    """Turns granted to two replicas' budgets keep to one rate, all together, counted over
    windows as Braze counts requests: never more than `width * rate` and one in any window."""
    PgSpoolDB(pg_url).close()  # the schema
    budgets = [Budget(pg_url), Budget(pg_url)]
    rate = 50.0
    try:
        turns = await asyncio.gather(*(_timed_turn(budgets[n % 2], rate) for n in range(100)))
    finally:
        for budget in budgets:
            await budget.close()
    # 100 turns at 50 a second take at least 99 intervals, whoever asked: each turn was
    # granted between its asking and its answer, so the first was asked before the first
    # grant and the last answered after the last.
    assert max(g for _, g in turns) - min(a for a, _ in turns) >= 99 / rate * 0.95
    # Two budgets pacing each on its own would grant twice the rate: 100 in one second.
    for width in (0.2, 1.0):
        assert _surely_within(turns, width) <= width * rate + 1, width


async def test_a_wait_braze_asked_of_one_replica_holds_the_others(pg_url: str) -> None:
    """`block` on one budget: the other's next turn waits as long, and the requests the stop
    held leave one by one after it, not all at once."""
    PgSpoolDB(pg_url).close()
    told, other = Budget(pg_url), Budget(pg_url)
    try:
        await _turn(told, 10.0)
        await told.block(2.0)
        assert await other.take(10.0) >= 1.8
        started = time.monotonic()
        turns = sorted(await asyncio.gather(*(_turn(b, 10.0) for b in [told, other] * 6)))
        assert turns[0] - started >= 1.8
        assert turns[-1] - turns[0] >= 11 / 10.0 * 0.9, turns
    finally:
        await told.close()
        await other.close()


async def test_a_budget_without_its_database_is_a_spool_error(pg_url: str) -> None:
    """The rate limiter turns this into local pacing (braze.RateLimiter)."""
    budget = Budget(pg_url.rsplit("/", 1)[0] + "/no_such_database")
    try:
        with pytest.raises(SpoolError):
            await budget.take(10.0)
    finally:
        await budget.close()


@pytest.mark.slow
@pytest.mark.parametrize("down", ["refused", "silent"])
async def test_without_its_database_a_replica_sends_at_its_share_of_the_rate(down: str) -> None:
    """With the budget's database refusing connections or never answering, eight concurrent
    requesters of one of two replicas alive at a deployment rate of 20 send at most 10 a second
    over any 3 s window (README: `1 / rate` x the replicas alive), and still send."""
    held: list[asyncio.StreamWriter] = []  # a server that accepts and never says anything
    silent = await asyncio.start_server(lambda _, writer: held.append(writer), "127.0.0.1", 0)
    port = silent.sockets[0].getsockname()[1] if down == "silent" else free_port()
    budget = Budget(f"postgresql://gateway@127.0.0.1:{port}/gateway")
    limiter = RateLimiter(20.0)
    limiter.shared = budget
    limiter.replicas = lambda: 2
    sent: list[float] = []
    deadline = time.monotonic() + 8.0

    async def requester() -> None:
        while time.monotonic() < deadline:
            await limiter.acquire()
            sent.append(time.monotonic())

    try:
        await asyncio.wait_for(asyncio.gather(*(requester() for _ in range(8))), 30.0)
    finally:
        await budget.close()
        for writer in held:
            writer.close()
        silent.close()
        await silent.wait_closed()
    window = 3.0
    assert _windows(sent, window) <= 10 * window + 2, sorted(sent)
    assert len(sent) >= 10, sent  # paced, not stopped


# ---------------------------------------------------------------------------
# Two `gateway run` replicas, one killed under load


def _windows(times: list[float], width: float) -> int:
    """The most requests in any window of `width` seconds."""
    times = sorted(times)
    most = start = 0
    for end, t in enumerate(times):
        while t - times[start] >= width:
            start += 1
        most = max(most, end - start + 1)
    return most


@pytest.mark.slow
async def test_two_replicas_one_killed_deliver_everything_in_order_within_the_rate(
    tmp_path: Path,
    pg_url: str,
    secrets_env: dict[str, str],
    auth_headers: dict[str, str],
    processes: list[GatewayProcess],
) -> None:
    """Two replicas on one database take webhooks alternately; one is killed with `kill -9`
    a third of the way in. Every accepted webhook is delivered, each person's choices reach
    Braze in the order of their dates (never an older one after a newer one, never two
    requests for one person at once), and all requests together keep to the configured rate."""
    rate = 20
    latency = 0.05
    fake = FakeBraze(api_key=BRAZE_API_KEY, latency_s=latency)
    await fake.start()
    rng = random.Random(15)
    bodies: dict[str, bytes] = {}
    latest: dict[str, bool] = {}
    for n in range(40):
        person = f"p-{n}"
        for minute in range(6):
            enabled = rng.random() < 0.5
            bodies[f"{person}-{minute}"] = choice(
                person, enabled, at(minute), event_id=f"ev-{person}-{minute}"
            )
            latest[person] = enabled
    order = list(bodies)
    rng.shuffle(order)  # arrivals out of date order: older choices must end up stale
    replicas: list[GatewayProcess] = []
    try:
        for name in ("a", "b"):
            directory = tmp_path / name
            directory.mkdir()
            port = free_port()
            write_config(
                directory,
                server={"port": port, "shutdown_timeout_s": 5},
                braze={
                    "server": fake.url,
                    "batch_size": 3,
                    "flush_interval_ms": 10,
                    "max_in_flight": 4,
                    "requests_per_second": rate,  # the whole deployment's
                    "timeout_s": 0.9,  # short, so a short lease may bound every request
                },
                delivery={
                    "spool": pg_url,
                    "replica": name,
                    "lease_s": 3,
                    "retry_initial_ms": 20,
                    "retry_max_ms": 200,
                },
            )
            gw = GatewayProcess(directory, port, secrets_env)
            processes.append(gw)
            replicas.append(gw)
        first, second = replicas
        await first.start()
        accepted: set[str] = set()
        gate = asyncio.Semaphore(12)
        timeout = aiohttp.ClientTimeout(total=10)
        third = len(order) // 3
        async with aiohttp.ClientSession(timeout=timeout) as session:

            async def send(target: GatewayProcess, eid: str) -> None:
                async with gate:
                    try:
                        async with session.post(
                            f"{target.base}/webhooks/didomi", data=bodies[eid], headers=auth_headers
                        ) as resp:
                            if resp.status in (200, 202):
                                accepted.add(eid)
                    except (aiohttp.ClientError, TimeoutError):
                        return  # cut off by the kill: Didomi sends it again

            # A third to the first replica alone; at 20 requests a second a backlog forms.
            await asyncio.gather(*(send(first, eid) for eid in order[:third]))
            # The second joins under that load: the partitions are split while work is in
            # flight, and the next third goes to both in turn.
            await second.start()

            async def split() -> bool:
                owners = list(leases(pg_url).values())
                return owners.count("a") == owners.count("b") == PARTITIONS // 2

            middle = order[third : 2 * third]
            await asyncio.gather(*(send(replicas[n % 2], eid) for n, eid in enumerate(middle)))
            await eventually(split, 10, "the two replicas to share the partitions")

            async def both_delivering() -> bool:
                counts = []
                for gw in replicas:
                    samples = await gw.metrics()
                    counts.append(
                        sum(
                            v
                            for (name, _), v in samples.items()
                            if name == "gateway_updates_delivered_total"
                        )
                    )
                return all(counts)

            await eventually(both_delivering, 20, "both replicas to deliver")
            # kill -9 with a backlog and requests in flight, while the last third arrives.
            rest = asyncio.gather(*(send(second, eid) for eid in order[2 * third :]))
            assert first.proc is not None
            first.proc.kill()
            await asyncio.wait_for(rest, timeout=60)
            assert await asyncio.wait_for(first.proc.wait(), 10) == -signal.SIGKILL
            store = open_store(DeliveryConfig(spool=pg_url))
            try:
                assert store.count_pending() > 0, "nothing was waiting at the kill: proves less"
            finally:
                store.close()
            # Didomi retries what it never saw acknowledged: to the replica still up.
            for eid in order:
                if eid not in accepted:
                    async with session.post(
                        f"{second.base}/webhooks/didomi", data=bodies[eid], headers=auth_headers
                    ) as resp:
                        assert resp.status in (200, 202), await resp.text()
                        accepted.add(eid)
        assert accepted == set(order)

        store = open_store(DeliveryConfig(spool=pg_url))
        try:

            async def drained() -> bool:
                return store.count_pending() == 0

            await eventually(drained, 60, "every accepted webhook to be delivered")
            assert store.count_dead() == 0
            trail = {p: [as_dict(e) for e in store.trail(p)] for p in latest}
        finally:
            store.close()
        assert await second.stop() == 0, second.log()
    finally:
        await fake.stop()

    # Every person ends at their latest choice (nothing older overwrote it).
    assert {p: fake.users[p].email_subscribe for p in latest} == {
        p: STATES[e] for p, e in latest.items()
    }
    # Per person and target, what was delivered left in the order of the choices' dates (one
    # request may carry targets of several choices: each target's latest).
    for person, records in trail.items():
        sent: dict[str, list[str]] = defaultdict(list)
        for r in reversed(records):  # oldest first
            if r["outcome"] == "delivered":
                sent[r["target"]].append(r["event"]["at"])
        assert sent, person
        for target, dates in sent.items():
            assert dates == sorted(dates), (person, target, dates)
    # Never two requests about one person at Braze at once, from either replica.
    spans: dict[str, list[float]] = defaultdict(list)
    tracks = [r for r in fake.requests if r.path == "/users/track" and r.status == 201]
    for request in tracks:
        for obj in request.body["attributes"]:
            spans[obj["external_id"]].append(request.at)
    for person, arrivals in spans.items():
        arrivals.sort()
        gaps = [b - a for a, b in itertools.pairwise(arrivals)]
        assert all(gap >= latency * 0.9 for gap in gaps), (person, gaps)
    # Both replicas delivered, together never faster than the configured rate.
    assert _windows([r.at for r in fake.requests], 1.0) <= rate + 1
    assert "partition leases: 64 held of 64, 1 replica(s) alive" in second.log()  # took over


def test_a_lost_connection_is_a_spool_error_then_reconnected(pg_url: str) -> None:
    """A database restart (here: the backend terminated) fails one call with SpoolError, the
    gateway's 503; the next call reconnects and nothing committed is lost."""
    db, admin = PgSpoolDB(pg_url), PgSpoolDB(pg_url)
    try:
        assert db.put_many([("k1", "event.created", b"{}", "alice")]) == [True]
        pid = db.db.raw.info.backend_pid
        admin.db.execute("SELECT pg_terminate_backend(?)", (pid,))
        with pytest.raises(SpoolError, match="cannot"):
            db.put_many([("k2", "event.created", b"{}", "alice")])
        assert db.put_many([("k2", "event.created", b"{}", "alice")]) == [True]
        assert len(db.fetch(0, 10)) == 2  # the failed put stored nothing; its retry did
    finally:
        db.close()
        admin.close()


async def test_delivery_follows_the_partitions_it_owns(
    pg_url: str, tmp_path: Path, fake: FakeBraze
) -> None:
    """Only owned partitions are delivered; partitions taken later are read from the start,
    so their older rows are delivered too, each exactly once."""
    from gateway.forward.dispatcher import Dispatcher
    from gateway.metrics import Metrics
    from gateway.peers.braze import open_client
    from gateway.rules.mappings import load_rules
    from gateway.spool.face import Spool
    from tests.conftest import build_config

    config = build_config(
        tmp_path, braze={"server": fake.url, "flush_interval_ms": 10}, delivery={"spool": pg_url}
    )
    rules = load_rules(config.mappings.dir)
    people = [f"owner-{n}" for n in range(12)]
    mine = {partition(p) for p in people[:6]} - {partition(p) for p in people[6:]}
    assert mine, "choose other people: their partitions all collide"
    db = PgSpoolDB(pg_url)
    for n, person in enumerate(people):
        db.put_many([(None, "event.created", choice(person, True, at(n)), person)])
    db.set_owned(frozenset(mine))
    spool = Spool(db)
    metrics = Metrics()
    async with open_client(config.braze, metrics) as client:
        dispatcher = Dispatcher(config, spool, lambda: rules, client, metrics)
        await dispatcher.start()
        try:
            await eventually(lambda: _sent(fake, mine), 10, "the owned partitions to go")
            await asyncio.sleep(0.3)
            assert {partition(o["external_id"]) for o in fake.objects_sent()} <= mine
            db.set_owned(None)  # every partition, as a takeover gives
            dispatcher.wake()

            async def drained() -> bool:
                return await spool.run(db.count_pending) == 0

            await eventually(drained, 10, "the partitions taken later to go")
        finally:
            await dispatcher.stop(grace_s=2.0)
            await spool.close()
    sent = [o["external_id"] for o in fake.objects_sent()]
    assert sorted(sent) == sorted(people)  # each exactly once


async def _sent(fake: FakeBraze, parts: set[int]) -> bool:
    return {partition(o["external_id"]) for o in fake.objects_sent()} == parts


def test_gateway_migrate_creates_then_finds_the_schema_up_to_date(
    pg_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`gateway migrate` on a new database creates the schema; run again, it says so and
    changes nothing; a database from a newer gateway is refused with what to do."""
    from gateway.cli.main import main
    from gateway.spool.postgres import VERSION
    from tests.conftest import write_config

    path = write_config(tmp_path, delivery={"spool": pg_url})
    assert main(["migrate", "--config", str(path)]) == 0
    assert f"from version 0 to {VERSION}" in capsys.readouterr().out
    assert main(["migrate", "--config", str(path)]) == 0
    assert "up to date" in capsys.readouterr().out
    db = PgSpoolDB(pg_url)
    try:
        db.db.execute("INSERT INTO schema_version(version) VALUES (?)", (VERSION + 1,))
    finally:
        db.close()
    assert main(["migrate", "--config", str(path)]) == 1
    assert "newer than this gateway's" in capsys.readouterr().err


def test_a_spool_url_is_not_a_path_and_its_password_is_a_secret(tmp_path: Path) -> None:
    """A postgresql:// spool is kept as written (not resolved against the config's folder);
    a password written into it is masked in logs like every other secret."""
    from gateway.config.settings import secrets_of
    from gateway.spool.postgres import redact
    from tests.conftest import build_config

    url = "postgresql://gateway:hunter2-9f@db.internal:5432/gateway"
    config = build_config(tmp_path, delivery={"spool": url})
    assert config.delivery.spool == url
    assert "hunter2-9f" in secrets_of(config)
    assert redact(url) == "postgresql://gateway@db.internal:5432/gateway"


def test_an_erasure_commits_beside_a_body_that_is_not_utf8(pg_url: str) -> None:
    """A stored body may hold bytes that are not UTF-8 (in fields msgspec skips): the scrub
    must not trip over them, or no erasure would ever be acknowledged again."""
    db = PgSpoolDB(pg_url)
    try:
        step = b'{"external_id": "other", "campaign": "Caf\xe9", "email_subscribe": "opted_in"}'
        db.put_many([("s", "braze.step", step, "other")])
        mine = b'{"external_id": "erase-me", "email_subscribe": "opted_in"}'
        db.put_many([("m", "braze.step", mine, "erase-me")])
        db.ack([], [("erase-me", "email_subscribe", 1.0)], erase=["erase-me"])
        left = [row.body for row in db.fetch(0, 10, "to_didomi")]
        assert left == [step]  # theirs went, the other person's stayed
        assert db.applied_times(["erase-me"]) == {("erase-me", "email_subscribe"): 1.0}
        # An identifier outside ASCII is still found (the prefilter escapes it as the body).
        email = "Jos\u00e9.Back@example.org"  # a letter outside ASCII, written as UTF-8
        raw = json.dumps({"external_id": "x", "email": email}, ensure_ascii=False).encode()
        db.put_many([("j", "braze.step", raw, "x")])
        db.ack([], erase=[email])
        assert [row.body for row in db.fetch(0, 10, "to_didomi")] == [step]
    finally:
        db.close()


async def test_two_processes_given_one_name_never_hold_one_partition(pg_url: str) -> None:
    """`delivery.replica` set to the same name twice by mistake: still two owners."""
    dbs = [PgSpoolDB(pg_url), PgSpoolDB(pg_url)]
    replicas = [Replicas(db, "same", lease_s=30) for db in dbs]
    try:
        for replica in replicas:
            await replica.start()
        for _ in range(2):
            for replica in replicas:
                await replica.beat()
        first, second = (db.owned or frozenset() for db in dbs)
        assert not first & second
        assert len(first) == len(second) == PARTITIONS // 2
    finally:
        for replica in replicas:
            await replica.stop()
        for db in dbs:
            db.close()


async def test_no_request_is_started_that_could_outlive_the_lease(pg_url: str) -> None:
    """With a request bound longer than a third of the lease, delivery stops that long before
    the lease ends: a request started just before the stop still ends before anyone may take
    the partition over."""
    clock = Clock()
    db = PgSpoolDB(pg_url)
    replica = Replicas(db, "a", lease_s=30, request_bound_s=20, clock=clock)
    try:
        await replica.start()
        clock.now += 9.5
        replica.check()
        assert db.owned  # 20.5 s left, more than any request takes
        clock.now += 1
        replica.check()
        assert db.owned == frozenset()
    finally:
        await replica.stop()
        db.close()


def test_a_lease_too_short_for_the_request_timeouts_is_refused(tmp_path: Path) -> None:
    """delivery.lease_s below 1.5 x (braze.timeout_s + 1) on PostgreSQL: a config error that
    says what to change (SQLite has no leases, so it does not care)."""
    from gateway.config.settings import load_config
    from gateway.errors import ConfigError
    from tests.conftest import write_config

    url = "postgresql://gateway@db.internal/gateway"
    path = write_config(tmp_path, delivery={"spool": url, "lease_s": 10})
    with pytest.raises(ConfigError, match=r"lease_s must be at least 16\.5 s"):
        load_config(path, {"DIDOMI_CLIENT_SECRET": "x", "BRAZE_API_KEY": "y"})
    write_config(tmp_path, delivery={"spool": url, "lease_s": 10}, braze={"timeout_s": 5})
    assert load_config(path, {"DIDOMI_CLIENT_SECRET": "x", "BRAZE_API_KEY": "y"})
    write_config(tmp_path, delivery={"lease_s": 1})
    assert load_config(path, {"DIDOMI_CLIENT_SECRET": "x", "BRAZE_API_KEY": "y"})


async def test_the_writeback_writes_only_the_reports_of_partitions_it_owns(
    pg_url: str, tmp_path: Path, fake_didomi: FakeDidomi
) -> None:
    """Braze's reports are written to Didomi by the replica owning their person's partition;
    one whose partition is another's stays in the spool, and is written once it is owned."""
    from gateway.metrics import Metrics
    from gateway.peers.didomi import open_didomi_client
    from gateway.reverse.writeback import Writeback
    from gateway.rules.mappings import load_rules
    from gateway.spool.face import Spool
    from tests.conftest import DIDOMI_API_KEY, DIDOMI_API_SECRET, DIDOMI_ORG, build_config

    config = build_config(
        tmp_path,
        delivery={"spool": pg_url, "retry_initial_ms": 10, "retry_max_ms": 50},
        braze_webhooks={"tokens": ["t"]},
        didomi_api={
            "enabled": True,
            "base_url": fake_didomi.url + "/v1",
            "organization_id": DIDOMI_ORG,
            "key": DIDOMI_API_KEY,
            "secret": DIDOMI_API_SECRET,
        },
    )
    rules = load_rules(config.mappings.dir)
    people = [f"rev-{n}" for n in range(8)]
    mine = {partition(p) for p in people[:4]} - {partition(p) for p in people[4:]}
    assert mine
    db = PgSpoolDB(pg_url)
    for n, person in enumerate(people):
        body = {
            "external_id": person,
            "email_subscribe": "unsubscribed",
            "time": str(1_700_000_000 + n),
        }
        db.put_many([(f"s{n}", "braze.step", json.dumps(body).encode(), person)])
    db.set_owned(frozenset(mine))
    spool = Spool(db)
    async with open_didomi_client(config.didomi_api) as client:
        back = Writeback(config, spool, lambda: rules, client, Metrics())
        await back.start()
        try:
            ours = [p for p in people if partition(p) in mine]

            async def written(expected: list[str]) -> bool:
                names = sorted(e.body["user"]["organization_user_id"] for e in fake_didomi.events)
                return names == sorted(expected)

            await eventually(lambda: written(ours), 10, "the owned reports to be written")
            await asyncio.sleep(0.3)
            assert await written(ours)  # nothing of the others' partitions
            db.set_owned(None)
            back.wake()
            await eventually(lambda: written(people), 10, "the rest, once owned")
        finally:
            await back.stop(grace_s=2.0)
            await spool.close()


# ---------------------------------------------------------------------------
# A request withheld because its partition moved


class _MovingSqlite(SpoolDB):
    """A SQLite spool whose partitions can be taken away as a lost lease does on PostgreSQL.

    One gateway owns a SQLite spool, so its partitions never move; this stands in for
    `Replicas` to prove that the rows a move withholds stay in this backend's inbox too.
    """

    _moved: frozenset[int] | None = None
    _moves = 0

    @property
    def owned(self) -> frozenset[int] | None:
        return self._moved

    @property
    def generation(self) -> int:
        return self._moves

    def set_owned(self, owned: frozenset[int] | None) -> None:
        if owned != self._moved:
            self._moved, self._moves = owned, self._moves + 1


class _MovingBudget:
    """A shared budget whose first turn hands every partition to another replica, as a lease
    running out while a request waited for its turn would."""

    def __init__(self, db: _MovingSqlite | PgSpoolDB) -> None:
        self.db = db
        self.turns = 0

    async def take(self, rate: float) -> float:
        self.turns += 1
        if self.turns == 1:
            self.db.set_owned(frozenset())
        return 0.0

    async def block(self, seconds: float) -> None:
        return None


def _moving_db(spool_url: str) -> _MovingSqlite | PgSpoolDB:
    db = PgSpoolDB(spool_url) if spool_url.startswith("postgresql") else _MovingSqlite(spool_url)
    db.set_owned(frozenset(range(PARTITIONS)))
    return db


async def test_rows_withheld_because_their_partition_moved_go_to_its_owner_not_the_dead_letters(
    spool_url: str, tmp_path: Path, fake: FakeBraze
) -> None:
    """Updates older than give_up_after_s whose partition moves while they wait for their turn
    are not sent, not dead-lettered and not counted as a failure: they stay in the spool for
    the new owner, and are delivered once each when the partition comes back."""
    from gateway.forward.dispatcher import Dispatcher
    from gateway.metrics import Metrics
    from gateway.peers.braze import open_client
    from gateway.rules.mappings import load_rules
    from gateway.spool.face import Spool
    from tests.conftest import build_config

    config = build_config(
        tmp_path,
        braze={"server": fake.url, "flush_interval_ms": 10},
        delivery={"spool": spool_url, "give_up_after_s": 0.3, "retry_initial_ms": 10},
    )
    rules = load_rules(config.mappings.dir)
    people = [f"moved-{n}" for n in range(3)]
    db = _moving_db(spool_url)
    for n, person in enumerate(people):
        db.put_many([(None, "event.created", choice(person, False, at(n)), person)])
    await asyncio.sleep(0.5)  # older than give_up_after_s, as after a Braze 401 hold
    spool = Spool(db)
    metrics = Metrics()
    async with open_client(config.braze, metrics) as client:
        budget = _MovingBudget(db)
        client.limiter.shared = budget
        dispatcher = Dispatcher(config, spool, lambda: rules, client, metrics)
        await dispatcher.start()
        try:
            await eventually(lambda: _async(budget.turns >= 1), 10, "a request to take its turn")
            await asyncio.sleep(0.5)
            assert fake.requests == []
            assert db.dead_letters() == []
            assert await spool.run(db.count_pending) == len(people)
            assert not dispatcher.busy_partitions()  # nothing held back from the new owner
            failed = metrics.registry.get_sample_value(
                "gateway_delivery_failures_total", {"direction": "to_braze", "reason": "gave_up"}
            )
            assert not failed
            db.set_owned(frozenset(range(PARTITIONS)))  # the partitions come back
            dispatcher.wake()

            async def drained() -> bool:
                return await spool.run(db.count_pending) == 0

            await eventually(drained, 10, "the rows to be delivered by their owner")
            assert db.dead_letters() == []
        finally:
            await dispatcher.stop(grace_s=2.0)
            await spool.close()
    assert sorted(o["external_id"] for o in fake.objects_sent()) == people  # once each


async def test_reports_withheld_because_their_partition_moved_go_to_its_owner_not_the_dead_letters(
    spool_url: str, tmp_path: Path, fake_didomi: FakeDidomi
) -> None:
    """The writeback likewise: a Braze report older than give_up_after_s whose partition moves
    while it is being written stays in the spool for the new owner, never a dead letter."""
    from gateway.metrics import Metrics
    from gateway.peers.didomi import open_didomi_client
    from gateway.reverse.writeback import Writeback
    from gateway.rules.mappings import load_rules
    from gateway.spool.face import Spool
    from tests.conftest import DIDOMI_API_KEY, DIDOMI_API_SECRET, DIDOMI_ORG, build_config

    config = build_config(
        tmp_path,
        delivery={"spool": spool_url, "give_up_after_s": 0.3, "retry_initial_ms": 10},
        braze_webhooks={"tokens": ["t"]},
        didomi_api={
            "enabled": True,
            "base_url": fake_didomi.url + "/v1",
            "organization_id": DIDOMI_ORG,
            "key": DIDOMI_API_KEY,
            "secret": DIDOMI_API_SECRET,
        },
    )
    rules = load_rules(config.mappings.dir)
    db = _moving_db(spool_url)
    body = {
        "external_id": "moved-rev",
        "email_subscribe": "unsubscribed",
        "time": str(int(time.time())),
    }
    db.put_many([("s1", "braze.step", json.dumps(body).encode(), "moved-rev")])
    await asyncio.sleep(0.5)  # older than give_up_after_s
    spool = Spool(db)
    async with open_didomi_client(config.didomi_api) as client:
        budget = _MovingBudget(db)
        client.limiter.shared = budget
        back = Writeback(config, spool, lambda: rules, client, Metrics())
        await back.start()
        try:
            await eventually(lambda: _async(budget.turns >= 1), 10, "a call to take its turn")
            await asyncio.sleep(0.5)
            assert fake_didomi.events == []
            assert db.dead_letters() == []
            assert await spool.run(db.count_pending, "to_didomi") == 1
            assert not back.busy_partitions()
            db.set_owned(frozenset(range(PARTITIONS)))
            back.wake()

            async def written() -> bool:
                return len(fake_didomi.events) == 1

            await eventually(written, 10, "the report to be written by its owner")
            assert db.dead_letters() == []
        finally:
            await back.stop(grace_s=2.0)
            await spool.close()


async def _async(value: bool) -> bool:
    return value
