"""The Braze client: how answers are classified, and that a redirect is never followed."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from gateway.app.server import SPOOL
from gateway.cli.main import main
from gateway.config.settings import BrazeConfig
from gateway.delivery.outcome import Verdict
from gateway.delivery.pacing import RateLimiter, header_float
from gateway.metrics import Metrics
from gateway.peers.braze import _classify, open_client
from gateway.testing.braze import FakeBraze
from tests.conftest import BRAZE_API_KEY, SECRETS, Elsewhere, choice, write_config
from tests.system.test_end_to_end import StartGateway, start_gateway

__all__ = ["start_gateway"]  # the fixture, imported so pytest finds it here

BASE = "https://rest.iad-01.braze.com"
OBJECT = {"external_id": "u1", "email_subscribe": "opted_in"}


async def eventually(probe: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    """Wait until `probe()` is true, failing with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not probe():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


@pytest.mark.parametrize("status", [300, 301, 302, 303, 304, 307, 308, 404, 405])
def test_wrong_server_answers_are_held_and_blame_braze_server(status: int) -> None:
    """A 3xx, 404 or 405 is a configuration problem: held like a 401, and the reason says to
    check braze.server at the base URL, without echoing the body."""
    answer = _classify(status, b'{"message": "echoed body"}', None, url=BASE)
    assert answer.verdict is Verdict.AUTH
    assert answer.status == status
    assert answer.reason.startswith(f"Braze answered {status}: ")
    assert BASE in answer.reason
    assert "(check braze.server)" in answer.reason
    assert "echoed body" not in answer.reason


def test_404_and_405_say_what_they_mean() -> None:
    """A 404 says there is no such endpoint, a 405 that POST is not allowed there."""
    assert _classify(404, b"", None, url=BASE).reason == (
        f"Braze answered 404: no such endpoint at {BASE} (check braze.server)"
    )
    assert _classify(405, b"", None, url=BASE).reason == (
        f"Braze answered 405: POST is not allowed at {BASE} (check braze.server)"
    )


def test_a_redirect_names_where_it_pointed() -> None:
    """A redirect's reason names its target, which is often the right braze.server."""
    target = "https://rest.fra-01.braze.eu/users/track"
    answer = _classify(301, b"", None, url=BASE, location=target)
    assert answer.reason == (
        f"Braze answered 301: a redirect from {BASE} to {target}, not followed (check braze.server)"
    )


def test_other_answers_keep_their_verdicts() -> None:
    """The statuses around the new ones are classified as before."""
    assert _classify(201, b'{"message": "success"}', None).verdict is Verdict.OK
    assert _classify(401, b"", None).verdict is Verdict.AUTH
    assert _classify(400, b"", None).verdict is Verdict.SPLIT
    assert _classify(410, b"gone", None).verdict is Verdict.REFUSED
    assert _classify(503, b"", None).verdict is Verdict.RETRY


@pytest.mark.parametrize("status", [301, 302, 307, 308])
async def test_the_client_never_follows_a_redirect(
    status: int, fake: FakeBraze, elsewhere: Elsewhere
) -> None:
    """A redirect is answered as a wrong braze.server; its target never gets a request."""
    fake.fail_next(status, headers={"Location": elsewhere.url("/users/track")})
    config = BrazeConfig(server=fake.url, api_key=BRAZE_API_KEY)
    async with open_client(config, Metrics()) as client:
        answer = await client.track([OBJECT])
    assert answer.verdict is Verdict.AUTH
    assert answer.status == status
    assert elsewhere.url("/users/track") in answer.reason
    assert elsewhere.hits == []
    assert [r.status for r in fake.requests] == [status]


async def test_a_new_server_takes_later_requests_while_one_in_flight_finishes(
    fake: FakeBraze,
) -> None:
    """After reconfigure with another braze.server, a request already sent is answered by the old
    server on the old session, later ones go to the new server, and the old session is closed."""
    other = FakeBraze(api_key=BRAZE_API_KEY)
    await other.start()
    fake.latency_s = 1.0  # keeps the first request in flight across the switch
    try:
        config = BrazeConfig(server=fake.url, api_key=BRAZE_API_KEY)
        async with open_client(config, Metrics()) as client:
            old = client.session
            first = asyncio.create_task(client.track([{**OBJECT, "external_id": "before"}]))
            await eventually(lambda: len(fake.requests) == 1, "the first request to arrive")
            client.reconfigure(BrazeConfig(server=other.url, api_key=BRAZE_API_KEY))
            assert client.base_url == other.url
            assert client.session is not old
            second = await client.track([{**OBJECT, "external_id": "after"}])
            assert second.verdict is Verdict.OK
            assert (await first).verdict is Verdict.OK  # its session was not closed under it
            await eventually(lambda: old.closed, "the old session to be closed")
            assert not client.session.closed
    finally:
        await other.stop()
    assert set(fake.users) == {"before"}
    assert set(other.users) == {"after"}


async def test_reconfigure_applies_the_key_timeout_and_rate_on_the_same_session(
    fake: FakeBraze,
) -> None:
    """A reloaded key, timeout and rate apply from the next request; the same server keeps its
    session and connections."""
    async with open_client(BrazeConfig(server=fake.url, api_key="the-old-key"), Metrics()) as c:
        session = c.session
        assert (await c.track([OBJECT])).status == 401
        c.reconfigure(
            BrazeConfig(
                server=fake.url + "/", api_key=BRAZE_API_KEY, timeout_s=2.5, requests_per_second=40
            )
        )
        assert c.timeout.total == 2.5
        assert c.limiter.interval == 1 / 40
        assert c.session is session
        assert (await c.track([OBJECT])).verdict is Verdict.OK
    assert "u1" in fake.users


async def test_the_limiter_spends_the_budget_of_requests_sent_since_the_answer() -> None:
    """Remaining 2 after request 1, with requests 2 and 3 already sent, leaves nothing: the
    fourth waits for the window's reset instead of meeting a certain 429, then goes."""
    now = [100.0]
    limiter = RateLimiter(1000.0, clock=lambda: now[0])
    first = await limiter.acquire()
    for _ in range(2):
        now[0] += 0.01
        await limiter.acquire()
    limiter.observe(201, {"X-RateLimit-Remaining": "2", "X-RateLimit-Reset": "5"}, first)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(limiter.acquire(), timeout=0.1)
    now[0] += 5.0  # the window resets
    assert await asyncio.wait_for(limiter.acquire(), timeout=1.0) == 4


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "1e400"])
async def test_the_limiter_takes_a_non_finite_rate_limit_header_for_a_missing_one(
    value: str,
) -> None:
    """A `nan` or `inf` where Braze sends a number (a proxy's garbling, say) is no number: the
    answer is still classified, not lost to a ValueError or OverflowError, and a 429 with it
    waits Braze's default second."""
    now = [100.0]
    limiter = RateLimiter(1000.0, clock=lambda: now[0])
    first = await limiter.acquire()
    odd = {"X-RateLimit-Remaining": value, "X-RateLimit-Reset": value, "Retry-After": value}
    assert limiter.observe(201, odd, first) is None
    assert limiter.remaining is None
    assert limiter.observe(429, odd, first) == 1.0
    assert header_float(odd, "Retry-After") is None


async def test_the_limiter_lets_requests_through_while_the_budget_lasts() -> None:
    """With budget left after the requests in flight, nothing waits."""
    now = [100.0]
    limiter = RateLimiter(1000.0, clock=lambda: now[0])
    first = await limiter.acquire()
    limiter.observe(201, {"X-RateLimit-Remaining": "2", "X-RateLimit-Reset": "5"}, first)
    for _ in range(2):
        now[0] += 0.01
        await asyncio.wait_for(limiter.acquire(), timeout=0.5)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(limiter.acquire(), timeout=0.1)


class _Shared:
    """A shared budget that records what the limiter asks of it."""

    def __init__(self, waits: list[float]) -> None:
        self.waits = waits
        self.takes: list[float] = []
        self.blocks: list[float] = []

    async def take(self, rate: float) -> float:
        self.takes.append(rate)
        return self.waits.pop(0) if self.waits else 0.0

    async def block(self, seconds: float) -> None:
        self.blocks.append(seconds)


async def test_a_shared_budget_is_asked_until_the_turn_is_due_and_told_of_braze_waits() -> None:
    """With replicas, each request asks the shared budget (at the configured rate) until its
    turn is due; a 429 seen by this replica holds the others too (`block`)."""
    limiter = RateLimiter(20.0)
    shared = _Shared([0.05, 0.0])
    limiter.shared = shared
    started = time.monotonic()
    await limiter.acquire()
    assert shared.takes == [20.0, 20.0]  # asked again after the wait it was given
    assert time.monotonic() - started >= 0.04
    assert limiter.observe(429, {"Retry-After": "2"}, 1) == 2.0
    await asyncio.sleep(0)  # the block is sent in the background
    await asyncio.sleep(0)
    assert shared.blocks == [2.0]


async def test_without_its_database_the_shared_budget_paces_by_the_replicas_alive() -> None:
    """A shared budget that fails: the request is paced locally, as if each replica alive
    sent at the whole rate's pace, instead of waiting on the database for ever."""

    class Failing(_Shared):
        async def take(self, rate: float) -> float:
            from gateway.errors import SpoolError

            self.takes.append(rate)
            raise SpoolError("the spool database failed: gone")

    limiter = RateLimiter(20.0)
    failing = Failing([])
    limiter.shared = failing
    limiter.replicas = lambda: 2
    started = time.monotonic()
    await limiter.acquire()
    assert time.monotonic() - started >= 2 / 20.0 * 0.9
    # For a few seconds after, turns do not queue behind the failing database again.
    await limiter.acquire()
    assert failing.takes == [20.0]


async def test_a_request_whose_partitions_went_elsewhere_during_its_wait_is_not_sent(
    fake: FakeBraze,
) -> None:
    """`allowed` is asked after the rate limiter's wait: when it says no, nothing reaches
    Braze and the answer is `MOVED` (the rows are given back to their new owner)."""
    async with open_client(BrazeConfig(server=fake.url, api_key=BRAZE_API_KEY), Metrics()) as c:
        answer = await c.track([{"external_id": "p", "email_subscribe": "opted_in"}], lambda: False)
        assert answer.verdict is Verdict.MOVED
        assert fake.requests == []
        answer = await c.track([{"external_id": "p", "email_subscribe": "opted_in"}], lambda: True)
        assert answer.verdict is Verdict.OK
        assert len(fake.requests) == 1


