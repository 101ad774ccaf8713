"""Live rules: the mapping rule set (and the Braze key) swapped atomically on SIGHUP or file change.

A reload compiles and checks everything off the hot path; only a fully good result replaces the
running one, in a single assignment, so an event is always mapped by one rule set, never a mix.
A bad edit is logged as `file:line: message`, counted, and the last good rules keep running.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from .config import Config, load_config
from .errors import ConfigError
from .mappings import RuleSet, load_rules, options_of

if TYPE_CHECKING:
    from .metrics import Metrics

log = logging.getLogger("gateway.reload")

WATCH_INTERVAL_S = 1.0


class LiveRules:
    """Holds the current config and rule set; `reload()` replaces both or neither."""

    def __init__(
        self, config: Config, rules: RuleSet, metrics: Metrics, config_path: str | Path | None
    ) -> None:
        self.config = config
        self.rules = rules
        self.metrics = metrics
        self.config_path = Path(config_path) if config_path is not None else None
        self.listeners: list[Callable[[Config], None]] = []
        self._stamp = self._fingerprint()

    @classmethod
    def load(cls, config: Config, metrics: Metrics, config_path: str | Path | None) -> LiveRules:
        """The rules of `config`'s mapping folder; ConfigError if they are not good."""
        return cls(
            config, load_rules(config.mappings.dir, options_of(config)), metrics, config_path
        )

    def current(self) -> RuleSet:
        """The rule set to map with now."""
        return self.rules

    def reload(self) -> bool:
        """Re-read gateway.toml (when known) and the mappings; swap them in only if all is good."""
        try:
            config = load_config(self.config_path) if self.config_path else self.config
            rules = load_rules(config.mappings.dir, options_of(config))
        except ConfigError as exc:
            for problem in exc.problems:
                log.error("reload refused: %s", problem, extra={"outcome": "error"})
            log.error("the last good rules keep running (%d rules)", len(self.rules.rules))
            self.metrics.config_reloads.labels("error").inc()
            self._stamp = self._fingerprint()  # do not retry the same bad files every second
            return False
        restart_needed = [
            name
            for name in ("server", "auth", "delivery")
            if getattr(config, name) != getattr(self.config, name)
        ]
        if restart_needed:
            log.warning("changes to [%s] take effect after a restart", "], [".join(restart_needed))
        # One assignment each: a batch that already took `self.rules` keeps its rule set.
        self.rules = rules
        self.config = config
        for listener in self.listeners:
            listener(config)
        self._stamp = self._fingerprint()
        self.metrics.config_reloads.labels("success").inc()
        log.info("reloaded %d rules from %d file(s)", len(rules.rules), len(rules.files))
        return True

    async def reload_async(self) -> bool:
        """Reload on a worker thread, so parsing never stalls the event loop."""
        return await asyncio.to_thread(self.reload)

    def _fingerprint(self) -> tuple[tuple[str, int, int], ...]:
        paths: list[Path] = []
        directory = Path(self.config.mappings.dir)
        with contextlib.suppress(OSError):  # a missing folder shows up at reload, as a problem
            paths.extend(p for p in directory.iterdir() if p.suffix == ".toml")
        if self.config_path is not None:
            paths.append(self.config_path)
        stamp = []
        for path in sorted(paths):
            try:
                st = os.stat(path)
            except OSError:
                continue
            stamp.append((str(path), st.st_mtime_ns, st.st_size))
        return tuple(stamp)

    async def watch(self, interval: float = WATCH_INTERVAL_S) -> None:
        """Reload whenever a mapping file (or gateway.toml) changes; runs until cancelled."""
        while True:
            await asyncio.sleep(interval)
            stamp = await asyncio.to_thread(self._fingerprint)
            if stamp != self._stamp:
                log.info("mapping files changed; reloading")
                await self.reload_async()
