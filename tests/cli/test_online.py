"""`gateway check --online` against the fake Braze and the fake Didomi, as the real ones answer."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from gateway.cli.online import check_online
from gateway.cli.online_checker import PROBE_PREFIX, Report
from gateway.config.settings import load_config
from gateway.errors import Problem
from gateway.rules.mappings import load_rules, options_of
from gateway.testing.braze import FakeBraze, FakeDidomi
from gateway.testing.braze_access import ALL_PERMISSIONS
from tests.conftest import (
    BRAZE_API_KEY,
    DIDOMI_API_KEY,
    DIDOMI_API_SECRET,
    DIDOMI_ORG,
    ROOT,
    SECRETS,
    free_port,
    write_config,
)

NEWS = "3b0a6f8e-5c1d-4e2f-9a7b-0c1d2e3f4a5b"
OFFERS = "7c1e2d3f-4a5b-4c6d-8e9f-0a1b2c3d4e5f"
PURPOSES = ["marketing_email", "analytics"]
PREFERENCES = {"frequency": ["never", "weekly"], "topics": ["product_news", "offers"]}


@pytest.fixture
async def braze() -> AsyncIterator[FakeBraze]:
    """A fake Braze (US-01) whose workspace has the two groups of mappings/email.toml."""
    fake = FakeBraze(api_key=BRAZE_API_KEY, groups={NEWS, OFFERS}, known_users=set())
    await fake.start()
    yield fake
    await fake.stop()


@pytest.fixture
def didomi(fake_didomi: FakeDidomi) -> FakeDidomi:
    """The fake Didomi with the purposes and preferences mappings/email.toml names."""
    fake_didomi.define(PURPOSES, PREFERENCES)
    return fake_didomi


def api(didomi_url: str, **keys: Any) -> dict[str, Any]:
    return {
        "enabled": True,
        "base_url": didomi_url + "/v1",
        "organization_id": DIDOMI_ORG,
        "key": DIDOMI_API_KEY,
        "secret": DIDOMI_API_SECRET,
        **keys,
    }


async def run_check(
    tmp_path: Path, braze_url: str, didomi_url: str, **sections: dict[str, Any]
) -> tuple[Report, Path]:
    """Write gateway.toml (the fakes' URLs plus `sections`), load it, check it online."""
    braze = {"server": braze_url, **sections.pop("braze", {})}
    didomi_api = api(didomi_url, **sections.pop("didomi_api", {}))
    path = write_config(tmp_path, braze=braze, didomi_api=didomi_api, **sections)
    config = load_config(path, SECRETS)
    rules = load_rules(config.mappings.dir, options_of(config))
    return await check_online(config, rules, str(path)), path


def line_of(path: Path, text: str, nth: int = 0) -> int:
    """The number of the `nth` line of `path` that starts with `text`."""
    lines = [n for n, line in enumerate(path.read_text().splitlines(), 1) if line.startswith(text)]
    return lines[nth]


def mapping(tmp_path: Path) -> Path:
    return tmp_path / "mappings" / "email.toml"


def only(problems: list[Problem]) -> Problem:
    assert len(problems) == 1, [str(p) for p in problems]
    return problems[0]


async def test_all_good_writes_nothing_and_says_so(
    tmp_path: Path, braze: FakeBraze, didomi: FakeDidomi
) -> None:
    """A right key with every permission, known groups, purposes and values: no problem, a
    summary, and neither Braze nor Didomi holds anything new."""
    report, _ = await run_check(tmp_path, braze.url, didomi.url)
    assert (report.errors, report.warnings) == ([], [])
    summary = "\n".join(report.summary)
    assert "the key works, with users.track" in summary
    assert "2 subscription group id(s) exist" in summary
    assert "1 purpose id(s) and 3 preference value id(s) exist" in summary
    assert braze.users == {}
    assert braze.deleted == []
    (track,) = [r for r in braze.requests if r.path == "/users/track"]
    (probe,) = track.body["attributes"]
    assert probe["_update_existing_only"] is True
    assert probe["external_id"].startswith(PROBE_PREFIX)
    assert set(probe) == {"external_id", "_update_existing_only"}
    assert {r.path for r in braze.requests} == {
        "/users/track",
        "/subscription/status/get",
        "/users/export/ids",
    }
    assert didomi.events == []
    assert {(r.method, r.path) for r in didomi.requests} == {
        ("POST", "/sessions"),
        ("GET", "/metadata/purposes"),
        ("GET", "/preferences"),
    }


async def test_a_400_to_the_bare_probe_still_proves_the_key(
    tmp_path: Path, braze: FakeBraze, didomi: FakeDidomi
) -> None:
    """Should Braze refuse an object that sets nothing, its 400 comes after the key and the
    permission passed: no error, and the summary says what Braze answered."""
    braze.refuse_with_400 = lambda obj: True
    report, _ = await run_check(tmp_path, braze.url, didomi.url)
    assert report.errors == []
    assert "with users.track (the probe got 400" in report.summary[0]


async def test_didomi_lists_are_read_to_their_last_page(
    tmp_path: Path, braze: FakeBraze, didomi: FakeDidomi
) -> None:
    """With one item a page, every purpose and preference is still found through $skip."""
    didomi.list_limit = 1
    report, _ = await run_check(tmp_path, braze.url, didomi.url)
    assert report.errors == []
    skips = [r.query["$skip"] for r in didomi.requests if r.path == "/preferences"]
    assert skips == ["0", "1"]


async def test_a_wrong_braze_key_is_one_error_at_braze_api_key(
    tmp_path: Path, braze: FakeBraze, didomi: FakeDidomi
) -> None:
    """A key Braze does not know: a 401, said at the api_key line, naming the host; nothing
    else is asked of Braze."""
    report, path = await run_check(tmp_path, braze.url, didomi.url, braze={"api_key": "nope"})
    problem = only(report.errors)
    assert problem.file == str(path)
    assert problem.line == line_of(path, "api_key")
    assert "refused the key (401 'Invalid API key')" in problem.message
    assert braze.url.removeprefix("http://") in problem.message
    assert [r.path for r in braze.requests] == ["/users/track"]


async def test_a_key_of_another_instance_is_told_apart_from_nothing(
    tmp_path: Path, braze: FakeBraze, didomi: FakeDidomi
) -> None:
    """A real key made on EU-01, sent to this US-01: Braze's 401, and the message names the
    instance as the likely cause."""
    braze.grant("eu-key", ALL_PERMISSIONS, instance="EU-01")
    report, path = await run_check(tmp_path, braze.url, didomi.url, braze={"api_key": "eu-key"})
    problem = only(report.errors)
    assert problem.line == line_of(path, "api_key")
    assert "another instance than braze.server" in problem.message


@pytest.mark.parametrize(
    ("missing", "reconcile", "error"),
    [
        ("users.track", False, True),
        ("subscription.status.get", False, False),
        ("subscription.status.get", True, True),
        ("users.export.ids", False, False),
        ("users.export.ids", True, True),
    ],
)
async def test_a_missing_permission_is_said_for_its_use(
    tmp_path: Path,
    braze: FakeBraze,
    didomi: FakeDidomi,
    missing: str,
    reconcile: bool,
    error: bool,
) -> None:
    """users.track is always an error; reconcile's reads are a warning, or an error when
    [check] reconcile = true; each names the permission Braze's 403 says is missing."""
    braze.grant("partial", ALL_PERMISSIONS - {missing})
    report, path = await run_check(
        tmp_path,
        braze.url,
        didomi.url,
        braze={"api_key": "partial"},
        check={"reconcile": reconcile},
    )
    problems = report.errors if error else report.warnings
    other = report.warnings if error else report.errors
    problem = only(problems)
    assert other == []
    assert f"lacks {missing} (403 'Access Denied')" in problem.message
    key = "reconcile" if reconcile else "api_key"
    assert problem.line == line_of(path, key)
    if not error:
        assert problem.message.startswith("warning: ")
        assert "`gateway reconcile` needs it" in problem.message


async def test_users_delete_is_a_warning_and_never_called(
    tmp_path: Path, braze: FakeBraze, didomi: FakeDidomi
) -> None:
    """on_user_deleted = "delete" needs users.delete, which no call checks without deleting:
    a warning at that key, and /users/delete is never sent."""
    braze.grant("no-delete", ALL_PERMISSIONS - {"users.delete"})
    report, path = await run_check(
        tmp_path,
        braze.url,
        didomi.url,
        braze={"api_key": "no-delete"},
        didomi={"on_user_deleted": "delete"},
    )
    assert report.errors == []
    warning = only(report.warnings)
    assert warning.line == line_of(path, "on_user_deleted")
    assert "cannot be checked without deleting" in warning.message
    assert "/users/delete" not in {r.path for r in braze.requests}


async def test_an_unknown_group_id_is_an_error_at_its_rule(
    tmp_path: Path, braze: FakeBraze, didomi: FakeDidomi
) -> None:
    """A group the workspace lacks is said at the `to` line of the rule naming it."""
    assert braze.groups is not None
    braze.groups.discard(OFFERS)
    report, _ = await run_check(tmp_path, braze.url, didomi.url)
    problem = only(report.errors)
    assert problem.file == str(mapping(tmp_path))
    assert problem.line == line_of(mapping(tmp_path), f'to = "{OFFERS}"')
    assert f"knows no subscription group '{OFFERS}'" in problem.message


async def test_an_unknown_purpose_is_an_error_at_each_rule_naming_it(
    tmp_path: Path, braze: FakeBraze, didomi: FakeDidomi
) -> None:
    """A purpose Didomi lacks is said at every `purpose =` line that names it."""
    didomi.define(["analytics"], PREFERENCES)
    report, _ = await run_check(tmp_path, braze.url, didomi.url)
    lines = [line_of(mapping(tmp_path), "purpose =", n) for n in range(5)]
    assert sorted(p.line or 0 for p in report.errors) == lines
    assert all("has no purpose 'marketing_email'" in p.message for p in report.errors)


async def test_an_unknown_preference_value_is_an_error_at_its_value(
    tmp_path: Path, braze: FakeBraze, didomi: FakeDidomi
) -> None:
    """A value id its preference lacks is said at its `value =` line; an unknown preference id
    is a warning (it may be a configuration-tree id)."""
    didomi.define(PURPOSES, {"frequency": ["never"], "subjects": ["product_news"]})
    report, _ = await run_check(tmp_path, braze.url, didomi.url)
    problem = only(report.errors)
    assert problem.line == line_of(mapping(tmp_path), 'value = "offers"')
    assert "has no value 'offers' in any preference of the library" in problem.message
    warnings = report.warnings
    assert [w.line for w in warnings] == [
        line_of(mapping(tmp_path), 'preference = "topics"', n) for n in range(2)
    ]
    didomi.define(PURPOSES, {"frequency": ["weekly"], "topics": ["product_news", "offers"]})
    report, _ = await run_check(tmp_path, braze.url, didomi.url)
    problem = only(report.errors)
    assert problem.line == line_of(mapping(tmp_path), 'value = "never"')
    assert "has no value 'never' in preference 'frequency'" in problem.message


async def test_a_wrong_didomi_key_or_organization_is_said_at_its_key(
    tmp_path: Path, braze: FakeBraze, didomi: FakeDidomi
) -> None:
    """Didomi's 400 to the login is said at didomi_api.key; a 403 for the organization at
    didomi_api.organization_id."""
    report, path = await run_check(tmp_path, braze.url, didomi.url, didomi_api={"secret": "not-it"})
    problem = only(report.errors)
    assert problem.line == line_of(path, "key =")
    assert "refused the login (400 'Invalid authentication information')" in problem.message
    report, path = await run_check(
        tmp_path, braze.url, didomi.url, didomi_api={"organization_id": "someone-else"}
    )
    problem = only(report.errors)
    assert problem.line == line_of(path, "organization_id")
    assert "refused /metadata/purposes for organization 'someone-else' (403" in problem.message


async def test_an_unreachable_service_is_named_by_its_host(
    tmp_path: Path, braze: FakeBraze, didomi: FakeDidomi
) -> None:
    """A closed port on either side is an error naming the host and port, at its URL's key."""
    closed = f"http://127.0.0.1:{free_port()}"
    report, path = await run_check(tmp_path, closed, closed)
    assert report.errors == []  # nothing is known of the config itself
    by_line = {p.line: p.message for p in report.unreachable}
    host = closed.removeprefix("http://")
    assert by_line[line_of(path, "server =")].startswith(f"cannot reach Braze at {host}: ")
    assert by_line[line_of(path, "base_url")].startswith(f"cannot reach Didomi at {host}: ")
    assert len(report.unreachable) == 2


async def test_a_didomi_that_never_answers_is_bounded_by_its_timeout(
    tmp_path: Path, braze: FakeBraze
) -> None:
    """A server that accepts and stays silent costs didomi_api.timeout_s, then is an error
    naming the host and the timeout: never a hang."""
    held: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    started = time.monotonic()
    try:
        report, path = await asyncio.wait_for(
            run_check(
                tmp_path,
                braze.url,
                f"http://127.0.0.1:{port}",
                didomi_api={"timeout_s": 0.5},
            ),
            timeout=60,
        )
    finally:
        for writer in held:
            writer.close()
        server.close()
        await server.wait_closed()
    assert report.errors == []
    problem = only(report.unreachable)
    assert problem.line == line_of(path, "base_url")
    assert problem.message == f"cannot reach Didomi at 127.0.0.1:{port}: no answer within 0.5 s"
    assert time.monotonic() - started < 30  # one timeout, not a hang (generous for busy hosts)


async def test_the_command_prints_the_summary_or_the_problems(
    tmp_path: Path, braze: FakeBraze, didomi: FakeDidomi
) -> None:
    """`gateway check --online`: exit 0 with `online:` lines, or 1 with file:line: message; an
    unreachable service is an error, a warning under --allow-unreachable."""
    path = write_config(tmp_path, braze={"server": braze.url}, didomi_api=api(didomi.url))
    env = {**os.environ, **SECRETS}

    async def gateway(*args: str) -> tuple[int, str, str]:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway", *args, "--config", str(path),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env, cwd=ROOT,
        )  # fmt: skip
        out, err = await asyncio.wait_for(process.communicate(), timeout=120)
        assert process.returncode is not None
        return process.returncode, out.decode(), err.decode()

    status, out, err = await gateway("check", "--online")
    assert (status, err) == (0, "")
    assert "online: Braze" in out
    assert "online: Didomi" in out
    assert braze.groups is not None
    braze.groups.discard(NEWS)
    status, out, err = await gateway("check", "--online")
    assert status == 1
    line = line_of(mapping(tmp_path), f'to = "{NEWS}"')
    assert f"{mapping(tmp_path)}:{line}: Braze at" in err
    assert err.splitlines()[-1] == "1 problem(s) found"
    braze.groups.add(NEWS)
    await didomi.stop()  # Didomi down: an error, or with --allow-unreachable a warning
    status, out, err = await gateway("check", "--online")
    assert status == 1
    assert f"cannot reach Didomi at {didomi.url.removeprefix('http://')}" in err
    status, out, err = await gateway("check", "--online", "--allow-unreachable")
    assert status == 0
    assert ": warning: cannot reach Didomi at " in err
    assert "online: Braze" in out
    before = len(braze.requests)
    status, out, _ = await gateway("check")
    assert status == 0
    assert "online:" not in out
    assert len(braze.requests) == before  # without --online, nothing is asked


def test_offline_check_never_imports_the_online_probes(tmp_path: Path) -> None:
    """`gateway check` without --online stays light: gateway.online is imported lazily."""
    path = write_config(tmp_path)
    code = (
        "import sys; from gateway.cli.main import main;"
        " status = main(['check', '--config', sys.argv[1]]);"
        " print(status, 'gateway.online' in sys.modules)"
    )
    run = subprocess.run(
        [sys.executable, "-c", code, str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **SECRETS},
        check=False,
    )
    assert run.stdout.splitlines()[-1] == "0 False", run.stderr
