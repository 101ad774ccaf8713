"""`gateway.toml`: its shape as frozen msgspec Structs, and the loader that fills and checks it."""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal, get_args
from urllib.parse import urlsplit

import msgspec

from gateway.config.located import (
    Located,
    convert,
    format_path,
    interpolate,
    read_toml,
)
from gateway.errors import ConfigError


class Strict(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Base of every config shape: typos are errors, values never change after load."""

    # Fields whose values a repr masks: a config printed in a traceback must not leak them.
    secret_fields: ClassVar[frozenset[str]] = frozenset()

    def __repr__(self) -> str:
        parts = []
        for name in self.__struct_fields__:
            value = getattr(self, name)
            shown = "[redacted]" if name in self.secret_fields and value else repr(value)
            parts.append(f"{name}={shown}")
        return f"{type(self).__name__}({', '.join(parts)})"


class ServerConfig(Strict, frozen=True):
    host: str = "127.0.0.1"
    port: int = 8080
    max_body_bytes: int = 1_048_576
    allow_from: list[str] = []
    shutdown_timeout_s: float = 10.0
    # Issue 27: processes taking webhooks on `port` (SO_REUSEPORT); all but one only store them.
    intake_processes: int = 1


class AuthConfig(Strict, frozen=True):
    secret_fields = frozenset({"client_secret", "tokens"})

    mode: Literal["oauth2", "bearer", "none"] = "oauth2"
    client_id: str = "didomi"
    client_secret: str = ""
    token_ttl_s: int = 3600
    tokens: list[str] = []


class BrazeConfig(Strict, frozen=True):
    secret_fields = frozenset({"api_key"})

    server: str = ""
    api_key: str = ""
    update_existing_only: bool = True
    batch_size: int = 75
    flush_interval_ms: int = 100
    max_in_flight: int = 8
    timeout_s: float = 10.0
    requests_per_second: float = 1000.0
    # Which profile /users/delete erases when an email address names several (Braze's
    # `prioritization`, in order); Braze's own example order is the default.
    delete_prioritization: list[str] = msgspec.field(
        default_factory=lambda: ["identified", "most_recently_updated"]
    )
    # `gateway reconcile` reads through /users/export/ids, which Braze limits per minute: 250
    # for workspaces onboarded on or after 2024-08-22, 2,500 before. Reconcile uses this much.
    export_requests_per_minute: int = 250


# The values /users/delete takes in `prioritization` (Braze's "Delete users" docs), and the
# pair of which at most one may be given.
DELETE_PRIORITIES = ("identified", "unidentified", "most_recently_updated")
_EXCLUSIVE_PRIORITIES = frozenset({"identified", "unidentified"})


class DeliveryConfig(Strict, frozen=True):
    spool: str = "var/gateway.db"
    retry_initial_ms: int = 250
    retry_max_ms: int = 60_000
    give_up_after_s: float = 86_400.0
    dedupe_window_s: float = 7 * 86_400.0
    max_pending: int = 1_000_000
    min_free_bytes: int = 64 * 1024 * 1024
    # With a PostgreSQL spool: this replica's name (empty: host and pid) and how long a
    # replica's hold on its partitions lasts without a heartbeat (a kill -9's takeover time;
    # at least 1.5 x (the longest request timeout + 1 s), see `lease_floor`; 0: that, or 20 s
    # if more, see `lease_of`).
    replica: str = ""
    lease_s: float = 0.0


class DidomiConfig(Strict, frozen=True):
    regulations: list[str] = msgspec.field(default_factory=lambda: ["gdpr"])
    on_user_deleted: Literal["ignore", "unsubscribe", "delete"] = "ignore"
    max_clock_skew_s: float = 300.0  # how far past its arrival a choice may be dated


class MappingsConfig(Strict, frozen=True):
    dir: str = "mappings"
    watch: bool = True


class DidomiApiConfig(Strict, frozen=True):
    """Didomi's Consents API, where the reverse path writes the choices people make in Braze."""

    secret_fields = frozenset({"key", "secret"})

    enabled: bool = False
    base_url: str = "https://api.didomi.io/v1"
    organization_id: str = ""
    key: str = ""
    secret: str = ""
    regulation: str = "gdpr"
    disable_integrations: bool = False  # sends $disable_integrations=true with every event
    timeout_s: float = 10.0
    # Didomi does not limit /consents/* (developers.didomi.io, "Rate limiting"), and each
    # Braze report costs two calls (read first, then write): 10 made reports queue for seconds.
    requests_per_second: float = 100.0


class BrazeWebhooksConfig(Strict, frozen=True):
    """What Braze must present to the reverse routes; without this table they answer 404."""

    secret_fields = frozenset({"tokens"})

    tokens: list[str] = []
    # How long a choice the gateway wrote to one side is recognised when it comes back.
    echo_window_s: float = 3600.0
    # Braze's reports waiting for Didomi, at most: held while Didomi refuses the key, they
    # must never fill the spool that Didomi's own webhooks need (those would then get 503s).
    max_pending: int = 100_000


class RetentionConfig(Strict, frozen=True):
    """How long the spool keeps what it recorded, and the key that hashes persons in it."""

    secret_fields = frozenset({"person_key"})

    person_key: str = ""  # empty: a random key of the spool's own (hashes differ per spool)
    audit_days: float = 400.0
    bodies_days: float = 30.0  # dead letters
    applied_days: float = 400.0  # stale-check rows; older choices are refused for everyone
    interval_s: float = 3600.0  # between two pruning passes
    batch: int = 500  # rows per transaction
    pause_s: float = 0.05  # between two batches, so intake never waits long


class CheckConfig(Strict, frozen=True):
    """What `gateway check --online` demands of the credentials beyond the running gateway's."""

    # true: `gateway reconcile` is used, so a Braze key without users.export.ids or
    # subscription.status.get is an error, not a warning.
    reconcile: bool = False


# -- backfill (issue 24): `gateway backfill`'s lane in the spool ------------------------------
class BackfillConfig(Strict, frozen=True):
    """How the backfilled users share Braze with live webhooks (`gateway backfill`)."""

    # Of braze.requests_per_second (in objects: that times braze.batch_size), at most; live
    # webhooks always go first and take what they need.
    share: float = 0.5
    # Backfilled users waiting in the spool, at most: the command waits for delivery beyond
    # it, so live webhooks keep their room (delivery.max_pending counts both).
    max_pending: int = 100_000
    users_per_transaction: int = 2000

    def __post_init__(self) -> None:
        if not 0.0 < self.share <= 1.0:
            raise ValueError("backfill.share must be above 0 and at most 1 (of Braze's rate)")
        if self.max_pending < 1 or self.users_per_transaction < 1:
            raise ValueError("backfill.max_pending and users_per_transaction must be at least 1")


class Config(Strict, frozen=True):
    server: ServerConfig = ServerConfig()
    auth: AuthConfig = AuthConfig()
    braze: BrazeConfig = BrazeConfig()
    delivery: DeliveryConfig = DeliveryConfig()
    didomi: DidomiConfig = DidomiConfig()
    mappings: MappingsConfig = MappingsConfig()
    didomi_api: DidomiApiConfig = DidomiApiConfig()
    braze_webhooks: BrazeWebhooksConfig | None = None
    retention: RetentionConfig = RetentionConfig()
    check: CheckConfig = CheckConfig()
    backfill: BackfillConfig = BackfillConfig()


MIN_AUTO_LEASE_S = 20.0


def request_bound_s(config: Config) -> float:
    """The longest a delivery request may take, plus a second: Braze's, or Didomi's if used
    (twice its timeout: a write may need a login first)."""
    api = config.didomi_api
    return max(config.braze.timeout_s, 2 * api.timeout_s if api.enabled else 0.0) + 1.0


def lease_floor(config: Config) -> float:
    """The shortest `delivery.lease_s` that lets a replica stop starting requests in time
    (`request_bound_s` before its lease ends) with two heartbeats (each `lease_s / 6`) to spare."""
    return round(request_bound_s(config) * 1.5, 3)


def lease_of(config: Config) -> float:
    """The lease replicas hold their partitions by: `delivery.lease_s`, or when 0 the floor
    these timeouts need, and at least 20 s."""
    return config.delivery.lease_s or max(MIN_AUTO_LEASE_S, lease_floor(config))


def secrets_of(config: Config) -> list[str]:
    """Every secret `config` holds, non-empty, for the log redaction to mask."""
    values = [
        config.braze.api_key,
        config.auth.client_secret,
        *config.auth.tokens,
        # The key only names the Didomi credential, but with the secret it is the login.
        config.didomi_api.key,
        config.didomi_api.secret,
        *(config.braze_webhooks.tokens if config.braze_webhooks is not None else ()),
        config.retention.person_key,
        _url_password(config.delivery.spool),
    ]
    return [value for value in values if value]


PG_SCHEMES = ("postgresql://", "postgres://")


def is_postgresql(spool: str) -> bool:
    """Whether `delivery.spool` names a PostgreSQL database rather than a SQLite file."""
    return spool.startswith(PG_SCHEMES)


def _url_password(url: str) -> str:
    """The password a spool URL carries, if any (PGPASSWORD is the place for it)."""
    if not is_postgresql(url):
        return ""
    return urlsplit(url).password or ""


# ---------------------------------------------------------------------------
# Loading: TOML text -> environment interpolation -> located validation.

# What makes delivery.spool a URL rather than a path (RFC 3986's scheme, then `://`).
_URL_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")

# Braze REST instances whose host does not follow `rest.<name>.braze.com`.
_INSTANCE_HOSTS = {
    **{f"US-0{n}": f"rest.iad-0{n}.braze.com" for n in range(1, 9)},
    "US-10": "rest.us-10.braze.com",
    "EU-01": "rest.fra-01.braze.eu",
    "EU-02": "rest.fra-02.braze.eu",
    **{name: f"rest.{name.lower()}.braze.com" for name in ("AU-01", "ID-01", "JP-01", "KR-01")},
}
_INSTANCE_NAME = re.compile(r"^[A-Za-z]{2}-\d{2}$")
_HOST = re.compile(
    r"^(?:[A-Za-z0-9.-]+\.[A-Za-z]{2,}|\d{1,3}(?:\.\d{1,3}){3}|localhost|\[[0-9A-Fa-f:]+\])(?::\d+)?$"
)

MIN_FREE_FLOOR = 1024 * 1024


FAKE_SCHEME = "fake://"
_LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})


