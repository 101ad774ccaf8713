"""Located TOML: read a file, interpolate the environment, convert to Structs, name lines."""

from __future__ import annotations

import difflib
import re
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from types import UnionType
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import msgspec

from gateway.errors import Problem

KeyPath = tuple[str | int, ...]
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_TOML_LINE = re.compile(r"\(at line (\d+), column \d+\)")
_MSGSPEC_AT = re.compile(r" - at `\$(.*)`$")
_UNKNOWN_FIELD = re.compile(r"^Object contains unknown field `([^`]*)`$")


def format_path(path: KeyPath) -> str:
    """Render a key path the way it reads in TOML: `map[2].to`."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else part
    return out


class LineIndex:
    """Finds the line of a key path in TOML text, since tomllib keeps no positions."""

    _ARRAY = re.compile(r"^\s*\[\[\s*([^\]]+?)\s*\]\]")
    _TABLE = re.compile(r"^\s*\[\s*([^\]]+?)\s*\]")
    _KEY = re.compile(r"""^\s*("[^"]*"|'[^']*'|[A-Za-z0-9_-]+)\s*=""")

    def __init__(self, text: str) -> None:
        self._lines: dict[KeyPath, int] = {}
        counts: dict[str, int] = {}
        table: KeyPath = ()
        for number, line in enumerate(text.splitlines(), start=1):
            if m := self._ARRAY.match(line):
                name = m.group(1)
                index = counts.get(name, 0)
                counts[name] = index + 1
                table = (*self._split(name), index)
                self._lines.setdefault(table[:-1], number)  # the array itself: its first entry
                self._lines.setdefault(table, number)
            elif m := self._TABLE.match(line):
                table = self._split(m.group(1))
                self._lines.setdefault(table, number)
            elif m := self._KEY.match(line):
                self._lines.setdefault((*table, m.group(1).strip("\"'")), number)

    @staticmethod
    def _split(name: str) -> KeyPath:
        return tuple(part.strip().strip("\"'") for part in name.split("."))

    def line(self, path: KeyPath) -> int | None:
        """The line of `path`, or of its nearest enclosing key or table."""
        while path:
            if path in self._lines:
                return self._lines[path]
            path = path[:-1]
        return None


class Located:
    """Collects problems for one file, placing each on its line where it can."""

    def __init__(self, file: str, text: str = "") -> None:
        self.file = file
        self.index = LineIndex(text)
        self.problems: list[Problem] = []
        self.paths: list[KeyPath] = []  # parallel to problems, to filter by section
        # Parallel too: every section a problem's rule read, its own and those of `reads`.
        self.sections: list[frozenset[str | int]] = []

    def add(self, path: KeyPath, message: str, *, reads: tuple[str, ...] = ()) -> None:
        """Record a problem at `path`; `reads` names the other sections its rule judged."""
        line = self.index.line(path)
        where = None if line is not None else format_path(path) or None
        self.problems.append(Problem(self.file, message, line=line, path=where))
        self.paths.append(path)
        self.sections.append(frozenset((*path[:1], *reads)))


