"""`gateway reconcile`: Braze's reads as Braze documents them, the comparison, the pacing."""

from __future__ import annotations

import asyncio
import io
import json
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway.bulk import drift
from gateway.bulk.reconcile import Report, person_of, wilson
from gateway.bulk.sources import UserRecord
from gateway.cli.reconcile import Options, run
from gateway.config.settings import Config
from gateway.metrics import Metrics
from gateway.peers.braze_export import BrazeReader, WindowLimiter
from gateway.rules.mappings import EMAIL, Target, load_rules
from gateway.shapes.webhooks import Entity
from gateway.spool.backend import open_store
from gateway.spool.face import Spool
from gateway.testing.braze import FakeBraze
from gateway.testing.didomi import FakeDidomi
from tests.conftest import BRAZE_API_KEY, MakeConfig, recent

NEWS = "3b0a6f8e-5c1d-4e2f-9a7b-0c1d2e3f4a5b"
OFFERS = "7c1e2d3f-4a5b-4c6d-8e9f-0a1b2c3d4e5f"
ATTR = Target.attribute("consent_marketing")
KEY = {"Authorization": f"Bearer {BRAZE_API_KEY}"}


def didomi_user(n: int, at: str = recent(566 + 53 / 60)) -> dict[str, Any]:
    """User n of four kinds: both topics; offers only; refused; opted in but `never`."""
    kind = n % 4
    purpose: dict[str, Any] = {"id": "marketing_email", "enabled": kind != 2}
    if kind == 0:
        purpose["values"] = {"topics": {"value": "product_news,offers"}}
    elif kind == 1:
        purpose["values"] = {"topics": {"value": "offers"}}
    elif kind == 3:
        purpose["values"] = {"topics": {"value": "product_news"}, "frequency": {"value": "never"}}
    return {
        "id": f"didomi-{n}",
        "organization_user_id": f"user-{n}",
        "updated_at": at,
        "consents": {"purposes": [purpose]},
    }


def write_export(path: Path, count: int) -> Path:
    """A Didomi batch-export file of `count` users, each line wrapping its user."""
    with path.open("w") as out:
        for n in range(count):
            out.write(json.dumps({"user": didomi_user(n), "events": []}) + "\n")
    return path


def seed_agreeing(fake: FakeBraze, config: Config, count: int) -> None:
    """Put in the fake Braze exactly what the rules give from each user's Didomi status."""
    rules = load_rules(config.mappings.dir)
    for n in range(count):
        raw = json.dumps(didomi_user(n)).encode()
        found = person_of(rules, UserRecord(_entity(raw), raw, "", ""))
        assert not isinstance(found, str)
        changes = found.changes
        fake.seed(
            found.person,
            email_subscribe=str(changes[EMAIL]),
            groups={t.name: str(s) for t, s in changes.items() if t.kind == "group"},
            attributes={t.name: s for t, s in changes.items() if t.kind == "attribute"},
        )


def _entity(raw: bytes) -> Entity:
    import msgspec

    return msgspec.json.decode(raw, type=Entity)


def options(path: Path, **kw: Any) -> Options:
    return Options([str(path)], out=io.StringIO(), err=io.StringIO(), **kw)


@pytest.fixture
def reconcile_config(tmp_path: Path, make_config: MakeConfig, fake: FakeBraze) -> Config:
    return make_config(tmp_path, braze={"server": fake.url, "update_existing_only": False})


# ---------------------------------------------------------------------------
# The fake Braze's reads.


