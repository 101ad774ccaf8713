"""The cross-field checks of `gateway.toml`, each problem at the key to fix."""

from __future__ import annotations

import ipaddress
import re
from typing import Any
from urllib.parse import urlsplit

from gateway.config.addresses import (
    FAKE_SCHEME,
    braze_base_url,
    fake_didomi_address,
    is_postgresql,
)
from gateway.config.located import Located, format_path
from gateway.config.sections import Config, lease_floor

# What makes delivery.spool a URL rather than a path (RFC 3986's scheme, then `://`).
_URL_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")

MIN_FREE_FLOOR = 1024 * 1024

# The values /users/delete takes in `prioritization` (Braze's "Delete users" docs), and the
# pair of which at most one may be given.
DELETE_PRIORITIES = ("identified", "unidentified", "most_recently_updated")
_EXCLUSIVE_PRIORITIES = frozenset({"identified", "unidentified"})


def check_config(config: Config, located: Located, *, require_secrets: bool) -> None:
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
    backfill = config.backfill
    if not 0.0 < backfill.share <= 1.0:
        located.add(
            ("backfill", "share"),
            "backfill.share must be above 0 and at most 1 (of Braze's rate)",
        )
    for key, count in (
        (("backfill", "max_pending"), backfill.max_pending),
        (("backfill", "users_per_transaction"), backfill.users_per_transaction),
    ):
        if count < 1:
            located.add(key, f"{format_path(key)} must be at least 1")
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
            reads=("delivery",),
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


def check_fake_is_written(written: dict[str, Any], config: Config, located: Located) -> None:
    """The demo's fakes only where the file itself says so: never through a variable, so an
    unset or mistyped variable in a real deployment can never turn it into the demo."""
    for (section, key), value, fake, real in (
        (("braze", "server"), config.braze.server, "Braze", "a real Braze instance"),
        (("didomi_api", "base_url"), config.didomi_api.base_url, "Didomi", "Didomi's API"),
    ):
        if not value.strip().startswith(FAKE_SCHEME):
            continue
        table = written.get(section)
        literal = table.get(key) if isinstance(table, dict) else None
        if not isinstance(literal, str) or "${" in literal:
            located.add(
                (section, key),
                f"{section}.{key} names the demo's fake {fake} through an environment variable;"
                f' write it in the file ({key} = "fake://127.0.0.1:PORT"), or name {real}',
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
            reads=("braze", "didomi_api"),
        )
    if config.braze_webhooks is not None and not api.enabled:
        located.add(
            ("braze_webhooks",),
            "[braze_webhooks] takes Braze's changes for Didomi: set [didomi_api] enabled ="
            " true, or they would wait in the spool for ever",
            reads=("didomi_api",),
        )
    url = urlsplit(api.base_url)
    try:
        fake = fake_didomi_address(api.base_url)
    except ValueError as exc:
        located.add(("didomi_api", "base_url"), str(exc))
        fake = ("", 0)
    fake_braze = config.braze.server.strip().startswith(FAKE_SCHEME)
    if api.enabled and (fake is not None) != fake_braze:
        # Real Braze acts kept by an in-memory fake are lost at exit; a demo's made-up acts
        # written to a real Didomi are recorded as consent.
        located.add(
            ("didomi_api", "base_url"),
            "braze.server and didomi_api.base_url must be both the demo's fakes (fake://) or"
            " both real services while [didomi_api] is enabled: one fake beside one real"
            " service would lose real consent changes or record made-up ones",
            reads=("braze",),
        )
    if fake is None and (url.scheme not in ("http", "https") or not url.hostname):
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
