"""The demo: the README's quick start run as written, and what keeps its fake Braze a demo.

The quick start is read from the README itself, as `.ci/run` reads the test command: the line
after `# Run the demo` starts the gateway, the lines after `# In a second terminal` are pasted
into a shell. Only the two ports (free ones, so parallel runs never meet) and the interpreter
(this test run's, where the README names `.venv/bin/`) are swapped.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import msgspec
import pytest

from gateway.config.settings import braze_base_url, didomi_base_url, load_config
from gateway.errors import ConfigError
from gateway.testing.braze import FakeBraze
from tests.conftest import ROOT, SECRETS, free_port, write_config

README = ROOT / "README.md"
DEMO = ROOT / "examples" / "demo.toml"
RUN_MARKER = "# Run the demo"
LINES_MARKER = "# In a second terminal"
BACK_MARKER = "# Then the other way"
GATEWAY_PORT, FAKE_PORT = 8080, 9090  # as the demo config and the README write them
DIDOMI_PORT = 9091  # the demo's fake Didomi
GROUP = "3b0a6f8e-5c1d-4e2f-9a7b-0c1d2e3f4a5b"  # a group of mappings/email.toml


def readme_lines_after(marker: str) -> list[str]:
    """The README's lines after the one starting with `marker`, up to the end of its block."""
    lines = README.read_text(encoding="utf-8").splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith(marker)]
    assert len(starts) == 1, f"the README must have one line starting with {marker!r}"
    block = []
    for line in lines[starts[0] + 1 :]:
        if line.startswith("```"):
            break
        block.append(line)
    return block


def here(command: str, port: int, fake_port: int, didomi_port: int = DIDOMI_PORT) -> str:
    """A README command with this run's ports and interpreter, the rest as written."""
    return (
        command.replace(f"127.0.0.1:{GATEWAY_PORT}", f"127.0.0.1:{port}")
        .replace(f"127.0.0.1:{FAKE_PORT}", f"127.0.0.1:{fake_port}")
        .replace(f"127.0.0.1:{DIDOMI_PORT}", f"127.0.0.1:{didomi_port}")
        .replace(".venv/bin/gateway", f"{shlex.quote(sys.executable)} -m gateway")
    )


def lay_out_demo(
    directory: Path, port: int, fake_port: int, didomi_port: int = DIDOMI_PORT
) -> None:
    """The files the quick start reads, where the repository has them, on this run's ports."""
    text = DEMO.read_text(encoding="utf-8")
    assert f"port = {GATEWAY_PORT}\n" in text
    assert f'"fake://127.0.0.1:{FAKE_PORT}"' in text
    assert f'"fake://127.0.0.1:{DIDOMI_PORT}"' in text
    text = (
        text.replace(f"port = {GATEWAY_PORT}\n", f"port = {port}\n")
        .replace(f"fake://127.0.0.1:{FAKE_PORT}", f"fake://127.0.0.1:{fake_port}")
        .replace(f"fake://127.0.0.1:{DIDOMI_PORT}", f"fake://127.0.0.1:{didomi_port}")
    )
    (directory / "examples").mkdir()
    (directory / "examples" / "demo.toml").write_text(text, encoding="utf-8")
    shutil.copytree(ROOT / "mappings", directory / "mappings")
    shutil.copytree(ROOT / "tests" / "events", directory / "tests" / "events")