async def test_fake_export_answers_and_refuses_as_braze_documents(fake: FakeBraze) -> None:
    """Export: found users with the fields asked, unknown ids in `invalid_user_ids`, 400 for 51
    ids, for no `fields_to_export` (newer workspaces), for an email with external ids."""
    fake.seed("a", email_subscribe="opted_in", attributes={"x": True, "email": "a@example.com"})
    url = fake.url + "/users/export/ids"
    async with aiohttp.ClientSession(headers=KEY) as session:
        body = {"external_ids": ["a", "b"], "fields_to_export": ["external_id", "email_subscribe"]}
        async with session.post(url, json=body) as response:
            assert response.status == 201
            assert response.headers["X-RateLimit-Limit"] == "250"
            answer = await response.json()
        assert answer["users"] == [{"external_id": "a", "email_subscribe": "opted_in"}]
        assert answer["invalid_user_ids"] == ["b"]
        body = {"email_address": "a@example.com", "fields_to_export": ["external_id", "email"]}
        async with session.post(url, json=body) as response:
            answer = await response.json()
        assert answer["users"] == [{"external_id": "a", "email": "a@example.com"}]
        for refused in (
            {"external_ids": [str(i) for i in range(51)], "fields_to_export": ["external_id"]},
            {"external_ids": ["a"]},
            {"external_ids": ["a"], "email_address": "a@example.com", "fields_to_export": []},
        ):
            async with session.post(url, json=refused) as response:
                assert response.status == 400, refused


async def test_fake_subscription_status_keeps_the_last_group_state(fake: FakeBraze) -> None:
    """Status: Subscribed / Unsubscribed / Unknown per id, a global unsubscribe keeps the
    group's last status, 400 for 51 ids, 403 without subscription.status.get."""
    fake.seed("a", email_subscribe="unsubscribed", groups={NEWS: "subscribed"})
    fake.seed("b", groups={NEWS: "unsubscribed"})
    url = fake.url + "/subscription/status/get"
    async with aiohttp.ClientSession(headers=KEY) as session:
        params = [("subscription_group_id", NEWS), *(("external_id[]", p) for p in "abc")]
        async with session.get(url, params=params) as response:
            assert response.status == 200
            answer = await response.json()
        assert answer["status"] == {"a": "Subscribed", "b": "Unsubscribed", "c": "Unknown"}
        many = [("subscription_group_id", NEWS), *(("external_id[]", str(i)) for i in range(51))]
        async with session.get(url, params=many) as response:
            assert response.status == 400
        fake.grant(fake.api_key, {"users.export.ids"})
        async with session.get(url, params=params) as response:
            assert response.status == 403


async def test_fake_export_limit_answers_429_with_headers(fake: FakeBraze) -> None:
    """Over the per-minute limit the fake answers 429 with X-RateLimit-* as Braze does."""
    fake.export_limit.scale(60.0, per_minute=2)
    url = fake.url + "/users/export/ids"
    body = {"external_ids": ["a"], "fields_to_export": ["external_id"]}
    statuses = []
    async with aiohttp.ClientSession(headers=KEY) as session:
        for _ in range(3):
            async with session.post(url, json=body) as response:
                statuses.append(response.status)
                headers = response.headers
    assert statuses == [201, 201, 429]
    assert headers["X-RateLimit-Remaining"] == "0"
    assert float(headers["X-RateLimit-Reset"]) > time.time()


# ---------------------------------------------------------------------------
# The comparison and its report.


