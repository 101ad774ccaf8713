"""gateway.logs: JSON and text lines, extras, and the redaction of secrets and emails."""

from __future__ import annotations

import io
import logging
import re
import secrets
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import msgspec
import pytest

from gateway.logs import configure_logging, redact, register_secret

TOUCHED = ("gateway", "aiohttp", "aiohttp.access")
RFC3339_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


@pytest.fixture(autouse=True)
def restore_loggers() -> Iterator[None]:
    """Put the loggers configure_logging changes back, so other tests' caplog still works."""
    loggers = [logging.getLogger(name) for name in TOUCHED]
    saved = [(lg, list(lg.handlers), lg.level, lg.propagate, lg.disabled) for lg in loggers]
    yield
    for logger, handlers, level, propagate, disabled in saved:
        logger.handlers = handlers
        logger.setLevel(level)
        logger.propagate = propagate
        logger.disabled = disabled


@pytest.fixture
def out() -> io.StringIO:
    return io.StringIO()


def json_lines(out: io.StringIO) -> list[dict[str, Any]]:
    return [msgspec.json.decode(line) for line in out.getvalue().splitlines()]


log = logging.getLogger("gateway.test")


def test_json_lines_parse_with_the_base_fields_and_extras(out: io.StringIO) -> None:
    """Each record is one JSON object with ts (RFC 3339 UTC), level, logger, msg and its extras."""
    configure_logging("json", stream=out)
    log.info("stored %d update(s)", 2, extra={"event_id": "ev-1", "outcome": "accepted"})
    log.warning("Braze answered", extra={"status": 503, "count": 75})
    first, second = json_lines(out)
    assert first == {
        "ts": first["ts"],
        "level": "INFO",
        "logger": "gateway.test",
        "msg": "stored 2 update(s)",
        "event_id": "ev-1",
        "outcome": "accepted",
    }
    assert RFC3339_UTC.match(first["ts"])
    stamp = datetime.fromisoformat(first["ts"])
    assert stamp.utcoffset() is not None
    assert abs((datetime.now(UTC) - stamp).total_seconds()) < 60
    assert (second["level"], second["status"], second["count"]) == ("WARNING", 503, 75)


def test_extras_never_overwrite_the_base_fields(out: io.StringIO) -> None:
    """An extra named like a base field (level, ts) cannot forge it."""
    configure_logging("json", stream=out)
    log.error("real", extra={"level": "DEBUG", "ts": "yesterday"})
    (line,) = json_lines(out)
    assert line["level"] == "ERROR"
    assert line["ts"] != "yesterday"


def test_values_json_cannot_encode_fall_back_to_text(out: io.StringIO) -> None:
    """An extra of an arbitrary type (a set, an object) is written as text, never dropped."""
    configure_logging("json", stream=out)
    log.info("odd extras", extra={"ids": {3}, "obj": object()})
    (line,) = json_lines(out)
    assert line["ids"] == [3]
    assert line["obj"].startswith("<object object")


def test_exceptions_are_included_and_redacted(out: io.StringIO) -> None:
    """A logged exception's traceback is in `exc`, with secrets and emails masked."""
    secret = "sk-" + secrets.token_hex(12)
    register_secret(secret)
    configure_logging("json", stream=out)
    try:
        raise RuntimeError(f"refused {secret} for bob@example.com")
    except RuntimeError:
        log.exception("delivery failed")
    (line,) = json_lines(out)
    assert "RuntimeError: refused [redacted] for [email]" in line["exc"]
    assert secret not in out.getvalue()
    assert "bob@example.com" not in out.getvalue()


def test_text_format_is_readable_with_extras_as_key_value(out: io.StringIO) -> None:
    """Text lines read `ts LEVEL logger: msg key=value`, quoting values that hold spaces."""
    configure_logging("text", stream=out)
    log.info("reloaded", extra={"count": 12, "detail": "two words", "outcome": "success"})
    line = out.getvalue().rstrip("\n")
    stamp, rest = line.split(" ", 1)
    assert RFC3339_UTC.match(stamp)
    assert rest == 'INFO    gateway.test: reloaded count=12 detail="two words" outcome=success'


