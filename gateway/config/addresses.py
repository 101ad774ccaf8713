"""What `braze.server` (instance, host, URL, demo fake://), `didomi_api.base_url` and
`delivery.spool` point at."""

from __future__ import annotations

import re
from urllib.parse import urlsplit

PG_SCHEMES = ("postgresql://", "postgres://")


def is_postgresql(spool: str) -> bool:
    """Whether `delivery.spool` names a PostgreSQL database rather than a SQLite file."""
    return spool.startswith(PG_SCHEMES)


def url_password(url: str) -> str:
    """The password a spool URL carries, if any (PGPASSWORD is the place for it)."""
    if not is_postgresql(url):
        return ""
    return urlsplit(url).password or ""


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

FAKE_SCHEME = "fake://"
_LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})


def fake_braze_address(server: str) -> tuple[str, int] | None:
    """The loopback host and port of `braze.server = "fake://HOST:PORT"` (the demo's in-process
    fake Braze), None for a real server; ValueError for a fake that is not on loopback."""
    return _fake_address(server, "braze.server", "fake Braze")


def fake_didomi_address(base_url: str) -> tuple[str, int] | None:
    """The loopback host and port of `didomi_api.base_url = "fake://HOST:PORT"` (the demo's
    in-process fake Didomi), None for a real API; ValueError for a fake off loopback."""
    return _fake_address(base_url, "didomi_api.base_url", "fake Didomi")


def didomi_base_url(base_url: str) -> str:
    """`didomi_api.base_url` as the client calls it: the demo's fake:// serves /v1 on loopback."""
    fake = fake_didomi_address(base_url)
    if fake is None:
        return base_url.strip().rstrip("/")
    return f"{_http(*fake)}/v1"


def _http(loopback: str, port: int) -> str:
    return f"http://[{loopback}]:{port}" if ":" in loopback else f"http://{loopback}:{port}"


def _fake_address(value: str, key: str, fake: str) -> tuple[str, int] | None:
    value = value.strip()
    if not value.startswith(FAKE_SCHEME):
        return None
    url = urlsplit(value)
    try:
        port = url.port
    except ValueError:
        port = None
    host = url.hostname
    if host not in _LOOPBACK or not port or url.path.strip("/") or url.query:
        raise ValueError(
            f"{value!r}: the {fake} is a demo served by this process on loopback; write"
            f" {key} = fake://127.0.0.1:PORT (a port from 1 to 65535)"
        )
    assert host is not None  # in _LOOPBACK
    return host, port


def braze_base_url(server: str) -> str:
    """Turn `braze.server` (instance name, host or URL) into a base URL; ValueError if none fits."""
    server = server.strip()
    fake = fake_braze_address(server)
    if fake is not None:
        return _http(*fake)
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
