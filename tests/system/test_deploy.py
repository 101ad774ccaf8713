"""deploy/ and the Dockerfile: alerts and dashboard against our metrics, and the deployments.

Nothing here runs Docker or Kubernetes: the files are parsed and cross-checked against each other
and against the gateway's own config loader, CLI and defaults.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tomllib
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import msgspec
import pytest
import yaml
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from gateway.cli.main import _parser
from gateway.config import located
from gateway.config import settings as config_module
from gateway.config.settings import Config, ServerConfig, load_config
from gateway.metrics import Metrics
from gateway.rules.mappings import load_rules

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
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
    "AuditRecordsShed",
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


# ---------------------------------------------------------------------------
# The image, Kubernetes and Compose: parsed, and checked against each other and the gateway.

DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
KUBERNETES = DEPLOY / "kubernetes" / "gateway.yaml"
COMPOSE_DIR = DEPLOY / "compose"
COMPOSE = COMPOSE_DIR / "docker-compose.yml"
PROMETHEUS_CONFIG = COMPOSE_DIR / "prometheus.yml"
NGINX = COMPOSE_DIR / "nginx.conf"
MAPPINGS = ROOT / "mappings"
CONFIG_DIR = PurePosixPath("/etc/gateway")  # where the image expects gateway.toml
CONFIG_PATH = CONFIG_DIR / "gateway.toml"
SPOOL = "postgresql://gateway@postgres:5432/gateway"
# What [server] host must be in a container, or nothing outside it (probes, Service) connects.
ALL_INTERFACES = "0.0.0.0"  # noqa: S104
LIBPQ_ENV = {"PGPASSWORD"}  # what libpq itself reads: never a ${VAR} of gateway.toml
# Keys of the PostgreSQL spool's contract that today's loader does not know yet.
PENDING_KEYS = {("delivery", "replica")}
# The loader's own pattern, so these tests see exactly the references it substitutes.
ENV_REF = located._ENV_REF
COMPOSE_DEFAULT = re.compile(r"\$\{(\w+):-([^}]*)\}")


def dockerfile() -> list[tuple[str, str]]:
    """The Dockerfile's instructions as (INSTRUCTION, arguments), continuation lines joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            instruction, _, args = line.partition(" ")
            out.append((instruction.upper(), args.strip()))
    return out


def instruction(name: str) -> list[str]:
    return [args for instr, args in dockerfile() if instr == name]


def k8s_docs() -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(KUBERNETES.read_text()) if doc is not None]


def k8s(kind: str) -> dict[str, Any]:
    (doc,) = [doc for doc in k8s_docs() if doc["kind"] == kind]
    return doc


def pod() -> dict[str, Any]:
    spec: dict[str, Any] = k8s("Deployment")["spec"]["template"]["spec"]
    return spec


def k8s_containers() -> list[dict[str, Any]]:
    return [*pod().get("initContainers", []), *pod()["containers"]]


def k8s_gateway() -> dict[str, Any]:
    (container,) = [c for c in pod()["containers"] if c["name"] == "gateway"]
    return container


def k8s_config_text() -> str:
    text: str = k8s("ConfigMap")["data"]["gateway.toml"]
    return text


def k8s_config() -> dict[str, Any]:
    return tomllib.loads(k8s_config_text())


def container_port(container: dict[str, Any], port: int | str) -> int:
    """A probe's or Service's port, by name or number, as the container's port number."""
    by_name = {p["name"]: p["containerPort"] for p in container["ports"]}
    number = by_name[port] if isinstance(port, str) else port
    assert number in by_name.values(), (port, container["ports"])
    return number