def fake_braze_address(server: str) -> tuple[str, int] | None:
    """The loopback host and port of `braze.server = "fake://HOST:PORT"` (the demo's in-process
    fake Braze), None for a real server; ValueError for a fake that is not on loopback."""
    server = server.strip()
    if not server.startswith(FAKE_SCHEME):
        return None
    url = urlsplit(server)
    try:
        port = url.port
    except ValueError:
        port = None
    host = url.hostname
    if host not in _LOOPBACK or not port or url.path.strip("/") or url.query:
        raise ValueError(
            f"{server!r}: the fake Braze is a demo served by this process on loopback; write"
            " fake://127.0.0.1:PORT (a port from 1 to 65535)"
        )
    assert host is not None  # in _LOOPBACK
    return host, port


def braze_base_url(server: str) -> str:
    """Turn `braze.server` (instance name, host or URL) into a base URL; ValueError if none fits."""
    server = server.strip()
    fake = fake_braze_address(server)
    if fake is not None:
        loopback, port = fake
        return f"http://[{loopback}]:{port}" if ":" in loopback else f"http://{loopback}:{port}"
    if server.startswith(("http://", "https://")):
        return server.rstrip("/")
    if _INSTANCE_NAME.match(server):
        host = _INSTANCE_HOSTS.get(server.upper())
        if host is None:
            known = ", ".join(sorted(_INSTANCE_HOSTS))
            raise ValueError(f"unknown Braze instance {server!r}; known instances: {known}")
        return f"https://{host}"
    if _HOST.match(server):
        return f"https://{server}"
    raise ValueError(f"{server!r} is not a Braze instance name (e.g. US-01), a host or a URL")


