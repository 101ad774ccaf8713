"""Reloads: one at a time with the newest files winning, every [braze] key applied live, and each
key that needs a restart named in the log.

The last two tests run `python -m gateway run` and reload it with `kill -HUP`, as an operator
would; everything stays on 127.0.0.1, against fake Brazes in the test process.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import threading
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway.app import reload as reload_module
from gateway.app.reload import LIVE_KEYS, LiveRules, changed_keys
from gateway.config.settings import Config, load_config
from gateway.metrics import Metrics
from gateway.testing.braze import FakeBraze
from tests.conftest import BRAZE_API_KEY, CLIENT_SECRET, SECRETS, choice, free_port, write_config
from tests.system.test_reliability import GatewayProcess, eventually, metric


@pytest.fixture
def live(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> LiveRules:
    """LiveRules on tmp_path/gateway.toml, which reloads read with the test secrets."""
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    path = write_config(tmp_path, braze={"batch_size": 10})
    config = load_config(path)
    return LiveRules.load(config, Metrics(), path)


async def test_concurrent_reloads_end_on_the_newest_files(
    live: LiveRules, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Reloads asked for while a slow one reads older files are served by exactly one more
    reload, which reads the files afresh: the gateway ends on the newest files."""
    real = reload_module.load_config
    read_sizes: list[int] = []
    first_read, release = threading.Event(), threading.Event()

    def slow_first_read(path: Any, *args: Any, **kwargs: Any) -> Config:
        config = real(path, *args, **kwargs)
        read_sizes.append(config.braze.batch_size)
        if len(read_sizes) == 1:  # the first reader has the old files and is overtaken
            first_read.set()
            release.wait(10)
        return config

    monkeypatch.setattr(reload_module, "load_config", slow_first_read)
    applied: list[int] = []
    live.listeners.append(lambda config: applied.append(config.braze.batch_size))

    write_config(tmp_path, braze={"batch_size": 20})
    first = asyncio.create_task(live.reload_async())
    assert await asyncio.to_thread(first_read.wait, 10)
    write_config(tmp_path, braze={"batch_size": 30})
    later = [asyncio.create_task(live.reload_async()) for _ in range(3)]
    # Reloads running side by side would overtake the blocked one here and let its older files
    # land last; serialised, they wait for it, and this wait only runs out.
    await asyncio.wait(later, timeout=1.0)
    release.set()

    assert await asyncio.gather(first, *later) == [True] * 4
    assert live.config.braze.batch_size == 30
    assert read_sizes == [20, 30]  # three requests during a reload cost exactly one more
    assert applied == [20, 30]


