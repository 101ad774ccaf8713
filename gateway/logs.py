"""Log output for the `gateway` logger tree: terminal text or JSON lines, always redacted.

`configure_logging` installs one handler on the `gateway` logger (and routes aiohttp's own
loggers through it, with the per-request access log turned off: `gateway_http_requests_total`
counts requests without writing a line for each). Fields passed with `extra={...}` become JSON
keys, or `key=value` pairs in text.

Before anything is written, a filter masks what looks like a secret: the value of an
`Authorization` header, `Bearer <token>`, `api_key=`/`client_secret=`/`token=`/`secret=`/
`password=` pairs in the message, extras whose key names a secret, every string registered with
`register_secret` (the config loader registers the Braze API key and the client secret), and
email addresses anywhere. Exception tracebacks are masked the same way.
"""

from __future__ import annotations

import logging
import re
import sys
import threading
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Literal, TextIO

import msgspec

__all__ = ["REDACTED", "RedactFilter", "configure_logging", "redact", "register_secret"]

REDACTED = "[redacted]"
EMAIL = "[email]"
# Registered secrets shorter than this are ignored: masking every "abc" would mangle all output.
MIN_SECRET_LENGTH = 4

_SENSITIVE = r"api[_-]?key|apikey|secret|token|password|passwd|pwd|authorization|cookie"
_TRIGGERS = ("authorization", "bearer", "key", "secret", "token", "passw", "pwd", "cookie")
# An extra whose key has a secret word as one of its `_`/`-` parts: api_key, client_secret, token.
_SECRET_KEY = re.compile(rf"(?i)(?:^|[_-])(?:{_SENSITIVE})(?:$|[_-])")
_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    # Authorization: Basic abc, "authorization": "Bearer x" -- the whole value, scheme included.
    (
        re.compile(r"""(?i)(\bauthorization["']?\s*[:=]\s*["']?)(?:\w+\s+)?[^\s"',;}]+"""),
        rf"\g<1>{REDACTED}",
    ),
    # Bearer <token>, though not the prose "bearer tokens" or "bearer mode".
    (
        re.compile(r"(?i)\b(bearer\s+)(?!(?:tokens?|mode|auth\w*|scheme)\b)[A-Za-z0-9\-._~+/]+=*"),
        rf"\g<1>{REDACTED}",
    ),
    # api_key=..., "client_secret": "...", access_token: ... (but not token_ttl_s=3600).
    (
        re.compile(rf"""(?i)(\b[\w-]*(?:{_SENSITIVE})["']?\s*[:=]\s*["']?)[^\s"'&,;}}]+"""),
        rf"\g<1>{REDACTED}",
    ),
    # Any address RFC 6531 allows, in any script: local part up to the nearest separator.
    (
        re.compile(
            r"""[^\s@<>()\[\]{},;:"]+@[^\s@<>()\[\]{},;:"'/]+\.[^\s@<>()\[\]{},;:"'/.]{2,}"""
        ),
        EMAIL,
    ),
)


