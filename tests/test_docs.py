"""The README and docs/: every relative link lands in the repository, every test they name exists.

A clone is all a reader has, so a link must resolve to a file of the repository (never a folder
beside it), and a `#fragment` to a heading of its target, slugged as GitHub does.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

from tests.conftest import ROOT

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# [text](target) outside code spans; images too. Autolinks and bare URLs are not relative.
_LINK = re.compile(r"!?\[(?:[^\]`]|`[^`]*`)*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
_FENCE = re.compile(r"^(```|~~~)")
_CODE_SPAN = re.compile(r"`[^`]*`")
_TEST_NAME = re.compile(r"(tests/(?:\w+/)*test_\w+\.py)::(test_\w+)")


def prose(path: Path) -> list[str]:
    """The lines of a Markdown file outside fenced code blocks, code spans blanked."""
    lines, fenced = [], False
    for line in path.read_text(encoding="utf-8").splitlines():
        if _FENCE.match(line.lstrip()):
            fenced = not fenced
            continue
        if not fenced:
            lines.append(_CODE_SPAN.sub("``", line))
    return lines


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a Markdown file, with GitHub's -1, -2 for repeats."""
    seen: dict[str, int] = {}
    out = set()
    fenced = False
    for line in path.read_text(encoding="utf-8").splitlines():
        if _FENCE.match(line.lstrip()):
            fenced = not fenced
        elif not fenced and (m := re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)):
            base = slug(m.group(1))
            count = seen.get(base, 0)
            seen[base] = count + 1
            out.add(base if count == 0 else f"{base}-{count}")
    return out


def test_every_relative_link_resolves_to_a_file_in_the_repository() -> None:
    """Each relative link of README.md and docs/*.md names a path inside the repository that
    exists, and each #fragment a heading of its target."""
    broken = []
    for doc in DOCS:
        for line in prose(doc):
            for target in _LINK.findall(line):
                if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:: not relative
                    continue
                where = f"{doc.relative_to(ROOT)}: {target}"
                path_part, _, fragment = target.partition("#")
                resolved = (doc.parent / path_part).resolve() if path_part else doc
                if not resolved.is_relative_to(ROOT):
                    broken.append(f"{where}: outside the repository")
                elif not resolved.exists():
                    broken.append(f"{where}: no such file")
                elif fragment and resolved.suffix == ".md" and fragment not in anchors(resolved):
                    broken.append(f"{where}: no heading #{fragment}")
    assert not broken, "\n".join(broken)
    assert len(DOCS) >= 3  # the README, the contract and the guarantees at least


def test_every_test_the_docs_name_exists() -> None:
    """Each `tests/test_x.py::test_name` in README.md and docs/*.md is a test of that file."""
    missing = []
    defined: dict[str, set[str]] = {}
    for doc in DOCS:
        for file, name in _TEST_NAME.findall(doc.read_text(encoding="utf-8")):
            if file not in defined:
                source = ROOT / file
                tree = ast.parse(source.read_text(encoding="utf-8")) if source.exists() else None
                defined[file] = {
                    node.name
                    for node in (ast.walk(tree) if tree is not None else ())
                    if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
                }
            if name not in defined[file]:
                missing.append(f"{doc.relative_to(ROOT)}: {file}::{name}")
    assert not missing, "\n".join(missing)
