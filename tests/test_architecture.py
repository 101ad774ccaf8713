"""The layout keeps its rules: no import cycle, each module imports its own package and lower layers
only, forward/ and reverse/ apart, every subpackage in the wheel, and a CLI that stays light.

The import graph counts every import statement: module level, `if TYPE_CHECKING:` and inside
functions, since each one is an edge a reader must follow. ARCHITECTURE.md draws the layers.
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.conftest import ROOT, SECRETS, write_config

GATEWAY = ROOT / "gateway"

# A unit is a top-level module or a subpackage. A module may import its own unit and units of a
# lower layer; units of one layer never import each other (so forward/ and reverse/ stay apart).
LAYERS = {
    "gateway": 0,  # __init__: the version
    "gateway.errors": 0,
    "gateway.logs": 0,
    "gateway.words": 0,
    "gateway.config": 1,
    "gateway.shapes": 2,
    "gateway.delivery": 2,
    "gateway.rules": 3,
    "gateway.spool": 3,
    "gateway.peers": 4,
    "gateway.metrics": 5,
    "gateway.http": 6,
    "gateway.forward": 7,
    "gateway.reverse": 7,
    "gateway.bulk": 7,
    "gateway.app": 8,
    "gateway.cli": 9,
    "gateway.__main__": 10,
}
# The fakes stand aside: they import only layer 0 and shapes, and only these import them.
SIDE = "gateway.testing"
SIDE_MAY_IMPORT = {"gateway", "gateway.errors", "gateway.logs", "gateway.words", "gateway.shapes"}
EXCEPTIONS = {
    ("gateway.app", SIDE): "the demo (braze.server = fake://) serves the fake Braze itself",
}
APART = ("gateway.forward", "gateway.reverse", "gateway.bulk")


def modules() -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its __init__)."""
    found = {}
    for path in GATEWAY.rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The gateway modules one module imports, wherever the statement is."""
    out: set[str] = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_bytes())):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[: len(parts) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            targets = [
                f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names
            ]
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                out.add(target)
    return out


def graph() -> dict[str, set[str]]:
    """The import graph of gateway/, module to modules."""
    known = modules()
    return {name: imports(name, path, known) for name, path in known.items()}


def unit(module: str) -> str | None:
    """The top-level module or subpackage a module belongs to; None if LAYERS does not place it."""
    if module in LAYERS or module == SIDE:
        return module
    top = ".".join(module.split(".")[:2])
    return top if top in LAYERS or top == SIDE else None


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_every_module_has_a_place_in_the_layers() -> None:
    """Each module of gateway/ belongs to a unit the layer table names."""
    unplaced = sorted(m for m in modules() if unit(m) is None)
    assert not unplaced, f"place these in LAYERS (and ARCHITECTURE.md): {unplaced}"


def test_the_import_graph_has_no_cycle() -> None:
    """No two modules import each other, even through TYPE_CHECKING or a function's import."""
    knots = cycles(graph())
    assert not knots, "import cycles:\n" + "\n".join(" <-> ".join(k) for k in knots)


def test_each_module_imports_its_own_package_and_lower_layers_only() -> None:
    """Every import goes down the layers (or stays in its unit); forward/ and reverse/ never
    import each other; the fakes stand aside."""
    wrong = []
    for module, targets in sorted(graph().items()):
        mine = unit(module)
        for target in sorted(targets):
            theirs = unit(target)
            if mine is None or theirs is None or mine == theirs:
                continue
            if (mine, theirs) in EXCEPTIONS:
                continue
            if mine == SIDE:
                ok = theirs in SIDE_MAY_IMPORT
            elif theirs == SIDE:
                ok = False
            else:
                ok = LAYERS[theirs] < LAYERS[mine]
            if not ok:
                wrong.append(f"{module} imports {target}")
    assert not wrong, "imports against the layers of ARCHITECTURE.md:\n" + "\n".join(wrong)


def test_forward_reverse_and_bulk_never_import_each_other() -> None:
    """The two directions (and bulk) meet only in the layers below them and in app/."""
    edges = graph()
    crossing = [
        f"{m} imports {t}"
        for m, targets in edges.items()
        for t in targets
        if unit(m) in APART and unit(t) in APART and unit(m) != unit(t)
    ]
    assert not crossing, "\n".join(crossing)


def test_every_package_has_a_one_line_docstring() -> None:
    """Each subpackage says in one line what it holds."""
    missing = []
    for init in GATEWAY.rglob("__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_bytes()))
        if not doc or "\n" in doc.strip():
            missing.append(str(init.relative_to(ROOT)))
    assert not missing, f"no one-line docstring: {missing}"


def build_wheel(tmp_path: Path) -> Path:
    """A wheel of the project, built from a copy of what the Dockerfile builds it from."""
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(GATEWAY, source / "gateway", ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path / "wheel"
    pip = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(out)]
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    # The test extra brings setuptools with bdist_wheel, so no index is needed; an older
    # environment builds in isolation from pip's configured index instead.
    for extra in (["--no-build-isolation"], []):
        result = subprocess.run(
            [*pip, *extra, str(source)], capture_output=True, text=True, timeout=300, env=env
        )
        wheels = list(out.glob("*.whl"))
        if result.returncode == 0 and wheels:
            return wheels[0]
    pytest.fail(f"pip wheel failed:\n{result.stdout}\n{result.stderr}")


def test_the_wheel_holds_every_subpackage_and_module(tmp_path: Path) -> None:
    """A wheel built from the project ships every module of every subpackage (an editable
    install hides a `packages = ["gateway"]` that would leave them out)."""
    wheel = build_wheel(tmp_path)
    with zipfile.ZipFile(wheel) as archive:
        shipped = set(archive.namelist())
    wanted = {str(p.relative_to(ROOT)) for p in GATEWAY.rglob("*.py")} | {"gateway/py.typed"}
    missing = sorted(wanted - shipped)
    assert not missing, f"not in {wheel.name}: {missing}"
    assert {p.rsplit("/", 1)[0] for p in wanted if p.endswith("__init__.py")} >= {
        f"gateway/{d.name}" for d in GATEWAY.iterdir() if (d / "__init__.py").exists()
    }


def heavy_imports(args: list[str], cwd: Path, env: dict[str, str]) -> tuple[int, set[str]]:
    """Run `python -X importtime -m gateway ARGS`; its exit code and the heavy modules it loaded."""
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "gateway", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
        env=env,
    )
    loaded = {line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines() if "|" in line}
    heavy = {m for m in loaded if m.split(".")[0] in ("aiohttp", "psycopg", "psycopg_binary")}
    return result.returncode, heavy


def test_version_and_check_do_not_import_aiohttp_or_psycopg(tmp_path: Path) -> None:
    """`gateway --version` and `gateway check` load neither the HTTP stack nor the PostgreSQL
    driver: the CLI imports the app lazily, and psycopg stays optional."""
    env = {**os.environ, **SECRETS}
    code, heavy = heavy_imports(["--version"], tmp_path, env)
    assert code == 0
    assert not heavy, sorted(heavy)
    config = write_config(tmp_path)
    code, heavy = heavy_imports(["check", "--config", str(config)], tmp_path, env)
    assert code == 0, "gateway check failed on the test config"
    assert not heavy, sorted(heavy)
