"""`gateway backfill` against real `gateway run` processes: two replicas on one PostgreSQL spool,
`kill -9` of a replica, and `kill -9` of the command and the gateway at once, on both backends.

Black-box: the command and the gateways are subprocesses, Braze is the fake on loopback, the
spool a real SQLite file or a throwaway PostgreSQL database. Nobody is stored twice (the
command's counts equal one uninterrupted run's); everybody reaches Braze; Braze sees a person
twice only when a kill cut off a request it had answered before the answer was recorded
(at-least-once delivery), so at most what the killed gateway had in flight.
"""

from __future__ import annotations

import asyncio
import gzip
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import aiohttp
import msgspec
import pytest

from gateway.config.settings import DeliveryConfig
from gateway.forward.dispatcher import LANE_SLOTS
from gateway.spool.backend import open_store
from gateway.spool.store import PARTITIONS
from gateway.testing.braze import FakeBraze
from gateway.testing.didomi import FakeDidomi
from tests.bulk.test_backfill import ago, export, user
from tests.conftest import BRAZE_API_KEY, SECRETS, choice, free_port, write_config
from tests.system.test_reliability import GatewayProcess, eventually, metric
from tests.system.test_replicas import leases


def _file(directory: Path, total: int, prefix: str) -> Path:
    """A gzip export of `total` users, each choosing marketing email some days ago."""
    path = directory / "users.json.gz"
    users = [user(f"{prefix}{n}", n % 3 != 0, ago(days=4)) for n in range(total)]
    path.write_bytes(gzip.compress(export(users), compresslevel=1))
    return path


def _command(config_path: Path, *args: str) -> subprocess.Popen[bytes]:
    """`gateway backfill ARGS` as an operator runs it."""
    return subprocess.Popen(
        [sys.executable, "-m", "gateway", "backfill", *args, "--config", str(config_path)],
        env={**os.environ, **SECRETS},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        cwd=config_path.parent,
    )


async def _finish(proc: subprocess.Popen[bytes], timeout: float) -> str:
    """The command's output once it exited 0."""
    out, _ = await asyncio.to_thread(proc.communicate, timeout=timeout)
    text = out.decode(errors="replace")
    assert proc.returncode == 0, text
    return text


def _lane(spool: str) -> int:
    """Backfilled users waiting in the spool, read by a connection of its own."""
    store = open_store(DeliveryConfig(spool=spool))
    try:
        return store.count_backfill()
    finally:
        store.close()


def _per_person(fake: FakeBraze) -> Counter[str]:
    return Counter(obj["external_id"] for obj in fake.objects_sent())


def _most_in_window(stamps: list[tuple[float, int]], width: float) -> int:
    """The most objects Braze received in any window of `width` seconds."""
    stamps = sorted(stamps)
    most = inside = start = 0
    for at, count in stamps:
        inside += count
        while at - stamps[start][0] >= width:
            inside -= stamps[start][1]
            start += 1
        most = max(most, inside)
    return most


def _replica(
    directory: Path,
    fake: FakeBraze,
    spool: str,
    name: str,
    *,
    share: float = 0.5,
    max_pending: int = 1_000_000,
    **braze: float,
) -> GatewayProcess:
    """A gateway's folder and config (a named replica with a short lease, given a name)."""
    directory.mkdir()
    port = free_port()
    write_config(
        directory,
        server={"port": port, "shutdown_timeout_s": 5},
        # A short request timeout lets a 3 s lease bound every request (`lease_floor`).
        braze={"server": fake.url, "flush_interval_ms": 10, "timeout_s": 0.9, **braze},
        delivery={
            "spool": spool,
            "replica": name or None,
            "lease_s": 3,  # on PostgreSQL: a killed gateway's partitions free in 3 s
            "retry_initial_ms": 20,
            "retry_max_ms": 200,
        },
        backfill={"share": share, "users_per_transaction": 250, "max_pending": max_pending},
    )
    return GatewayProcess(directory, port, SECRETS)


