"""deploy/: the alert rules pass promtool, and dashboard and alerts only use metrics we export."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from gateway.metrics import Metrics

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
ALERT_TESTS = DEPLOY / "prometheus" / "alerts_test.yml"
DASHBOARD = DEPLOY / "grafana" / "gateway-dashboard.json"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None,
    reason="promtool is not on PATH (Debian: apt-get install --no-install-recommends prometheus)",
)
METRIC_NAME = re.compile(r"\bgateway_[a-z0-9_]+")
SUFFIXES = re.compile(r"_(?:total|bucket|sum|count|created)$")
REQUIRED_ALERTS = {
    "GatewayDown",
    "GatewayNotReady",
    "BrazeErrorsSustained",
    "DeliveryBlocked",
    "SpoolGrowing",
    "DeadLettersAppearing",
    "ConfigReloadFailed",
}


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def query_panels() -> list[dict[str, Any]]:
    return [p for p in dashboard()["panels"] if p["type"] != "row"]


def panel_exprs() -> list[str]:
    return [t["expr"] for p in query_panels() for t in p["targets"]]


def dashboard_exprs() -> list[str]:
    """The panels' PromQL and the variables' `label_values(...)` queries."""
    variables = dashboard()["templating"]["list"]
    return panel_exprs() + [v["query"]["query"] for v in variables if v["type"] == "query"]


def alert_blocks() -> dict[str, str]:
    """Each alert rule's YAML text, by alert name (PyYAML is not a dependency, so by layout)."""
    parts = re.split(r"^\s*- alert:\s*", ALERTS.read_text(), flags=re.MULTILINE)[1:]
    return {part.split("\n", 1)[0].strip(): part for part in parts}


def block_expr(block: str) -> str:
    """The `expr:` of one rule, inline or as a `|` / `>` block scalar."""
    lines = block.splitlines()
    for number, line in enumerate(lines):
        match = re.match(r"^(\s*)expr:\s*(.*)$", line)
        if not match:
            continue
        indent, rest = len(match.group(1)), match.group(2).strip()
        if rest not in ("|", "|-", ">", ">-"):
            return rest
        body = []
        for following in lines[number + 1 :]:
            if following.strip() and len(following) - len(following.lstrip()) <= indent:
                break
            body.append(following.strip())
        return " ".join(body).strip()
    raise AssertionError(f"no expr in rule:\n{block}")


def exported_families() -> set[str]:
    """Metric family names a fresh registry exposes (the text format lists `_created` apart)."""
    text = generate_latest(Metrics().registry).decode()
    return {family_of(family.name) for family in text_string_to_metric_families(text)}


def family_of(name: str) -> str:
    return SUFFIXES.sub("", name)


def as_promql(expr: str) -> str:
    """A dashboard query with Grafana's variables replaced, so promtool can parse it."""
    for variable, value in (("$__rate_interval", "5m"), ("$__interval", "1m"), ("$__range", "1h")):
        expr = expr.replace(variable, value)
    return re.sub(r"\$\{?\w+\}?", ".+", expr)


@needs_promtool
def test_alert_rules_pass_promtool_check() -> None:
    """`promtool check rules` accepts deploy/prometheus/alerts.yml."""
    assert PROMTOOL is not None
    run = subprocess.run(
        [PROMTOOL, "check", "rules", str(ALERTS)], capture_output=True, text=True, check=False
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert f"SUCCESS: {len(alert_blocks())} rules found" in run.stdout


@needs_promtool
def test_alert_unit_tests_pass() -> None:
    """`promtool test rules` fires SpoolGrowing, ConfigReloadFailed and more on synthetic series."""
    assert PROMTOOL is not None
    text = ALERT_TESTS.read_text()
    for alert in ("SpoolGrowing", "ConfigReloadFailed"):
        assert f"alertname: {alert}\n        exp_alerts:" in text, alert
    run = subprocess.run(
        [PROMTOOL, "test", "rules", ALERT_TESTS.name],
        cwd=ALERT_TESTS.parent,
        capture_output=True,
        text=True,
        check=False,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "SUCCESS" in run.stdout


@needs_promtool
def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    """Every dashboard query, its Grafana variables filled in, parses as PromQL for promtool."""
    assert PROMTOOL is not None
    rules = [
        f"      - record: dashboard:query{n}\n        expr: {json.dumps(as_promql(expr))}\n"
        for n, expr in enumerate(panel_exprs())
    ]
    path = tmp_path / "dashboard_rules.yml"
    path.write_text("groups:\n  - name: dashboard\n    rules:\n" + "".join(rules))
    run = subprocess.run(
        [PROMTOOL, "check", "rules", str(path)], capture_output=True, text=True, check=False
    )
    assert run.returncode == 0, run.stdout + run.stderr


def test_alerts_cover_the_required_cases_with_labels_and_hints() -> None:
    """Each required alert exists, and every rule has a severity, a summary, a description and a runbook."""  # noqa: E501
    blocks = alert_blocks()
    assert set(blocks) >= REQUIRED_ALERTS
    for name, block in blocks.items():
        for key in ("severity:", "summary:", "description:", "runbook:"):
            assert key in block, (name, key)
        assert re.search(r"severity: (critical|warning|info)\b", block), name


def test_alert_expressions_use_only_exported_metrics() -> None:
    """Every gateway_* metric an alert reads is exposed by a fresh Metrics registry."""
    exported = exported_families()
    for name, block in alert_blocks().items():
        expr = block_expr(block)
        used = set(METRIC_NAME.findall(expr))
        assert used or "up{" in expr, (name, expr)
        for metric in used:
            assert family_of(metric) in exported, (name, metric)


def test_dashboard_uses_only_exported_metrics_and_shows_them_all() -> None:
    """Dashboard queries read only exported metrics, and every exported metric has a panel."""
    exported = {f for f in exported_families() if f.startswith("gateway_")}
    used = {family_of(m) for expr in dashboard_exprs() for m in METRIC_NAME.findall(expr)}
    assert used - exported == set()
    assert exported - used == set()


def test_dashboard_is_importable() -> None:
    """The dashboard JSON has its uid, title, a Prometheus datasource variable and query panels."""
    data = dashboard()
    assert data["uid"] == "didomi-braze-gateway"
    assert data["title"] == "didomi-braze-gateway"
    assert 36 <= data["schemaVersion"] <= 41
    variables = {v["name"]: v for v in data["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"
    ids = [p["id"] for p in data["panels"]]
    assert len(ids) == len(set(ids))
    panels = query_panels()
    assert len(panels) >= 15
    for panel in panels:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}, panel[
            "title"
        ]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["expr"].strip(), panel["title"]
            assert target["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