def test_secrets_never_come_out(out: io.StringIO) -> None:
    """Authorization values, Bearer tokens, secret-named extras and registered secrets: masked."""
    api_key = "braze-" + secrets.token_hex(16)
    client_secret = secrets.token_urlsafe(24)
    register_secret(api_key)
    register_secret(client_secret)
    configure_logging("json", stream=out)
    log.warning(
        "POST /users/track Authorization: Basic ZGlkb21pOnNlY3JldA== then"
        " Bearer eyJhbGc.eyJzdWIi.sig with api_key=%s and client_secret: %s,"
        " url /cb?token=tok123&x=1 password=hunter2",
        api_key,
        client_secret,
        extra={
            "api_key": "abc123abc123",
            "client_secret": "xyz",
            "token": "tok-999",
            "password": "hunter2",
            "headers": {"Authorization": "Bearer tok-888", "X-Trace": "keep-me"},
            "note": f"the key {api_key} leaked here",
            "nested": [{"access_token": "tok-777"}, f"Bearer {client_secret}"],
        },
    )
    text = out.getvalue()
    for leaked in (
        api_key,
        client_secret,
        "ZGlkb21pOnNlY3JldA",
        "eyJhbGc",
        "tok123",
        "hunter2",
        "abc123abc123",
        "tok-999",
        "tok-888",
        "tok-777",
    ):
        assert leaked not in text, leaked
    (line,) = json_lines(out)
    assert line["headers"] == {"Authorization": "[redacted]", "X-Trace": "keep-me"}
    assert line["note"] == "the key [redacted] leaked here"
    assert "Authorization: [redacted]" in line["msg"]
    assert "Bearer [redacted]" in line["msg"]


def test_emails_are_masked_in_messages_args_and_extras(out: io.StringIO) -> None:
    """An email address anywhere (format args, message, extras) comes out as [email]."""
    configure_logging("text", stream=out)
    log.info(
        "no identity for %s (cc jane.doe+x@mail.example.co.uk)",
        "alice@example.com",
        extra={"person": "bob@example.org", "people": ["carol@example.net"]},
    )
    text = out.getvalue()
    assert "@" not in text
    assert text.count("[email]") == 4


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("using bearer tokens from auth.tokens", "using bearer tokens from auth.tokens"),
        ("token_ttl_s=3600", "token_ttl_s=3600"),
        ("the API key is wrong (check braze.server)", "the API key is wrong (check braze.server)"),
        ('{"access_token": "abc.def", "expires_in": 3600}', '{"access_token": "[redacted]", '
         '"expires_in": 3600}'),
        ("authorization=Bearer x.y.z", "authorization=[redacted]"),
        ("mail to a_b@x.io now", "mail to [email] now"),
    ],
)  # fmt: skip
def test_redact_keeps_prose_and_masks_values(raw: str, expected: str) -> None:
    """Redaction masks credential values but leaves ordinary operational text readable."""
    assert redact(raw) == expected


def test_short_registered_secrets_are_ignored(out: io.StringIO) -> None:
    """A secret under four characters is not registered, so it cannot mangle every line."""
    register_secret("ab")
    register_secret("")
    assert redact("absent table") == "absent table"


def test_configuring_twice_does_not_duplicate_lines(out: io.StringIO) -> None:
    """A second configure_logging replaces the first handler instead of adding another."""
    configure_logging("text", stream=io.StringIO())
    configure_logging("json", stream=out)
    log.info("once")
    assert len(json_lines(out)) == 1
    handlers = logging.getLogger("gateway").handlers
    assert sum(type(h).__name__ == "_GatewayHandler" for h in handlers) == 1


def test_level_filters_and_unknown_levels_are_refused(out: io.StringIO) -> None:
    """Records under the configured level are dropped, and a misspelled level is an error."""
    configure_logging("json", level="warning", stream=out)
    log.info("quiet")
    log.warning("loud")
    assert [line["msg"] for line in json_lines(out)] == ["loud"]
    with pytest.raises(ValueError, match="unknown log level"):
        configure_logging("json", level="LOUD", stream=out)


def test_aiohttp_errors_are_routed_and_access_log_is_off(out: io.StringIO) -> None:
    """aiohttp's own errors go through the same redacted handler; per-request access lines don't."""
    configure_logging("json", stream=out)
    logging.getLogger("aiohttp.server").error("Error handling request from bob@example.com")
    logging.getLogger("aiohttp.access").info("127.0.0.1 GET /webhooks/didomi 202")
    lines = json_lines(out)
    assert [(line["logger"], line["msg"]) for line in lines] == [
        ("aiohttp.server", "Error handling request from [email]")
    ]