async def _two_replicas(
    tmp_path: Path,
    fake: FakeBraze,
    pg_url: str,
    processes: list[GatewayProcess],
    share: float = 0.5,
    **braze: float,
) -> tuple[GatewayProcess, GatewayProcess]:
    """Replicas `a` and `b` on `pg_url`, started, once they hold half the partitions each."""
    a = _replica(tmp_path / "a", fake, pg_url, "a", share=share, **braze)
    b = _replica(tmp_path / "b", fake, pg_url, "b", share=share, **braze)
    processes.extend([a, b])
    await a.start()
    await b.start()

    async def split() -> bool:
        owners = list(leases(pg_url).values())
        return owners.count("a") == owners.count("b") == PARTITIONS // 2

    await eventually(split, 30, "the two replicas to share the partitions")
    return a, b


async def test_two_replicas_deliver_one_backfill_once_within_its_share(
    tmp_path: Path, pg_url: str, processes: list[GatewayProcess]
) -> None:
    """Two `gateway run` replicas on one PostgreSQL spool deliver one backfill together: every
    user reaches Braze exactly once, the counts equal, and the lane's objects keep to
    `backfill.share` of Braze's rate over any window, both replicas together."""
    total, rate, batch, share = 3000, 50, 20, 0.25
    fake = FakeBraze(api_key=BRAZE_API_KEY, latency_s=0.01)
    await fake.start()
    try:
        a, b = await _two_replicas(
            tmp_path, fake, pg_url, processes, share, requests_per_second=rate, batch_size=batch
        )
        path = _file(tmp_path, total, "two")
        text = await _finish(_command(a.config_path, str(path), "--wait"), timeout=120)
        assert f"{total:,} users read, {total:,} stored" in text
        assert "every stored user is delivered" in text
        delivered = [
            metric(await gw.metrics(), "gateway_backfill_users_total", outcome="delivered")
            for gw in (a, b)
        ]
        assert all(delivered), delivered  # both replicas took part
        assert sum(delivered) == total
        for gw in (a, b):
            assert await gw.stop() == 0, gw.log()
    finally:
        await fake.stop()
    sent = _per_person(fake)
    assert set(sent) == {f"two{n}" for n in range(total)}
    assert set(sent.values()) == {1}, [p for p, n in sent.items() if n > 1][:10]
    # The share is in objects a second: `share x requests_per_second x batch_size`, the two
    # replicas together; a window may hold one second's burst more, and a batch each in flight.
    allowed = share * rate * batch
    stamps = [
        (r.at, r.object_count) for r in fake.requests if r.path == "/users/track" and r.status < 300
    ]
    width = 4.0
    assert _most_in_window(stamps, width) <= allowed * (width + 1) + 2 * batch * 4


async def test_kill_9_of_a_replica_mid_backfill_loses_nobody(
    tmp_path: Path, pg_url: str, processes: list[GatewayProcess]
) -> None:
    """One of two replicas delivering a backfill on PostgreSQL is killed with `kill -9`: the
    other takes its partitions over once its lease ran out and delivers the rest; everybody
    reaches Braze, the lane ends empty, and only what the killed one had in flight twice."""
    total, batch, in_flight = 3000, 20, 4
    fake = FakeBraze(api_key=BRAZE_API_KEY, latency_s=0.05)
    await fake.start()
    try:
        a, b = await _two_replicas(
            tmp_path,
            fake,
            pg_url,
            processes,
            requests_per_second=100,
            batch_size=batch,
            max_in_flight=in_flight,
        )
        path = _file(tmp_path, total, "rk")
        command = _command(a.config_path, str(path))
        text = await _finish(command, timeout=120)
        assert f"{total:,} users read, {total:,} stored" in text

        async def some() -> bool:
            return len(fake.objects_sent()) >= total // 4

        await eventually(some, 60, "a quarter of the users delivered", every=0.01)
        await a.kill()
        assert _lane(pg_url) > 0, "the lane was delivered before the kill: proves less"

        async def drained() -> bool:
            return await asyncio.to_thread(_lane, pg_url) == 0

        await eventually(drained, 90, "the surviving replica to deliver the rest")
        assert "partition leases: 64 held of 64, 1 replica(s) alive" in b.log()  # took over
        assert await b.stop() == 0, b.log()
    finally:
        await fake.stop()
    sent = _per_person(fake)
    assert set(sent) == {f"rk{n}" for n in range(total)}
    twice = [p for p, n in sent.items() if n > 1]
    # In flight: `max_in_flight` requests, and the lane's own beside them (`LANE_SLOTS`).
    assert len(twice) <= batch * in_flight * (1 + LANE_SLOTS), twice
    assert max(sent.values()) <= 2