async def shell(script: str, cwd: Path) -> str:
    """Run `script` in bash as a newcomer's terminal would; its standard output."""
    proc = await asyncio.create_subprocess_exec(
        "bash",
        "-c",
        "set -euo pipefail\n" + script,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
    assert proc.returncode == 0, f"{script}\nfailed: {err.decode()}"
    return out.decode()


async def ready(base: str, proc: asyncio.subprocess.Process, log: Path) -> None:
    """Wait until the gateway at `base` answers /readyz with 200."""
    said = log.read_text  # only on failure: the log so far
    deadline = time.monotonic() + 30
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        while True:
            assert proc.returncode is None, f"the gateway exited early:\n{said()}"
            try:
                async with session.get(base + "/readyz") as resp:
                    if resp.status == 200:
                        return
            except (aiohttp.ClientError, OSError):
                pass
            assert time.monotonic() < deadline, f"the gateway never got ready:\n{said()}"
            await asyncio.sleep(0.2)


@pytest.mark.slow
async def test_the_readme_quick_start_delivers_within_a_minute(tmp_path: Path) -> None:
    """The README's demo command and its three lines, run as written, show a delivered update."""
    for tool in ("bash", "curl", "python3"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed here, and the quick start uses it")
    (run,) = readme_lines_after(RUN_MARKER)
    token, post, see = readme_lines_after(LINES_MARKER)
    braze_act, see_didomi = readme_lines_after(BACK_MARKER)
    port, fake_port, didomi_port = free_port(), free_port(), free_port()
    lay_out_demo(tmp_path, port, fake_port, didomi_port)
    # The install before it is .ci/run's job; the gateway is this test run's.
    start = here(run.split(" && ")[-1], port, fake_port)
    assert start.startswith(shlex.quote(sys.executable)), run
    log = tmp_path / "gateway.log"
    with log.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            *shlex.split(start),
            cwd=tmp_path,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            env={k: v for k, v in os.environ.items() if k not in SECRETS},  # needs none
        )
    try:
        await ready(f"http://127.0.0.1:{port}", proc, log)
        posted = await shell(here(f"{token}\n{post}", port, fake_port, didomi_port), tmp_path)
        assert msgspec.json.decode(posted) == {"status": "accepted"}
        deadline = time.monotonic() + 60
        while True:
            seen = await shell(here(see, port, fake_port, didomi_port), tmp_path)
            # Both halves of the line: the fake's answer may predate a delivery the trail shows.
            if '"user": "user-123"' in seen and "201 delivered" in seen:
                break
            assert time.monotonic() < deadline, f"nothing delivered within a minute:\n{seen}"
            await asyncio.sleep(0.5)
        state = msgspec.json.decode(seen[: seen.index("\n}\n") + 3])
        assert state["user"] == "user-123"
        assert state["email_subscribe"] == "opted_in"
        assert state["subscription_groups"][GROUP] == "subscribed"
        assert "email_subscribe=opted_in" in seen  # the trail names what was sent
        said = log.read_text()
        assert "DEMO" in said
        assert f"http://127.0.0.1:{fake_port}" in said
        # The other way: Braze's unsubscribe, through the same rules read backwards, to Didomi.
        acted = await shell(here(braze_act, port, fake_port, didomi_port), tmp_path)
        assert msgspec.json.decode(acted) == {"status": "accepted"}
        deadline = time.monotonic() + 60
        while True:
            back = await shell(
                here(see_didomi.replace("curl -s", "curl -s -f", 1), port, fake_port, didomi_port)
                + " || true",
                tmp_path,
            )
            if "200 delivered" in back:
                break
            assert time.monotonic() < deadline, f"Didomi never got the choice:\n{back}"
            await asyncio.sleep(0.5)
        user = msgspec.json.decode(back[: back.index("\n}\n") + 3])
        assert user["organization_user_id"] == "user-123"
        assert {"id": "marketing_email", "enabled": False, "values": {}} in user["consents"][
            "purposes"
        ]
        top = back[back.index("\n}\n") + 3 :].splitlines()[0]  # the trail, newest first
        assert "to_didomi" in top
        assert "/consents/events email_subscribe=unsubscribed" in top
        assert f"http://127.0.0.1:{didomi_port}" in log.read_text()
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        status = await asyncio.wait_for(proc.wait(), timeout=30)
    assert status == 0, log.read_text()


async def test_check_online_passes_against_the_running_demo_both_ways(tmp_path: Path) -> None:
    """The demo's fakes know what its rules name: `check --online` finds every id, exit 0."""
    port, fake_port, didomi_port = free_port(), free_port(), free_port()
    lay_out_demo(tmp_path, port, fake_port, didomi_port)
    config = tmp_path / "examples" / "demo.toml"
    log = tmp_path / "gateway.log"
    env = {k: v for k, v in os.environ.items() if k not in SECRETS}
    with log.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway", "run", "--config", str(config),
            cwd=tmp_path, stdin=subprocess.DEVNULL, stdout=out, stderr=out, env=env,
        )  # fmt: skip
    try:
        await ready(f"http://127.0.0.1:{port}", proc, log)
        check = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway", "check", "--online", "--config", str(config),
            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
        )  # fmt: skip
        said, err = await asyncio.wait_for(check.communicate(), timeout=60)
        assert check.returncode == 0, err.decode()
        lines = said.decode().splitlines()
        assert any(f"online: Didomi 127.0.0.1:{didomi_port}: login" in line for line in lines)
        assert any("1 purpose id(s) and 3 preference value id(s) exist" in x for x in lines)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), timeout=30) == 0, log.read_text()


