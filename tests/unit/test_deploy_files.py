"""The deployment files are consistent with each other and with ditserve: dashboards are well-formed
Grafana JSON on the provisioned datasource, compose.yaml runs real `ditserve serve` commands wired to
each other and to Prometheus, and the image is built the way compose and the healthcheck expect.
(tests/integration/test_observability.py runs it all against live services.)"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from ditserve.client.cli import build_parser
from ditserve.client.config import repo_root

ROOT = repo_root()
DEPLOY = ROOT / "deploy"
DASHBOARDS = sorted((DEPLOY / "grafana" / "dashboards").glob("*.json"))
STAGES = ("gateway", "encoder", "denoiser", "vae")
COMPOSE = yaml.safe_load((ROOT / "compose.yaml").read_text())
SERVICES = {
    name: service for name, service in COMPOSE["services"].items() if service.get("command", [""])[0] == "serve"
}


def load(path: Path) -> dict:
    return json.loads(path.read_text())


def parsed(name: str) -> object:
    """The service's command as `ditserve` itself parses it."""
    command = SERVICES[name]["command"]
    return build_parser(command).parse_args(command)


def panels(board: dict) -> list[dict]:
    return [nested for panel in board["panels"] for nested in [panel, *panel.get("panels", [])]]


def test_dashboards_are_well_formed_and_use_the_provisioned_datasource() -> None:
    provisioned = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())
    (datasource,) = provisioned["datasources"]
    expected = {"type": datasource["type"], "uid": datasource["uid"]}
    boards = [load(path) for path in DASHBOARDS]
    assert {board["uid"] for board in boards} == {f"ditserve-{name}" for name in ("overview", *STAGES)}
    for board in boards:
        assert board["schemaVersion"] == 39 and "ditserve" in board["tags"], board["uid"]
        ids = [panel["id"] for panel in panels(board)]
        assert len(ids) == len(set(ids)), f"{board['uid']}: duplicate panel ids"
        for panel in panels(board):
            where = f"{board['uid']} panel {panel['id']} {panel['title']!r}"
            grid = panel["gridPos"]
            assert grid["x"] + grid["w"] <= 24 and grid["h"] > 0, where
            if panel["type"] == "row":
                continue
            assert panel["datasource"] == expected, where
            assert panel["targets"], f"{where}: no query"
            assert len({target["refId"] for target in panel["targets"]}) == len(panel["targets"]), where
            for target in panel["targets"]:
                assert target["datasource"] == expected and target["expr"].strip(), where
                # the integration test substitutes Grafana's variables; this is the only one used
                assert set(re.findall(r"\$\w+", target["expr"])) <= {"$__rate_interval"}, where


def test_overview_shows_every_stage_signal() -> None:
    exprs = " ".join(
        target["expr"]
        for panel in panels(load(DEPLOY / "grafana/dashboards/overview.json"))
        for target in panel.get("targets", [])
    )
    for needed in (
        "ditserve_requests_total",  # request rate, errors by code
        'code!="OK"',
        "histogram_quantile(0.5, sum by (job, le) (rate(ditserve_request_duration_seconds_bucket",
        "histogram_quantile(0.95, sum by (job, le) (rate(ditserve_request_duration_seconds_bucket",
        "histogram_quantile(0.99, sum by (job, le) (rate(ditserve_request_duration_seconds_bucket",
        "ditserve_queue_depth",
        "ditserve_batch_size_count",
        'ditserve_cache_steps_total{outcome="cached"}',
        "ditserve_denoise_step_duration_seconds_bucket",
        "ditserve_device_memory_bytes",
        "ditserve_tensor_bytes_total",
        "up{",
    ):
        assert needed in exprs, needed


def bare_metrics(expr: str) -> list[str]:
    """Metric names a PromQL expression selects without a `{...}` selector."""
    text = re.sub(r"\{[^}]*\}", "{}", expr)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)|\[[^\]]*\]", " ", text)
    keywords = {"and", "or", "unless", "bool"}
    return [name for name in re.findall(r"\b[a-zA-Z_:][\w:]*\b(?!\s*[({])", text) if name not in keywords]


@pytest.mark.parametrize("stage", STAGES)
def test_each_stage_dashboard_shows_only_its_stage(stage: str) -> None:
    board = load(DEPLOY / f"grafana/dashboards/{stage}.json")
    for panel in panels(board):
        for target in panel.get("targets", []):
            expr = target["expr"]
            assert not bare_metrics(expr), f"{panel['title']}: {expr}"
            for selector in re.findall(r"\{[^}]*\}", expr):
                assert f'job="{stage}"' in selector, f"{panel['title']}: {expr}"


def test_grafana_provisioning_points_at_what_compose_mounts() -> None:
    grafana = COMPOSE["services"]["grafana"]
    mounts = dict(volume.split(":")[:2] for volume in grafana["volumes"] if volume.startswith("./"))
    assert mounts["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"
    provider = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/ditserve.yml").read_text())
    (folder,) = [options["options"]["path"] for options in provider["providers"]]
    assert mounts["./deploy/grafana/dashboards"] == folder
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert (DEPLOY / "grafana/dashboards" / Path(home).relative_to(folder)).is_file()
    (datasource,) = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())[
        "datasources"
    ]
    assert datasource["url"] == "http://prometheus:9090" and "prometheus" in COMPOSE["services"]


