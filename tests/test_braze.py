"""The Braze client: how answers are classified, and that a redirect is never followed."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest
from conftest import BRAZE_API_KEY, Elsewhere

from gateway.braze import RateLimiter, Verdict, _classify, open_client
from gateway.config import BrazeConfig
from gateway.metrics import Metrics
from gateway.testing import FakeBraze

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