def test_the_fake_braze_is_only_ever_written_in_the_file(tmp_path: Path) -> None:
    """`fake://` from an environment variable is a config error; written in the file, it loads."""
    fake = "fake://127.0.0.1:9090"
    for server, env in (
        ("${BRAZE_SERVER}", {"BRAZE_SERVER": fake}),
        (f"${{BRAZE_SERVER:-{fake}}}", {}),  # an unset variable must not fall back to the demo
        ("fake://127.0.0.1:${FAKE_PORT}", {"FAKE_PORT": "9090"}),
    ):
        path = write_config(tmp_path, braze={"server": server})
        with pytest.raises(ConfigError) as caught:
            load_config(path, {**SECRETS, **env})
        (problem,) = caught.value.problems
        assert problem.line is not None
        assert "braze.server" in problem.message
        assert "environment variable" in problem.message
    config = load_config(write_config(tmp_path, braze={"server": fake}), SECRETS)
    assert braze_base_url(config.braze.server) == "http://127.0.0.1:9090"
    demo = load_config(DEMO, {})  # the shipped demo needs no environment at all
    assert braze_base_url(demo.braze.server) == f"http://127.0.0.1:{FAKE_PORT}"
    assert demo.server.host == "127.0.0.1"


def test_the_fake_didomi_is_written_in_the_file_on_loopback_only(tmp_path: Path) -> None:
    """As the fake Braze: never through a variable, never off loopback; the demo's is /v1."""
    api = {"enabled": True, "organization_id": "org", "key": "k", "secret": "s"}
    fake = "fake://127.0.0.1:9091"
    braze = {"server": "fake://127.0.0.1:9090"}  # both fakes: a demo
    for base_url, env, said in (
        ("${DIDOMI_URL}", {"DIDOMI_URL": fake}, "environment variable"),
        (f"${{DIDOMI_URL:-{fake}}}", {}, "environment variable"),
        ("fake://0.0.0.0:9091", {}, "fake://127.0.0.1:PORT"),
        ("fake://127.0.0.1", {}, "fake://127.0.0.1:PORT"),
        ("fake://127.0.0.1:9091/v1", {}, "fake://127.0.0.1:PORT"),
    ):
        path = write_config(tmp_path, braze=braze, didomi_api={**api, "base_url": base_url})
        with pytest.raises(ConfigError) as caught:
            load_config(path, {**SECRETS, **env})
        (problem,) = caught.value.problems
        assert problem.line is not None, base_url
        assert "didomi_api.base_url" in problem.message, base_url
        assert said in problem.message, base_url
    path = write_config(tmp_path, braze=braze, didomi_api={**api, "base_url": fake})
    config = load_config(path, SECRETS)
    assert didomi_base_url(config.didomi_api.base_url) == "http://127.0.0.1:9091/v1"
    assert didomi_base_url("https://api.didomi.io/v1/") == "https://api.didomi.io/v1"
    demo = load_config(DEMO, {})
    assert didomi_base_url(demo.didomi_api.base_url) == f"http://127.0.0.1:{DIDOMI_PORT}/v1"
    assert demo.braze_webhooks is not None