def test_render_shows_the_delete_by_email_body_braze_takes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`gateway render` of a user.deleted, with an email identity and on_user_deleted = "delete",
    prints `email_addresses` as objects carrying braze.delete_prioritization."""
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    path = write_config(
        tmp_path,
        didomi={"on_user_deleted": "delete"},
        braze={"delete_prioritization": ["unidentified", "most_recently_updated"]},
    )
    (tmp_path / "mappings" / "email.toml").write_text(
        '[identity]\nemail = "organization_user_id"\n\n'
        '[[map]]\nto = "OPTED_IN"\npurpose = "marketing_email"\n'
    )
    event = tmp_path / "deleted.json"
    event.write_text(
        json.dumps(
            {
                "type": "user.deleted",
                "parameters": {"entity": {"id": "u-1", "organization_user_id": "ann@example.com"}},
            }
        )
    )
    assert main(["render", str(event), "--config", str(path)]) == 0
    assert json.loads(capsys.readouterr().out) == [
        {
            "endpoint": "/users/delete",
            "body": {
                "email_addresses": [
                    {
                        "email": "ann@example.com",
                        "prioritization": ["unidentified", "most_recently_updated"],
                    }
                ]
            },
        }
    ]


def test_a_2xx_whose_errors_are_plain_messages_is_not_a_success() -> None:
    """`"errors": ["<message>"]` in a 201 names no object: the request's objects are halved
    to find it, never taken as delivered; indexed errors still name their objects."""
    plain = b'{"message": "success", "errors": ["Subscription group is archived: ann@x.io"]}'
    answer = _classify(201, plain, None)
    assert answer.verdict is Verdict.SPLIT
    assert answer.unattributed == ("Subscription group is archived: [email]",)
    assert "ann@x.io" not in answer.reason
    indexed = (
        b'{"message": "success",'
        b' "errors": [{"type": "bad", "input_array": "attributes", "index": 1}]}'
    )
    answer = _classify(201, indexed, None)
    assert (answer.verdict, answer.errors, answer.unattributed) == (Verdict.OK, {1: "bad"}, ())


async def test_objects_a_201_refuses_without_naming_them_are_dead_lettered_with_the_message(
    start_gateway: StartGateway, fake: FakeBraze, auth_headers: dict[str, str]
) -> None:
    """A 201 that refuses one object with a plain message: that object is found, dead-lettered
    with Braze's words and counted; the others are delivered; nothing is delivered silently."""
    archived = "Subscription group is archived"
    fake.refuse_unattributed(lambda obj: archived if obj.get("external_id") == "eve" else None)
    gw = await start_gateway()
    for person in ("dan", "eve", "fay"):
        assert await gw.post(choice(person, True, event_id=f"evt-{person}"), auth_headers) == 202
    await gw.settle()
    assert {"dan", "fay"} <= set(fake.users)
    assert "eve" not in fake.users
    [dead] = gw.app[SPOOL].db.dead_letters()
    assert archived in dead.reason
    assert gw.sample("gateway_braze_object_errors_total", reason="unattributed") >= 1
    assert gw.sample("gateway_updates_delivered_total", direction="to_braze") == 2
    assert gw.sample("gateway_updates_failed_total", direction="to_braze", reason="rejected") == 1


def test_a_400_for_too_many_objects_names_the_50_object_plans() -> None:
    """Braze's 400 for too many objects carries the hint: braze.batch_size = 50 serves plans
    bought as "Monthly Active Users CY 24-25"; another 400 does not."""
    answer = _classify(400, b'{"message": "Max Input Length Exceeded"}', None)
    assert answer.verdict is Verdict.SPLIT
    assert "Monthly Active Users CY 24-25" in answer.reason
    assert "braze.batch_size = 50" in answer.reason
    other = _classify(400, b'{"message": "Valid data must be provided"}', None)
    assert "batch_size" not in other.reason


async def test_a_50_object_plan_delivers_everything_and_batch_size_50_avoids_its_400s(
    start_gateway: StartGateway,
    fake: FakeBraze,
    auth_headers: dict[str, str],
    caplog: pytest.LogCaptureFixture,
    tmp_path: Path,
) -> None:
    """Against a Braze that takes 50 objects a request, full batches of 75 are halved (each a
    400 whose hint is logged) and all delivered; braze.batch_size = 50 sends no 400 at all."""
    fake.max_objects = 50
    for size, expect_400 in ((75, True), (50, False)):
        fake.requests.clear()
        people = [f"p{size}-{i:03d}" for i in range(120)]
        (tmp_path / str(size)).mkdir()
        # A flush interval long enough for full batches to form however busy the machine is:
        # the webhooks arrive together, as a burst does, not one per flush.
        braze = {"batch_size": size, "flush_interval_ms": 2000}
        gw = await start_gateway(tmp_path / str(size), braze=braze)
        answers = await asyncio.gather(
            *(gw.post(choice(p, True, event_id=f"evt-{p}"), auth_headers) for p in people)
        )
        assert answers == [202] * len(people)
        await gw.settle()
        track = [r for r in fake.requests if r.path == "/users/track"]
        assert any(r.status == 400 for r in track) is expect_400
        assert all(len(r.body["attributes"]) <= 50 for r in track if r.status == 201)
        assert all(fake.users[p].email_subscribe == "opted_in" for p in people)
        await gw.client.close()
    assert "braze.batch_size = 50" in caplog.text
