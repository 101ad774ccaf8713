"""`gateway.toml` loaded into the Structs and checked; the one import path for the config.

TOML text, then environment interpolation, then located validation (`config.located`) into the
Structs of `config.sections`, then the cross-field checks of `config.checks`.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any, get_args

import msgspec

from gateway.config.addresses import (
    braze_base_url,
    didomi_base_url,
    fake_braze_address,
    fake_didomi_address,
    is_postgresql,
)
from gateway.config.checks import check_config, check_fake_is_written
from gateway.config.located import (
    KeyPath,
    Located,
    convert,
    format_path,
    interpolate,
    read_toml,
)
from gateway.config.sections import (
    AuthConfig,
    BackfillConfig,
    BrazeConfig,
    BrazeWebhooksConfig,
    CheckConfig,
    Config,
    DeliveryConfig,
    DidomiApiConfig,
    DidomiConfig,
    MappingsConfig,
    RetentionConfig,
    ServerConfig,
    Strict,
    lease_of,
    request_bound_s,
    secrets_of,
)
from gateway.errors import ConfigError, Problem

# The config's public names, wherever they are defined: callers import them from here.
__all__ = [
    "AuthConfig",
    "BackfillConfig",
    "BrazeConfig",
    "BrazeWebhooksConfig",
    "CheckConfig",
    "Config",
    "DeliveryConfig",
    "DidomiApiConfig",
    "DidomiConfig",
    "MappingsConfig",
    "RetentionConfig",
    "ServerConfig",
    "Strict",
    "braze_base_url",
    "didomi_base_url",
    "fake_braze_address",
    "fake_didomi_address",
    "is_postgresql",
    "lease_of",
    "load_config",
    "request_bound_s",
    "secrets_of",
]


def load_config(
    path: str | Path,
    env: Mapping[str, str] | None = None,
    *,
    require_secrets: bool = True,
    needed: Collection[str] = (),
) -> Config:
    """Load and check `gateway.toml`; raise ConfigError listing every problem found.

    With `require_secrets=False` (render, test), missing variables and secrets are not errors,
    but for the keys `needed` names (`braze.api_key`): a command that uses one must not run on
    an empty value a missing variable left.
    """
    path = Path(path)
    env = os.environ if env is None else env
    located = Located(str(path))
    raw = read_toml(path, located)
    if raw is None:
        if not path.exists():  # most often a command run outside the config's folder
            (problem,) = located.problems
            to_do = (
                "give the config's path with --config PATH"
                " (`gateway render` and `gateway test` need only --mappings DIR)"
            )
            located.problems = [Problem(problem.file, f"{problem.message}; {to_do}")]
        raise ConfigError(located.problems)
    written = raw
    raw = interpolate(
        raw,
        env,
        located,
        strict=require_secrets,
        secret=_is_secret,
        needed=lambda where: format_path(where[:2]) in needed,
    )
    sections: dict[str, Any] = {}
    failed: set[str | int] = set()
    known = {f.name: _table_type(f.type) for f in msgspec.structs.fields(Config)}
    for key, value in raw.items():
        if key not in known:
            hint = difflib.get_close_matches(key, known, n=1)
            did_you_mean = f" (did you mean [{hint[0]}]?)" if hint else ""
            allowed = ", ".join(sorted(known))
            located.add((key,), f"unknown section [{key}]{did_you_mean}; allowed: {allowed}")
            continue
        section = convert(value, known[key], located, (key,))
        if section is None:
            failed.add(key)
        else:
            sections[key] = section
    # Cross-field checks run on the sections that did decode, so one run reports everything.
    config = Config(**sections)
    checks = Located(located.file)
    checks.index = located.index
    check_config(config, checks, require_secrets=require_secrets)
    check_fake_is_written(written, config, checks)
    seen = set(located.paths)
    # A rule that read a section which did not load judged its defaults, not the file.
    for problem, where, read in zip(checks.problems, checks.paths, checks.sections, strict=True):
        if not read & failed and where not in seen:
            located.problems.append(problem)
    if located.problems:
        raise ConfigError(sorted(located.problems, key=lambda p: p.line or 0))
    return _resolve_paths(config, path.parent.resolve())


def _table_type(annotation: Any) -> Any:
    """The Struct a Config field holds: an optional table (`X | None`) converts as X."""
    members = [member for member in get_args(annotation) if member is not type(None)]
    return members[0] if members else annotation


def _resolve_paths(config: Config, base: Path) -> Config:
    """Relative paths in the config are relative to the config file's folder, not the cwd."""

    def resolve(p: str) -> str:
        if is_postgresql(p):
            return p  # a database URL, not a path
        # Written plainly (`../mappings` from examples/ is `<root>/mappings`): the rule paths
        # check, trace and the audit trail print come from here. `base` has no symlinks left.
        return os.path.normpath(base / p) if not Path(p).is_absolute() else p

    return msgspec.structs.replace(
        config,
        delivery=msgspec.structs.replace(config.delivery, spool=resolve(config.delivery.spool)),
        mappings=msgspec.structs.replace(config.mappings, dir=resolve(config.mappings.dir)),
    )


def _is_secret(path: KeyPath) -> bool:
    """Whether a key path names a secret field (`api_key`, `tokens[0]`, ...) of its section."""
    if len(path) < 2 or not isinstance(path[0], str):
        return False
    field = next((f for f in msgspec.structs.fields(Config) if f.encode_name == path[0]), None)
    if field is None:
        return False
    section = field.type
    for member in get_args(section) or (section,):  # `X | None` for optional sections
        if isinstance(member, type) and path[1] in getattr(member, "secret_fields", ()):
            return True
    return False
