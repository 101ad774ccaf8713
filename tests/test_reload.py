"""Reloads: one at a time, with the newest files winning."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import pytest
from conftest import SECRETS, write_config

from gateway import reload as reload_module
from gateway.config import Config, load_config
from gateway.metrics import Metrics
from gateway.reload import LiveRules


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