def load_config(
    path: str | Path, env: Mapping[str, str] | None = None, *, require_secrets: bool = True
) -> Config:
    """Load and check `gateway.toml`; raise ConfigError listing every problem found.

    With `require_secrets=False` (render, test), missing variables and secrets are not errors.
    """
    path = Path(path)
    env = os.environ if env is None else env
    located = Located(str(path))
    raw = read_toml(path, located)
    if raw is None:
        raise ConfigError(located.problems)
    written = raw
    raw = interpolate(raw, env, located, strict=require_secrets)
    sections: dict[str, Any] = {}
    failed: set[str | int] = set()
    known = {f.name: _table_type(f.type) for f in msgspec.structs.fields(Config)}
    for key, value in raw.items():
        if key not in known:
            hint = difflib.get_close_matches(key, known, n=1)
            did_you_mean = f" (did you mean [{hint[0]}]?)" if hint else ""
            located.add((key,), f"unknown section [{key}]{did_you_mean}")
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
    _check(config, checks, require_secrets=require_secrets)
    _check_fake_is_written(written, config, checks)
    seen = set(located.paths)
    for problem, where in zip(checks.problems, checks.paths, strict=True):
        if where[0] not in failed and where not in seen:
            located.problems.append(problem)
    if located.problems:
        raise ConfigError(sorted(located.problems, key=lambda p: p.line or 0))
    return _resolve_paths(config, path.parent.resolve())