async def test_seeded_drift_of_each_kind_is_counted_exactly(
    tmp_path: Path, fake: FakeBraze, reconcile_config: Config
) -> None:
    """Drift seeded for 1 % of persons each (email state, each group, the attribute, a missing
    user) is counted exactly per target; globally unsubscribed persons whose groups kept a
    Subscribed status, and groups Braze has no history of, agree."""
    count = 800
    export = write_export(tmp_path / "users.json", count)
    seed_agreeing(fake, reconcile_config, count)
    email = [n for n in range(200) if n % 4 in (0, 1)][:8]
    news = [16 + 4 * i for i in range(8)]  # kind 0: both groups subscribed
    offers = [49 + 4 * i for i in range(8)]  # kind 1: offers subscribed
    attribute = [82 + 4 * i for i in range(8)]  # kind 2: refused
    missing = list(range(120, 128))
    masked = [142 + 4 * i for i in range(8)]  # kind 2: unsubscribed globally
    unknown = [174 + 4 * i for i in range(8)]  # kind 2: never in a group
    for n in email:
        fake.users[f"user-{n}"].email_subscribe = "subscribed"
    for n in news:
        fake.users[f"user-{n}"].subscription_groups[NEWS] = "unsubscribed"
    for n in offers:
        fake.users[f"user-{n}"].subscription_groups[OFFERS] = "unsubscribed"
    for n in attribute:
        fake.users[f"user-{n}"].attributes["consent_marketing"] = True
    for n in missing:
        del fake.users[f"user-{n}"]
    for n in masked:
        fake.users[f"user-{n}"].subscription_groups.update({NEWS: "subscribed"})
    for n in unknown:
        fake.users[f"user-{n}"].subscription_groups.clear()

    opts = options(export, as_json=True)
    report = await run(reconcile_config, opts)

    assert (report.read, report.population, report.compared) == (count, count, count)
    expected = {
        EMAIL: email,
        Target.group(NEWS): news,
        Target.group(OFFERS): offers,
        ATTR: attribute,
    }
    for target, drifted in expected.items():
        counts = report.targets[target]
        assert (counts.agree, counts.differ, counts.missing) == (count - 16, len(drifted), 8)
    assert report.missing == 8
    assert report.drifting == 40
    assert report.ratio() == pytest.approx(40 / count)
    lines = [json.loads(line) for line in opts.out.getvalue().splitlines()]  # type: ignore[attr-defined]
    assert len(lines) == 40
    assert all(line["hashed"] and "user-" not in line["person"] for line in lines)
    assert sum(line["missing_in_braze"] for line in lines) == 8
    assert fake.stats["rate_limited"] == 0


async def test_show_persons_names_them_and_missing_is_no_drift_when_update_only(
    tmp_path: Path, fake: FakeBraze, make_config: MakeConfig
) -> None:
    """With update_existing_only, persons missing in Braze are reported but are no drift (the
    gateway never creates them); --show-persons names the differing persons."""
    config = make_config(tmp_path, braze={"server": fake.url})
    export = write_export(tmp_path / "users.json", 40)
    seed_agreeing(fake, config, 40)
    del fake.users["user-3"]
    fake.users["user-5"].email_subscribe = "unsubscribed"
    opts = options(export, as_json=True, show_persons=True)
    report = await run(config, opts)
    assert report.missing == 1
    assert report.drifting == 1
    (line,) = [json.loads(x) for x in opts.out.getvalue().splitlines()]  # type: ignore[attr-defined]
    assert line["person"] == "user-5"
    assert line["targets"]["email_subscribe"] == {"didomi": "opted_in", "braze": "unsubscribed"}
    assert "not drift" in opts.err.getvalue()  # type: ignore[attr-defined]


async def test_no_drift_exits_0_and_the_ratios_reach_the_metric(
    tmp_path: Path, fake: FakeBraze, reconcile_config: Config
) -> None:
    """An agreeing Braze reports no drift; the run's ratios land in the spool, from which the
    running gateway's gateway_drift_ratio{target} is set."""
    export = write_export(tmp_path / "users.json", 60)
    seed_agreeing(fake, reconcile_config, 60)
    report = await run(reconcile_config, options(export))
    assert report.drifting == 0
    fake.users["user-1"].email_subscribe = "subscribed"
    await run(reconcile_config, options(export))
    store = open_store(reconcile_config.delivery, reconcile_config.retention.person_key)
    spool = Spool(store)
    metrics = Metrics()
    follower = asyncio.create_task(drift.follow(spool, metrics, interval_s=0.05))
    try:
        for _ in range(200):
            value = metrics.registry.get_sample_value(
                "gateway_drift_ratio", {"target": "email_subscribe"}
            )
            if value is not None:
                break
            await asyncio.sleep(0.05)
        assert value == pytest.approx(1 / 60)
        assert metrics.registry.get_sample_value(
            "gateway_drift_ratio", {"target": "any"}
        ) == pytest.approx(1 / 60)
    finally:
        follower.cancel()
        await asyncio.gather(follower, return_exceptions=True)
        await spool.close()


async def test_a_sampled_runs_interval_covers_the_true_rate(
    tmp_path: Path, fake: FakeBraze, reconcile_config: Config
) -> None:
    """--sample 300 of 2,000 persons, 10 % of them in drift: the 95 % interval covers 10 %,
    and only the sample is read from Braze."""
    count = 2000
    export = write_export(tmp_path / "users.json", count)
    seed_agreeing(fake, reconcile_config, count)
    for n in range(0, count, 10):
        fake.users[f"user-{n}"].attributes["consent_marketing"] = "yes"
    report = await run(reconcile_config, options(export, sample=300, seed=7))
    assert (report.population, report.compared) == (count, 300)
    interval = report.interval()
    assert interval is not None
    low, high = interval
    assert low <= 0.10 <= high
    assert high - low < 0.1
    exports = [r for r in fake.requests if r.path == "/users/export/ids"]
    assert len(exports) == 6


def test_wilson_interval_matches_known_values() -> None:
    """The Wilson interval of 10 in 100 is 5.52 % to 17.44 % (textbook value)."""
    low, high = wilson(0.1, 100)
    assert (round(low, 4), round(high, 4)) == (0.0552, 0.1744)
    assert wilson(0.0, 50)[0] == pytest.approx(0.0, abs=1e-12)


# ---------------------------------------------------------------------------
# Pacing.


async def test_pacing_uses_the_budget_and_never_draws_a_429(
    tmp_path: Path, fake: FakeBraze, make_config: MakeConfig
) -> None:
    """At 5 exports a (1 s) minute against a fake enforcing the same, 1,000 persons take 20
    exports in about 4 minutes, none refused with a 429."""
    fake.export_limit.scale(1.0, per_minute=5)
    config = make_config(tmp_path, braze={"server": fake.url, "export_requests_per_minute": 5})
    export = write_export(tmp_path / "users.json", 1000)
    seed_agreeing(fake, config, 1000)
    started = time.monotonic()
    report = await run(config, options(export, minute_s=1.0))
    elapsed = time.monotonic() - started
    assert report.compared == 1000
    assert fake.stats["rate_limited"] == 0
    exports = [r.at for r in fake.requests if r.path == "/users/export/ids"]
    assert len(exports) == 20
    assert elapsed >= 3.0  # 20 requests at 5 a window: never faster than the limit
    for at in exports:  # no 1 s window at Braze ever held more than 5
        assert sum(1 for other in exports if at <= other < at + 1.0) <= 5


async def test_pacing_follows_braze_headers_when_another_client_spent_the_budget(
    fake: FakeBraze, config: Config
) -> None:
    """When another client already spent all but one of the window, Braze's headers hold the
    reader until the reset: no 429."""
    fake.export_limit.scale(1.0, per_minute=5)
    fake.export_limit.export.headers(consume=True)  # the window opens, spent by someone else
    for _ in range(3):
        fake.export_limit.export.headers(consume=True)
    braze = msgspec_replace(config, fake.url)
    reader = BrazeReader(braze, minute_s=1.0)
    try:
        for _ in range(6):
            await reader.export("external_id", ["nobody"], ["external_id"])
    finally:
        await reader.close()
    assert fake.stats["rate_limited"] == 0
    assert reader.stats.rate_limited == 0


def msgspec_replace(config: Config, url: str) -> Any:
    import msgspec

    return msgspec.structs.replace(
        config.braze, server=url, api_key=BRAZE_API_KEY, export_requests_per_minute=5
    )


