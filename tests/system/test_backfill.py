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

from gateway.config.settings import DeliveryConfig
from gateway.spool.backend import open_store
from gateway.spool.store import PARTITIONS
from gateway.testing.braze import FakeBraze
from tests.bulk.test_backfill import ago, export, user
from tests.conftest import BRAZE_API_KEY, SECRETS, free_port, write_config
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
    assert len(twice) <= batch * in_flight, twice
    assert max(sent.values()) <= 2


async def test_kill_9_of_the_command_and_the_gateway_at_once_then_both_go_on(
    tmp_path: Path, spool_url: str, processes: list[GatewayProcess]
) -> None:
    """`kill -9` of `gateway backfill` and of the gateway delivering it at the same moment:
    the restarted gateway and the same command run again finish the job with the counts of one
    uninterrupted run; everybody reaches Braze, only what was in flight twice."""
    total, batch, in_flight = 5000, 20, 4
    fake = FakeBraze(api_key=BRAZE_API_KEY, latency_s=0.02)
    await fake.start()
    try:
        gw = _replica(
            tmp_path / "gw",
            fake,
            spool_url,
            "",
            # The command waits for delivery beyond 1,000 queued: killed mid-file, mid-delivery.
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
        command.send_signal(signal.SIGKILL)
        await gw.kill()
        await asyncio.to_thread(command.communicate, timeout=10)
        assert len(_per_person(fake)) < total, "all delivered before the kill: proves less"

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
    assert len(twice) <= batch * in_flight, twice
