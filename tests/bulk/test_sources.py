"""gateway.sources: Didomi users read from export files, folders, stdin and the Consents API."""

from __future__ import annotations

import gzip
import io
from pathlib import Path

import msgspec
import pytest

from gateway.bulk.sources import SourceError, UserRecord, open_source
from gateway.config.settings import DidomiApiConfig
from gateway.testing.didomi import FakeDidomi


def user(n: int, *, updated_at: str = "2024-05-01T08:30:00Z") -> dict[str, object]:
    """A Didomi user entity as the Consents API and the batch export show it."""
    return {
        "id": f"didomi-{n}",
        "organization_id": "test-org",
        "organization_user_id": f"person-{n}",
        "updated_at": updated_at,
        "consents": {"purposes": [{"id": "newsletter", "enabled": n % 2 == 0}]},
    }


def export_line(n: int) -> bytes:
    """One batch-export line: the user wrapped with its events."""
    return msgspec.json.encode({"user": user(n), "events": [{"id": f"e{n}"}]}) + b"\n"


async def read_all(spec: str, resume: str | None = None, **kw: object) -> list[UserRecord]:
    """Every record of a source from `resume` on."""
    source = open_source(spec, **kw)  # type: ignore[arg-type]
    return [r async for batch in source.batches(7, resume) for r in batch]


async def test_file_unwraps_users_and_counts_malformed_lines(tmp_path: Path) -> None:
    """Export lines are unwrapped, bare entities read as they are, and a bad line is counted."""
    path = tmp_path / "users.json"
    bare = msgspec.json.encode(user(2)) + b"\n"
    path.write_bytes(export_line(1) + b"{not json\n\n" + bare + b"[1]\n")
    source = open_source(str(path))
    records = [r async for batch in source.batches(10) for r in batch]
    assert [r.user.organization_user_id for r in records] == ["person-1", "person-2"]
    assert records[0].where == "users.json:1"
    assert records[1].where == "users.json:4"
    assert msgspec.json.decode(records[0].raw)["id"] == "didomi-1"
    assert source.malformed == 2
    assert source.malformed_at[0].startswith("users.json:2:")
    assert source.malformed_at[1].startswith("users.json:5:")


async def test_folder_reads_gzip_recursively_in_name_order_and_resumes(tmp_path: Path) -> None:
    """A folder's .json.gz files are read in name order, _SUCCESS skipped, resumable mid-file."""
    users = tmp_path / "export-id=x" / "date=2024-05-02" / "users"
    users.mkdir(parents=True)
    (users / "_SUCCESS").write_bytes(b"")
    (users / "b.json.gz").write_bytes(gzip.compress(b"".join(export_line(n) for n in range(5, 9))))
    (users / "a.json.gz").write_bytes(gzip.compress(b"".join(export_line(n) for n in range(5))))
    records = await read_all(str(tmp_path))
    assert [r.user.organization_user_id for r in records] == [f"person-{n}" for n in range(9)]
    source = open_source(str(tmp_path))
    assert source.warnings == []
    assert source.size is not None
    again = await read_all(str(tmp_path), records[6].resume)
    assert [r.user.organization_user_id for r in again] == ["person-7", "person-8"]
    assert again[0].where.endswith("b.json.gz:3")


async def test_partition_without_success_marker_is_warned(tmp_path: Path) -> None:
    """An export partition still being written (no _SUCCESS) is reported, not refused."""
    users = tmp_path / "date=2024-05-02" / "users"
    users.mkdir(parents=True)
    (users / "part.json").write_bytes(export_line(1))
    assert "_SUCCESS" in open_source(str(tmp_path)).warnings[0]


async def test_stdin_is_read() -> None:
    """`-` reads newline-delimited users from standard input."""
    stream = io.BytesIO(b"".join(export_line(n) for n in range(3)))
    records = await read_all("-", stdin=stream)
    assert [r.where for r in records] == ["-:1", "-:2", "-:3"]


async def test_missing_source_says_what_to_give(tmp_path: Path) -> None:
    """A path that does not exist is a SourceError naming it."""
    with pytest.raises(SourceError, match="nope"):
        open_source(str(tmp_path / "nope"))


def api_config(fake: FakeDidomi) -> DidomiApiConfig:
    """A [didomi_api] table pointing at the fake."""
    return DidomiApiConfig(
        enabled=True,
        base_url=fake.url + "/v1",
        organization_id=fake.organization_id,
        key=fake.key,
        secret=fake.secret,
    )


async def test_api_pages_with_cursor_survives_failures_and_resumes(fake_didomi: FakeDidomi) -> None:
    """didomi-api follows $cursor to null, retries a 503 and a 429, and resumes mid-page."""
    for n in range(250):
        fake_didomi.seed_user(f"person-{n}", [{"id": "newsletter", "enabled": True}])
    fake_didomi.fail_next(503, path="/consents/users")
    fake_didomi.fail_next(429, path="/consents/users")
    source = open_source("didomi-api", didomi=api_config(fake_didomi))
    source.retry_s = 0.01  # type: ignore[attr-defined]
    records = [r async for batch in source.batches(64) for r in batch]
    assert len({r.user.organization_user_id for r in records}) == 250 == len(records)
    pages = [q for q in fake_didomi.requests if q.path == "/consents/users" and q.status == 200]
    assert len(pages) == 3
    assert "$cursor" not in pages[0].query
    assert "$cursor" in pages[2].query
    again = await read_all("didomi-api", records[149].resume, didomi=api_config(fake_didomi))
    assert [r.user.organization_user_id for r in again] == [
        r.user.organization_user_id for r in records[150:]
    ]
    last_of_page = await read_all("didomi-api", records[99].resume, didomi=api_config(fake_didomi))
    assert len(last_of_page) == 150


async def test_api_refusal_is_a_source_error(fake_didomi: FakeDidomi) -> None:
    """A key Didomi refuses ends the read with a SourceError that says what to check."""
    fake_didomi.fail_next(403, count=5, path="/consents/users")
    with pytest.raises(SourceError, match="organization_id"):
        await read_all("didomi-api", didomi=api_config(fake_didomi))
