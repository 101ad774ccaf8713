"""Shared fixtures: a gateway.toml with its mappings written to tmp_path, its secrets, a token.

`make_config(tmp_path, **sections)` writes `tmp_path / "gateway.toml"` (each keyword is a section
whose keys replace the defaults below; a key or section given as None is left out), copies
`mappings/email.toml` and the events it names, and returns the loaded Config. The secrets come
from `secrets_env`, the environment a `gateway` subprocess needs too.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway.config.settings import Config, load_config
from gateway.http.auth import TokenIssuer
from gateway.testing import postgres as testing_postgres
from gateway.testing.braze import FakeBraze, FakeDidomi
from gateway.testing.postgres import PostgresServer

ROOT = Path(__file__).resolve().parent.parent
CONFIG_FILE = "gateway.toml"
CLIENT_ID = "didomi"
CLIENT_SECRET = "test-client-secret-4f9a"
BRAZE_API_KEY = "test-braze-key-7c21"
SECRETS = {"DIDOMI_CLIENT_SECRET": CLIENT_SECRET, "BRAZE_API_KEY": BRAZE_API_KEY}
# The reverse path's Didomi API credentials, as FakeDidomi accepts them.
DIDOMI_API_KEY = "test-didomi-key-5e0b"
DIDOMI_API_SECRET = "test-didomi-secret-91d3"
DIDOMI_ORG = "acme"

# Braze at a loopback port nothing listens on: nothing is ever delivered, so what a test
# stores stays in the spool. Tests that need Braze pass braze={"server": fake.url}.
DEFAULTS: dict[str, dict[str, Any]] = {
    "server": {"host": "127.0.0.1", "port": 8080},
    "auth": {
        "mode": "oauth2",
        "client_id": CLIENT_ID,
        "client_secret": "${DIDOMI_CLIENT_SECRET}",
    },
    "braze": {"server": "http://127.0.0.1:1", "api_key": "${BRAZE_API_KEY}"},
    "delivery": {"spool": "var/gateway.db"},
    "mappings": {"dir": "mappings", "watch": False},
}

MakeConfig = Callable[..., Config]


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"make_config cannot write {value!r} to TOML")


def write_config(directory: Path, **sections: dict[str, Any] | None) -> Path:
    """Write gateway.toml (defaults plus `sections`) and the mappings folder; return its path."""
    merged: dict[str, dict[str, Any]] = {name: dict(keys) for name, keys in DEFAULTS.items()}
    for name, keys in sections.items():
        if keys is None:
            merged.pop(name, None)
            continue
        merged.setdefault(name, {}).update(keys)
    lines: list[str] = []
    for name, keys in merged.items():
        lines.append(f"[{name}]")
        lines.extend(f"{key} = {_toml_value(v)}" for key, v in keys.items() if v is not None)
        lines.append("")
    path = directory / CONFIG_FILE
    path.write_text("\n".join(lines), encoding="utf-8")
    mappings = directory / "mappings"
    mappings.mkdir(exist_ok=True)
    shutil.copy(ROOT / "mappings" / "email.toml", mappings / "email.toml")
    # email.toml's [[test]] tables name ../tests/events/*.json; keep those paths working.
    shutil.copytree(ROOT / "tests" / "events", directory / "tests" / "events", dirs_exist_ok=True)
    return path


def build_config(directory: Path, **sections: dict[str, Any] | None) -> Config:
    """Write gateway.toml into `directory` and load it with the test secrets."""
    return load_config(write_config(directory, **sections), SECRETS)


class Stoppable(Protocol):
    def cleanup(self) -> None: ...


@pytest.fixture
def processes() -> Iterator[list[Stoppable]]:
    """Gateway processes a test starts; any still running at the end is killed."""
    started: list[Stoppable] = []
    yield started
    for process in started:
        process.cleanup()


@pytest.fixture
def make_config() -> MakeConfig:
    """`make_config(tmp_path, server={...}, auth={...})`: write gateway.toml, return its Config."""
    return build_config


@pytest.fixture
def config(tmp_path: Path) -> Config:
    """The default test config (oauth2 auth, spool in tmp_path/var), written to tmp_path."""
    return build_config(tmp_path)


@pytest.fixture
def secrets_env() -> dict[str, str]:
    """The environment variables the test gateway.toml reads its secrets from."""
    return dict(SECRETS)


@pytest.fixture
def token_issuer() -> TokenIssuer:
    """An issuer with the test client credentials: its tokens pass any test gateway in oauth2."""
    return TokenIssuer(CLIENT_ID, CLIENT_SECRET, 3600)


@pytest.fixture
def oauth_token(token_issuer: TokenIssuer) -> str:
    """A fresh OAuth2 access token, as POST /oauth/token would issue it."""
    return token_issuer.issue()[0]


@pytest.fixture
def auth_headers(oauth_token: str) -> dict[str, str]:
    """Headers that authenticate a webhook in oauth2 mode and declare a JSON body."""
    return {"Authorization": f"Bearer {oauth_token}", "Content-Type": "application/json"}


def consent_event(n: int, *, kind: str = "event.created", user: str | None = None) -> bytes:
    """A minimal valid Didomi webhook body whose entity id (so dedupe key) depends on `n`."""
    entity = {
        "id": f"evt-{n:08d}",
        "created_at": recent(566),
        "updated_at": recent(566),
        "status": "confirmed",
        "user": {"organization_user_id": user or f"user-{n}"},
        "organization_user_id": user or f"user-{n}",
        "consents": {"purposes": [{"id": "marketing_email", "enabled": True}]},
    }
    if kind.endswith(".updated"):
        parameters = {"old_entity": entity, "new_entity": entity, "source": {"id": f"src-{n}"}}
    else:
        parameters = {"entity": entity}
    return json.dumps({"type": kind, "parameters": parameters}).encode()


@pytest.fixture
async def fake() -> AsyncIterator[FakeBraze]:
    """A fake Braze on loopback that accepts the test API key."""
    braze = FakeBraze(api_key=BRAZE_API_KEY)
    await braze.start()
    yield braze
    await braze.stop()


@pytest.fixture
async def fake_didomi() -> AsyncIterator[FakeDidomi]:
    """A fake Didomi Consents API on loopback for DIDOMI_ORG and the test key and secret."""
    didomi = FakeDidomi(key=DIDOMI_API_KEY, secret=DIDOMI_API_SECRET, organization_id=DIDOMI_ORG)
    await didomi.start()
    yield didomi
    await didomi.stop()


@pytest.fixture
def make_event() -> Callable[..., bytes]:
    """`make_event(n, kind="event.created", user=None)`: a valid webhook body, unique per n."""
    return consent_event


# Midnight UTC two days before the test run: choices dated from it are younger than any
# retention floor (`retention.applied_days`) and never in the future (`max_clock_skew_s`),
# whenever the suite runs. One value per run, so a test's choices keep their order.
DAY = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0) - timedelta(days=2)


def recent(minutes: float = 0.0) -> str:
    """A Didomi timestamp `minutes` after `DAY`: a recent past, whatever the date today."""
    return (DAY + timedelta(minutes=minutes)).strftime("%Y-%m-%dT%H:%M:%SZ")


def choice(
    person: str,
    enabled: bool,
    at: str | None = None,
    *,
    topics: str = "",
    event_id: str | None = None,
) -> bytes:
    """An event.created body: `person` chooses `enabled` on marketing_email at time `at`
    (by default a recent one: `recent`)."""
    at = at or recent(566)
    purpose: dict[str, Any] = {"id": "marketing_email", "enabled": enabled}
    if topics:
        purpose["values"] = {"topics": {"value": topics}}
    entity = {
        "id": event_id or f"ev-{person}-{at}-{enabled}",
        "created_at": at,
        "updated_at": at,
        "status": "confirmed",
        "user": {"id": f"didomi-{person}", "organization_user_id": person},
        "consents": {"purposes": [purpose]},
    }
    return json.dumps({"type": "event.created", "parameters": {"entity": entity}}).encode()


def free_port() -> int:
    """A loopback TCP port nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Elsewhere:
    """A loopback server that answers anything with a Braze success, and counts what it gets."""

    def __init__(self) -> None:
        self.hits: list[tuple[str, str, str | None]] = []
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._answer)
        self.server = TestServer(app, host="127.0.0.1")

    async def _answer(self, request: web.Request) -> web.Response:
        self.hits.append((request.method, request.path, request.headers.get("Authorization")))
        return web.json_response({"message": "success"}, status=201)

    def url(self, path: str) -> str:
        return str(self.server.make_url(path))