async def test_window_limiter_takes_a_non_finite_rate_limit_header_for_a_missing_one() -> None:
    """`nan` or `inf` in Braze's rate-limit headers is no number: releasing the slot neither
    raises nor waits for ever; a 429 with them waits Braze's default second."""
    for value in ("nan", "inf"):
        # A limiter each: after a 429 the frozen clock never reaches the end of its wait.
        limiter = WindowLimiter(2, 10.0, clock=lambda: 0.0)
        number = await asyncio.wait_for(limiter.acquire(), timeout=5)
        odd = {"X-RateLimit-Remaining": value, "X-RateLimit-Reset": value, "Retry-After": value}
        assert limiter.release(number, 429, odd) == 1.0


async def test_window_limiter_holds_a_slot_a_window_after_its_answer() -> None:
    """A slot frees a full window after the answer, not after the start: latency never puts
    one request too many in Braze's window."""
    now = [0.0]
    limiter = WindowLimiter(2, 10.0, clock=lambda: now[0])
    first = await limiter.acquire()
    second = await limiter.acquire()
    now[0] = 1.0
    limiter.release(first, 200, {})
    limiter.release(second, 200, {})
    now[0] = 10.5
    waiting = asyncio.create_task(limiter.acquire())
    await asyncio.sleep(0.01)
    assert not waiting.done()
    now[0] = 11.0
    limiter._changed.set()
    assert await asyncio.wait_for(waiting, 1.0) == 3


def test_report_ratio_counts_missing_only_when_it_is_drift() -> None:
    """Missing persons count in a target's ratio only when the gateway would create them."""
    from gateway.bulk.reconcile import Counts

    report = Report(missing_is_drift=False, targets={EMAIL: Counts(8, 1, 1)}, compared=10)
    assert report.ratio(EMAIL) == pytest.approx(0.1)
    report.missing_is_drift = True
    assert report.ratio(EMAIL) == pytest.approx(0.2)


# ---------------------------------------------------------------------------
# --fix, through the backfill lane.


async def test_fix_then_delivery_then_a_second_run_reports_no_drift(
    spool_url: str, tmp_path: Path, fake: FakeBraze
) -> None:
    """Users backfilled and delivered, then Braze drifts (email, groups, attribute, a deleted
    profile): --fix stores Didomi's state in the lane (not deduped against the backfill, not
    stale at the same date) and says how many, delivery applies it, and a second run finds no
    drift (both backends; the ratios reach the spool's meta there too)."""
    from gateway.bulk.backfill import run as backfill
    from tests.bulk.test_backfill import configure, delivering, drained

    config = configure(tmp_path, spool_url, fake.url)
    config = msgspec_struct_replace(config, update_existing_only=False)
    count = 120
    export = write_export(tmp_path / "users.json", count)
    async with delivering(config) as db:
        assert await backfill(config, [str(export)], out=io.StringIO()) == 0
        await drained(db)
        first = await run(config, options(export))
        assert first.drifting == 0
        fake.users["user-0"].email_subscribe = "unsubscribed"
        fake.users["user-4"].subscription_groups[NEWS] = "unsubscribed"
        fake.users["user-5"].subscription_groups[OFFERS] = "unsubscribed"
        fake.users["user-6"].attributes["consent_marketing"] = True
        del fake.users["user-7"]
        fixing = options(export, fix=True)
        drifted = await run(config, fixing)
        assert drifted.drifting == 5
        said = fixing.err.getvalue()  # type: ignore[attr-defined]
        assert "reconcile --fix: 5 person(s) in drift stored for the gateway to deliver" in said
        await drained(db)
        again = await run(config, options(export))
    assert again.drifting == 0, again
    assert again.missing == 0
    store = open_store(config.delivery, config.retention.person_key)
    try:
        last = drift.load(store)
    finally:
        store.close()
    assert last is not None
    assert last.ratios["any"] == 0.0


def msgspec_struct_replace(config: Config, **braze: Any) -> Config:
    import msgspec

    return msgspec.structs.replace(config, braze=msgspec.structs.replace(config.braze, **braze))


