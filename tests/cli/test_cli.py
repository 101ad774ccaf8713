"""The `gateway` command: check, render, test and dead-letters, as an operator runs them."""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
import pytest

from gateway.app.server import SPOOL
from gateway.cli.main import main
from gateway.spool.sqlite import AUDIT_CHANGE_BYTES, AUDIT_RECORD_BYTES, Dead, SpoolDB
from gateway.testing.braze import FakeBraze
from tests.conftest import SECRETS, choice, free_port, write_config
from tests.system.test_reliability import (  # noqa: F401 - start_gateway is a fixture
    GatewayProcess,
    StartGateway,
    eventually,
    spool_counts,
    start_gateway,
)

ROOT = Path(__file__).resolve().parents[2]
EVENTS = ROOT / "tests" / "events"
NEWS = "3b0a6f8e-5c1d-4e2f-9a7b-0c1d2e3f4a5b"
# `gateway render` of a shipped event with the shipped rules: it prints, and needs no config.
RENDER = [
    sys.executable,
    "-m",
    "gateway",
    "render",
    str(EVENTS / "consent_given.json"),
    "--mappings",
    str(ROOT / "mappings"),
]


@pytest.fixture
def setup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A gateway.toml with mappings in tmp_path and its secrets in the environment."""
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    return write_config(tmp_path)


def test_check_prints_a_summary_and_exits_0(
    setup: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A good config gives a summary of rules per target and purposes referenced on stdout."""
    assert main(["check", "--config", str(setup)]) == 0
    out = capsys.readouterr().out
    assert "5 rules in 1 file(s), 4 test(s)" in out
    assert "email_subscribe" in out
    assert f"group:{NEWS}" in out
    assert "purposes referenced (1): marketing_email" in out