class _Secrets:
    """The exact strings to mask, compiled into one pattern (longest first)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: set[str] = set()
        self.pattern: re.Pattern[str] | None = None

    def add(self, value: str) -> None:
        if len(value.strip()) < MIN_SECRET_LENGTH:
            return
        with self._lock:
            self._values.add(value)
            ordered = sorted(self._values, key=len, reverse=True)
            self.pattern = re.compile("|".join(re.escape(v) for v in ordered))


_secrets = _Secrets()


def register_secret(value: str) -> None:
    """Mask every later occurrence of `value` in log output (values under 4 characters excepted)."""
    _secrets.add(value)


def redact(text: str) -> str:
    """`text` with registered secrets, credentials and email addresses masked."""
    pattern = _secrets.pattern
    if pattern is not None:
        text = pattern.sub(REDACTED, text)
    # Every match of the patterns below holds `@` or one of these words: skip them otherwise,
    # since this runs on every log line and most lines (ids, counts) hold neither.
    lowered = text.lower()
    if "@" not in text and not any(word in lowered for word in _TRIGGERS):
        return text
    for regex, replacement in _PATTERNS:
        text = regex.sub(replacement, text)
    return text


def _redact_value(key: str, value: Any) -> Any:
    if _SECRET_KEY.search(key) and value is not None:
        return REDACTED
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, Mapping):
        return {k: _redact_value(str(k), v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_redact_value("", v) for v in value]
    if isinstance(value, bool | int | float) or value is None:
        return value
    return redact(str(value))


# Every attribute a plain LogRecord has; anything else on a record came from `extra=`.
_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {
    "message",
    "asctime",
    "taskName",
}


def extras(record: logging.LogRecord) -> dict[str, Any]:
    """The fields a log call passed with `extra={...}`, in the order given."""
    return {
        k: v for k, v in record.__dict__.items() if k not in _STANDARD and not k.startswith("_")
    }


class RedactFilter(logging.Filter):
    """Rewrites each record in place so no secret or email reaches any handler's output."""

    _plain = logging.Formatter()

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "_redacted", False):
            return True
        try:
            message = record.getMessage()
        except (TypeError, ValueError):  # arguments that do not fit the format string
            message = f"{record.msg} {record.args!r}"
        record.msg = redact(message)
        record.args = None
        for key, value in extras(record).items():
            setattr(record, key, _redact_value(key, value))
        if record.exc_info and not record.exc_text:
            record.exc_text = self._plain.formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        setattr(record, "_redacted", True)  # noqa: B010 - not a LogRecord attribute mypy knows
        return True


def _timestamp(record: logging.LogRecord) -> str:
    moment = datetime.fromtimestamp(record.created, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, the extras, then exc if any."""

    _encoder = msgspec.json.Encoder(enc_hook=str)

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": _timestamp(record),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in extras(record).items():
            line.setdefault(key, value)  # an extra never overwrites the four fields above
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            line["exc"] = record.exc_text
        if record.stack_info:
            line["stack"] = record.stack_info
        try:
            return self._encoder.encode(line).decode()
        except (TypeError, ValueError, msgspec.EncodeError):  # e.g. a dict with tuple keys
            return self._encoder.encode({k: repr(v) for k, v in line.items()}).decode()


class TextFormatter(logging.Formatter):
    """`ts LEVEL logger: message key=value ...`, readable in a terminal."""

    def format(self, record: logging.LogRecord) -> str:
        parts = [f"{_timestamp(record)} {record.levelname:<7} {record.name}: {record.getMessage()}"]
        parts.extend(f"{k}={_text_value(v)}" for k, v in extras(record).items())
        text = " ".join(parts)
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            text += "\n" + record.exc_text
        if record.stack_info:
            text += "\n" + record.stack_info
        return text


def _text_value(value: Any) -> str:
    text = value if isinstance(value, str) else repr(value) if not _is_scalar(value) else str(value)
    if not text or any(c.isspace() or c in "\"'=" for c in text):
        return msgspec.json.encode(text).decode()
    return text


def _is_scalar(value: Any) -> bool:
    return isinstance(value, bool | int | float) or value is None


class _GatewayHandler(logging.StreamHandler[TextIO]):
    """Marks the handler `configure_logging` installs, so a second call replaces it."""


def configure_logging(
    fmt: Literal["text", "json"] = "text", level: str = "INFO", stream: TextIO | None = None
) -> None:
    """Send the `gateway` logger tree (and aiohttp's errors) to `stream`, redacted, as `fmt`."""
    levels = logging.getLevelNamesMapping()
    if level.upper() not in levels:
        raise ValueError(f"unknown log level {level!r}; use DEBUG, INFO, WARNING or ERROR")
    if fmt not in ("text", "json"):
        raise ValueError(f"unknown log format {fmt!r}; use 'text' or 'json'")
    handler = _GatewayHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(RedactFilter())
    for name in ("gateway", "aiohttp"):
        logger = logging.getLogger(name)
        for old in [h for h in logger.handlers if isinstance(h, _GatewayHandler)]:
            logger.removeHandler(old)
            old.close()
        logger.addHandler(handler)
        # aiohttp's own loggers only matter from WARNING up (errors handling a request).
        floor = logging.WARNING if name == "aiohttp" else logging.NOTSET
        logger.setLevel(max(levels[level.upper()], floor))
        logger.propagate = False
    # One line per request would duplicate gateway_http_requests_total and log client addresses.
    logging.getLogger("aiohttp.access").disabled = True