def strings(value: Any) -> Iterator[str]:
    """Every string value of a parsed TOML document (comments are gone by then)."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from strings(item)


def env_refs(toml: dict[str, Any]) -> dict[str, bool]:
    """Each `${VAR}` the config uses, and whether it has a default."""
    refs: dict[str, bool] = {}
    for text in strings(toml):
        for m in ENV_REF.finditer(text):
            refs[m.group(1)] = refs.get(m.group(1), False) or m.group(2) is not None
    return refs


def required_vars(toml: dict[str, Any]) -> set[str]:
    return {name for name, has_default in env_refs(toml).items() if not has_default}


def k8s_env_names(container: dict[str, Any]) -> set[str]:
    """The variables a container gets: its env, and every key of the Secrets it takes whole."""
    secrets = {doc["metadata"]["name"]: doc for doc in k8s_docs() if doc["kind"] == "Secret"}
    names = {entry["name"] for entry in container.get("env", [])}
    for source in container.get("envFrom", []):
        secret = secrets[source["secretRef"]["name"]]
        names |= set(secret.get("stringData", {})) | set(secret.get("data", {}))
    return names


def write_k8s_volume(tmp_path: Path) -> Path:
    """The `config` volume as the kubelet lays it out: each item's key at its path."""
    (volume,) = [v for v in pod()["volumes"] if v["name"] == "config"]
    configmap = k8s("ConfigMap")
    assert volume["configMap"]["name"] == configmap["metadata"]["name"]
    for item in volume["configMap"]["items"]:
        path = tmp_path / item["path"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(configmap["data"][item["key"]])
    return tmp_path / CONFIG_PATH.relative_to(CONFIG_DIR)


def placeholder_env(toml: dict[str, Any]) -> dict[str, str]:
    """A value for every variable the config names, as the pod or container would give them."""
    env = {name: f"test-{name.lower()}" for name in env_refs(toml)}
    env["BRAZE_SERVER"] = "US-01"
    return env


def todays_loader_text(text: str, spool: Path) -> str:
    """The config with the PostgreSQL keys the loader cannot take yet swapped for SQLite ones."""
    text = re.sub(r"^replica\s*=.*$", "", text, flags=re.MULTILINE)
    return re.sub(r"^spool\s*=.*$", f"spool = {json.dumps(str(spool))}", text, flags=re.MULTILINE)


def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return data


def services() -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = compose()["services"]
    return found


def compose_value(value: Any) -> str:
    """A compose value with `${VAR:-default}` at its default, as a bare `docker compose up` has."""
    return COMPOSE_DEFAULT.sub(r"\2", str(value))


def mounts(service: dict[str, Any]) -> dict[str, str]:
    """A service's bind mounts and named volumes, container path -> source."""
    out = {}
    for volume in service.get("volumes", []):
        if isinstance(volume, str):
            source, target = volume.split(":")[:2]
        else:
            source, target = volume["source"], volume["target"]
        out[target] = source
    return out


def host_path(source: str) -> Path:
    return (COMPOSE_DIR / source).resolve()


def uses_image_of_repo(service: dict[str, Any]) -> bool:
    build = service.get("build")
    return build is not None and host_path(build["context"]) == ROOT


def config_services() -> list[str]:
    """The services that run the `gateway` command on gateway.toml (the replicas and migrate)."""
    return [n for n, s in services().items() if uses_image_of_repo(s) and "entrypoint" not in s]


def replicas() -> list[str]:
    """The `gateway run` services: the image's own command."""
    return [n for n in config_services() if services()[n].get("command") is None]


def compose_config_file() -> Path:
    """The gateway.toml the replicas mount (the same one for all, as checked below)."""
    (source,) = {mounts(services()[n])[str(CONFIG_PATH)] for n in config_services()}
    return host_path(source)


def compose_config() -> dict[str, Any]:
    return tomllib.loads(compose_config_file().read_text())


def depends_on(service: dict[str, Any]) -> dict[str, str]:
    """Service name -> condition, for the list and the mapping forms of depends_on."""
    deps = service.get("depends_on", {})
    if isinstance(deps, list):
        return dict.fromkeys(deps, "service_started")
    return {name: spec.get("condition", "service_started") for name, spec in deps.items()}


def seconds(duration: str) -> float:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m)", duration)
    assert m, duration
    return float(m.group(1)) * {"ms": 0.001, "s": 1, "m": 60}[m.group(2)]