def test_a_fake_on_one_side_only_is_refused_with_the_reverse_path_on(tmp_path: Path) -> None:
    """A real Braze's unsubscribes written to the in-memory fake Didomi would be lost at exit,
    and a demo's made-up acts written to a real Didomi would be recorded as consent: refused."""
    api = {"enabled": True, "organization_id": "org", "key": "k", "secret": "s"}
    for braze, didomi in (
        ("US-01", "fake://127.0.0.1:9091"),
        ("fake://127.0.0.1:9090", "https://api.didomi.io/v1"),
    ):
        path = write_config(
            tmp_path, braze={"server": braze}, didomi_api={**api, "base_url": didomi}
        )
        with pytest.raises(ConfigError) as caught:
            load_config(path, SECRETS)
        (problem,) = caught.value.problems
        assert "both" in problem.message, problem.message
        assert problem.line is not None
    path = write_config(  # reading users only (backfill didomi-api) mixes nothing
        tmp_path,
        braze={"server": "fake://127.0.0.1:9090"},
        didomi_api={**api, "enabled": False, "base_url": "https://api.didomi.io/v1"},
    )
    load_config(path, SECRETS)


def test_a_section_that_does_not_load_draws_no_cross_section_problem(tmp_path: Path) -> None:
    """A typo in [braze] (or [didomi_api]) of the demo is its one problem: the rules reading
    that section with it (fakes on both sides, [braze_webhooks] needing [didomi_api]) would
    judge its defaults, not what the file says."""
    api = {"enabled": True, "organization_id": "org", "key": "k", "secret": "s"}
    fakes = {"server": "fake://127.0.0.1:9090"}, {**api, "base_url": "fake://127.0.0.1:9091"}
    for braze, didomi_api, wrong in (
        ({**fakes[0], "batch_size": "many"}, fakes[1], "braze.batch_size"),
        (fakes[0], {**fakes[1], "timeout_s": "slow"}, "didomi_api.timeout_s"),
    ):
        path = write_config(
            tmp_path, braze=braze, didomi_api=didomi_api, braze_webhooks={"tokens": ["t"]}
        )
        with pytest.raises(ConfigError) as caught:
            load_config(path, SECRETS)
        (problem,) = caught.value.problems
        assert wrong in problem.message, problem.message


def test_the_fake_braze_serves_loopback_only(tmp_path: Path) -> None:
    """A fake Braze off loopback, or without a port, is refused with the form to write."""
    for server in (
        "fake://0.0.0.0:9090",
        "fake://braze.example.com:9090",
        "fake://127.0.0.1",
        "fake://127.0.0.1:0",
        "fake://127.0.0.1:9090/users",
    ):
        path = write_config(tmp_path, braze={"server": server})
        with pytest.raises(ConfigError) as caught:
            load_config(path, SECRETS)
        (problem,) = caught.value.problems
        assert "fake://127.0.0.1:PORT" in problem.message, server
    config = write_config(tmp_path, braze={"server": "fake://[::1]:9090"})
    assert braze_base_url(load_config(config, SECRETS).braze.server) == "http://[::1]:9090"