def test_compose_runs_real_ditserve_commands_on_every_interface() -> None:
    roles = {name: parsed(name).role for name in SERVICES}
    for profile in ("cpu", "gpu"):
        in_profile = sorted(roles[name] for name in SERVICES if SERVICES[name]["profiles"] == [profile])
        assert set(in_profile) == set(STAGES), profile
    for name, service in SERVICES.items():
        args = parsed(name)
        assert args.host == "0.0.0.0", name
        assert service["healthcheck"]["test"] == ["CMD", "python3", "/opt/ditserve/healthcheck.py"], name
        assert service["image"] == {"cpu": "ditserve:cpu", "gpu": "ditserve:cuda"}[service["profiles"][0]]
        build = service["build"]
        assert build["dockerfile"] == "deploy/docker/Dockerfile" and set(build["args"]) == {"BASE_IMAGE", "TORCH_SPEC"}
        gpu = service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
        if args.role != "gateway":
            assert args.model.startswith("/models/") and any(v.endswith(":/models:ro") for v in service["volumes"])
            assert (args.device == "cuda") == ("gpu" in service["profiles"]) == bool(gpu), name
        if gpu:
            assert gpu[0]["driver"] == "nvidia" and gpu[0]["capabilities"] == ["gpu"], name
    denoisers = [name for name in SERVICES if roles[name] == "denoiser"]
    assert all(parsed(name).batching == "continuous" for name in denoisers)


def test_gateways_call_healthy_stages_of_their_own_profile() -> None:
    for name, service in SERVICES.items():
        args = parsed(name)
        if args.role != "gateway":
            continue
        called = []
        for stage in ("encoder", "denoiser", "vae"):
            for address in getattr(args, stage).split(","):
                host, port = address.split(":")
                called.append(host)
                assert SERVICES[host]["profiles"] == service["profiles"], address
                assert parsed(host).role == stage and parsed(host).port == int(port), address
        assert service["depends_on"] == {host: {"condition": "service_healthy"} for host in called}
        if service["profiles"] == ["cpu"]:
            assert len(args.denoiser.split(",")) >= 2, "the replica example: several denoisers behind one gateway"


def test_prometheus_scrapes_every_compose_service_on_its_metrics_port() -> None:
    config = yaml.safe_load((DEPLOY / "prometheus/prometheus.yml").read_text())
    scraped = {
        (job["job_name"], name, dns["port"])
        for job in config["scrape_configs"]
        for dns in job["dns_sd_configs"]
        for name in dns["names"]
    }
    assert scraped == {(parsed(name).role, name, parsed(name).metrics_port) for name in SERVICES}
    assert all((DEPLOY / "prometheus" / path).is_file() for path in config["rule_files"])
    mounts = COMPOSE["services"]["prometheus"]["volumes"]
    assert "./deploy/prometheus:/etc/prometheus:ro" in mounts


def test_queue_alert_fires_at_three_quarters_of_every_denoisers_max_queue() -> None:
    rules = yaml.safe_load((DEPLOY / "prometheus/alerts.yml").read_text())
    (expr,) = [
        rule["expr"]
        for group in rules["groups"]
        for rule in group["rules"]
        if rule["alert"] == "DitserveQueueSaturated"
    ]
    threshold = float(expr.rsplit(">", 1)[1])
    assert {parsed(name).max_queue * 0.75 for name in SERVICES if parsed(name).role == "denoiser"} == {threshold}


def test_image_is_built_as_compose_and_the_healthcheck_expect() -> None:
    dockerfile = (DEPLOY / "docker/Dockerfile").read_text()
    before_from = dockerfile.split("\nFROM ")[0]
    assert "ARG BASE_IMAGE=" in before_from and "FROM ${BASE_IMAGE}" in dockerfile
    assert "ARG TORCH_SPEC=" in dockerfile and "pip install ${TORCH_SPEC}" in dockerfile
    (user,) = re.findall(r"^USER (\S+)$", dockerfile, re.MULTILINE)
    assert user not in ("root", "0")
    assert "COPY models/shapes-flux /models/shapes-flux" in dockerfile and "VOLUME /models" in dockerfile
    assert "COPY deploy/docker/healthcheck.py /opt/ditserve/healthcheck.py" in dockerfile
    assert 'CMD ["python3", "/opt/ditserve/healthcheck.py"]' in dockerfile
    assert 'ENTRYPOINT ["ditserve"]' in dockerfile
    # BuildKit's context is only what Dockerfile.dockerignore lets through: every COPY source.
    allowed = {
        line[1:]
        for line in (DEPLOY / "docker/Dockerfile.dockerignore").read_text().splitlines()
        if line.startswith("!")
    }
    sources = {source for line in re.findall(r"^COPY (.+) \S+$", dockerfile, re.MULTILINE) for source in line.split()}
    assert sources == allowed


def test_healthcheck_reads_the_grpc_port_from_the_service_command_line() -> None:
    spec = importlib.util.spec_from_file_location("healthcheck", DEPLOY / "docker/healthcheck.py")
    healthcheck = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(healthcheck)
    entrypoint = ["/opt/venv/bin/python3", "/opt/venv/bin/ditserve"]
    for name in SERVICES:
        assert healthcheck.grpc_port([*entrypoint, *SERVICES[name]["command"]]) == parsed(name).port
    assert healthcheck.grpc_port([*entrypoint, "serve", "vae"]) == 50053


@pytest.mark.skipif(not shutil.which("docker-compose"), reason="no docker-compose to validate compose.yaml with")
def test_docker_compose_accepts_compose_yaml() -> None:
    for profile in ("cpu", "gpu"):
        result = subprocess.run(
            ["docker-compose", "--profile", profile, "config", "--quiet"], cwd=ROOT, capture_output=True, text=True
        )
        assert result.returncode == 0, result.stderr