@pytest.mark.parametrize("stop", ["kill-9", "ctrl-c"])
async def test_stopping_the_command_and_the_gateway_at_once_then_both_go_on(
    tmp_path: Path, spool_url: str, processes: list[GatewayProcess], stop: str
) -> None:
    """`kill -9` (or Ctrl-C) of `gateway backfill` and of the gateway delivering it at the same
    moment: the restarted gateway and the same command run again finish the job with the
    counts of one uninterrupted run; everybody reaches Braze, only what was in flight twice
    (after a Ctrl-C, nobody: the gateway drains what it sent before it exits)."""
    total, batch, in_flight = 5000, 20, 4
    sig = signal.SIGKILL if stop == "kill-9" else signal.SIGINT
    fake = FakeBraze(api_key=BRAZE_API_KEY, latency_s=0.02)
    await fake.start()
    try:
        gw = _replica(
            tmp_path / "gw",
            fake,
            spool_url,
            "",
            # The command waits for delivery beyond 1,000 queued: stopped mid-file, mid-delivery.
            max_pending=1000,
            requests_per_second=50,
            batch_size=batch,
            max_in_flight=in_flight,
        )
        processes.append(gw)
        await gw.start()
        path = _file(tmp_path, total, "both")
        command = _command(gw.config_path, str(path))

        async def delivering() -> bool:
            assert command.poll() is None, command.communicate()[0].decode()
            return len(fake.objects_sent()) >= 1000

        await eventually(delivering, 60, "a thousand users delivered", every=0.01)
        command.send_signal(sig)
        gw.signal(sig)
        out, _ = await asyncio.to_thread(command.communicate, timeout=30)
        assert gw.proc is not None
        code = await asyncio.wait_for(gw.proc.wait(), timeout=30)
        if stop == "ctrl-c":
            assert command.returncode == 130, out.decode()
            assert "run the same command again to go on" in out.decode()
            assert code == 0, gw.log()
        assert len(_per_person(fake)) < total, "all delivered before the stop: proves less"

        await gw.start()
        again = await _finish(_command(gw.config_path, str(path), "--wait"), timeout=180)
        assert "going on after" in again
        assert f"{total:,} users read, {total:,} stored" in again
        assert "every stored user is delivered" in again
        assert await gw.stop() == 0, gw.log()
    finally:
        await fake.stop()
    sent = _per_person(fake)
    assert set(sent) == {f"both{n}" for n in range(total)}
    twice = [p for p, n in sent.items() if n > 1]
    assert len(twice) <= (batch * in_flight * (1 + LANE_SLOTS) if stop == "kill-9" else 0), twice


