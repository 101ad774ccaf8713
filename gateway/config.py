"""`gateway.toml`: its shape as frozen msgspec Structs, and the loader that fills it."""

from __future__ import annotations

from typing import Literal

import msgspec


class Strict(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Base of every config shape: typos are errors, values never change after load."""


class ServerConfig(Strict):
    host: str = "127.0.0.1"
    port: int = 8080
    max_body_bytes: int = 1_048_576
    allow_from: list[str] = []
    shutdown_timeout_s: float = 10.0


class AuthConfig(Strict):
    mode: Literal["oauth2", "bearer", "none"] = "oauth2"
    client_id: str = "didomi"
    client_secret: str = ""
    token_ttl_s: int = 3600
    tokens: list[str] = []


class BrazeConfig(Strict):
    server: str = ""
    api_key: str = ""
    update_existing_only: bool = True
    batch_size: int = 75
    flush_interval_ms: int = 100
    max_in_flight: int = 8
    timeout_s: float = 10.0
    requests_per_second: float = 1000.0


class DeliveryConfig(Strict):
    spool: str = "var/gateway.db"
    retry_initial_ms: int = 250
    retry_max_ms: int = 60_000
    give_up_after_s: float = 86_400.0
    dedupe_window_s: float = 7 * 86_400.0
    max_pending: int = 1_000_000


class DidomiConfig(Strict):
    regulations: list[str] = msgspec.field(default_factory=lambda: ["gdpr"])
    on_user_deleted: Literal["ignore", "unsubscribe", "delete"] = "ignore"


class MappingsConfig(Strict):
    dir: str = "mappings"
    watch: bool = True


class DidomiApiConfig(Strict):
    enabled: bool = False
    base_url: str = "https://api.didomi.io/v1"
    organization_id: str = ""
    key: str = ""
    secret: str = ""
    regulation: str = "gdpr"


class Config(Strict):
    server: ServerConfig = ServerConfig()
    auth: AuthConfig = AuthConfig()
    braze: BrazeConfig = BrazeConfig()
    delivery: DeliveryConfig = DeliveryConfig()
    didomi: DidomiConfig = DidomiConfig()
    mappings: MappingsConfig = MappingsConfig()
    didomi_api: DidomiApiConfig = DidomiApiConfig()
