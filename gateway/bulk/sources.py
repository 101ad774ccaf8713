"""Where backfill and reconcile read Didomi users from: export files, folders, stdin, the API.

API (all a caller needs):

- `open_source(spec, didomi=..., stdin=...)` -> `Source`, for one SOURCE argument: a Didomi
  batch-export file (newline-delimited JSON, `.json` or `.json.gz`), a folder of them (read
  recursively, in name order; `_SUCCESS` and other names skipped), `-` for standard input, or
  `didomi-api` (`GET /consents/users`, 100 a page, `$cursor` until it is null).
- `Source.identity`: a stable name for this source (what a progress row is keyed on).
- `Source.batches(size, resume=None)`: async iterator of lists of `UserRecord`, streaming (memory
  stays flat whatever the size); `resume` is a `UserRecord.resume` a previous run committed, and
  reading goes on just after that record.
- `UserRecord`: `user` (the decoded `webhooks.Entity`), `raw` (the user's own JSON bytes, the
  export line's `user` object unwrapped), `where` (`file:line` or `didomi-api page N #i`),
  `resume` (an opaque token: pass it back as `resume`).
- `Source.malformed` / `Source.malformed_at` (the first `MALFORMED_KEPT` as `file:line: why`),
  `Source.size` / `Source.done` (bytes, for an ETA; `size` is None when unknown), and
  `Source.warnings` (e.g. an export partition without its `_SUCCESS` marker).

A malformed line is counted and skipped, never fatal. Standard input is not resumable (the
stream cannot be re-read); callers dedupe instead.
"""

from __future__ import annotations

import asyncio
import gzip
import io
import os
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import msgspec

from gateway.config.settings import DidomiApiConfig
from gateway.delivery.outcome import Verdict
from gateway.errors import GatewayError
from gateway.shapes.webhooks import Entity, Lenient

API = "didomi-api"
STDIN = "-"
MALFORMED_KEPT = 10
API_ATTEMPTS = 8  # transient failures in a row on one page before the read gives up
_SUFFIXES = (".json", ".json.gz")


class SourceError(GatewayError):
    """A SOURCE cannot be read: the message says which and what to fix."""


@dataclass(frozen=True, slots=True)
class UserRecord:
    """One Didomi user read from a source, where it was, and how to restart just after it."""

    user: Entity
    raw: bytes
    where: str
    resume: str