async def test_restart_keys_are_named_in_the_log_and_keep_their_values(
    live: LiveRules,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A reload applies the live keys and names each key that needs a restart by its full name,
    never its value, while the running gateway keeps that key's old value."""
    rotated = "the-rotated-client-secret-81f0"
    monkeypatch.setenv("ROTATED_SECRET", rotated)
    write_config(
        tmp_path,
        server={"port": 9999},
        auth={"client_secret": "${ROTATED_SECRET}"},
        braze={"batch_size": 20, "max_in_flight": 3, "update_existing_only": False},
        delivery={"spool": "var/elsewhere.db"},
    )
    with caplog.at_level(logging.INFO, logger="gateway.reload"):
        assert await live.reload_async() is True

    def settings(level: int) -> set[str]:
        return {r.setting for r in caplog.records if r.levelno == level and hasattr(r, "setting")}

    restart = {"server.port", "auth.client_secret", "braze.max_in_flight", "delivery.spool"}
    assert settings(logging.WARNING) == restart
    assert settings(logging.INFO) == {"braze.batch_size", "braze.update_existing_only"}
    assert "braze.max_in_flight changed and needs a restart" in caplog.text
    assert rotated not in caplog.text

    running = live.config
    assert running.braze.batch_size == 20
    assert running.braze.update_existing_only is False
    assert running.server.port == 8080
    assert running.auth.client_secret == CLIENT_SECRET
    assert running.braze.max_in_flight == 8
    assert running.delivery.spool == str(tmp_path / "var" / "gateway.db")


async def test_keys_only_a_command_reads_are_never_said_to_need_a_restart(
    live: LiveRules, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A key the server never reads (reconcile's pace, check's demand, the backfill command's
    batch and wait) is logged as read by its command at its next run, not as a restart to do."""
    write_config(
        tmp_path,
        braze={"batch_size": 10, "export_requests_per_minute": 2500},
        check={"reconcile": True},
        backfill={"max_pending": 5, "users_per_transaction": 7},
    )
    with caplog.at_level(logging.INFO, logger="gateway.reload"):
        assert await live.reload_async() is True
    warned = {r.setting for r in caplog.records if r.levelno >= logging.WARNING}
    assert warned == set()
    said = {r.setting: r.getMessage() for r in caplog.records if hasattr(r, "setting")}
    assert "`gateway reconcile`" in said["braze.export_requests_per_minute"]
    assert "`gateway check --online`" in said["check.reconcile"]
    assert "`gateway backfill`" in said["backfill.max_pending"]
    assert "`gateway backfill`" in said["backfill.users_per_transaction"]
    assert all("nothing to restart" in message for message in said.values())


def test_every_braze_key_but_max_in_flight_applies_live() -> None:
    """Of [braze], only max_in_flight (the dispatcher's fixed slots) waits for a restart."""
    braze = {key for key in LIVE_KEYS if key.startswith("braze.")}
    every = set(changed_keys(Config(), Config(braze=_every_braze_key_changed())))
    assert every - braze == {"braze.max_in_flight"}


def _every_braze_key_changed() -> Any:
    from gateway.config.settings import BrazeConfig

    return BrazeConfig(
        server="US-02",
        api_key="other",
        update_existing_only=False,
        batch_size=5,
        flush_interval_ms=7,
        max_in_flight=2,
        timeout_s=3.0,
        requests_per_second=9.0,
    )


# ---------------------------------------------------------------------------
# A running `gateway run`, reloaded with kill -HUP


async def post_webhook(gw: GatewayProcess, body: bytes, headers: dict[str, str]) -> int:
    """POST one webhook to a gateway process and return the status."""
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session,
        session.post(f"{gw.base}/webhooks/didomi", data=body, headers=headers) as resp,
    ):
        return resp.status


async def sighup_and_wait(gw: GatewayProcess, reloads: int) -> None:
    """Send SIGHUP and wait until /metrics counts `reloads` successful reloads."""
    gw.signal(signal.SIGHUP)

    async def reloaded() -> bool:
        samples = await gw.metrics()
        return metric(samples, "gateway_config_reloads_total", outcome="success") >= reloads

    await eventually(reloaded, 10, "the SIGHUP reload")


def log_records(gw: GatewayProcess) -> list[dict[str, Any]]:
    """The gateway's JSON log lines."""
    return [json.loads(line) for line in gw.log().splitlines() if line.startswith("{")]


@pytest.mark.slow
async def test_sighup_moves_later_webhooks_to_a_new_braze_server(
    tmp_path: Path,
    fake: FakeBraze,
    secrets_env: dict[str, str],
    auth_headers: dict[str, str],
    processes: list[GatewayProcess],
) -> None:
    """With braze.server changed from Braze A to Braze B in gateway.toml, `kill -HUP` sends every
    later webhook to B, never to A; braze.max_in_flight, changed too, is logged as a restart."""
    other = FakeBraze(api_key=BRAZE_API_KEY)
    await other.start()
    try:
        port = free_port()
        sections: dict[str, Any] = {
            "server": {"port": port},
            "delivery": {"retry_initial_ms": 20, "retry_max_ms": 200},
        }
        write_config(tmp_path, braze={"server": fake.url, "flush_interval_ms": 10}, **sections)
        gw = GatewayProcess(tmp_path, port, secrets_env)
        processes.append(gw)
        await gw.start()
        assert await post_webhook(gw, choice("ann", True), auth_headers) == 202
        await eventually(_has(fake, "ann"), 10, "ann at Braze A")

        braze_b = {"server": other.url, "flush_interval_ms": 10, "max_in_flight": 4}
        write_config(tmp_path, braze=braze_b, **sections)
        await sighup_and_wait(gw, 1)
        sent_to_a = len(fake.requests)
        for person in ("bob", "cat"):
            assert await post_webhook(gw, choice(person, False), auth_headers) == 202

        async def arrived() -> bool:
            return all(p in other.users or p in fake.users for p in ("bob", "cat"))

        await eventually(arrived, 10, "bob and cat at a Braze")
        assert set(other.users) == {"bob", "cat"}
        assert len(fake.requests) == sent_to_a
        assert await gw.stop() == 0
    finally:
        await other.stop()
    assert set(fake.users) == {"ann"}
    records = log_records(gw)
    warned = {r.get("setting") for r in records if r["level"] == "WARNING"}
    assert "braze.max_in_flight" in warned
    assert "braze.server" not in warned
    assert any(r.get("setting") == "braze.server" and r["level"] == "INFO" for r in records)


@pytest.mark.slow
async def test_sighup_flips_update_existing_only_for_later_webhooks(
    tmp_path: Path,
    fake: FakeBraze,
    secrets_env: dict[str, str],
    auth_headers: dict[str, str],
    processes: list[GatewayProcess],
) -> None:
    """Setting braze.update_existing_only = false and `kill -HUP` turns on upsert mode: a later
    webhook creates the unknown person an earlier one could not; no braze key needs a restart."""
    fake.known_users = set()  # Braze knows nobody: update-only mode changes no one
    port = free_port()
    sections: dict[str, Any] = {"server": {"port": port}}
    braze = {"server": fake.url, "flush_interval_ms": 10}
    write_config(tmp_path, braze=braze, **sections)
    gw = GatewayProcess(tmp_path, port, secrets_env)
    processes.append(gw)
    await gw.start()
    assert await post_webhook(gw, choice("dee", True), auth_headers) == 202
    await eventually(_sent(fake, 1), 10, "the first object at Braze")
    assert fake.objects_sent()[0]["_update_existing_only"] is True

    changed = {"update_existing_only": False, "timeout_s": 5, "requests_per_second": 200}
    write_config(tmp_path, braze={**braze, **changed}, **sections)
    await sighup_and_wait(gw, 1)
    assert await post_webhook(gw, choice("eve", True), auth_headers) == 202
    await eventually(_sent(fake, 2), 10, "the second object at Braze")
    assert fake.objects_sent()[1]["_update_existing_only"] is False
    assert set(fake.users) == {"eve"}
    assert [o["external_id"] for o in fake.ignored] == ["dee"]
    assert await gw.stop() == 0
    warned = {r.get("setting") for r in log_records(gw) if r["level"] == "WARNING"}
    assert not {s for s in warned if s and s.startswith("braze.")}


def _has(fake: FakeBraze, person: str) -> Any:
    async def probe() -> bool:
        return person in fake.users

    return probe


def _sent(fake: FakeBraze, count: int) -> Any:
    async def probe() -> bool:
        return len(fake.objects_sent()) >= count

    return probe