def _table_type(annotation: Any) -> Any:
    """The Struct a Config field holds: an optional table (`X | None`) converts as X."""
    members = [member for member in get_args(annotation) if member is not type(None)]
    return members[0] if members else annotation


def _check(config: Config, located: Located, *, require_secrets: bool) -> None:
    """Cross-field rules that a type alone cannot say."""
    braze, auth, server, delivery = config.braze, config.auth, config.server, config.delivery
    if not braze.server:
        located.add(
            ("braze", "server"),
            "braze.server is required: an instance name (US-01), a host or a URL",
        )
    else:
        try:
            braze_base_url(braze.server)
        except ValueError as exc:
            located.add(("braze", "server"), str(exc))
    if require_secrets and not braze.api_key:
        located.add(("braze", "api_key"), "braze.api_key is required (use ${BRAZE_API_KEY})")
    problem = _prioritization_problem(braze.delete_prioritization)
    if problem is not None:
        located.add(("braze", "delete_prioritization"), f"braze.delete_prioritization {problem}")
    if not 1 <= braze.batch_size <= 75:
        located.add(
            ("braze", "batch_size"),
            "braze.batch_size must be between 1 and 75 (Braze's limit per request)",
        )
    for key, value in (
        (("braze", "max_in_flight"), braze.max_in_flight),
        (("braze", "flush_interval_ms"), braze.flush_interval_ms),
        (("server", "max_body_bytes"), server.max_body_bytes),
        (("server", "intake_processes"), server.intake_processes),
        (("auth", "token_ttl_s"), auth.token_ttl_s),
        (("delivery", "retry_initial_ms"), delivery.retry_initial_ms),
        (("delivery", "max_pending"), delivery.max_pending),
    ):
        if value <= 0:
            located.add(key, f"{format_path(key)} must be positive")
    for key, fvalue in (
        (("braze", "timeout_s"), braze.timeout_s),
        (("braze", "requests_per_second"), braze.requests_per_second),
        (("delivery", "give_up_after_s"), delivery.give_up_after_s),
    ):
        if fvalue <= 0:
            located.add(key, f"{format_path(key)} must be positive")
    scheme = _URL_SCHEME.match(delivery.spool)
    if scheme is not None and not is_postgresql(delivery.spool):
        # Only the scheme is echoed: the rest of a URL may hold a password.
        located.add(
            ("delivery", "spool"),
            f"delivery.spool: {scheme.group(0)} is not a spool the gateway opens: write a"
            " PostgreSQL URL as postgresql://user@host/db, a SQLite spool as a file path",
        )
    if braze.export_requests_per_minute <= 0:
        located.add(
            ("braze", "export_requests_per_minute"),
            "braze.export_requests_per_minute must be positive (Braze's: 250, or 2,500 for"
            " workspaces onboarded before 2024-08-22)",
        )
    if delivery.min_free_bytes < MIN_FREE_FLOOR:
        located.add(
            ("delivery", "min_free_bytes"),
            f"delivery.min_free_bytes must be at least {MIN_FREE_FLOOR} (1 MiB): acknowledging"
            " deliveries needs that room on the spool's disk once intake has filled it",
        )
    if delivery.retry_max_ms < delivery.retry_initial_ms:
        located.add(
            ("delivery", "retry_max_ms"), "delivery.retry_max_ms must not be below retry_initial_ms"
        )
    if not 0 < server.port < 65536:
        located.add(("server", "port"), "server.port must be between 1 and 65535")
    for i, network in enumerate(server.allow_from):
        try:
            ipaddress.ip_network(network, strict=False)
        except ValueError:
            located.add(("server", "allow_from", i), f"{network!r} is not an IP address or network")
    _check_reverse_path(config, located, require_secrets=require_secrets)
    retention = config.retention
    for key, fvalue in (
        (("retention", "audit_days"), retention.audit_days),
        (("retention", "bodies_days"), retention.bodies_days),
        (("retention", "applied_days"), retention.applied_days),
        (("retention", "interval_s"), retention.interval_s),
        (("retention", "batch"), float(retention.batch)),
    ):
        if fvalue <= 0:
            located.add(key, f"{format_path(key)} must be positive")
    # Pruned applied times leave a floor for everyone: whatever may still come late (a
    # retry, a replayed dead letter, a duplicate inside the window) must be younger than it.
    late = max(retention.bodies_days * 86_400, delivery.give_up_after_s, delivery.dedupe_window_s)
    if 0 < retention.applied_days * 86_400 < late:
        located.add(
            ("retention", "applied_days"),
            "retention.applied_days must cover retention.bodies_days, delivery.give_up_after_s"
            f" and delivery.dedupe_window_s ({late / 86_400:g} days): a late choice older than"
            " the pruned times would be refused",
        )
    if config.didomi.max_clock_skew_s < 0:
        located.add(("didomi", "max_clock_skew_s"), "didomi.max_clock_skew_s must not be negative")
    if not config.didomi.regulations:
        located.add(("didomi", "regulations"), "didomi.regulations must name a regulation")
    if require_secrets:
        if auth.mode == "oauth2" and not auth.client_secret:
            located.add(
                ("auth", "client_secret"), 'auth.client_secret is required for mode "oauth2"'
            )
        if auth.mode == "bearer" and not any(auth.tokens):
            located.add(("auth", "tokens"), 'auth.tokens must list a token for mode "bearer"')
        api = config.didomi_api
        if api.enabled:
            for name in ("organization_id", "key", "secret"):
                if not getattr(api, name):
                    located.add(("didomi_api", name), f"didomi_api.{name} is required when enabled")