async def test_kill_9_of_a_didomi_api_backfill_goes_on_from_the_last_page_stored(
    tmp_path: Path, spool_url: str, fake_didomi: FakeDidomi
) -> None:
    """`gateway backfill didomi-api` killed with `kill -9` mid-read goes on from the cursor it
    committed: it does not read the organization again from its first page, and stores
    everybody once, with the counts of one uninterrupted run."""
    total = 2000
    for n in range(total):
        fake_didomi.seed_user(
            f"api{n}", [{"id": "marketing_email", "enabled": True}], updated_at=ago(days=9)
        )
    fake_didomi.latency_s = 0.05
    config_path = write_config(
        tmp_path,
        delivery={"spool": spool_url},
        backfill={"users_per_transaction": 100},
        didomi_api={
            "enabled": True,
            "base_url": fake_didomi.url + "/v1",
            "organization_id": fake_didomi.organization_id,
            "key": fake_didomi.key,
            "secret": fake_didomi.secret,
        },
    )

    def pages() -> int:
        return sum(1 for r in fake_didomi.requests if r.path == "/consents/users")

    command = _command(config_path, "didomi-api")

    async def some() -> bool:
        assert command.poll() is None, command.communicate()[0].decode()
        return await asyncio.to_thread(_lane, spool_url) >= 500

    await eventually(some, 60, "the first pages to be stored", every=0.02)
    command.send_signal(signal.SIGKILL)
    await asyncio.to_thread(command.communicate, timeout=10)
    stored = _lane(spool_url)
    assert stored < total, "read to its end before the kill: proves less"
    before = pages()
    text = await _finish(_command(config_path, "didomi-api"), timeout=120)
    assert "going on after" in text
    assert f"{total:,} users read, {total:,} stored" in text
    # Pages of 100: the rerun reads from the page the last committed batch ended in.
    assert pages() - before <= (total - stored) // 100 + 2
    store = open_store(DeliveryConfig(spool=spool_url))
    try:
        rows = store.fetch_backfill(0, total + 10)
    finally:
        store.close()
    persons = [
        msgspec.json.decode(r.body)["parameters"]["new_entity"]["organization_user_id"]
        for r in rows
    ]
    assert len(persons) == len(set(persons)) == total


async def test_live_choices_racing_a_backfill_newest_wins(
    tmp_path: Path,
    spool_url: str,
    processes: list[GatewayProcess],
    auth_headers: dict[str, str],
) -> None:
    """Live webhooks posted to the gateway while it delivers a backfill of the same people: a
    live choice newer than the snapshot decides Braze's state and an older one does not,
    whichever of the two the gateway happens to deliver first."""
    total, racers = 2000, 300
    fake = FakeBraze(api_key=BRAZE_API_KEY, latency_s=0.01)
    await fake.start()
    try:
        gw = _replica(tmp_path / "gw", fake, spool_url, "", requests_per_second=50, batch_size=20)
        processes.append(gw)
        await gw.start()
        path = gw.config_path.parent / "users.json"
        # Everybody opted in ten days ago, by the snapshot.
        path.write_bytes(export([user(f"race{n}", True, ago(days=10)) for n in range(total)]))
        command = _command(gw.config_path, str(path), "--wait")
        # Half the racers withdrew yesterday (newer: wins); the other half withdrew twenty
        # days ago (older: the snapshot wins). Spread over the whole file, sent while it goes.
        step = total // racers
        newer = {f"race{n}" for n in range(0, total, step)[::2]}
        older = {f"race{n}" for n in range(0, total, step)[1::2]}

        async def started() -> bool:
            return len(fake.objects_sent()) >= 200

        await eventually(started, 60, "the backfill's delivery to begin", every=0.01)
        timeout = aiohttp.ClientTimeout(total=10)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            for n, person in enumerate(sorted(newer | older)):
                when = ago(days=1) if person in newer else ago(days=20)
                body = choice(person, False, when, event_id=f"live-{person}")
                async with session.post(
                    f"{gw.base}/webhooks/didomi", data=body, headers=auth_headers
                ) as resp:
                    assert resp.status in (200, 202), await resp.text()
                if n % 20 == 0:
                    await asyncio.sleep(0.05)  # spread over the backfill's delivery
        text = await _finish(command, timeout=120)
        assert f"{total:,} users read, {total:,} stored" in text
        store = open_store(DeliveryConfig(spool=spool_url))
        try:

            async def settled() -> bool:
                return await asyncio.to_thread(store.count_pending) == 0

            await eventually(settled, 30, "the live choices to settle")
        finally:
            store.close()
        assert await gw.stop() == 0, gw.log()
    finally:
        await fake.stop()
    # Both flowed at once: backfilled users went after the first live choice, and live choices
    # after the first backfilled user.
    states = [obj.get("email_subscribe") for obj in fake.objects_sent()]
    assert "opted_in" in states[states.index("unsubscribed") :]
    assert "unsubscribed" in states[states.index("opted_in") :]
    state = {p: u.email_subscribe for p, u in fake.users.items()}
    assert {p for p, s in state.items() if s == "unsubscribed"} == newer
    assert {p for p, s in state.items() if s == "opted_in"} == {
        f"race{n}" for n in range(total)
    } - newer
