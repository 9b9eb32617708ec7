"""The deployment files are consistent with each other and with ditserve: dashboards are well-formed
Grafana JSON on a datasource variable with an instance filter, compose.yaml (and its GPU override)
runs real `ditserve serve` commands wired to each other and to Prometheus, the alerts compare with what
the services export, and the image is built the way compose and the healthcheck expect.
(tests/integration/test_observability.py runs it all against live services.)"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
import time
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
GPU = yaml.safe_load((ROOT / "compose.gpu.yaml").read_text())
SERVICES = {
    name: service for name, service in COMPOSE["services"].items() if service.get("command", [""])[0] == "serve"
}
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}


def load(path: Path) -> dict:
    return json.loads(path.read_text())


def parsed(name: str, services: dict | None = None) -> object:
    """The service's command as `ditserve` itself parses it."""
    command = (services or SERVICES)[name]["command"]
    return build_parser(command).parse_args(command)


def healthcheck_module() -> object:
    spec = importlib.util.spec_from_file_location("healthcheck", DEPLOY / "docker/healthcheck.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def panels(board: dict) -> list[dict]:
    return [nested for panel in board["panels"] for nested in [panel, *panel.get("panels", [])]]


def test_dashboards_are_well_formed_and_filter_by_datasource_and_instance() -> None:
    """No datasource uid baked in (imports into any Grafana pick their Prometheus), and every series
    selector honours the instance variable."""
    expected = DATASOURCE
    boards = [load(path) for path in DASHBOARDS]
    assert {board["uid"] for board in boards} == {f"ditserve-{name}" for name in ("overview", *STAGES)}
    for board in boards:
        assert board["schemaVersion"] == 39 and "ditserve" in board["tags"], board["uid"]
        variables = {variable["name"]: variable for variable in board["templating"]["list"]}
        assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
        instance = variables["instance"]
        assert instance["datasource"] == expected and "label_values(up{" in instance["query"]["query"]
        assert instance["includeAll"] and instance["allValue"] == ".*", board["uid"]
        assert '"uid": "prometheus"' not in json.dumps(board), f"{board['uid']}: a hard-coded datasource uid"
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
                # the integration test substitutes Grafana's variables; these are the ones used
                assert set(re.findall(r"\$\w+", target["expr"])) <= {"$__rate_interval", "$instance"}, where
                for selector in re.findall(r"\{[^}]*\}", target["expr"]):
                    assert 'instance=~"$instance"' in selector, f"{where}: {selector}"


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
        'ditserve_cache_steps_total{outcome="cached"',
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


def test_compose_up_as_written_starts_the_cpu_stack() -> None:
    """`docker compose up` with no flags: every service, none behind a profile, all on CPU."""
    assert set(COMPOSE["services"]) == {*STAGES, "prometheus", "grafana"}
    assert not any("profiles" in service for service in COMPOSE["services"].values())
    assert {parsed(name).role for name in SERVICES} == set(STAGES) and set(SERVICES) == set(STAGES)
    for name, service in SERVICES.items():
        args = parsed(name)
        assert args.host == "0.0.0.0" and args.health_port is not None, name
        assert service["healthcheck"]["test"][:3] == ["CMD", "python3", "/opt/ditserve/healthcheck.py"], name
        assert "--restart-after" in service["healthcheck"]["test"] and service["restart"] == "unless-stopped"
        assert service["image"] == "ditserve:cpu" and "deploy" not in service, name
        build = service["build"]
        assert build["dockerfile"] == "deploy/docker/Dockerfile" and set(build["args"]) == {"BASE_IMAGE", "TORCH_SPEC"}
        if args.role != "gateway":
            assert str(args.model).startswith("/models/") and any(v.endswith(":/models:ro") for v in service["volumes"])
            assert args.device == "cpu", name
    assert parsed("denoiser").batching == "continuous"
    # replicas come from `--scale denoiser=N`, so nothing may pin a name or a host port on a stage
    assert not any("container_name" in SERVICES[name] or "ports" in SERVICES[name] for name in STAGES[1:])


def test_the_gpu_override_puts_each_model_stage_on_its_own_device() -> None:
    assert set(GPU["services"]) == set(STAGES)
    devices = {}
    for name, override in GPU["services"].items():
        assert override["image"] == "ditserve:cuda" and set(override["build"]["args"]) == {"BASE_IMAGE", "TORCH_SPEC"}
        if name == "gateway":
            assert "deploy" not in override and "command" not in override, "the gateway needs no GPU"
            continue
        args = parsed(name, GPU["services"])
        assert args.device == "cuda", name
        assert override["command"][2:] == [
            "cuda" if part == "cpu" else part for part in SERVICES[name]["command"][2:]
        ], f"{name}: the GPU command must differ from the CPU one only in --device"
        (device,) = override["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"] and "count" not in device, name
        devices[name] = device["device_ids"]
    defaults = [re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", ids[0]) for ids in devices.values()]
    assert len(set(defaults)) == len(defaults), f"two stages share a GPU by default: {devices}"


def test_the_gateway_reaches_each_stage_through_its_dns_name() -> None:
    args = parsed("gateway")
    for stage in ("encoder", "denoiser", "vae"):
        target = getattr(args, stage)
        assert target == f"dns:///{stage}:{parsed(stage).port}", target
    assert SERVICES["gateway"]["depends_on"] == {stage: {"condition": "service_healthy"} for stage in STAGES[1:]}


def test_grafana_admin_password_comes_from_the_environment() -> None:
    grafana = COMPOSE["services"]["grafana"]
    assert grafana["environment"]["GF_SECURITY_ADMIN_PASSWORD"] == "${GRAFANA_ADMIN_PASSWORD:-}"
    script = " ".join(grafana["entrypoint"])
    assert "/dev/urandom" in script and "exec /run.sh" in script  # unset: random, never admin/admin


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


def _rules(path: str) -> list[dict]:
    groups = yaml.safe_load((DEPLOY / "prometheus" / path).read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def test_expected_replicas_cover_every_stage_as_compose_runs_it() -> None:
    expected = {rule["labels"]["job"]: rule["expr"] for rule in _rules("replicas.yml")}
    assert expected == {stage: "vector(1)" for stage in STAGES}, "compose runs one of each unless scaled"
    (missing,) = [rule["expr"] for rule in _rules("alerts.yml") if rule.get("alert") == "DitserveReplicasMissing"]
    assert "ditserve:expected_replicas" in missing and "up{" in missing


def test_queue_alert_compares_depth_with_the_exported_capacity() -> None:
    (expr,) = [rule["expr"] for rule in _rules("alerts.yml") if rule.get("alert") == "DitserveQueueSaturated"]
    assert expr == 'ditserve_queue_depth{job="denoiser"} / ditserve_queue_capacity{job="denoiser"} > 0.75'
    assert re.search(r"\b48\b", expr) is None


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


def test_healthcheck_reads_the_health_port_from_the_service_command_line() -> None:
    healthcheck = healthcheck_module()
    entrypoint = ["/opt/venv/bin/python3", "/opt/venv/bin/ditserve"]
    for name in SERVICES:
        assert healthcheck.grpc_port([*entrypoint, *SERVICES[name]["command"]]) == parsed(name).health_port
    assert healthcheck.grpc_port([*entrypoint, "serve", "vae"]) == 50053
    serving, _, message = healthcheck.check([*entrypoint, "serve", "vae", "--tls-cert", "c", "--tls-key", "k"])
    assert not serving and "--health-port" in message


def test_healthcheck_restarts_a_stage_only_after_it_served_and_then_failed_in_a_row(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    healthcheck = healthcheck_module()
    monkeypatch.setattr(healthcheck, "STATE", tmp_path)
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert healthcheck.count_failure(process.pid, False, True, 2) == 0, "still loading: never counted"
        healthcheck.count_failure(process.pid, True, True, 2)
        assert healthcheck.count_failure(process.pid, False, False, 2) == 0, "a gateway waiting for stages"
        assert healthcheck.count_failure(process.pid, False, True, 2) == 1
        assert process.poll() is None
        healthcheck.count_failure(process.pid, True, True, 2)  # SERVING again: the count starts over
        assert healthcheck.count_failure(process.pid, False, True, 2) == 1
        assert healthcheck.count_failure(process.pid, False, True, 2) == 2
        deadline = time.monotonic() + 5
        while process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert process.returncode == -15, "SIGTERM: the service drains, exits and is restarted"
    finally:
        process.kill()
        process.wait()


@pytest.mark.skipif(
    not shutil.which("docker-compose"), reason="no docker-compose (Debian: apt-get install docker-compose)"
)
def test_docker_compose_up_as_written_lists_all_six_services() -> None:
    six = {*STAGES, "prometheus", "grafana"}
    for files in ([], ["-f", "compose.yaml", "-f", "compose.gpu.yaml"]):
        result = subprocess.run(
            ["docker-compose", *files, "config", "--services"], cwd=ROOT, capture_output=True, text=True
        )
        assert result.returncode == 0, result.stderr
        assert set(result.stdout.split()) == six, result.stdout