def _check_fake_is_written(written: dict[str, Any], config: Config, located: Located) -> None:
    """The demo's fake Braze only where the file itself says so: never through a variable, so
    an unset or mistyped variable in a real deployment can never turn it into the demo."""
    if not config.braze.server.strip().startswith(FAKE_SCHEME):
        return
    braze = written.get("braze")
    literal = braze.get("server") if isinstance(braze, dict) else None
    if not isinstance(literal, str) or "${" in literal:
        located.add(
            ("braze", "server"),
            "braze.server names the demo's fake Braze through an environment variable; write"
            ' it in the file (server = "fake://127.0.0.1:9090"), or name a real Braze instance',
        )


def _check_reverse_path(config: Config, located: Located, *, require_secrets: bool) -> None:
    """[didomi_api] and [braze_webhooks]: the Braze-to-Didomi direction."""
    api = config.didomi_api
    delivery = config.delivery
    if delivery.lease_s < 0:
        located.add(("delivery", "lease_s"), "delivery.lease_s must be positive (0: automatic)")
    elif is_postgresql(delivery.spool) and 0 < delivery.lease_s < lease_floor(config):
        located.add(
            ("delivery", "lease_s"),
            f"delivery.lease_s must be at least {lease_floor(config):g} s with these timeouts: a"
            " replica starts no request that could outlive its lease, and needs room for two"
            " missed heartbeats besides; raise lease_s or lower braze.timeout_s",
        )
    if config.braze_webhooks is not None and not api.enabled:
        located.add(
            ("braze_webhooks",),
            "[braze_webhooks] takes Braze's changes for Didomi: set [didomi_api] enabled ="
            " true, or they would wait in the spool for ever",
        )
    url = urlsplit(api.base_url)
    if url.scheme not in ("http", "https") or not url.hostname:
        located.add(
            ("didomi_api", "base_url"),
            f"didomi_api.base_url must be an http(s) URL, e.g. https://api.didomi.io/v1,"
            f" not {api.base_url!r}",
        )
    for key, value in (
        (("didomi_api", "timeout_s"), api.timeout_s),
        (("didomi_api", "requests_per_second"), api.requests_per_second),
    ):
        if value <= 0:
            located.add(key, f"{format_path(key)} must be positive")
    hooks = config.braze_webhooks
    if hooks is None:
        return
    if hooks.max_pending <= 0:
        located.add(
            ("braze_webhooks", "max_pending"), "braze_webhooks.max_pending must be positive"
        )
    if hooks.echo_window_s < 0:
        located.add(
            ("braze_webhooks", "echo_window_s"), "braze_webhooks.echo_window_s must not be negative"
        )
    if require_secrets and not any(hooks.tokens):
        located.add(
            ("braze_webhooks", "tokens"),
            "braze_webhooks.tokens must list a token (use ${BRAZE_WEBHOOK_TOKEN}),"
            " or leave the table out to turn the Braze routes off",
        )


def _resolve_paths(config: Config, base: Path) -> Config:
    """Relative paths in the config are relative to the config file's folder, not the cwd."""

    def resolve(p: str) -> str:
        if is_postgresql(p):
            return p  # a database URL, not a path
        return str(base / p) if not Path(p).is_absolute() else p

    return msgspec.structs.replace(
        config,
        delivery=msgspec.structs.replace(config.delivery, spool=resolve(config.delivery.spool)),
        mappings=msgspec.structs.replace(config.mappings, dir=resolve(config.mappings.dir)),
    )


def _prioritization_problem(order: list[str]) -> str | None:
    """What is wrong with a /users/delete `prioritization`, or None."""
    if not order:
        return "must name at least one of " + ", ".join(DELETE_PRIORITIES)
    for value in order:
        if value not in DELETE_PRIORITIES:
            allowed = ", ".join(DELETE_PRIORITIES)
            return f"has {value!r}; Braze takes {allowed}"
    if len(set(order)) != len(order):
        return "names a value twice"
    if set(order) >= _EXCLUSIVE_PRIORITIES:
        return "may hold identified or unidentified, not both (Braze's rule)"
    return None
