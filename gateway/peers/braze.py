"""Braze's REST API: the client that sends the gateway's bodies (`braze_bodies`)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import aiohttp
import msgspec

from gateway.config.settings import BrazeConfig, braze_base_url
from gateway.delivery.outcome import Answer, Verdict
from gateway.delivery.pacing import RateLimiter
from gateway.logs import redact
from gateway.peers.braze_bodies import DELETE, TRACK, delete_body

if TYPE_CHECKING:
    from prometheus_client import Counter, Gauge, Histogram

log = logging.getLogger("gateway.braze")

# Plans bought as "Monthly Active Users CY 24-25" take at most 50 objects a request: every full
# batch of 75 is a 400, halved and resent. What the 400 says, and the setting that avoids it.
PLAN_LIMIT_HINT = (
    'Braze plans bought as "Monthly Active Users CY 24-25" take at most 50 objects a '
    "/users/track request: set braze.batch_size = 50"
)
_TOO_MANY = ("max input length", "too many", "exceed")


# ---------------------------------------------------------------------------
# The client: one ClientSession, a rate limiter, and answers sorted into what to do next.


class _TrackResponse(msgspec.Struct):
    message: str | None = None
    # Braze names a refused object by index, or says only a message: `"errors": ["..."]`.
    errors: list[_ObjectError | str] | None = None


class _ObjectError(msgspec.Struct):
    type: str | None = None
    input_array: str | None = None
    index: int | None = None


_track_response = msgspec.json.Decoder(_TrackResponse)
_encoder = msgspec.json.Encoder()


@dataclass(slots=True, eq=False)
class _Endpoint:
    """One Braze server and the session that talks to it, with its requests in flight."""

    base_url: str
    session: aiohttp.ClientSession
    in_flight: int = 0


class BrazeMeters(Protocol):
    """The metrics the client counts its requests in (`metrics.Metrics` is one)."""

    braze_object_errors: Counter
    braze_rate_limit_remaining: Gauge
    braze_request_duration: Histogram
    braze_requests: Counter


class BrazeClient:
    """Sends requests to one Braze REST endpoint over one shared connection pool.

    `reconfigure` applies a reloaded `[braze]` table. A new `braze.server` gets a new session:
    requests already sent finish on the old one, which is closed once the last of them is done.
    """

    def __init__(self, config: BrazeConfig, metrics: BrazeMeters) -> None:
        # Fixed at start, like the dispatcher's slots: braze.max_in_flight needs a restart.
        self.max_in_flight = config.max_in_flight
        self.metrics = metrics
        self.limiter = RateLimiter(config.requests_per_second)
        self.api_key = config.api_key
        self.timeout = aiohttp.ClientTimeout(total=config.timeout_s)
        self.prioritization = tuple(config.delete_prioritization)
        self._too_many = 0  # 400s for too many objects, to log their hint now and then
        self._endpoint = self._open(braze_base_url(config.server))
        self._retired: list[_Endpoint] = []  # old servers with requests still in flight
        self._closing: set[asyncio.Task[None]] = set()

    @property
    def base_url(self) -> str:
        """The Braze server new requests go to."""
        return self._endpoint.base_url

    @property
    def session(self) -> aiohttp.ClientSession:
        """The session new requests go through."""
        return self._endpoint.session

    def _open(self, base_url: str) -> _Endpoint:
        connector = aiohttp.TCPConnector(limit=self.max_in_flight * 2, keepalive_timeout=60)
        return _Endpoint(base_url, aiohttp.ClientSession(connector=connector))

    def reconfigure(self, config: BrazeConfig) -> None:
        """Apply a reloaded `[braze]`: key, server, timeout and rate from the next request on."""
        self.api_key = config.api_key
        self.timeout = aiohttp.ClientTimeout(total=config.timeout_s)
        self.prioritization = tuple(config.delete_prioritization)
        self.limiter.set_rate(config.requests_per_second)
        base_url = braze_base_url(config.server)
        if base_url == self._endpoint.base_url:
            return
        old, self._endpoint = self._endpoint, self._open(base_url)
        if old.in_flight:
            self._retired.append(old)
        else:
            self._close_later(old)

    def _close_later(self, endpoint: _Endpoint) -> None:
        task = asyncio.create_task(endpoint.session.close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        """Close every session, the current one and any a reload left behind."""
        for endpoint in (self._endpoint, *self._retired):
            await endpoint.session.close()
        self._retired.clear()
        await asyncio.gather(*self._closing)

    async def track(
        self, objects: Sequence[dict[str, Any]], allowed: Callable[[], bool] | None = None
    ) -> Answer:
        """POST one `/users/track` request carrying `objects`."""
        return await self.post(TRACK, {"attributes": list(objects)}, allowed)

    async def delete(
        self, identity: str, persons: Sequence[str], allowed: Callable[[], bool] | None = None
    ) -> Answer:
        """POST one `/users/delete` request for `persons`, named by `identity`."""
        body = delete_body(identity, persons, self.prioritization)
        return await self.post(DELETE, body, allowed)

    async def post(
        self, path: str, body: dict[str, Any], allowed: Callable[[], bool] | None = None
    ) -> Answer:
        """Send one request after the rate limiter allows it, and classify the answer.

        `allowed`, asked once the turn has come (the wait may be long), says whether the
        request may still leave: on a shared spool, whether its partitions are still this
        replica's. If not, nothing is sent and the answer is `MOVED`: the rows are the new
        owner's, not a failed attempt.
        """
        number = await self.limiter.acquire()
        if allowed is not None and not allowed():
            return Answer(Verdict.MOVED, None, "its partitions are another replica's now")
        data = _encoder.encode(body)
        # Server, key and timeout are read together, with no await between: a reload never
        # sends one server the key meant for another.
        endpoint, timeout = self._endpoint, self.timeout
        headers = {
            "Authorization": f"Bearer {self.api_key}",
            "Content-Type": "application/json",
        }
        started = time.perf_counter()
        status_label = "error"
        endpoint.in_flight += 1
        try:
            # Never follow a redirect: aiohttp would re-send a 301/302 as a GET and drop the
            # Authorization header on another host; a redirect means braze.server is wrong.
            async with endpoint.session.post(
                endpoint.base_url + path,
                data=data,
                headers=headers,
                timeout=timeout,
                allow_redirects=False,
            ) as response:
                status_label = str(response.status)
                payload = await response.read()
                wait = self.limiter.observe(response.status, response.headers, number)
                if self.limiter.remaining is not None:
                    self.metrics.braze_rate_limit_remaining.set(self.limiter.remaining)
                answer = _classify(
                    response.status,
                    payload,
                    wait,
                    url=endpoint.base_url,
                    location=response.headers.get("Location"),
                )
                self._count_errors(path, answer)
                return answer
        except TimeoutError:
            return Answer(Verdict.RETRY, None, "timeout")
        except aiohttp.ClientError as exc:
            return Answer(Verdict.RETRY, None, f"connection: {type(exc).__name__}")
        finally:
            endpoint.in_flight -= 1
            if endpoint in self._retired and not endpoint.in_flight:
                self._retired.remove(endpoint)
                self._close_later(endpoint)
            self.metrics.braze_requests.labels(path, status_label).inc()
            self.metrics.braze_request_duration.labels(path).observe(time.perf_counter() - started)

    def _count_errors(self, path: str, answer: Answer) -> None:
        """Count and log the errors Braze named in a 2xx answer; never silently delivered.

        A 400 for too many objects is halved and resent without a word elsewhere: its hint is
        logged here, the first time and then every hundredth, so the cost is seen.
        """
        if answer.verdict is Verdict.SPLIT and PLAN_LIMIT_HINT in answer.reason:
            if self._too_many % 100 == 0:
                log.warning("%s; halving and sending again", answer.reason)
            self._too_many += 1
        if answer.errors:
            self.metrics.braze_object_errors.labels("object").inc(len(answer.errors))
        if answer.unattributed:
            self.metrics.braze_object_errors.labels("unattributed").inc(len(answer.unattributed))
            log.warning(
                "Braze answered %s on %s with %d error(s) naming no object: %s",
                answer.status,
                path,
                len(answer.unattributed),
                "; ".join(answer.unattributed),
            )


def _classify(
    status: int, payload: bytes, wait: float | None, *, url: str = "", location: str | None = None
) -> Answer:
    text = payload[:300].decode("utf-8", "replace")
    if 200 <= status < 300:
        try:
            parsed = _track_response.decode(payload) if payload else _TrackResponse()
        except msgspec.DecodeError:
            parsed = _TrackResponse()
        found = parsed.errors or ()
        messages = tuple(redact(e)[:200] for e in found if isinstance(e, str))
        if messages:
            # A message that names no object could be about any of them: none is delivered.
            # Halved until it is one object's, that one is refused with Braze's words; the
            # others are sent again, which sets the same states (see `retry.decide`).
            said = "; ".join(messages[:3])
            reason = f"Braze answered {status} with errors naming no object: {said}"
            return Answer(Verdict.SPLIT, status, reason, unattributed=messages)
        errors = {
            e.index: e.type or "refused"
            for e in found
            if isinstance(e, _ObjectError)
            and e.index is not None
            and e.input_array in (None, "attributes")
        }
        return Answer(Verdict.OK, status, "ok", errors)
    if status == 429:
        return Answer(Verdict.RATE_LIMITED, status, "rate limited")
    if status in (401, 403):
        hint = (
            "the API key is wrong or belongs to another instance (check braze.server)"
            if status == 401
            else "the API key lacks the users.track or users.delete permission"
        )
        return Answer(Verdict.AUTH, status, f"Braze answered {status}: {hint}")
    if 300 <= status < 400 or status in (404, 405):
        # Braze's REST endpoints take a POST where they are: these answers come from a server
        # that is not one, so every update is held until braze.server is fixed, as for a 401.
        at = f" at {url}" if url else ""
        if status == 404:
            hint = f"no such endpoint{at}"
        elif status == 405:
            hint = f"POST is not allowed{at}"
        else:
            target = f" to {location[:200]}" if location else ""
            hint = f"a redirect{' from ' + url if url else ''}{target}, not followed"
        return Answer(Verdict.AUTH, status, f"Braze answered {status}: {hint} (check braze.server)")
    if status in (400, 413):
        reason = f"Braze answered {status}: {text}"
        if status == 400 and any(words in text.lower() for words in _TOO_MANY):
            reason += f" ({PLAN_LIMIT_HINT})"
        return Answer(Verdict.SPLIT, status, reason)
    if status in (408,) or status >= 500:
        return Answer(Verdict.RETRY, status, f"Braze answered {status}")
    return Answer(Verdict.REFUSED, status, f"Braze answered {status}: {text}")


@contextlib.asynccontextmanager
async def open_client(config: BrazeConfig, metrics: BrazeMeters) -> AsyncIterator[BrazeClient]:
    """The client to Braze, with keep-alive connections for `max_in_flight` requests."""
    client = BrazeClient(config, metrics)
    try:
        yield client
    finally:
        await client.close()