def read_toml(path: Path, located: Located) -> dict[str, Any] | None:
    """Read and parse one TOML file, recording an unreadable or malformed file as a problem."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        located.problems.append(Problem(located.file, f"cannot read the file: {_os_reason(exc)}"))
        return None
    located.index = LineIndex(text)
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        message = str(exc)
        m = _TOML_LINE.search(message)
        line = int(m.group(1)) if m else None
        located.problems.append(
            Problem(located.file, f"invalid TOML: {_TOML_LINE.sub('', message).strip()}", line=line)
        )
        return None


def _os_reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc)


def interpolate(
    value: Any,
    env: Mapping[str, str],
    located: Located,
    path: KeyPath = (),
    *,
    strict: bool = True,
    secret: Callable[[KeyPath], bool] = lambda path: False,
    needed: Callable[[KeyPath], bool] = lambda path: False,
) -> Any:
    """Replace `${VAR}` and `${VAR:-default}` inside string values, recording missing variables
    (`secret` says which keys hold one: never to be given a default in the file; `needed`,
    which keys must have theirs set even when not `strict`)."""
    if isinstance(value, str):
        if "${" not in value:
            return value

        def replace(m: re.Match[str]) -> str:
            name, default = m.group(1), m.group(2)
            value = env.get(name)
            # As in the shell, `:-` means "unset or empty": an empty .env entry keeps the default.
            if value is not None and (value or default is None):
                return value
            if default is not None:
                return default
            if strict or needed(path):
                hint = (
                    f"export {name}=... where the gateway runs"
                    if secret(path)
                    else f"set it, or write ${{{name}:-default}}"
                )
                located.add(path, f"environment variable {name} is not set ({hint})")
            return ""

        return _ENV_REF.sub(replace, value)
    if isinstance(value, dict):
        return {
            k: interpolate(v, env, located, (*path, k), strict=strict, secret=secret, needed=needed)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [
            interpolate(v, env, located, (*path, i), strict=strict, secret=secret, needed=needed)
            for i, v in enumerate(value)
        ]
    return value


def convert(raw: Any, typ: type[T], located: Located, path: KeyPath) -> T | None:
    """Convert one TOML table into `typ`, reporting every unknown key and the first wrong value."""
    if not isinstance(raw, dict):
        located.add(path, f"expected a table, got {_toml_kind(raw)}")
        return None
    known = {f.encode_name for f in msgspec.structs.fields(typ)}
    unknown = [k for k in raw if k not in known]
    for key in unknown:
        hint = difflib.get_close_matches(key, known, n=1)
        did_you_mean = f" (did you mean {hint[0]!r}?)" if hint else ""
        allowed = ", ".join(sorted(known))
        located.add((*path, key), f"unknown key {key!r}{did_you_mean}; allowed: {allowed}")
    clean = {k: v for k, v in raw.items() if k in known}
    # Field by field first: msgspec stops at the first error, and check must report them all.
    types = {f.encode_name: f.type for f in msgspec.structs.fields(typ)}
    wrong = False
    for key, value in clean.items():
        try:
            msgspec.convert(value, types[key])
        except msgspec.ValidationError as exc:
            _add_validation(exc, (*path, key), located, types[key])
            wrong = True
    if wrong:
        return None
    try:
        return msgspec.convert(clean, typ)
    except msgspec.ValidationError as exc:  # cross-field: a required key missing, __post_init__
        _add_validation(exc, path, located)
        return None


def _add_validation(
    exc: msgspec.ValidationError, path: KeyPath, located: Located, typ: Any = None
) -> None:
    message = str(exc)
    sub: KeyPath = ()
    if m := _MSGSPEC_AT.search(message):
        message = message[: m.start()]
        sub = _parse_msgspec_path(m.group(1))
    at = _type_at(typ, sub)
    # msgspec names the wrong value or key, not the right ones: say those, as for a table.
    if (unknown := _UNKNOWN_FIELD.match(message)) and _is_struct(at):
        key = unknown.group(1)
        known = [f.encode_name for f in msgspec.structs.fields(at)]
        hint = difflib.get_close_matches(key, known, n=1)
        did_you_mean = f" (did you mean {hint[0]!r}?)" if hint else ""
        message = f"unknown key {key!r}{did_you_mean}; allowed: {', '.join(sorted(known))}"
        located.add((*path, *sub, key), _humane(message, (*path, *sub)))
        return
    message = _humane(message, (*path, *sub))
    choices = _choices(at)
    if choices and "invalid value" in message:
        message += f"; use {choices}"
    located.add((*path, *sub), message)


def _unwrap(typ: Any) -> Any:
    """`X | None` as X: an optional value converts as its type."""
    members = [m for m in get_args(typ) if m is not type(None)]
    return members[0] if get_origin(typ) in (Union, UnionType) and len(members) == 1 else typ


def _is_struct(typ: Any) -> bool:
    return isinstance(typ, type) and issubclass(typ, msgspec.Struct)


def _type_at(typ: Any, sub: KeyPath) -> Any:
    """The type found at `sub` inside `typ` (Struct fields, list items), or None if unknown."""
    for part in sub:
        typ = _unwrap(typ)
        if isinstance(part, int):
            args = get_args(typ)
            typ = args[0] if get_origin(typ) is list and args else None
        elif _is_struct(typ):
            typ = {f.encode_name: f.type for f in msgspec.structs.fields(typ)}.get(part)
        else:
            return None
    return _unwrap(typ)


def _choices(typ: Any) -> str:
    """The values a `Literal` field takes, as a message lists them; "" for any other type."""
    if get_origin(typ) is not Literal:
        return ""
    values = [repr(v) for v in get_args(typ)]
    return values[0] if len(values) == 1 else f"{', '.join(values[:-1])} or {values[-1]}"


def _parse_msgspec_path(text: str) -> KeyPath:
    parts: list[str | int] = []
    for m in re.finditer(r"\.([A-Za-z0-9_-]+)|\[(\d+)\]|\[\"?([^\]\"]+)\"?\]", text):
        if m.group(1) is not None:
            parts.append(m.group(1))
        elif m.group(2) is not None:
            parts.append(int(m.group(2)))
        else:
            parts.append(m.group(3))
    return tuple(parts)


def _humane(message: str, path: KeyPath) -> str:
    key = format_path(path)
    message = message.replace("Expected", "expected").replace("Invalid enum value", "invalid value")
    return f"{key}: {message}" if key else message


def _toml_kind(value: Any) -> str:
    return {dict: "a table", list: "an array", str: "a string", bool: "a boolean"}.get(
        type(value), type(value).__name__
    )


T = TypeVar("T", bound=msgspec.Struct)