async def test_exit_status_tells_no_drift_drift_and_failure(
    tmp_path: Path, fake: FakeBraze, reconcile_config: Config
) -> None:
    """`gateway reconcile` exits 0 without drift, 1 with drift, 2 when Braze refuses the key
    (the message names the permission or key to fix); `--sample 0` is refused with 2."""
    import msgspec

    from gateway.cli.main import main
    from gateway.cli.reconcile import command

    export = write_export(tmp_path / "users.json", 10)
    seed_agreeing(fake, reconcile_config, 10)
    assert await asyncio.to_thread(command, reconcile_config, options(export)) == 0
    fake.users["user-2"].attributes["consent_marketing"] = True
    assert await asyncio.to_thread(command, reconcile_config, options(export)) == 1
    fake.grant(fake.api_key, {"subscription.status.get"})
    refused = options(export)
    assert await asyncio.to_thread(command, reconcile_config, refused) == 2
    assert "users.export.ids" in refused.err.getvalue()  # type: ignore[attr-defined]
    wrong = msgspec.structs.replace(
        reconcile_config, braze=msgspec.structs.replace(reconcile_config.braze, api_key="nope")
    )
    refused = options(export)
    assert await asyncio.to_thread(command, wrong, refused) == 2
    assert "API key is wrong" in refused.err.getvalue()  # type: ignore[attr-defined]
    assert main(["reconcile", str(export), "--sample", "0"]) == 2