class _Resume(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """The position after a record: file and lines consumed, or page cursor and users taken."""

    file: str | None = None
    line: int = 0
    cursor: str | None = None
    skip: int = 0


class _Line(Lenient, frozen=True):
    """An export line wraps the user with its events; a bare user entity has no `user`."""

    user: msgspec.Raw = msgspec.field(default_factory=msgspec.Raw)  # msgspec: no Raw | None


class _Page(Lenient, frozen=True):
    data: list[msgspec.Raw] = msgspec.field(default_factory=list)
    cursor: str | None = None


_line = msgspec.json.Decoder(_Line)
_entity = msgspec.json.Decoder(Entity)
_page = msgspec.json.Decoder(_Page)
_resume_decoder = msgspec.json.Decoder(_Resume)
_encoder = msgspec.json.Encoder()


def _token(resume: _Resume) -> str:
    return _encoder.encode(resume).decode()


def _parse(resume: str | None) -> _Resume:
    if not resume:
        return _Resume()
    try:
        return _resume_decoder.decode(resume)
    except msgspec.DecodeError:
        return _Resume()  # a token from another version: start over, the store dedupes


class Source:
    """One SOURCE argument; subclasses read files or the API."""

    identity: str = ""
    label: str = ""

    def __init__(self) -> None:
        self.malformed = 0
        self.malformed_at: list[str] = []
        self.warnings: list[str] = []
        self.size: int | None = None
        self.done = 0

    def batches(self, size: int, resume: str | None = None) -> AsyncIterator[list[UserRecord]]:
        """Records in lists of up to `size`, starting just after `resume`."""
        raise NotImplementedError

    def _bad(self, where: str, why: str) -> None:
        self.malformed += 1
        if len(self.malformed_at) < MALFORMED_KEPT:
            self.malformed_at.append(f"{where}: {why}")

    def _decode(self, data: bytes, where: str) -> tuple[Entity, bytes] | None:
        """The user a line or page item holds, unwrapped; None (counted) when malformed."""
        try:
            wrapped = _line.decode(data)
            raw = bytes(wrapped.user) if len(wrapped.user) else data
            if raw.lstrip()[:1] != b"{":
                raise msgspec.DecodeError("a user must be a JSON object")
            user = _entity.decode(raw)
        except msgspec.DecodeError as exc:
            self._bad(where, str(exc))
            return None
        return user, raw


class FileSource(Source):
    """A file, a folder of export files, or standard input: newline-delimited JSON users."""

    def __init__(self, spec: str, stdin: BinaryIO | None = None) -> None:
        super().__init__()
        self.stdin = stdin
        if spec == STDIN:
            self.root: Path | None = None
            self.identity, self.label = "stdin", "standard input"
            return
        path = Path(spec)
        if not path.exists():
            raise SourceError(f"{spec}: no such file or folder; give an export file or folder")
        self.root = path.resolve()
        self.identity, self.label = f"file:{self.root}", spec
        files = self._files()
        if not files:
            raise SourceError(f"{spec}: holds no .json or .json.gz file of Didomi users")
        self.size = sum(f.stat().st_size for f in files)

    def _files(self) -> list[Path]:
        assert self.root is not None
        if self.root.is_file():
            return [self.root]
        found: list[Path] = []
        for folder, dirs, names in os.walk(self.root):
            dirs.sort()
            here = [n for n in sorted(names) if n.endswith(_SUFFIXES)]
            if here and "date=" in folder and "_SUCCESS" not in names:
                self.warnings.append(
                    f"{folder}: no _SUCCESS marker; Didomi may still be writing this export"
                )
            found.extend(Path(folder) / n for n in here)
        return found

    def _name(self, path: Path) -> str:
        assert self.root is not None
        return path.name if self.root.is_file() else str(path.relative_to(self.root))

    async def batches(
        self, size: int, resume: str | None = None
    ) -> AsyncIterator[list[UserRecord]]:
        """Records in lists of up to `size`, starting just after `resume`."""
        lines = self._lines(_parse(resume) if self.root is not None else _Resume())
        while True:
            batch: list[UserRecord] = []
            for record in lines:
                batch.append(record)
                if len(batch) >= size:
                    break
            if not batch:
                return
            yield batch
            await asyncio.sleep(0)  # let a progress ticker or a signal handler run

    def _lines(self, start: _Resume) -> Iterator[UserRecord]:
        if self.root is None:
            stream = self.stdin if self.stdin is not None else sys.stdin.buffer
            yield from self._read(stream, "stdin", "-", 0, None)
            return
        base = 0
        files = self._files()
        names = [self._name(path) for path in files]
        # Files before the committed one were wholly read; walk order, not string order, says so.
        first = names.index(start.file) if start.file in names else 0
        for index, (path, name) in enumerate(zip(files, names, strict=True)):
            size = path.stat().st_size
            if index < first:
                base += size  # wholly read by the run that committed `start`
                self.done = base
                continue
            skip = start.line if name == start.file else 0
            with path.open("rb") as raw:
                yield from self._read(raw, name, name, skip, base)
            base += size
            self.done = base

    def _read(
        self, raw: BinaryIO, name: str, where: str, skip: int, base: int | None
    ) -> Iterator[UserRecord]:
        gz = where.endswith(".gz")
        # GzipFile's own readline is slow; a large buffer over it reads lines at memory speed.
        reader: BinaryIO = raw
        if gz:
            reader = io.BufferedReader(gzip.GzipFile(fileobj=raw, mode="rb"), 1 << 20)
        number = 0
        try:
            for line in reader:
                number += 1
                if number <= skip:
                    continue
                if base is not None and number % 1024 == 0:
                    self.done = base + raw.tell()
                if not line.strip():
                    continue
                at = f"{where}:{number}"
                decoded = self._decode(line, at)
                if decoded is None:
                    continue
                token = _token(_Resume(file=name, line=number))
                yield UserRecord(decoded[0], decoded[1], at, token)
        except (OSError, EOFError, gzip.BadGzipFile) as exc:
            # A truncated or corrupt gzip: what was read stands; the rest of the file is lost.
            self._bad(f"{where}:{number + 1}", f"the file cannot be read further: {exc}")


class ApiSource(Source):
    """Every user of the organization through Didomi's Consents API."""

    def __init__(self, config: DidomiApiConfig) -> None:
        super().__init__()
        if not (config.organization_id and config.key and config.secret):
            raise SourceError(
                "didomi-api needs [didomi_api] organization_id, key and secret in the config"
            )
        self.config = config
        self.identity = f"didomi-api:{config.base_url}:{config.organization_id}:{config.regulation}"
        self.label = API
        self.retry_s = 1.0  # first back-off after a transient failure; doubles each time

    async def batches(
        self, size: int, resume: str | None = None
    ) -> AsyncIterator[list[UserRecord]]:
        """Records in lists of up to `size`, starting just after `resume`."""
        from gateway.peers.didomi import open_didomi_client

        start = _parse(resume)
        cursor, skip, number = start.cursor, start.skip, 0
        batch: list[UserRecord] = []
        async with open_didomi_client(self.config) as client:
            while True:
                page = await self._page(client, cursor)
                number += 1
                for index, item in enumerate(page.data):
                    if index < skip:
                        continue
                    at = f"{API} page {number} #{index + 1}"
                    decoded = self._decode(bytes(item), at)
                    self.done += 1
                    if decoded is None:
                        continue
                    if index + 1 == len(page.data) and page.cursor is not None:
                        token = _Resume(cursor=page.cursor)  # the whole page is taken
                    else:
                        token = _Resume(cursor=cursor, skip=index + 1)
                    batch.append(UserRecord(decoded[0], decoded[1], at, _token(token)))
                    if len(batch) >= size:
                        yield batch
                        batch = []
                skip = 0
                if page.cursor is None or not page.data:
                    break
                cursor = page.cursor
        if batch:
            yield batch

    async def _page(self, client: object, cursor: str | None) -> _Page:
        from gateway.peers.didomi import DidomiClient

        assert isinstance(client, DidomiClient)
        wait = self.retry_s
        for _attempt in range(API_ATTEMPTS):
            answer, payload = await client.users_page(cursor)
            if answer.verdict is Verdict.OK:
                try:
                    return _page.decode(payload)
                except msgspec.DecodeError as exc:
                    raise SourceError(
                        f"didomi-api: the users page is not Didomi's shape ({exc});"
                        " check didomi_api.base_url"
                    ) from None
            if answer.verdict not in (Verdict.RETRY, Verdict.RATE_LIMITED):
                raise SourceError(f"didomi-api: {answer.reason}")
            await asyncio.sleep(wait)
            wait = min(wait * 2, 30.0)
        raise SourceError(
            f"didomi-api: {API_ATTEMPTS} failures in a row ({answer.reason}); run the same"
            " command again later to go on from the last page stored"
        )


def open_source(
    spec: str, *, didomi: DidomiApiConfig | None = None, stdin: BinaryIO | None = None
) -> Source:
    """The reader for one SOURCE argument; SourceError when it cannot be read at all."""
    if spec == API:
        if didomi is None:
            raise SourceError("didomi-api needs a [didomi_api] table in the config")
        return ApiSource(didomi)
    return FileSource(spec, stdin)