def test_check_lists_every_problem_on_stderr_and_exits_1(
    setup: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Problems in gateway.toml and in a mapping file come together, as file:line: message."""
    monkeypatch.delenv("BRAZE_API_KEY")
    mapping = setup.parent / "mappings" / "email.toml"
    mapping.write_text(mapping.read_text() + '\n[[map]]\nto = "NOPE"\npurpose = "x"\n')
    assert main(["check", "--config", str(setup)]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert any(
        line.startswith(f"{setup}:") and "BRAZE_API_KEY is not set" in line for line in lines
    )
    assert any(line.startswith(f"{mapping}:") and "unknown `to` 'NOPE'" in line for line in lines)
    assert lines[-1] == "2 problem(s) found"
    assert "Traceback" not in captured.err


def test_check_warns_of_a_regulation_didomi_does_not_document_on_its_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A typo (`gdrp`) would skip every event as `regulation`: said, with the ids, exit still 0."""
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    config = write_config(tmp_path, didomi={"regulations": ["gdrp", "cpra", "lgpd"]})
    assert main(["check", "--config", str(config)]) == 0
    captured = capsys.readouterr()
    warnings = [line for line in captured.err.splitlines() if "warning" in line]
    assert len(warnings) == 2, captured.err
    gdrp, lgpd = warnings
    line = next(
        n
        for n, text in enumerate(config.read_text().splitlines(), start=1)
        if text.startswith("regulations")
    )
    assert gdrp.startswith(f"{config}:{line}: warning: didomi.regulations: 'gdrp'")
    assert "did you mean 'gdpr'?" in gdrp
    assert "gdpr, cpra, cpa, ctdpa, vcdpa" in gdrp
    assert "skipped as `regulation`" in gdrp
    assert "'lgpd'" in lgpd
    assert "did you mean" not in lgpd
    write_config(tmp_path, didomi={"regulations": ["gdpr", "cpra"]})
    assert main(["check", "--config", str(config)]) == 0
    assert "warning" not in capsys.readouterr().err
    api = {"enabled": True, "organization_id": "org", "key": "k", "secret": "s"}
    write_config(tmp_path, didomi_api={**api, "regulation": "gpdr"})
    assert main(["check", "--config", str(config)]) == 0
    [warning] = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert "warning: didomi_api.regulation: 'gpdr'" in warning
    assert "did you mean 'gdpr'?" in warning


def test_check_never_shows_a_traceback_for_a_broken_file(tmp_path: Path) -> None:
    """Invalid TOML is reported with its line by the real command, never as a traceback."""
    path = tmp_path / "gateway.toml"
    path.write_text("[braze\nserver = 1\n")
    run = subprocess.run(
        [sys.executable, "-m", "gateway", "check", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert run.returncode == 1
    assert f"{path}:1: invalid TOML" in run.stderr
    assert "Traceback" not in run.stderr


def test_render_prints_the_track_bodies(setup: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """render prints the exact /users/track bodies, batched as they would be sent."""
    event = EVENTS / "consent_given.json"
    assert main(["render", str(event), "--config", str(setup)]) == 0
    bodies = json.loads(capsys.readouterr().out)
    assert len(bodies) == 1
    [obj] = bodies[0]["attributes"]
    assert obj["external_id"] == "user-123"
    assert obj["_update_existing_only"] is True
    assert obj["email_subscribe"] == "opted_in"
    assert {"subscription_group_id": NEWS, "subscription_state": "subscribed"} in obj[
        "subscription_groups"
    ]


def test_render_needs_only_the_mappings(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With --mappings, render works without a gateway.toml or any secret."""
    monkeypatch.chdir(tmp_path)
    event = EVENTS / "consent_withdrawn.json"
    assert main(["render", str(event), "--mappings", str(ROOT / "mappings")]) == 0
    [body] = json.loads(capsys.readouterr().out)
    assert body["attributes"][0]["email_subscribe"] == "unsubscribed"


def test_render_of_an_event_that_changes_nothing(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """An event the rules skip renders as no request, and says why on stderr."""
    args = ["render", str(EVENTS / "event_pending.json"), "--mappings", str(ROOT / "mappings")]
    assert main(args) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out) == []
    assert "not_confirmed" in captured.err


def test_render_refuses_a_body_that_is_not_a_webhook(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A file that is not a Didomi webhook is an error with the reason, exit 1."""
    bad = tmp_path / "bad.json"
    bad.write_text('{"type": 3}')
    assert main(["render", str(bad), "--mappings", str(ROOT / "mappings")]) == 1
    assert "not a Didomi webhook" in capsys.readouterr().err


def test_test_command_runs_the_shipped_tests(capsys: pytest.CaptureFixture[str]) -> None:
    """`gateway test` runs the [[test]] tables of the shipped mappings and they all pass."""
    assert main(["test", "--mappings", str(ROOT / "mappings")]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "4 passed, 0 failed"


def test_test_command_shows_a_readable_diff_and_exits_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A failing [[test]] prints expected against produced per target, and exits 1."""
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "a.toml").write_text(
        f"""
[[map]]
to = "OPTED_IN"
purpose = "marketing_email"

[[test]]
name = "wrong on purpose"
event = "{EVENTS / "consent_withdrawn.json"}"
expect = {{ email_subscribe = "opted_in", subscription_groups = {{ "{NEWS}" = "subscribed" }} }}

[[test]]
name = "right"
event = "{EVENTS / "consent_withdrawn.json"}"
expect = {{ email_subscribe = "unsubscribed" }}
"""
    )
    assert main(["test", "--mappings", str(folder)]) == 1
    out = capsys.readouterr().out
    assert "FAIL wrong on purpose" in out
    assert 'email_subscribe: expected "opted_in", produced "unsubscribed"' in out
    assert f'subscription_groups[{NEWS}]: expected "subscribed", produced no change' in out
    assert "ok   right" in out
    assert out.splitlines()[-1] == "1 passed, 1 failed"


def test_check_warns_of_an_undocumented_didomi_api_regulation_even_when_not_enabled(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`backfill didomi-api` reads [didomi_api] without `enabled` (no reverse path), so a typo
    in its regulation is warned about there too, on its line, exit still 0."""
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    api = {"organization_id": "org", "key": "k", "secret": "s", "regulation": "cppa"}
    config = write_config(tmp_path, didomi_api=api)
    assert main(["check", "--config", str(config)]) == 0
    [warning] = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    line = next(
        n
        for n, text in enumerate(config.read_text().splitlines(), start=1)
        if text.startswith("regulation")
    )
    assert warning.startswith(f"{config}:{line}: warning: didomi_api.regulation: 'cppa'")
    assert "did you mean 'cpa'?" in warning


def test_a_test_whose_event_cannot_be_used_says_where_it_looked_and_why_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A [[test]] event file that is not there is named by the path read (relative to its
    mapping file), and a malformed inline event's reason is not said twice."""
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "a.toml").write_text(
        """
[[map]]
to = "OPTED_IN"
purpose = "marketing_email"

[[test]]
name = "missing"
event = "events/nope.json"
expect = { email_subscribe = "opted_in" }

[[test]]
name = "inline"
event = { type = "event.created" }
expect = { email_subscribe = "opted_in" }
"""
    )
    assert main(["test", "--mappings", str(folder)]) == 1
    out = capsys.readouterr().out
    assert f"cannot read the event 'events/nope.json' at {folder / 'events' / 'nope.json'}" in out
    assert "(an event path is relative to its mapping file)" in out
    assert "not a Didomi webhook" in out
    assert out.count("not a Didomi webhook") == 1, out


def test_dead_letters_list_replay_purge(setup: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """dead-letters lists with reasons, replays into the spool, purges, and refuses unknown ids."""
    spool = setup.parent / "var" / "gateway.db"
    db = SpoolDB(spool)
    body = (EVENTS / "consent_given.json").read_bytes()
    db.put_many([("a", "event.created", body), ("b", "event.created", body)])
    rows = db.fetch(0, 10)
    db.ack([], [], [Dead(rows[0].id, "Braze refused the object: invalid", "user-123")])
    db.ack([], [], [Dead(rows[1].id, "gave_up: timeout", "user-123")])
    db.close()

    assert main(["dead-letters", "list", "--config", str(setup)]) == 0
    out = capsys.readouterr().out
    assert "Braze refused the object: invalid" in out
    assert "gave_up: timeout" in out
    assert out.splitlines()[-1] == "2 dead letter(s)"
    first = int(out.splitlines()[0].split("\t")[0])

    assert main(["dead-letters", "replay", "--id", str(first), "--config", str(setup)]) == 0
    assert "1 dead letter(s) moved back" in capsys.readouterr().out
    assert main(["dead-letters", "replay", "--id", "999", "--config", str(setup)]) == 1
    capsys.readouterr()
    assert main(["dead-letters", "purge", "--config", str(setup)]) == 0
    assert "1 dead letter(s) deleted" in capsys.readouterr().out

    db = SpoolDB(spool)
    assert db.count_dead() == 0
    assert db.count_pending() == 1
    db.close()


# ---------------------------------------------------------------------------
# The reverse path: Braze bodies rendered into Didomi requests.

BRAZE = EVENTS / "braze"


def test_check_warns_when_the_spool_volume_cannot_hold_the_audit_retention(
    setup: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """With --changes-per-day, check says on stdout whether the spool's volume holds
    retention.audit_days of audit records at that rate; short, a line labelled `warning:`
    that leaves the exit status 0, like the other information check prints."""
    assert main(["check", "--config", str(setup), "--changes-per-day", "1"]) == 0
    captured = capsys.readouterr()
    (line,) = [x for x in captured.out.splitlines() if "retention.audit_days" in x]
    assert line.startswith(f"{setup}: the spool's volume (")
    assert " holds " in line
    # One packed record a change: its own bytes, and each target's it may carry.
    targets = int(line.rsplit(" target(s)", 1)[0].rsplit("(", 1)[1])
    assert f"one record of about {AUDIT_RECORD_BYTES + targets * AUDIT_CHANGE_BYTES} bytes" in line
    assert captured.err == ""
    volume = os.statvfs(setup.parent)
    rate = volume.f_blocks * volume.f_frsize // 1000  # more than any volume holds in a day
    assert main(["check", "--config", str(setup), "--changes-per-day", str(rate)]) == 0
    captured = capsys.readouterr()
    (line,) = [x for x in captured.out.splitlines() if "retention.audit_days" in x]
    assert line.startswith(f"{setup}: warning: the spool's volume (")
    assert "cannot hold retention.audit_days = 400 of audit records" in line
    assert "gateway_audit_shed_total" in line
    assert captured.err == ""
    assert main(["check", "--config", str(setup)]) == 0  # without the flag: no such line
    assert "retention.audit_days" not in capsys.readouterr().out


def test_check_refuses_a_negative_rate_and_allow_unreachable_without_online(
    setup: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A negative --changes-per-day, or --allow-unreachable without --online (where it would
    do nothing), is a usage error (exit 2) that says what to write, not a silent answer."""
    assert main(["check", "--config", str(setup), "--changes-per-day", "-5"]) == 2
    err = capsys.readouterr().err
    assert "--changes-per-day takes a number of consent changes a day, 0 or more" in err
    assert main(["check", "--config", str(setup), "--allow-unreachable"]) == 2
    err = capsys.readouterr().err
    assert "--allow-unreachable only applies with --online" in err


ASSUMES = "# assumes no other Didomi choices; the gateway reads the person's current ones first"


def test_check_lists_the_rules_that_cannot_be_reversed_and_exits_0(
    setup: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """After the summary, check names each rule Braze changes cannot reach, labelled a warning
    (not an error: the exit status stays 0)."""
    assert main(["check", "--config", str(setup)]) == 0
    captured = capsys.readouterr()
    mapping = setup.parent / "mappings" / "email.toml"
    lines = [line for line in captured.out.splitlines() if "not reversible" in line]
    assert lines == [
        f"{mapping}:11: warning: not reversible (Braze -> Didomi): an UNSUBSCRIBED rule: "
        "Braze's unsubscribe cannot tell which Didomi value (or purpose) was meant",
        f"{mapping}:29: warning: not reversible (Braze -> Didomi): an attribute rule: neither a "
        "webhook step nor Currents reports custom attributes",
    ]
    assert captured.out.index("purposes referenced") < captured.out.index("not reversible")
    assert captured.err == ""


def test_render_a_webhook_step_prints_the_didomi_request(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A webhook-step body renders as the /consents/events request, with the assumption noted."""
    args = [
        "render",
        str(BRAZE / "webhook_step_unsubscribed.json"),
        "--mappings",
        str(ROOT / "mappings"),
    ]
    assert main(args) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out) == [
        {
            "endpoint": "/consents/events",
            "body": {
                "user": {"organization_user_id": "user-123"},
                "consents": {"purposes": [{"id": "marketing_email", "enabled": False}]},
                "metadata": {"source": "didomi-braze-gateway"},
            },
        }
    ]
    assert ASSUMES in captured.err.splitlines()


def test_render_a_currents_batch_prints_one_request_per_event(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Each subscription event of a batch is its own request; the others are counted on stderr."""
    args = ["render", str(BRAZE / "currents_batch.json"), "--mappings", str(ROOT / "mappings")]
    assert main(args) == 0
    captured = capsys.readouterr()
    requests = json.loads(captured.out)
    assert [r["body"]["user"]["organization_user_id"] for r in requests] == ["user-123", "user-456"]
    assert requests[1]["body"]["consents"]["purposes"] == [
        {"id": "marketing_email", "enabled": True, "values": {"topics": {"value": "offers"}}}
    ]
    assert {r["endpoint"] for r in requests} == {"/consents/events"}
    assert "# 1 event(s) of other types ignored, 1 invalid event(s) skipped" in captured.err
    assert ASSUMES in captured.err


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ({"external_id": "u", "email_subscribe": "subscribed", "time": "1"}, "no_rule"),
        ({"external_id": "u", "email_subscribe": "", "time": "1"}, "no_state"),
        (
            {"external_id": "", "email": "a@example.com", "email_subscribe": "opted_in", "time": 1},
            "no_identity",
        ),
        ({"external_id": "u", "groups": {NEWS: "unsubscribed"}, "time": "1"}, "no_change"),
        ({"events": []}, "no events"),
    ],
    ids=["neutral-state", "no-state", "email-only", "nothing-to-remove", "empty-batch"],
)
def test_render_of_a_braze_body_that_sends_nothing_says_why(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], body: dict[str, object], reason: str
) -> None:
    """A Braze body that asks nothing of Didomi renders as no request, with the reason."""
    path = tmp_path / "braze.json"
    path.write_text(json.dumps(body))
    assert main(["render", str(path), "--mappings", str(ROOT / "mappings")]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out) == []
    assert f"# nothing to send: {reason}" in captured.err


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (
            {"external_id": "u", "email_subscribe": "gone", "time": "1"},
            "`email_subscribe` is 'gone'",
        ),
        ({"external_id": "u", "email_subscribe": "opted_in", "time": "now"}, "`time` is 'now'"),
        ({"events": {"id": "e-1"}}, "not a Currents batch"),
    ],
    ids=["bad-state", "bad-time", "events-not-a-list"],
)
def test_render_refuses_a_bad_braze_body(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], body: dict[str, object], reason: str
) -> None:
    """A bad Braze body is an error with the reason, exit 1, never a traceback."""
    path = tmp_path / "braze.json"
    path.write_text(json.dumps(body))
    assert main(["render", str(path), "--mappings", str(ROOT / "mappings")]) == 1
    captured = capsys.readouterr()
    assert reason in captured.err
    assert "Traceback" not in captured.err


def test_render_still_takes_a_didomi_webhook_with_a_time_field(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A body with a `type` is Didomi's even if it also has `time` and `email`."""
    event = json.loads((EVENTS / "consent_given.json").read_text())
    event.update(time=1, email="x@example.com")
    path = tmp_path / "didomi.json"
    path.write_text(json.dumps(event))
    assert main(["render", str(path), "--mappings", str(ROOT / "mappings")]) == 0
    [body] = json.loads(capsys.readouterr().out)
    assert body["attributes"][0]["email_subscribe"] == "opted_in"


def test_python_dash_m_is_the_same_program() -> None:
    """`python -m gateway --version` answers like the `gateway` command."""
    run = subprocess.run(
        [sys.executable, "-m", "gateway", "--version"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert run.returncode == 0
    assert run.stdout.startswith("gateway ")


def gateway(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Run `python -m gateway ARGS` to completion, as an operator would from a shell."""
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=30,  # a gateway that should have refused to start serves until killed here
        check=False,
    )


@pytest.mark.slow
async def test_one_gateway_per_spool_while_dead_letters_works_beside_it(
    tmp_path: Path,
    secrets_env: dict[str, str],
    auth_headers: dict[str, str],
    processes: list[GatewayProcess],
) -> None:
    """A second `gateway run` on the spool of a running one exits 1 saying so, before it binds
    its port; the first keeps serving, `dead-letters list` works beside it, and the spool is
    free for another gateway once the first has stopped."""
    port, other_port = free_port(), free_port()
    config = write_config(tmp_path, server={"port": port})
    spool = tmp_path / "var" / "gateway.db"
    first = GatewayProcess(tmp_path, port, secrets_env)
    processes.append(first)
    await first.start()
    other = tmp_path / "other"
    other.mkdir()
    other_config = write_config(other, server={"port": other_port}, delivery={"spool": str(spool)})

    # Also the same gateway.toml started twice: it reports the spool, not the port in use,
    # since the lock is taken before the port is bound.
    for path in (other_config, config):
        args = ("run", "--config", str(path), "--log-format", "json")
        second = await asyncio.to_thread(gateway, *args, env=secrets_env)
        assert second.returncode == 1, second.stderr
        said = [json.loads(line)["msg"] for line in second.stderr.splitlines()]
        assert said[-1].startswith("cannot start: another gateway (pid ")
        assert f"is running on the spool {spool}" in said[-1]
        assert "ready" not in said

    assert (await first.readyz())[0] == 200
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session,
        session.post(
            f"{first.base}/webhooks/didomi", data=choice("ona", True), headers=auth_headers
        ) as resp,
    ):
        assert resp.status == 202  # the first gateway still stores webhooks
    listing = await asyncio.to_thread(
        gateway, "dead-letters", "list", "--config", str(other_config), env=secrets_env
    )
    assert listing.returncode == 0, listing.stderr
    assert listing.stdout.splitlines()[-1] == "0 dead letter(s)"

    assert await first.stop() == 0
    after = GatewayProcess(other, other_port, secrets_env)
    processes.append(after)
    await after.start()  # the lock went with the first gateway
    assert await after.stop() == 0
    assert spool_counts(spool) == (1, 0)  # the webhook the first gateway stored is still there


# ---------------------------------------------------------------------------
# The command line's edges: what a newcomer gets wrong, answered with what to do.


@pytest.mark.parametrize(
    "args",
    [
        ["trace", "user-123"],
        ["trace", "--event", "ev-1"],
        ["dead-letters", "list"],
        ["dead-letters", "replay"],
        ["dead-letters", "purge"],
    ],
    ids=["trace", "trace-event", "list", "replay", "purge"],
)
def test_commands_on_a_missing_spool_say_so_and_create_nothing(
    setup: Path, capsys: pytest.CaptureFixture[str], args: list[str]
) -> None:
    """trace and dead-letters on a SQLite spool that does not exist say "no spool at PATH" and
    exit 1, leaving no file (nor its folder) behind, rather than answer "0 records"."""
    spool = setup.parent / "var" / "gateway.db"
    assert main([*args, "--config", str(setup)]) == 1
    captured = capsys.readouterr()
    assert f"no spool at {spool}" in captured.err
    assert "record(s)" not in captured.out
    assert "dead letter(s)" not in captured.out
    assert not spool.parent.exists()


@pytest.mark.parametrize(
    "url",
    [
        "postgresql+psycopg://gateway@127.0.0.1/gateway",
        "mysql://gateway:hunter22@db.example/gateway",
        "sqlite:///var/gateway.db",
    ],
)
def test_a_spool_url_of_another_scheme_is_a_config_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], url: str
) -> None:
    """delivery.spool with a URL scheme other than postgresql:// is refused by `check` at its
    line, rather than taken for a file path; a password in it is never echoed."""
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    path = write_config(tmp_path, delivery={"spool": url})
    line = next(
        n for n, text in enumerate(path.read_text().splitlines(), 1) if text.startswith("spool")
    )
    assert main(["check", "--config", str(path)]) == 1
    err = capsys.readouterr().err
    assert f"{path}:{line}: delivery.spool" in err
    assert "postgresql://" in err
    assert "hunter22" not in err
    assert not any(p.name.endswith(":") for p in tmp_path.iterdir())


def test_trace_without_a_person_says_what_to_give(
    setup: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`gateway trace` with neither a person nor --event says what to give, not "not both"."""
    assert main(["trace", "--config", str(setup)]) == 1
    err = capsys.readouterr().err
    assert "give a PERSON" in err
    assert "not both" not in err
    assert main(["trace", "someone", "--event", "ev-1", "--config", str(setup)]) == 1
    assert "not both" in capsys.readouterr().err


@pytest.mark.parametrize("given", ["", "\n", "   \n"], ids=["nothing", "empty-line", "blanks"])
def test_trace_dash_refuses_an_empty_person(
    setup: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, given: str
) -> None:
    """`printf '' | gateway trace -` refuses to search for an empty person and exits 1."""
    SpoolDB(setup.parent / "var" / "gateway.db").close()
    monkeypatch.setattr(sys, "stdin", io.StringIO(given))
    assert main(["trace", "-", "--config", str(setup)]) == 1
    captured = capsys.readouterr()
    assert "standard input" in captured.err
    assert "record(s)" not in captured.out


def test_render_dash_reads_the_event_from_standard_input(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`gateway render -` reads the body from standard input, as `trace -` reads the person."""
    body = (EVENTS / "consent_given.json").read_bytes()
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(body)))
    assert main(["render", "-", "--mappings", str(ROOT / "mappings")]) == 0
    [request] = json.loads(capsys.readouterr().out)
    assert request["attributes"][0]["email_subscribe"] == "opted_in"
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"{")))
    assert main(["render", "-", "--mappings", str(ROOT / "mappings")]) == 1
    assert "gateway: standard input:" in capsys.readouterr().err


def test_replay_or_purge_of_an_unknown_id_says_it_does_not_exist(
    setup: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`dead-letters replay --id 999` names the id that does not exist, exits 1 and moves
    nothing, not even the ids given beside it that do exist."""
    spool = setup.parent / "var" / "gateway.db"
    db = SpoolDB(spool)
    db.put_many([("a", "event.created", (EVENTS / "consent_given.json").read_bytes())])
    [row] = db.fetch(0, 10)
    db.ack([], [], [Dead(row.id, "gave_up: timeout", "user-123")])
    [letter] = db.dead_letters()
    db.close()
    for action in ("replay", "purge"):
        args = ["dead-letters", action, "--id", str(letter.id), "--id", "999"]
        assert main([*args, "--config", str(setup)]) == 1
        captured = capsys.readouterr()
        assert "no dead letter 999" in captured.err
        assert "moved back" not in captured.out
        assert spool_counts(spool) == (0, 1)


def test_migrate_says_created_for_a_new_spool_file(
    setup: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`gateway migrate` on a SQLite path with no file says it created it; then, up to date."""
    spool = setup.parent / "var" / "gateway.db"
    assert main(["migrate", "--config", str(setup)]) == 0
    assert capsys.readouterr().out.strip() == f"the spool {spool} was created"
    assert spool.exists()
    assert main(["migrate", "--config", str(setup)]) == 0
    assert capsys.readouterr().out.strip() == f"the spool {spool} is up to date"


@pytest.mark.parametrize(
    "broken",
    ["unknown-section", "missing-secret", "missing-file"],
)
def test_config_errors_under_run_are_json_lines(
    tmp_path: Path, secrets_env: dict[str, str], broken: str
) -> None:
    """`gateway run` on a bad config writes each problem as a JSON log line with its file:line,
    as every other stderr line of a server is, and exits 1 without serving."""
    path = write_config(tmp_path, server={"port": free_port()})
    env = dict(secrets_env)
    if broken == "unknown-section":
        path.write_text(path.read_text() + "\n[brazе]\nserver = 1\n")
    elif broken == "missing-secret":
        env["BRAZE_API_KEY"] = ""
    else:
        path.unlink()
    for args in (["--log-format", "json"], []):  # not a terminal: JSON unless told otherwise
        run = gateway("run", "--config", str(path), *args, env=env)
        assert run.returncode == 1, run.stderr
        lines = [json.loads(line) for line in run.stderr.splitlines()]
        assert lines, "nothing said"
        assert all(line["level"] == "ERROR" for line in lines)
        assert any(line["msg"].startswith(f"cannot start: {path}") for line in lines), lines
        assert "ready" not in [line["msg"] for line in lines]


def test_ctrl_c_in_the_first_half_second_never_prints_a_traceback(
    tmp_path: Path, secrets_env: dict[str, str]
) -> None:
    """SIGINT at any moment of a start (imports, config, spool, binding) ends `gateway run`
    quietly, with no KeyboardInterrupt traceback, whatever the exit status.

    The delay counts from a line the launcher prints once the interpreter's own start-up is
    over, just before it runs `python -m gateway`: the gateway's code is what is tested, not
    the interpreter's (whose site imports are not the gateway's to guard). A signal that still
    comes before the gateway's first instruction (a busy machine) exits 99 and proves nothing.
    """
    path = write_config(tmp_path, server={"port": free_port()})
    launcher = (
        "import runpy, signal, sys\n"
        "def early(*_): raise SystemExit(99)\n"
        "signal.signal(signal.SIGINT, early)\n"
        "sys.argv[1:] = sys.argv[2:]\n"
        "print('go', flush=True)\n"
        "runpy.run_module('gateway', run_name='__main__', alter_sys=True)\n"
    )
    reached = 0
    delays = (0.0, 0.01, 0.03, 0.06, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5)
    for delay in delays:
        proc = subprocess.Popen(
            [sys.executable, "-c", launcher, "-", "run", "--config", str(path)],
            env={**os.environ, **secrets_env},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert proc.stdout is not None
            assert proc.stdout.readline() == "go\n"
            time.sleep(delay)
            proc.send_signal(signal.SIGINT)
            _, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
        assert "Traceback" not in err, f"after {delay} s:\n{err}"
        assert "KeyboardInterrupt" not in err, f"after {delay} s:\n{err}"
        assert proc.returncode in (0, 99, 130, -signal.SIGINT), f"after {delay} s:\n{err}"
        reached += proc.returncode != 99
    assert reached >= len(delays) // 2, "most signals came before the gateway even started"


async def test_a_replay_from_the_cli_reaches_braze_from_the_idle_server_promptly(
    start_gateway: StartGateway,  # noqa: F811 - the imported fixture
    fake: FakeBraze,
    auth_headers: dict[str, str],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Each dead letter `gateway dead-letters replay` moves back beside a running, idle gateway
    reaches Braze within a couple of seconds (the server looks for another process's writes
    twice a second while idle), not after its 5 s re-read."""
    refused = {"replay-0", "replay-1", "replay-2"}
    fake.reject_objects(lambda o: "invalid_user" if o.get("external_id") in refused else None)
    gw = await start_gateway(fake.url)
    when = (datetime.now(UTC) - timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    for person in sorted(refused):
        assert await gw.post(choice(person, True, when), auth_headers) == 202
    await gw.settle()
    letters = gw.app[SPOOL].db.dead_letters()
    assert len(letters) == 3
    refused.clear()
    config = str(tmp_path / "gateway.toml")
    for letter in letters:
        await asyncio.sleep(1.0)  # idle: the dispatcher is asleep in its loop
        args = ["dead-letters", "replay", "--id", str(letter.id), "--config", config]
        assert await asyncio.to_thread(main, args) == 0
        replayed = time.monotonic()

        async def sent(person: str | None = letter.person) -> bool:
            return person in {o["external_id"] for o in fake.objects_sent()}

        await eventually(sent, 30, f"{letter.person} to reach Braze")
        took = time.monotonic() - replayed
        assert took < 2.5, f"{letter.person} reached Braze {took:.1f} s after the replay"
    capsys.readouterr()


@pytest.mark.parametrize("buffered", [True, False], ids=["buffered", "unbuffered"])
def test_output_cut_short_by_the_reader_prints_no_traceback(buffered: bool) -> None:
    """`gateway render ... | head -1`: a reader that stops early ends the command quietly,
    with stdout block-buffered (a shell's pipe, the output still unwritten when the command
    returns) as with PYTHONUNBUFFERED set."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    if not buffered:
        env["PYTHONUNBUFFERED"] = "1"
    proc = subprocess.Popen(
        RENDER,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stdout is not None
    proc.stdout.close()  # as `head` does once it has its lines: every write now fails
    try:
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "Traceback" not in err, err
    assert "BrokenPipeError" not in err, err
    assert proc.returncode == 141, err  # as a shell reports a command stopped by SIGPIPE


def test_a_command_started_with_stdout_closed_ends_quietly() -> None:
    """Started with no stdout at all (`>&-`, as some supervisors do), a command that prints
    still ends with its own status and no traceback: there is nothing to flush."""
    done = subprocess.run(
        ["/bin/sh", "-c", 'exec "$@" >&-', "sh", *RENDER],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "Traceback" not in done.stderr, done.stderr
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("command", ["migrate", "backfill", "trace", "dead-letters"])
def test_a_command_opening_the_spool_needs_the_person_key_variable(
    tmp_path: Path,
    command: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """With `retention.person_key = "${GATEWAY_PERSON_KEY}"` unset, a command that opens the
    spool stops naming the variable: it neither keys a new spool with a random key of its own
    (the gateway's key is then refused) nor fails on a written one with 'another key'."""
    from gateway.config.settings import load_config
    from gateway.spool.backend import open_store
    from tests.bulk.test_reconcile import write_export

    key = "test-person-key-3a1f"
    path = write_config(tmp_path, retention={"person_key": "${GATEWAY_PERSON_KEY}"})
    config = load_config(path, {**SECRETS, "GATEWAY_PERSON_KEY": key})
    if command in ("trace", "dead-letters"):  # they read a spool the gateway wrote
        open_store(config.delivery, key).close()
    args = {
        "migrate": [],
        "backfill": [str(write_export(tmp_path / "users.json", 2))],
        "trace": ["user-1"],
        "dead-letters": ["list"],
    }[command]
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("GATEWAY_PERSON_KEY", raising=False)
    assert main([command, "--config", str(path), *args]) != 0
    assert "environment variable GATEWAY_PERSON_KEY is not set" in capsys.readouterr().err
    open_store(config.delivery, key).close()  # the gateway's key still opens it
    if command == "backfill":  # a dry run opens no spool: it needs no key
        assert main([command, "--config", str(path), *args, "--dry-run"]) == 0