async def test_a_config_problem_exits_2_and_a_file_needs_only_the_braze_key(
    tmp_path: Path, fake: FakeBraze, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A config reconcile cannot load is "could not finish" (2), never 1, which means drift to
    cron and scripts; reading an export file needs only braze.api_key, not the secrets of the
    webhook routes it never serves."""
    from gateway.cli.main import main
    from gateway.config.settings import load_config
    from tests.conftest import SECRETS, write_config

    path = write_config(tmp_path, braze={"server": fake.url, "update_existing_only": False})
    export = write_export(tmp_path / "users.json", 4)
    seed_agreeing(fake, load_config(path, SECRETS), 4)
    command = ["reconcile", "--config", str(path), str(export)]
    monkeypatch.delenv("DIDOMI_CLIENT_SECRET", raising=False)
    monkeypatch.delenv("BRAZE_API_KEY", raising=False)
    assert await asyncio.to_thread(main, command) == 2
    monkeypatch.setenv("BRAZE_API_KEY", BRAZE_API_KEY)
    assert await asyncio.to_thread(main, command) == 0


async def test_reconcile_needs_the_person_key_variable_and_never_keys_the_spool_itself(
    tmp_path: Path, fake: FakeBraze, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With `retention.person_key = "${GATEWAY_PERSON_KEY}"` unset, reconcile exits 2 naming
    the variable, rather than keying a fresh spool with a random key of its own, which the
    gateway started with GATEWAY_PERSON_KEY would then refuse."""
    from gateway.cli.main import main
    from gateway.config.settings import load_config
    from tests.conftest import SECRETS, write_config

    retention = {"person_key": "${GATEWAY_PERSON_KEY}"}
    path = write_config(tmp_path, braze={"server": fake.url}, retention=retention)
    export = write_export(tmp_path / "users.json", 4)
    secrets = {**SECRETS, "GATEWAY_PERSON_KEY": "test-person-key-3a1f"}
    config = load_config(path, secrets)
    seed_agreeing(fake, config, 4)
    command = ["reconcile", "--config", str(path), str(export)]
    monkeypatch.setenv("BRAZE_API_KEY", BRAZE_API_KEY)
    monkeypatch.delenv("GATEWAY_PERSON_KEY", raising=False)
    err = io.StringIO()
    monkeypatch.setattr("sys.stderr", err)
    assert await asyncio.to_thread(main, command) == 2
    assert "environment variable GATEWAY_PERSON_KEY is not set" in err.getvalue()
    open_store(config.delivery, config.retention.person_key).close()  # the gateway's key holds
    monkeypatch.setenv("GATEWAY_PERSON_KEY", secrets["GATEWAY_PERSON_KEY"])
    assert await asyncio.to_thread(main, command) == 0


async def test_reading_didomi_api_needs_its_credentials_and_no_webhook_secret(
    tmp_path: Path, fake: FakeBraze, fake_didomi: FakeDidomi, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`reconcile didomi-api` needs [didomi_api]'s key and secret (2, naming them, when one is
    missing), never the webhook routes' DIDOMI_CLIENT_SECRET, which it does not serve."""
    from gateway.cli.main import main
    from tests.conftest import write_config

    for n in range(3):
        fake_didomi.seed_user(f"api-{n}", [{"id": "marketing_email", "enabled": True}])
    api = {
        "base_url": fake_didomi.url + "/v1",
        "organization_id": fake_didomi.organization_id,
        "key": "${DIDOMI_API_KEY}",
        "secret": fake_didomi.secret,
    }
    path = write_config(tmp_path, braze={"server": fake.url}, didomi_api=api)
    monkeypatch.delenv("DIDOMI_CLIENT_SECRET", raising=False)
    monkeypatch.delenv("DIDOMI_API_KEY", raising=False)
    monkeypatch.setenv("BRAZE_API_KEY", BRAZE_API_KEY)
    command = ["reconcile", "--config", str(path), "didomi-api"]
    assert await asyncio.to_thread(main, command) == 2
    monkeypatch.setenv("DIDOMI_API_KEY", fake_didomi.key)
    assert await asyncio.to_thread(main, command) in (0, 1)  # compared: drift or none
    assert fake_didomi.sessions >= 1


async def test_a_source_whose_users_the_rules_all_skip_could_not_finish_and_records_nothing(
    tmp_path: Path, reconcile_config: Config
) -> None:
    """An export in which no user is one the rules map (no identity: the wrong organization's
    export, say) compared nobody: exit 2 and no ratios, not a "no drift" that clears
    gateway_drift_ratio and silences BrazeDrift for as long as the job reads it."""
    from gateway.cli.reconcile import command

    export = tmp_path / "users.json"
    with export.open("w") as out:
        for n in range(3):
            user = {k: v for k, v in didomi_user(n).items() if k != "organization_user_id"}
            out.write(json.dumps({"user": user, "events": []}) + "\n")
    said = options(export)
    assert await asyncio.to_thread(command, reconcile_config, said) == 2
    said_err = said.err.getvalue()  # type: ignore[attr-defined]
    assert "none of the 3 user(s) read" in said_err, said_err
    store = open_store(reconcile_config.delivery, reconcile_config.retention.person_key)
    try:
        assert drift.load(store) is None
    finally:
        store.close()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[server]\nport = 8080\n# a config, not users\n"x"\n', "is a Didomi user"),
        ("", "hold no user (an empty export?)"),
    ],
    ids=["config", "empty"],
)
async def test_a_source_with_no_user_in_any_line_could_not_finish_and_records_nothing(
    tmp_path: Path, reconcile_config: Config, text: str, message: str
) -> None:
    """Reconciling a file that holds no Didomi user (gateway.toml by mistake, or an export job
    that wrote nothing) exits 2 and leaves no ratios for gateway_drift_ratio: "no drift" would
    silence BrazeDrift for as long as the job reads it."""
    from gateway.cli.reconcile import command

    wrong = tmp_path / "not-an-export.json"
    wrong.write_text(text)
    said = options(wrong)
    assert await asyncio.to_thread(command, reconcile_config, said) == 2
    said_err = said.err.getvalue()  # type: ignore[attr-defined]
    assert message in said_err, said_err  # each case is told its own fix
    store = open_store(reconcile_config.delivery, reconcile_config.retention.person_key)
    try:
        assert drift.load(store) is None
    finally:
        store.close()
