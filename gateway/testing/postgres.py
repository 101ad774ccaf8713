"""A throwaway PostgreSQL server for tests and benchmarks: `initdb` and `pg_ctl` on a temp dir.

Real PostgreSQL, on loopback, gone when stopped. It needs the server binaries (Debian's
`postgresql` package puts them in /usr/lib/postgresql/<version>/bin); `find_binaries` says
where they are or why none were found. As root (CI runs tests as root, and PostgreSQL refuses
to run as root), the cluster is made and run as the `postgres` user.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path


def find_binaries() -> Path | str:
    """The directory holding initdb and pg_ctl, or the reason they cannot be had."""
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl"):
        return Path(found).resolve().parent
    for directory in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if (Path(directory) / "initdb").exists():
            return Path(directory)
    return (
        "the PostgreSQL server binaries (initdb, pg_ctl) are not installed;"
        " Debian: apt-get install postgresql"
    )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PostgresServer:
    """One PostgreSQL cluster in a temp directory, listening on 127.0.0.1 only."""

    def __init__(self, binaries: Path, *, fsync: bool = False) -> None:
        self.binaries = binaries
        self.fsync = fsync  # off for tests: the cluster is thrown away, crashes are the gateway's
        self.root = Path(tempfile.mkdtemp(prefix="gateway-pg-"))
        self.data = self.root / "data"
        self.port = _free_port()
        self.user: str | None = None
        if os.geteuid() == 0:
            self.user = "postgres"
            pw = pwd.getpwnam(self.user)  # KeyError: no such user; the package creates it
            os.chown(self.root, pw.pw_uid, pw.pw_gid)

    def _run(self, *args: str) -> None:
        command = [str(self.binaries / args[0]), *args[1:]]
        if self.user is not None:
            command = ["runuser", "-u", self.user, "--", *command]
        result = subprocess.run(command, capture_output=True, text=True, check=False)  # noqa: S603
        if result.returncode != 0:
            raise RuntimeError(f"{args[0]} failed: {result.stdout}{result.stderr}")

    def start(self) -> None:
        """initdb, then start the server and wait until it takes connections."""
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "-A", "trust", "-E", "UTF8")
        options = (
            f"-c listen_addresses=127.0.0.1 -c port={self.port}"
            f" -c unix_socket_directories={self.root} -c fsync={'on' if self.fsync else 'off'}"
            " -c max_connections=200"
            " -c synchronous_commit=on -c full_page_writes=off"
        )
        log = self.root / "server.log"
        self._run("pg_ctl", "-D", str(self.data), "-l", str(log), "-o", options, "-w", "start")

    def stop(self) -> None:
        """Stop the server at once and delete its files."""
        with contextlib.suppress(RuntimeError):
            self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(self.root, ignore_errors=True)

    @property
    def url(self) -> str:
        """The URL of the `postgres` database, as the superuser."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def database(self, name: str | None = None) -> str:
        """Create a new empty database; returns its URL."""
        import psycopg

        name = name or f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"'.encode())
        return f"postgresql://postgres@127.0.0.1:{self.port}/{name}"


@contextlib.contextmanager
def running(*, fsync: bool = False) -> Iterator[PostgresServer]:
    """A started PostgresServer, stopped and deleted on exit; RuntimeError when none can be had."""
    binaries = find_binaries()
    if isinstance(binaries, str):
        raise RuntimeError(binaries)
    server = PostgresServer(binaries, fsync=fsync)
    try:
        server.start()
        yield server
    finally:
        server.stop()