def alerts_job() -> str:
    (job,) = set(re.findall(r'up\{job="([^"]+)"\}', ALERTS.read_text()))
    return job


def test_every_deploy_yaml_file_parses() -> None:
    """Every YAML file under deploy/ is valid YAML with at least one document."""
    files = sorted([*DEPLOY.rglob("*.yml"), *DEPLOY.rglob("*.yaml")])
    assert KUBERNETES in files
    assert COMPOSE in files
    for path in files:
        docs = [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
        assert docs, path


def test_the_dockerfile_runs_the_gateway_cli_as_non_root_with_the_postgresql_extra() -> None:
    """python:3.11-slim, `.[postgresql]`, a numeric non-root USER, and a CMD the CLI accepts."""
    (base,) = [a for a in instruction("ARG") if a.startswith("PYTHON_IMAGE=")]
    assert base == "PYTHON_IMAGE=python:3.11-slim"
    assert instruction("FROM")[-1] == "${PYTHON_IMAGE}"
    assert any("pip install" in a and "'.[postgresql]'" in a for a in instruction("RUN"))
    (user,) = instruction("USER")
    uid, _, gid = user.partition(":")
    assert int(uid) > 0
    assert int(gid) > 0
    assert int(uid) == pod()["securityContext"]["runAsUser"]
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    (entrypoint,) = instruction("ENTRYPOINT")
    assert json.loads(entrypoint) == ["gateway"]
    assert "gateway" in scripts
    (cmd,) = instruction("CMD")
    args = json.loads(cmd)
    assert args == ["run", "--config", str(CONFIG_PATH)]
    assert _parser().parse_args(args).config == str(CONFIG_PATH)
    (expose,) = instruction("EXPOSE")
    assert int(expose) == k8s_config()["server"]["port"] == compose_config()["server"]["port"]
    (healthcheck,) = instruction("HEALTHCHECK")
    assert f"http://127.0.0.1:{expose}/healthz" in healthcheck


def test_dockerignore_lets_in_what_the_dockerfile_copies_and_nothing_else() -> None:
    """An allow-list: everything is excluded, then exactly the COPY sources are let back in."""
    lines = [
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*"
    allowed = {line[1:] for line in lines if line.startswith("!")}
    sources = set()
    for args in instruction("COPY"):
        if args.startswith("--from"):
            continue
        *srcs, _ = args.split()
        sources |= set(srcs)
    assert sources == allowed
    for source in sources:
        assert (ROOT / source).exists(), source


def test_kubernetes_manifests_are_namespace_agnostic_and_select_their_pods() -> None:
    """Secret, ConfigMap, Deployment, Service, PDB; no namespace; selectors match the pods."""
    docs = k8s_docs()
    kinds = sorted(doc["kind"] for doc in docs)
    assert kinds == ["ConfigMap", "Deployment", "PodDisruptionBudget", "Secret", "Service"]
    for doc in docs:
        assert "namespace" not in doc["metadata"], doc["kind"]
    deployment = k8s("Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector.items() <= labels.items()
    assert k8s("Service")["spec"]["selector"].items() <= labels.items()
    assert k8s("PodDisruptionBudget")["spec"]["selector"]["matchLabels"] == selector


def test_kubernetes_keeps_a_replica_taking_webhooks() -> None:
    """Two replicas or more, a rollout that never goes below them, a PDB that keeps one."""
    spec = k8s("Deployment")["spec"]
    assert spec["replicas"] >= 2
    assert spec["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    assert 1 <= k8s("PodDisruptionBudget")["spec"]["minAvailable"] < spec["replicas"]


def test_kubernetes_probes_hit_readyz_and_healthz_on_the_served_port() -> None:
    """Readiness on /readyz, liveness and startup on /healthz, all on [server] port."""
    gateway = k8s_gateway()
    server = k8s_config()["server"]
    assert server["host"] == ALL_INTERFACES
    paths = {"readinessProbe": "/readyz", "livenessProbe": "/healthz", "startupProbe": "/healthz"}
    for probe, path in paths.items():
        get = gateway[probe]["httpGet"]
        assert get["path"] == path, probe
        assert container_port(gateway, get["port"]) == server["port"], probe
    service = k8s("Service")["spec"]["ports"]
    assert [p["port"] for p in service] == [80]
    assert container_port(gateway, service[0]["targetPort"]) == server["port"]
    annotations = k8s("Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == server["port"]
    assert annotations["prometheus.io/path"] == "/metrics"


def test_kubernetes_grace_period_outlasts_the_prestop_sleep_and_the_shutdown() -> None:
    """terminationGracePeriodSeconds > preStop sleep + shutdown_timeout_s + the second beyond it."""
    command = k8s_gateway()["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    sleep = float(command[1])
    assert sleep > 0
    shutdown = k8s_config()["server"].get("shutdown_timeout_s", ServerConfig().shutdown_timeout_s)
    # README "Shutdown is bounded": the process ends within shutdown_timeout_s plus a second.
    assert pod()["terminationGracePeriodSeconds"] > sleep + shutdown + 1


def test_kubernetes_pods_get_every_variable_their_config_needs() -> None:
    """Each `${VAR}` without a default, and libpq's PGPASSWORD, comes from the Secret or env."""
    config = k8s_config()
    needed = required_vars(config) | LIBPQ_ENV
    assert {"BRAZE_API_KEY", "DIDOMI_CLIENT_SECRET"} <= needed
    for container in k8s_containers():
        assert needed <= k8s_env_names(container), container["name"]
        env = {entry["name"]: entry for entry in container.get("env", [])}
        replica = env["GATEWAY_REPLICA"]["valueFrom"]["fieldRef"]["fieldPath"]
        assert replica == "metadata.name", container["name"]
    assert config["delivery"]["replica"] == "${GATEWAY_REPLICA:-}"
    for key, value in k8s("Secret")["stringData"].items():
        assert "REPLACE" in value, key  # placeholders only: no real secret in the repository


def test_kubernetes_spool_is_postgresql_without_a_password() -> None:
    """The ConfigMap's spool is the PostgreSQL URL; the password stays in PGPASSWORD."""
    spool = k8s_config()["delivery"]["spool"]
    assert spool == SPOOL
    assert urlsplit(spool).password is None


def test_kubernetes_migrates_and_runs_on_the_mounted_config() -> None:
    """The init container runs `gateway migrate`, the server `gateway run`, on /etc/gateway."""
    init = {c["name"]: c for c in pod()["initContainers"]}["migrate"]
    gateway = k8s_gateway()
    assert init["args"] == ["migrate", "--config", str(CONFIG_PATH)]
    args = _parser().parse_args(gateway["args"])
    assert (args.command, args.config) == ("run", str(CONFIG_PATH))
    assert init["image"] == gateway["image"]
    for key in ("env", "envFrom", "volumeMounts"):
        assert init[key] == gateway[key], key
    (config_mount,) = [m for m in gateway["volumeMounts"] if m["name"] == "config"]
    assert config_mount["mountPath"] == str(CONFIG_DIR)
    assert config_mount["readOnly"] is True


def test_kubernetes_checks_the_credentials_online_before_the_replicas_start() -> None:
    """The first init container runs `gateway check --online` (an outage allowed) on the mounted
    config, with the server's image, variables and mounts, so a wrong key, group or purpose
    stops the rollout before any replica starts."""
    first = pod()["initContainers"][0]
    gateway = k8s_gateway()
    args = _parser().parse_args(first["args"])
    assert (args.command, args.config) == ("check", str(CONFIG_PATH))
    assert args.online is True
    assert args.allow_unreachable is True  # an outage must not keep replicas from spooling
    assert first["image"] == gateway["image"]
    for key in ("env", "envFrom", "volumeMounts"):
        assert first[key] == gateway[key], key


def test_kubernetes_pods_run_non_root_read_only_with_small_resources() -> None:
    """Non-root, read-only root filesystem, no capabilities; requests and limits everywhere."""
    context = pod()["securityContext"]
    assert context["runAsNonRoot"] is True
    assert context["runAsUser"] > 0
    for container in k8s_containers():
        security = container["securityContext"]
        assert security["readOnlyRootFilesystem"] is True, container["name"]
        assert security["allowPrivilegeEscalation"] is False, container["name"]
        assert security["capabilities"]["drop"] == ["ALL"], container["name"]
        resources = container["resources"]
        for kind in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(resources[kind]), (container["name"], kind)


def test_kubernetes_volume_lays_out_the_config_and_mappings_the_loader_reads(
    tmp_path: Path,
) -> None:
    """Every ConfigMap key is projected; the mappings land in mappings.dir and load as ours."""
    volume = next(v for v in pod()["volumes"] if v["name"] == "config")
    items = volume["configMap"]["items"]
    assert sorted(i["key"] for i in items) == sorted(k8s("ConfigMap")["data"])
    config_file = write_k8s_volume(tmp_path)
    mappings = tmp_path / k8s_config()["mappings"]["dir"]
    assert sorted(p.name for p in mappings.iterdir()) == sorted(
        i["key"] for i in items if i["key"] != "gateway.toml"
    )
    assert config_file.is_file()
    rules = load_rules(mappings)
    assert len(rules.rules) == len(load_rules(MAPPINGS).rules)
    # The example in the manifest is the repository's example, minus the [[test]] tables
    # (whose event files are not in the ConfigMap).
    ours = tomllib.loads((MAPPINGS / "email.toml").read_text())
    shipped = tomllib.loads(k8s("ConfigMap")["data"]["email.toml"])
    assert shipped == {key: value for key, value in ours.items() if key != "test"}


def test_the_shipped_configs_load_with_the_gateway_loader(tmp_path: Path) -> None:
    """The ConfigMap's and compose's gateway.toml load as they are, spool on PostgreSQL."""
    shipped = {
        "kubernetes": (write_k8s_volume(tmp_path / "kubernetes"), k8s_config()),
        "compose": (compose_config_file(), compose_config()),
    }
    for where, (path, toml) in shipped.items():
        env = placeholder_env(toml)
        config = load_config(path, env)
        assert config.delivery.spool == SPOOL, where
        assert config.delivery.spool.startswith("postgresql://"), where
        assert getattr(config.delivery, "replica", None) == env["GATEWAY_REPLICA"], where
        assert (config.server.host, config.server.port) == (ALL_INTERFACES, 8080), where


def test_the_shipped_configs_pass_todays_loader_but_for_the_postgresql_keys(
    tmp_path: Path,
) -> None:
    """Every other key and value of the shipped gateway.toml files is one the loader accepts."""
    shipped = {
        "kubernetes": (write_k8s_volume(tmp_path / "kubernetes"), k8s_config()),
        "compose": (compose_config_file(), compose_config()),
    }
    tables = {f.name: config_module._table_type(f.type) for f in msgspec.structs.fields(Config)}
    for where, (path, toml) in shipped.items():
        for section, keys in toml.items():
            assert section in tables, (where, section)
            known = {f.encode_name for f in msgspec.structs.fields(tables[section])}
            unknown = {(section, key) for key in keys if key not in known}
            assert unknown <= PENDING_KEYS, (where, unknown)
        # What the loader does not know yet out, SQLite in: the rest must load as it is.
        copy = tmp_path / where / "today.toml"
        copy.parent.mkdir(parents=True, exist_ok=True)
        copy.write_text(todays_loader_text(path.read_text(), tmp_path / where / "spool.db"))
        mappings = tmp_path / where / toml["mappings"]["dir"]
        if not mappings.exists():
            shutil.copytree(MAPPINGS, mappings)
        config = load_config(copy, placeholder_env(toml))
        assert config.server.host == ALL_INTERFACES, where
        assert config.auth.mode == "oauth2", where


def test_compose_depends_on_services_that_exist_in_the_right_state() -> None:
    """Every depends_on names a service; one that must complete is a one-shot, with no restart."""
    found = services()
    for name, service in found.items():
        for dependency, condition in depends_on(service).items():
            assert dependency in found, (name, dependency)
            assert dependency != name
            if condition == "service_completed_successfully":
                assert found[dependency].get("restart", "no") == "no", dependency
            if condition == "service_healthy":
                dep = found[dependency]
                # Its own healthcheck, or the image's HEALTHCHECK, and not switched off.
                assert "healthcheck" in dep or uses_image_of_repo(dep), dependency
                assert not dep.get("healthcheck", {}).get("disable"), dependency
    for name in replicas():
        deps = depends_on(found[name])
        assert deps["postgres"] == "service_healthy", name
    assert "pg_isready" in str(found["postgres"]["healthcheck"]["test"])


def test_compose_mounts_files_that_exist_in_the_repository() -> None:
    """Every bind mount's source exists inside the repository; named volumes are declared."""
    named = set(compose().get("volumes") or {})
    for name, service in services().items():
        for target, source in mounts(service).items():
            if source.startswith((".", "/")):
                path = host_path(source)
                assert path.exists(), (name, source)
                assert path.is_relative_to(ROOT), (name, source)
            else:
                assert source in named, (name, source)
            assert target.startswith("/"), (name, target)
        if "build" in service:
            assert (host_path(service["build"]["context"]) / "Dockerfile").is_file(), name


def test_compose_runs_two_replicas_on_one_config_with_every_variable() -> None:
    """Two replicas or more, each with its own name, the mounted config and the mappings dir."""
    found = services()
    names = replicas()
    assert len(names) >= 2
    assert "migrate" in config_services()
    assert found["migrate"]["command"] == ["migrate", "--config", str(CONFIG_PATH)]
    config = compose_config()
    assert config["delivery"]["spool"] == SPOOL
    assert config["server"]["host"] == ALL_INTERFACES
    needed = required_vars(config) | LIBPQ_ENV
    replica_names = set()
    for name in config_services():
        service = found[name]
        env = service["environment"]
        assert needed <= set(env), name
        assert mounts(service)[str(CONFIG_PATH)] == mounts(found[names[0]])[str(CONFIG_PATH)]
        mappings_dir = str(CONFIG_DIR / config["mappings"]["dir"])
        assert host_path(mounts(service)[mappings_dir]) == MAPPINGS, name
        if name in names:
            replica_names.add(env["GATEWAY_REPLICA"])
    assert len(replica_names) == len(names)


def test_compose_stop_grace_outlasts_the_shutdown_timeout() -> None:
    """Docker's SIGKILL comes after shutdown_timeout_s and the second the gateway may take."""
    shutdown = compose_config()["server"].get(
        "shutdown_timeout_s", ServerConfig().shutdown_timeout_s
    )
    for name in replicas():
        assert seconds(services()[name]["stop_grace_period"]) > shutdown + 1, name


def test_compose_braze_is_the_fake_braze_of_gateway_testing() -> None:
    """BRAZE_SERVER points at the fake-braze service, which takes the replicas' API key."""
    found = services()
    fake = found["fake-braze"]
    assert fake["entrypoint"] == ["python", "-m", "gateway.testing"]
    assert uses_image_of_repo(fake)
    args = [compose_value(a) for a in fake["command"]]
    options = dict(zip(args[::2], args[1::2], strict=True))
    assert options["--host"] == ALL_INTERFACES
    for name in config_services():
        env = {k: compose_value(v) for k, v in found[name]["environment"].items()}
        server = urlsplit(env["BRAZE_SERVER"])
        assert (server.hostname, server.port) == ("fake-braze", int(options["--port"])), name
        assert env["BRAZE_API_KEY"] == options["--api-key"], name
        # A URL braze.server takes as it is (no https:// added in front).
        assert config_module.braze_base_url(env["BRAZE_SERVER"]) == env["BRAZE_SERVER"], name


def test_compose_postgres_is_the_database_of_the_spool_url() -> None:
    """The postgres service creates the role and database the spool URL names, same password."""
    found = services()
    url = urlsplit(compose_config()["delivery"]["spool"])
    assert url.password is None
    assert url.hostname in found
    postgres = {k: compose_value(v) for k, v in found[str(url.hostname)]["environment"].items()}
    assert postgres["POSTGRES_USER"] == url.username
    assert postgres["POSTGRES_DB"] == url.path.lstrip("/")
    assert url.port == 5432
    for name in config_services():
        password = compose_value(found[name]["environment"]["PGPASSWORD"])
        assert password == postgres["POSTGRES_PASSWORD"], name


def test_compose_nginx_balances_over_the_replicas() -> None:
    """nginx's upstream is exactly the replicas on [server] port, and it waits for them."""
    port = compose_config()["server"]["port"]
    text = NGINX.read_text()
    upstream = re.search(r"upstream \w+ \{(.*?)\}", text, flags=re.DOTALL)
    assert upstream is not None
    servers = set(re.findall(r"^\s*server\s+([\w.-]+:\d+)", upstream.group(1), flags=re.MULTILINE))
    assert servers == {f"{name}:{port}" for name in replicas()}
    lb = services()["lb"]
    assert mounts(lb)["/etc/nginx/conf.d/default.conf"] == "./nginx.conf"
    assert set(depends_on(lb)) == set(replicas())
    (listen,) = re.findall(r"^\s*listen\s+(\d+);", text, flags=re.MULTILINE)
    assert any(p.endswith(f":{listen}") for p in lb["ports"])


def test_prometheus_scrapes_each_replica_under_the_alerts_job_name() -> None:
    """One job, named as the alerts expect, with every replica on [server] port as a target."""
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    port = compose_config()["server"]["port"]
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    job = jobs[alerts_job()]
    targets = {t for group in job["static_configs"] for t in group["targets"]}
    assert targets == {f"{name}:{port}" for name in replicas()}
    assert job.get("metrics_path", "/metrics") == "/metrics"


def test_prometheus_loads_the_mounted_alert_rules() -> None:
    """Each rule file Prometheus reads is mounted from deploy/prometheus/alerts.yml."""
    prometheus = services()["prometheus"]
    mounted = mounts(prometheus)
    assert host_path(mounted["/etc/prometheus/prometheus.yml"]) == PROMETHEUS_CONFIG
    rule_files = yaml.safe_load(PROMETHEUS_CONFIG.read_text())["rule_files"]
    assert rule_files
    for rule_file in rule_files:
        assert host_path(mounted[rule_file]) == ALERTS, rule_file


@needs_promtool
def test_compose_prometheus_config_passes_promtool(tmp_path: Path) -> None:
    """`promtool check config` accepts prometheus.yml, its rule files at their mounts' sources."""
    assert PROMTOOL is not None
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    mounted = mounts(services()["prometheus"])
    config["rule_files"] = [str(host_path(mounted[f])) for f in config["rule_files"]]
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    run = subprocess.run(
        [PROMTOOL, "check", "config", str(path)], capture_output=True, text=True, check=False
    )
    assert run.returncode == 0, run.stdout + run.stderr


def test_grafana_provisions_the_dashboard_and_a_default_prometheus() -> None:
    """The provider's path holds the mounted dashboard; its data source variable resolves."""
    grafana = services()["grafana"]
    mounted = mounts(grafana)
    provisioned = {PurePosixPath(target): host_path(source) for target, source in mounted.items()}
    datasources = [
        yaml.safe_load(source.read_text())
        for target, source in provisioned.items()
        if target.parent == PurePosixPath("/etc/grafana/provisioning/datasources")
    ]
    providers = [
        yaml.safe_load(source.read_text())
        for target, source in provisioned.items()
        if target.parent == PurePosixPath("/etc/grafana/provisioning/dashboards")
    ]
    (datasource,) = [d for file in datasources for d in file["datasources"]]
    assert datasource["type"] == "prometheus"
    # DS_PROMETHEUS has no saved value: Grafana then picks the default data source of its type.
    assert datasource["isDefault"] is True
    url = urlsplit(datasource["url"])
    assert url.hostname in services()
    assert any(p.endswith(f":{url.port}") for p in services()[str(url.hostname)]["ports"])
    scrape = yaml.safe_load(PROMETHEUS_CONFIG.read_text())["global"]["scrape_interval"]
    assert datasource["jsonData"]["timeInterval"] == scrape
    (provider,) = [p for file in providers for p in file["providers"]]
    assert provider["type"] == "file"
    (dashboard_target,) = [t for t, s in provisioned.items() if s == DASHBOARD]
    assert dashboard_target.parent == PurePosixPath(provider["options"]["path"])
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert PurePosixPath(home) == dashboard_target
    # An exported dashboard's __inputs are filled in by an import only, never by provisioning.
    data = dashboard()
    assert "__inputs" not in data
    (variable,) = [v for v in data["templating"]["list"] if v["name"] == "DS_PROMETHEUS"]
    assert (variable["type"], variable["query"]) == ("datasource", datasource["type"])
    assert not variable.get("current")


# ---------------------------------------------------------------------------
# The nightly `gateway reconcile` CronJob (issue 25), beside gateway.yaml's Deployment.

RECONCILE_K8S = DEPLOY / "kubernetes" / "reconcile.yaml"


def reconcile_docs() -> dict[str, dict[str, Any]]:
    docs = [doc for doc in yaml.safe_load_all(RECONCILE_K8S.read_text()) if doc is not None]
    return {doc["kind"]: doc for doc in docs}


def test_reconcile_cronjob_runs_the_reconcile_command_on_the_deployments_config() -> None:
    """The CronJob runs `gateway reconcile` (args the CLI parses) on the mounted export folder,
    with gateway.yaml's image, ConfigMap items and Secret, every variable the config needs,
    never two runs at once, and no retry of a drift exit."""
    cron = reconcile_docs()["CronJob"]
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    job = cron["spec"]["jobTemplate"]["spec"]
    assert job["backoffLimit"] == 0
    spec = job["template"]["spec"]
    assert spec["restartPolicy"] == "Never"
    (container,) = spec["containers"]
    assert container["image"] == k8s_gateway()["image"]
    args = _parser().parse_args(container["args"])
    assert args.command == "reconcile"
    mounts_at = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert PurePosixPath(args.config) == PurePosixPath(mounts_at["config"]) / "gateway.toml"
    assert args.sources == [mounts_at["exports"]]
    volumes = {v["name"]: v for v in spec["volumes"]}
    (deployment_config,) = [v for v in pod()["volumes"] if v["name"] == "config"]
    assert volumes["config"] == deployment_config
    fetch = {m["name"]: m["mountPath"] for m in spec["initContainers"][0]["volumeMounts"]}
    assert fetch["exports"] == mounts_at["exports"]
    secrets = {s["secretRef"]["name"] for s in container["envFrom"]}
    assert secrets == {k8s("Secret")["metadata"]["name"]}
    given = k8s_env_names(container)
    assert required_vars(k8s_config()) <= given
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