async def test_a_fake_on_ipv6_loopback_names_a_url_that_opens() -> None:
    """`fake://[::1]:PORT` is accepted, so the URL the DEMO line names (the fake's `url`) is
    bracketed as a URL must be, and a person's page opens there."""
    if not socket.has_ipv6:
        pytest.skip("no IPv6 here")
    fake = FakeBraze(api_key="k")
    try:
        url = await fake.start("::1", 0)
    except OSError:
        pytest.skip("no IPv6 loopback here")
    try:
        assert url.startswith("http://[::1]:"), url
        async with aiohttp.ClientSession() as session, session.get(url + "/fake/users") as got:
            assert got.status == 200
    finally:
        await fake.stop()


def test_check_says_the_demo_is_a_demo_without_loading_the_fake() -> None:
    """`gateway check` on the demo says DEMO and the fake's URL, and never imports test code."""
    probe = (
        "import sys\n"
        "from gateway.cli.main import main\n"
        f"status = main(['check', '--config', {str(DEMO)!r}])\n"
        "print('loaded:', sorted(m for m in sys.modules if m.startswith('gateway.testing')))\n"
        "sys.exit(status)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    first = done.stdout.splitlines()[0]
    assert "DEMO" in first
    assert f"http://127.0.0.1:{FAKE_PORT}" in first
    assert f"Didomi the fake it serves at http://127.0.0.1:{DIDOMI_PORT}" in first
    assert "loaded: []" in done.stdout


async def test_the_fake_braze_shows_a_persons_state() -> None:
    """GET /fake/users/{id} shows what a profile holds after /users/track; 404 for nobody."""
    fake = FakeBraze(api_key="k")
    await fake.start()
    try:
        async with aiohttp.ClientSession() as session:
            track = {
                "attributes": [
                    {
                        "external_id": "user-9",
                        "email_subscribe": "unsubscribed",
                        "subscription_groups": [
                            {"subscription_group_id": GROUP, "subscription_state": "unsubscribed"}
                        ],
                        "consent_marketing": False,
                    }
                ]
            }
            headers = {"Authorization": "Bearer k"}
            async with session.post(fake.url + "/users/track", json=track, headers=headers) as r:
                assert r.status == 201
            async with session.get(fake.url + "/fake/users/user-9") as r:
                assert r.status == 200
                state = msgspec.json.decode(await r.read())
            async with session.get(fake.url + "/fake/users/nobody") as r:
                assert r.status == 404
                assert "nobody" in (await r.json())["message"]
            async with session.get(fake.url + "/fake/users") as r:
                everyone = (await r.json())["users"]
    finally:
        await fake.stop()
    assert state == {
        "user": "user-9",
        "email_subscribe": "unsubscribed",
        "subscription_groups": {GROUP: "unsubscribed"},
        "attributes": {"consent_marketing": False},
    }
    assert everyone == [state]


@pytest.mark.parametrize("key", ["braze.server", "didomi_api.base_url"])
def test_a_taken_fake_port_stops_the_demo_and_names_the_key(tmp_path: Path, key: str) -> None:
    """A fake whose port is taken stops `gateway run` with exit 1, naming its key."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        fake_port = taken.getsockname()[1]
        fake = f"fake://127.0.0.1:{fake_port}"
        sections: dict[str, dict[str, object]] = {"braze": {"server": fake, "api_key": "demo"}}
        if key == "didomi_api.base_url":
            sections = {
                "braze": {"server": f"fake://127.0.0.1:{free_port()}", "api_key": "demo"},
                "didomi_api": {
                    "enabled": True,
                    "base_url": fake,
                    "organization_id": "demo",
                    "key": "k",
                    "secret": "s",
                },
                "braze_webhooks": {"tokens": ["t"]},
            }
        path = write_config(
            tmp_path,
            server={"port": free_port()},
            auth={"client_secret": "demo"},
            **sections,
        )
        done = subprocess.run(
            [sys.executable, "-m", "gateway", "run", "--config", str(path)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            cwd=tmp_path,
        )
    assert done.returncode == 1, done.stderr
    assert f"127.0.0.1:{fake_port}" in done.stderr
    assert key in done.stderr
    assert "Traceback" not in done.stderr
