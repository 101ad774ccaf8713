"""`gateway.toml`'s shape: a frozen Struct per section, and the values they imply."""

from __future__ import annotations

from typing import ClassVar, Literal

import msgspec

from gateway.config.addresses import url_password


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
    # Processes taking webhooks on `port` (SO_REUSEPORT); all but one only store them.
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
    users_per_transaction: int = 2000  # limits: config/checks.py, each at its key's line


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
        url_password(config.delivery.spool),
    ]
    return [value for value in values if value]
