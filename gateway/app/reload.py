"""Live rules: gateway.toml and the mapping rule set, swapped atomically on SIGHUP or file change.

A reload reads and checks everything off the hot path; only a fully good result replaces the
running one, in a single assignment, so an event is always mapped by one rule set, never a mix.
A bad edit is logged as `file:line: message`, counted, and the last good rules keep running.

Of gateway.toml, a reload applies the keys in `LIVE_KEYS` (listeners pass them on to the Braze
client and the dispatcher). Every other key keeps its running value, and each one that changed
is logged by its full name as needing a restart.

Reloads run one at a time. SIGHUP and the file watcher only ask for one: a request made while a
reload runs is served by exactly one more reload after it, which reads the files afresh, so the
newest files always win whatever the order in which two readers would have finished.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

from gateway.config.settings import Config, load_config, secrets_of
from gateway.errors import ConfigError
from gateway.logs import register_secret
from gateway.rules.mappings import RuleSet, load_rules, options_of

if TYPE_CHECKING:
    from gateway.metrics import Metrics

log = logging.getLogger("gateway.reload")

WATCH_INTERVAL_S = 1.0

# What a reload applies to the running gateway. Listing what is live, not what is not, means a
# key added later is reported as needing a restart until someone makes it live, never ignored.
LIVE_KEYS = frozenset(
    {
        # The Braze client takes these from the next request on.
        "braze.server",
        "braze.api_key",
        "braze.timeout_s",
        "braze.requests_per_second",
        "braze.delete_prioritization",
        # The dispatcher reads these for each batch and each retry.
        "braze.update_existing_only",
        "braze.batch_size",
        "braze.flush_interval_ms",
        "delivery.retry_initial_ms",
        "delivery.retry_max_ms",
        "delivery.give_up_after_s",
        # These shape the rule set, which is rebuilt on every reload.
        "didomi.regulations",
        "didomi.on_user_deleted",
        "didomi.max_clock_skew_s",
        "mappings.dir",
    }
)

# Keys the running gateway never reads: the command named reads them from the file at its next
# run, so a reload that finds them changed has nothing to restart.
COMMAND_KEYS = {
    "braze.export_requests_per_minute": "gateway reconcile",
    "check.reconcile": "gateway check --online",
    "backfill.max_pending": "gateway backfill",
    "backfill.users_per_transaction": "gateway backfill",
}

Stamp = tuple[tuple[str, int, int], ...]


def changed_keys(old: Config, new: Config) -> list[str]:
    """The full names (`braze.server`) of the keys whose values differ, in declaration order."""
    keys = []
    for section in msgspec.structs.fields(Config):
        before, after = getattr(old, section.name), getattr(new, section.name)
        if before is None or after is None:  # an optional table added or removed
            if before != after:
                keys.append(f"[{section.name}]")
            continue
        for field in msgspec.structs.fields(before):
            if getattr(before, field.name) != getattr(after, field.name):
                keys.append(f"{section.name}.{field.name}")
    return keys


def effective(running: Config, read: Config) -> Config:
    """What the gateway runs after a reload: live keys from the file, the rest as they were."""
    sections: dict[str, Any] = {}
    for section in msgspec.structs.fields(Config):
        before, after = getattr(running, section.name), getattr(read, section.name)
        if before is None or after is None:  # adding or removing a table needs a restart
            sections[section.name] = before
            continue
        live = {
            field.name: getattr(after, field.name)
            for field in msgspec.structs.fields(before)
            if f"{section.name}.{field.name}" in LIVE_KEYS
        }
        sections[section.name] = msgspec.structs.replace(before, **live)
    return Config(**sections)


class LiveRules:
    """Holds the running config and rule set; a reload replaces both or neither."""

    def __init__(
        self, config: Config, rules: RuleSet, metrics: Metrics, config_path: str | Path | None
    ) -> None:
        self.config = config
        self.rules = rules
        self.metrics = metrics
        self.config_path = Path(config_path) if config_path is not None else None
        # Called on the event loop with the config now running, after each successful reload.
        self.listeners: list[Callable[[Config], None]] = []
        self._stamp = self._fingerprint()
        self._next: asyncio.Future[bool] | None = None  # the reload not yet started, if asked
        self._runner: asyncio.Task[None] | None = None

    @classmethod
    def load(cls, config: Config, metrics: Metrics, config_path: str | Path | None) -> LiveRules:
        """The rules of `config`'s mapping folder; ConfigError if they are not good."""
        return cls(
            config, load_rules(config.mappings.dir, options_of(config)), metrics, config_path
        )

    def current(self) -> RuleSet:
        """The rule set to map with now."""
        return self.rules

    def request_reload(self) -> asyncio.Future[bool]:
        """Ask for a reload that reads the files from now on; its future says if it took."""
        if self._next is None:
            self._next = asyncio.get_running_loop().create_future()
        if self._runner is None or self._runner.done():
            self._runner = asyncio.create_task(self._run(), name="gateway-reload")
        return self._next

    async def reload_async(self) -> bool:
        """Reload (after the one running, if any) and say whether the files read were good."""
        # Shielded: a caller that stops waiting must not cancel a reload others wait for too.
        return await asyncio.shield(self.request_reload())

    async def close(self) -> None:
        """Stop reloading: a reload under way is abandoned and the running config stays."""
        if self._runner is not None:
            self._runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._runner

    async def _run(self) -> None:
        while self._next is not None:
            waiting, self._next = self._next, None
            try:
                outcome = await self._reload_once()
            except BaseException:
                # Cancelled (shutdown): nobody may wait forever for this reload or the next.
                waiting.cancel()
                if self._next is not None:
                    self._next.cancel()
                    self._next = None
                raise
            if not waiting.done():
                waiting.set_result(outcome)

    async def _reload_once(self) -> bool:
        # The stamp is taken before reading, so an edit made while we read triggers another.
        stamp = await asyncio.to_thread(self._fingerprint)
        try:
            read, rules = await asyncio.to_thread(self._read)
        except ConfigError as exc:
            for problem in exc.problems:
                log.error("reload refused: %s", problem, extra={"outcome": "error"})
            log.error("the last good rules keep running (%d rules)", len(self.rules.rules))
            self.metrics.config_reloads.labels("error").inc()
            self._stamp = stamp  # do not retry the same bad files every second
            return False
        except Exception:
            log.exception("reload failed; the running config and rules stay")
            self.metrics.config_reloads.labels("error").inc()
            self._stamp = stamp
            return False
        self._apply(read, rules)
        self._stamp = stamp
        self.metrics.config_reloads.labels("success").inc()
        log.info("reloaded %d rules from %d file(s)", len(rules.rules), len(rules.files))
        return True

    def _read(self) -> tuple[Config, RuleSet]:
        config = load_config(self.config_path) if self.config_path else self.config
        return config, load_rules(config.mappings.dir, options_of(config))

    def _apply(self, read: Config, rules: RuleSet) -> None:
        for secret in secrets_of(read):
            register_secret(secret)
        running = effective(self.config, read)
        for key in changed_keys(self.config, read):
            if key in LIVE_KEYS:
                log.info("%s changed and applies now", key, extra={"setting": key})
            elif key in COMMAND_KEYS:
                log.info(
                    "%s changed; only `%s` reads it, at its next run: nothing to restart",
                    key,
                    COMMAND_KEYS[key],
                    extra={"setting": key},
                )
            else:
                # Never the values: this may be auth.client_secret.
                log.warning(
                    "%s changed and needs a restart; the running gateway keeps its old value",
                    key,
                    extra={"setting": key},
                )
        # One assignment each: a batch that already took `self.rules` keeps its rule set.
        self.rules = rules
        self.config = running
        for listener in self.listeners:
            try:
                listener(running)
            except Exception:  # the others must still follow, and the rules are already in
                log.exception("a part of the gateway could not take the reloaded config")

    def _fingerprint(self) -> Stamp:
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