@pytest.fixture
async def elsewhere() -> AsyncIterator[Elsewhere]:
    """Where a redirect points: any request reaching it means the redirect was followed."""
    target = Elsewhere()
    await target.server.start_server()
    yield target
    await target.server.close()


# ---------------------------------------------------------------------------
# PostgreSQL: one throwaway server for the session, a new database per test.


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """A real PostgreSQL server on loopback (Debian's `postgresql` package).

    Where it cannot be had, the PostgreSQL tests are skipped with the reason, except under CI
    (`CI` set, as `.ci/run` does), where that is a failure: CI must test both spools.
    """
    try:
        with testing_postgres.running() as server:
            yield server
            return
    except (RuntimeError, KeyError, ImportError) as exc:
        reason = f"no PostgreSQL server for the PostgreSQL spool tests: {exc}"
    if os.environ.get("CI"):
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture
def pg_url(postgres: PostgresServer) -> str:
    """The URL of a new, empty database on the session's PostgreSQL server."""
    return postgres.database()


@pytest.fixture(params=["sqlite", "postgresql"])
def spool_backend(request: pytest.FixtureRequest) -> str:
    """Each test that takes this runs once per spool backend."""
    return str(request.param)


@pytest.fixture
def spool_url(spool_backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """`delivery.spool` for the backend under test: a file in tmp_path, or a new database."""
    if spool_backend == "postgresql":
        return str(request.getfixturevalue("pg_url"))
    return str(tmp_path / "var" / "gateway.db")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked `sqlite_only` (they read the spool file itself) run on SQLite only."""
    kept, dropped = [], []
    for item in items:
        params = getattr(item, "callspec", None)
        backend = params.params.get("spool_backend") if params is not None else None
        if backend == "postgresql" and item.get_closest_marker("sqlite_only"):
            dropped.append(item)
        else:
            kept.append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept
