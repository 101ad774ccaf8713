"""Hostile input: property tests on the webhook decoder and the mapping engine, and schemathesis
fuzzing a running gateway against `openapi.yaml`.

The decoder and the rules see whatever Didomi (or anyone holding a token) sends; an exception
other than `WebhookError` there would be a 500 at intake or, worse, a dead dispatcher loop
after a 202. Hypothesis example counts are kept small so the whole file runs in seconds.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import math
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import msgspec
import pytest
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.app.reload import LiveRules
from gateway.app.server import create_app, delivery
from gateway.http.auth import TokenIssuer
from gateway.metrics import SKIP_REASONS, Metrics
from gateway.rules.mappings import EMAIL, Mapped, Options, RuleSet, Skipped, load_rules
from gateway.shapes.webhooks import EVENT_TYPES, Webhook, WebhookError, decode
from gateway.testing.braze import FakeBraze
from tests.conftest import BRAZE_API_KEY, CLIENT_ID, CLIENT_SECRET, build_config

ROOT = Path(__file__).resolve().parents[2]
RULES = load_rules(ROOT / "mappings")
GROUPS = set(RULES.groups)
EMAIL_STATES = {"opted_in", "subscribed", "unsubscribed"}
GROUP_STATES = {"subscribed", "unsubscribed"}
WITHDRAWN = {EMAIL: "unsubscribed", **{f"group:{g}": "unsubscribed" for g in GROUPS}}

FAST = settings(
    max_examples=150,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# ---------------------------------------------------------------------------
# Strategies

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=20,
)
timestamps = st.datetimes(
    min_value=datetime(1970, 1, 2),
    max_value=datetime(2100, 1, 1),
    timezones=st.none() | st.timezones(),
).map(lambda moment: moment.isoformat())


BRAZE_WEBHOOK_TOKEN = "fuzz-braze-webhook-token-1c9e"
# The reverse path on, so Braze's routes are served; Didomi's API at a port nothing listens on.
REVERSE: dict[str, Any] = {
    "braze_webhooks": {"tokens": [BRAZE_WEBHOOK_TOKEN]},
    "didomi_api": {
        "enabled": True,
        "base_url": "http://127.0.0.1:1/v1",
        "organization_id": "acme",
        "key": "fuzz-didomi-key",
        "secret": "fuzz-didomi-secret",
    },
}


def mostly(
    strategy: st.SearchStrategy[Any], otherwise: st.SearchStrategy[Any] | None = None
) -> st.SearchStrategy[Any]:
    """`strategy` seven times in eight, else `otherwise` (None): most webhooks should map."""
    other = st.none() if otherwise is None else otherwise
    return st.integers(0, 7).flatmap(lambda n: other if n == 0 else strategy)


people = mostly(st.emails() | st.text(min_size=1, max_size=30), st.sampled_from([None, ""]))
preference_values = st.lists(
    st.sampled_from(["product_news", "offers", "never", "weekly", " offers ", ""]) | st.text(),
    max_size=4,
).map(",".join)
purposes = st.fixed_dictionaries(
    {
        "id": mostly(
            st.sampled_from(["marketing_email", "marketing_email", "analytics"]),
            st.text(max_size=10),
        ),
        "enabled": st.sampled_from([True, False, None]),
    },
    optional={
        "values": st.none()
        | st.dictionaries(
            st.sampled_from(["topics", "frequency", "other"]),
            st.fixed_dictionaries({}, optional={"value": st.none() | preference_values}),
            max_size=3,
        ),
        "vendor_data": json_values,  # unknown fields are ignored, never fatal
    },
)
MAPPED_TYPES = ("event.created", "event.created", "event.updated", "user.created", "user.updated")
ENTITY_KEYS = ("id", "created_at", "updated_at", "status", "regulation", "consents")


@st.composite
def entities(draw: st.DrawFn) -> dict[str, Any]:
    """A Didomi consent-event or user entity: usually complete, any field possibly missing or
    null, unknown fields mixed in, identities often email addresses."""
    person = draw(people)
    entity: dict[str, Any] = {
        "id": draw(st.text(max_size=20)),
        "created_at": draw(st.none() | timestamps),
        "updated_at": draw(mostly(timestamps)),
        "status": draw(st.sampled_from(["confirmed", "confirmed", "pending_approval", None])),
        "regulation": draw(st.sampled_from([None, None, None, "gdpr", "cpra"])),
        "organization_user_id": person,  # a user entity names itself
        "user": {"id": draw(st.text(max_size=8)), "organization_user_id": person},  # an event
        "consents": {"purposes": draw(mostly(st.lists(purposes, min_size=1, max_size=4)))},
    }
    for key in draw(st.sets(st.sampled_from(ENTITY_KEYS), max_size=2)):
        if draw(st.booleans()):
            entity[key] = None
        else:
            del entity[key]
    dropped = draw(st.sampled_from([None, None, None, "user", "organization_user_id"]))
    if dropped is not None:
        del entity[dropped]
    extra = draw(st.dictionaries(st.text(max_size=6).map("x_{}".format), json_values, max_size=2))
    return {**entity, **extra}


@st.composite
def webhooks(draw: st.DrawFn) -> dict[str, Any]:
    """A well-formed Didomi webhook: known or unknown type, any mix of the optional parts."""
    # Weighted towards the types that change something; each of the six and an unknown one occur.
    kind = draw(st.sampled_from([*sorted(EVENT_TYPES), *MAPPED_TYPES, "notice.published"]))
    if kind.endswith(".updated"):
        parameters: dict[str, Any] = {"new_entity": draw(entities())}
        if draw(st.booleans()):
            parameters["old_entity"] = draw(entities())
        if draw(st.booleans()):
            parameters["source"] = {"id": draw(st.text(max_size=8)), "type": "api"}
    else:
        parameters = {"entity": draw(entities())}
    body: dict[str, Any] = {"type": kind, "parameters": parameters}
    if draw(st.booleans()):
        body["regulation"] = draw(st.sampled_from(["gdpr", "cpra"]))
    return body


# Where in a webhook an arbitrary JSON value may be planted.
PLANT_AT: list[tuple[str, ...]] = [
    (),
    ("type",),
    ("parameters",),
    ("parameters", "entity"),
    ("parameters", "new_entity"),
    ("parameters", "source"),
    ("parameters", "entity", "created_at"),
    ("parameters", "entity", "user"),
    ("parameters", "entity", "user", "organization_user_id"),
    ("parameters", "entity", "consents"),
    ("parameters", "entity", "consents", "purposes"),
    ("regulation",),
]


@st.composite
def mangled_webhooks(draw: st.DrawFn) -> Any:
    """A well-formed webhook with one part replaced by an arbitrary JSON value."""
    body = draw(webhooks())
    path = draw(st.sampled_from(PLANT_AT))
    value = draw(json_values)
    if not path:
        return value
    node = body
    for key in path[:-1]:
        child = node.get(key) if isinstance(node, dict) else None
        if not isinstance(child, dict):
            child = {}
            node[key] = child
        node = child
    node[path[-1]] = value
    return body


options = st.builds(
    Options,
    regulations=st.sampled_from(
        [frozenset({"gdpr"}), frozenset({"gdpr"}), frozenset({"gdpr", "cpra"}), frozenset({"lgpd"})]
    ),
    on_user_deleted=st.sampled_from(["ignore", "unsubscribe", "delete"]),
)


def check_decoded(body: bytes) -> Webhook | None:
    """Decode `body`: a Webhook or WebhookError, and a decoded one maps without raising."""
    try:
        webhook = decode(body)
    except WebhookError as exc:
        refusal = str(exc)
    else:
        refusal = None
    if refusal is not None:
        assert refusal, "a refusal must say why"
        return None
    assert isinstance(webhook, Webhook)
    if webhook.known:
        assert webhook.subject is not None
    key = webhook.dedupe_key()
    assert key is None or isinstance(key, str)
    # The dispatcher maps every stored row; an exception here would stop delivery for good.
    assert isinstance(RULES.apply(webhook), Mapped | Skipped)
    return webhook


# ---------------------------------------------------------------------------
# The decoder


@FAST
@given(st.binary(max_size=400))
def test_decode_takes_arbitrary_bytes(body: bytes) -> None:
    """Arbitrary bytes decode to a Webhook or raise WebhookError, never another exception."""
    check_decoded(body)


@FAST
@given(json_values)
def test_decode_takes_arbitrary_json(value: Any) -> None:
    """Any JSON value as the body is a Webhook or a WebhookError, never another exception."""
    check_decoded(msgspec.json.encode(value))


@FAST
@given(mangled_webhooks())
def test_decode_takes_webhooks_with_one_part_replaced(value: Any) -> None:
    """A webhook with any part swapped for any JSON value decodes or is refused cleanly."""
    check_decoded(msgspec.json.encode(value))


@settings(FAST, max_examples=60)
@given(st.integers(min_value=1, max_value=200), st.sampled_from([b"[", b"{", b'{"a":']))
def test_decode_refuses_deep_or_truncated_nesting(depth: int, opener: bytes) -> None:
    """Deep and unterminated nesting is refused with WebhookError, never a RecursionError."""
    check_decoded(opener * depth)
    check_decoded(
        b'{"type": "user.created", "parameters": {"entity": ' + b"[" * depth + b"]" * depth + b"}}"
    )


@FAST
@given(webhooks())
def test_well_formed_webhooks_decode(body: dict[str, Any]) -> None:
    """Every webhook of the documented shape decodes (unknown fields and nulls included)."""
    webhook = check_decoded(msgspec.json.encode(body))
    assert webhook is not None
    assert webhook.type == body["type"]


# ---------------------------------------------------------------------------
# The mapping engine


@FAST
@given(webhooks(), options)
def test_apply_gives_mapped_or_skipped_with_allowed_states(
    body: dict[str, Any], opts: Options
) -> None:
    """Any well-formed webhook maps to allowed states of known targets, or is skipped for a
    reason the metrics know; a refused purpose always yields the withdrawn states."""
    rules: RuleSet = dataclasses.replace(RULES, options=opts)
    webhook = decode(msgspec.json.encode(body))
    result = rules.apply(webhook)
    if isinstance(result, Skipped):
        assert result.reason in SKIP_REASONS
        return
    assert isinstance(result, Mapped)
    assert result.identity == "external_id"
    assert isinstance(result.person, str)
    assert result.person
    assert math.isfinite(result.at)
    entity = webhook.subject
    assert entity is not None
    assert (entity.regulation or webhook.regulation or "gdpr") in opts.regulations
    if webhook.type.startswith("event."):
        assert entity.status in (None, "confirmed")
    if result.delete:
        assert webhook.type == "user.deleted"
        assert opts.on_user_deleted == "delete"
        assert result.changes == {}
        return
    assert result.changes
    for target, state in result.changes.items():
        if target == EMAIL:
            assert state in EMAIL_STATES
        elif target.startswith("group:"):
            assert target[6:] in GROUPS
            assert state in GROUP_STATES
        else:
            assert target == "attr:consent_marketing"
            assert state in (True, False)
    if webhook.type == "user.deleted":
        assert result.changes == WITHDRAWN
        return
    chosen = (entity.consents.purposes if entity.consents else None) or []
    assert "marketing_email" in {p.id for p in chosen}, "only marketing_email has rules"
    refused = any(p.id == "marketing_email" and p.enabled is False for p in chosen)
    if refused:  # no consent to the purpose, no subscription through any of its values
        assert result.changes == {**WITHDRAWN, "attr:consent_marketing": False}


@FAST
@given(webhooks())
def test_apply_is_deterministic(body: dict[str, Any]) -> None:
    """Mapping the same body twice gives the same answer (retries and replays agree)."""
    raw = msgspec.json.encode(body)
    assert RULES.apply(decode(raw)) == RULES.apply(decode(raw))


# ---------------------------------------------------------------------------
# openapi.yaml against the running server


def spec() -> dict[str, Any]:
    import yaml

    loaded: dict[str, Any] = yaml.safe_load((ROOT / "openapi.yaml").read_text(encoding="utf-8"))
    return loaded


def test_openapi_lists_exactly_the_routes_the_app_serves(tmp_path: Path) -> None:
    """Every route of create_app is in openapi.yaml and every documented route exists."""
    pytest.importorskip("yaml")
    app = create_app(build_config(tmp_path, **REVERSE))  # every route: Braze's too
    served = {
        (route.method.lower(), route.resource.canonical)
        for route in app.router.routes()
        if route.resource is not None and route.method != "HEAD"
    }
    documented = {(method, path) for path, item in spec()["paths"].items() for method in item}
    assert served == documented


class ThreadedGateway:
    """The gateway (with delivery to a FakeBraze) served on loopback from its own thread, so
    blocking clients such as schemathesis can call it from the test's thread."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.fake = FakeBraze(api_key=BRAZE_API_KEY)
        self.runner: web.AppRunner | None = None
        self.url = ""

    def call(self, coro: Any, timeout: float = 30.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def __enter__(self) -> ThreadedGateway:
        self.thread.start()
        self.call(self._start())
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.call(self._stop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=10)
            self.loop.close()

    async def _start(self) -> None:
        braze_url = await self.fake.start()
        config = build_config(
            self.directory,
            server={"max_body_bytes": 65_536},
            braze={"server": braze_url, "flush_interval_ms": 10},
            delivery={"retry_initial_ms": 10, "retry_max_ms": 100},
            **REVERSE,
        )
        metrics = Metrics()
        live = LiveRules.load(config, metrics, self.directory / "gateway.toml")
        app = create_app(config, metrics=metrics, contexts=[delivery(live)])
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", 0).start()
        host, port = self.runner.addresses[0][:2]
        self.url = f"http://{host}:{port}"

    async def _stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
        await self.fake.stop()


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThreadedGateway]:
    """One gateway for the module's fuzzing runs (its spool grows; nothing depends on it)."""
    with ThreadedGateway(tmp_path_factory.mktemp("fuzzed")) as gateway:
        yield gateway


def schemathesis_run(
    served: ThreadedGateway,
    label: str,
    mode: str,
    headers: dict[str, str],
    checks: list[Callable[..., Any]],
    max_examples: int,
) -> int:
    """Send `max_examples` generated requests for one operation; each must pass `checks`."""
    import schemathesis
    from schemathesis import GenerationMode

    schema = schemathesis.openapi.from_path(ROOT / "openapi.yaml")
    operation = schema.find_operation_by_label(label)
    assert operation is not None, label
    generation = GenerationMode.NEGATIVE if mode == "negative" else GenerationMode.POSITIVE
    strategy = operation.as_strategy(generation_mode=generation)
    sent: list[int] = []

    @settings(
        max_examples=max_examples,
        deadline=None,
        database=None,
        derandomize=True,  # the same requests on every run: CI failures reproduce locally
        suppress_health_check=list(HealthCheck),
    )
    @given(strategy)
    def run(case: Any) -> None:
        response = case.call_and_validate(
            base_url=served.url, headers=headers, checks=checks, timeout=10
        )
        sent.append(response.status_code)

    run()
    return len(sent)


def token() -> str:
    return TokenIssuer(CLIENT_ID, CLIENT_SECRET, 3600).issue()[0]


FUZZED = [
    ("POST /webhooks/didomi", "positive", 60),
    ("POST /webhooks/didomi", "negative", 60),
    ("POST /oauth/token", "positive", 25),
    ("POST /oauth/token", "negative", 25),
    ("POST /webhooks/braze", "positive", 30),
    ("POST /webhooks/braze", "negative", 30),
    ("POST /webhooks/braze/currents", "positive", 20),
    ("POST /webhooks/braze/currents", "negative", 20),
    ("GET /healthz", "positive", 3),
    ("GET /readyz", "positive", 3),
    ("GET /metrics", "positive", 3),
]


@pytest.mark.slow
@pytest.mark.parametrize(("label", "mode", "examples"), FUZZED)
def test_schemathesis_finds_no_5xx_and_no_answer_off_the_schema(
    served: ThreadedGateway, label: str, mode: str, examples: int
) -> None:
    """Requests generated from openapi.yaml (valid, and deliberately invalid) never get a 5xx,
    every answer's status, media type, headers and body match the schema, invalid ones are
    refused, and the webhook route refuses them without its token."""
    pytest.importorskip("schemathesis")
    from schemathesis.checks import (  # names resolved by schemathesis's check registry
        content_type_conformance,
        ignored_auth,
        negative_data_rejection,
        not_a_server_error,
        positive_data_acceptance,
        response_headers_conformance,
        response_schema_conformance,
        status_code_conformance,
    )

    checks: list[Callable[..., Any]] = [
        not_a_server_error,
        status_code_conformance,
        content_type_conformance,
        response_headers_conformance,
        response_schema_conformance,
    ]
    headers: dict[str, str] = {}
    if label == "POST /webhooks/didomi":
        headers = {"Authorization": f"Bearer {token()}"}
        checks += [ignored_auth]
        checks += [positive_data_acceptance] if mode == "positive" else [negative_data_rejection]
    elif label.startswith("POST /webhooks/braze"):
        # Only what the schema can say is checked: "an external_id or an email" and "group
        # ids are UUIDs" are the decoder's, so a schema-valid body may still be a 400.
        headers = {"Authorization": f"Bearer {BRAZE_WEBHOOK_TOKEN}"}
        checks += [ignored_auth]
    elif label == "POST /oauth/token":
        # Valid client credentials in Basic, so valid requests get tokens and 200s are checked.
        basic = base64.b64encode(f"{CLIENT_ID}:{CLIENT_SECRET}".encode()).decode()
        headers = {"Authorization": f"Basic {basic}"}
        checks += [positive_data_acceptance] if mode == "positive" else [negative_data_rejection]
    started = time.monotonic()
    sent = schemathesis_run(served, label, mode, headers, checks, examples)
    assert sent > 0
    assert time.monotonic() - started < 60


@pytest.mark.slow
def test_the_fuzzed_gateway_still_delivers(served: ThreadedGateway) -> None:
    """After the fuzzing runs, the gateway is ready and a real choice still reaches Braze:
    nothing the fuzzer got stored stopped the dispatcher."""
    import urllib.request

    body = msgspec.json.encode(
        {
            "type": "event.created",
            "parameters": {
                "entity": {
                    "id": "after-the-fuzz",
                    "updated_at": "2030-01-01T00:00:00Z",
                    "status": "confirmed",
                    "user": {"organization_user_id": "after-fuzz-person"},
                    "consents": {"purposes": [{"id": "marketing_email", "enabled": True}]},
                }
            },
        }
    )
    request = urllib.request.Request(  # noqa: S310 - a loopback http URL built by the test
        f"{served.url}/webhooks/didomi",
        data=body,
        headers={"Authorization": f"Bearer {token()}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310 - loopback
        assert response.status == 202
    deadline = time.monotonic() + 15
    while "after-fuzz-person" not in served.fake.users:
        assert time.monotonic() < deadline, "the dispatcher no longer delivers"
        time.sleep(0.05)
    assert served.fake.users["after-fuzz-person"].email_subscribe == "opted_in"
    with urllib.request.urlopen(f"{served.url}/readyz", timeout=10) as response:  # noqa: S310
        assert response.status == 200
