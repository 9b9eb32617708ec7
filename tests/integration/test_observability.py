"""The deployment's observability against real processes.

compose.yaml's services run here as local processes, started with compose.yaml's own commands
(hosts, ports and the model folder mapped to loopback and this checkout). A real Prometheus (Debian's
package) scrapes them with deploy/prometheus/prometheus.yml, its targets turned into loopback ones,
and loads the alert rules while requests run. Then every dashboard query and every alert's signal
returns data, every metric they name is exported by some service, and promtool accepts all of it.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import re
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
import yaml
from google.protobuf import json_format
from helpers import request, scrape

from ditserve.client.config import repo_root
from ditserve.client.launcher import Ports, Stack, free_port
from ditserve.client.stub import PipelineClient, StageClient
from ditserve.v1 import cache_pb2

PROMETHEUS, PROMTOOL = shutil.which("prometheus"), shutil.which("promtool")
pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        not (PROMETHEUS and PROMTOOL),
        reason="needs the prometheus and promtool binaries (Debian: apt-get install prometheus)",
    ),
]

ROOT = repo_root()
DEPLOY = ROOT / "deploy"
# What Grafana puts in place of its variables before it sends a query (1s scrapes here).
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$instance": ".*"}
# An alert's expression is `SIGNAL OP NUMBER`; the signal must return data on a live stack.
THRESHOLD = re.compile(r"\s*(==|!=|>=|<=|>|<)\s*[-+]?[0-9.]+(e[-+]?[0-9]+)?\s*$")
PROMQL_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless"}
DATA_TIMEOUT = 30.0
# In the containers, /models is the image's embedded copy of models/ (or what is mounted instead).
CONTAINER_MODELS = "/models/"
TEACACHE = json_format.Parse('{"teacache": {"threshold": 0.6}}', cache_pb2.CachePolicy())


def compose_defaults(text: str) -> str:
    """compose.yaml with every `${VAR:-default}` at its default, whatever this shell's environment."""
    return re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", text)


def dashboard_queries() -> dict[str, str]:
    """'dashboard / panel / refId' -> PromQL, Grafana's variables substituted."""
    queries = {}
    for path in sorted((DEPLOY / "grafana" / "dashboards").glob("*.json")):
        board = json.loads(path.read_text())
        for panel in board["panels"]:
            for target in panel.get("targets", []):
                expr = target["expr"]
                for variable, value in GRAFANA_VARIABLES.items():
                    expr = expr.replace(variable, value)
                queries[f"{board['title']} / {panel['title']} / {target['refId']}"] = expr
    return queries


def alert_rules() -> dict[str, str]:
    rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    return {rule["alert"]: rule["expr"] for group in rules["groups"] for rule in group["rules"]}


def alert_signals() -> dict[str, str]:
    signals = {}
    for name, expr in alert_rules().items():
        signal = THRESHOLD.sub("", expr)
        assert signal != expr, f"alert {name}: expr must end in a comparison with a number: {expr}"
        signals[f"alert {name}"] = signal
    return signals


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (strings, matchers, ranges, label lists and
    function names removed)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"\{[^}]*\}|\[[^\]]*\]", " ", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    return set(re.findall(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\b(?!\s*\()", text)) - PROMQL_KEYWORDS


@dataclass
class ComposeStack(Stack):
    """compose.yaml's services as local processes, keyed by compose service name: each runs its
    compose command with --host, --port, --metrics-port, --health-port and other services'
    `[dns:///]name:port` addresses mapped onto loopback, and the container's /models onto this
    checkout's models/."""

    services: dict[str, dict] = field(default_factory=dict)
    health_ports: dict[str, int] = field(default_factory=dict)

    def compose_port(self, name: str, flag: str) -> int:
        command = self.services[name]["command"]
        return int(command[command.index(flag) + 1])

    def command(self, role: str) -> list[str]:
        ports = self.ports
        local = {"--host": "127.0.0.1", "--port": ports.grpc[role], "--metrics-port": ports.metrics[role]}
        local["--health-port"] = self.health_ports.setdefault(role, free_port())
        addresses = {}
        for name in self.services:
            compose_address = f"{name}:{self.compose_port(name, '--port')}"
            addresses[compose_address] = addresses[f"dns:///{compose_address}"] = ports.address(name)
        command = list(self.services[role]["command"])
        for index in range(1, len(command)):
            flag, value = command[index - 1], command[index]
            if flag in local:
                command[index] = str(local[flag])
            elif value.startswith(CONTAINER_MODELS):
                command[index] = str(ROOT / "models" / value.removeprefix(CONTAINER_MODELS))
            elif flag.startswith("--"):
                command[index] = ",".join(addresses.get(part, part) for part in value.split(","))
        return [sys.executable, "-m", "ditserve.client.cli", *command]

    def start(self, timeout: float = 180.0) -> None:
        """Stages first, the gateway once they are SERVING (compose: depends_on service_healthy)."""
        stages = [name for name, service in self.services.items() if service["command"][1] != "gateway"]
        gateways = [name for name in self.services if name not in stages]
        try:
            for group in (stages, gateways):
                for name in group:
                    self.start_role(name)
                for name in group:
                    self.wait_ready(name, timeout)
        except BaseException:
            self.stop()
            raise


def compose_stack(log_dir: Path) -> ComposeStack:
    compose = yaml.safe_load(compose_defaults((ROOT / "compose.yaml").read_text()))
    services = {
        name: service for name, service in compose["services"].items() if service.get("command", [""])[0] == "serve"
    }
    ports = Ports({name: free_port() for name in services}, {name: free_port() for name in services})
    return ComposeStack(ports=ports, log_dir=log_dir, services=services)


def prometheus_config(stack: ComposeStack, path: Path) -> Path:
    """deploy/prometheus/prometheus.yml with every DNS name that is a running service (on the port
    compose gives it) as a loopback target of the same job and relabeling, 1s scrapes and evaluations,
    and its rule files by absolute path."""
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    config["rule_files"] = [str(DEPLOY / "prometheus" / name) for name in config["rule_files"]]
    for job in config["scrape_configs"]:
        job["static_configs"] = [
            {"targets": [f"127.0.0.1:{stack.ports.metrics[name]}"], "labels": {"__meta_dns_name": name}}
            for dns in job.pop("dns_sd_configs")
            for name in dns["names"]
            if name in stack.services and stack.compose_port(name, "--metrics-port") == dns["port"]
        ]
    path.write_text(yaml.safe_dump(config))
    return path


def drive_traffic(stack: ComposeStack) -> None:
    """Concurrent requests (batches form on the denoiser replicas), one with step caching, one the
    gateway rejects (INVALID_ARGUMENT) and one a denoiser refuses (RESOURCE_EXHAUSTED: the error-rate
    alert counts server-side errors only)."""
    prompt = "a red circle on a blue background"
    with PipelineClient(stack.gateway) as client:
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            outputs = list(pool.map(lambda seed: client.generate(prompt, seed=seed, steps=8), range(8)))
        assert all(len(output.images) == 1 for output in outputs)
        cached = client.generate(prompt, seed=8, steps=12, cache=TEACACHE)
        assert "0" in "".join(cached.timing.computed_steps.values()), "no step was served from the cache"
        with pytest.raises(grpc.RpcError) as rejected:
            client.generate(prompt, width=17)
        assert rejected.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    stage = StageClient(stack.ports.address("denoiser"))
    try:
        running = stage.denoiser.Denoise(request(1, steps=200), timeout=60)
        next(running)
        with pytest.raises(grpc.RpcError) as busy:
            list(stage.denoiser.Denoise(request(1), timeout=60))
        running.cancel()
    finally:
        stage.close()
    assert busy.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED, "a request_id already running"


@dataclass
class Observed:
    url: str
    stack: ComposeStack

    def api(self, path: str, **params: str) -> dict:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}{query}", timeout=10) as response:
            body = json.load(response)
        assert body["status"] == "success", body
        return body["data"]

    def without_data(self, queries: dict[str, str]) -> dict[str, str]:
        return {name: expr for name, expr in queries.items() if not self.api("query", query=expr)["result"]}

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2):
                    return
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)


@pytest.fixture(scope="module")
def observed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Observed]:
    """Prometheus scraping compose's cpu profile, after traffic, once every query has data (or
    DATA_TIMEOUT passed: the tests then name what has none)."""
    tmp = tmp_path_factory.mktemp("observability")
    stack = compose_stack(tmp / "logs")
    port = free_port()
    command = [
        PROMETHEUS,
        f"--config.file={prometheus_config(stack, tmp / 'prometheus.yml')}",
        f"--storage.tsdb.path={tmp / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
    ]
    with contextlib.ExitStack() as cleanup:
        log = cleanup.enter_context(open(tmp / "prometheus.log", "wb"))
        prometheus = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        cleanup.callback(prometheus.wait, timeout=30)
        cleanup.callback(prometheus.terminate)
        stack.start(timeout=180)
        cleanup.callback(stack.stop)  # when something fails; the clean path checks exit codes below
        observed = Observed(f"http://127.0.0.1:{port}", stack)
        observed.wait_ready(timeout=30)
        drive_traffic(stack)
        queries = {**dashboard_queries(), **alert_signals()}
        deadline = time.monotonic() + DATA_TIMEOUT
        while observed.without_data(queries) and time.monotonic() < deadline:
            time.sleep(1)
        yield observed
        codes = stack.stop()
        assert all(code == 0 for code in codes.values()), f"services did not exit cleanly: {codes}; see {tmp}"


def test_prometheus_scrapes_every_service_and_all_are_up(observed: Observed) -> None:
    targets = observed.api("targets")["activeTargets"]
    scraped = {(target["labels"]["job"], target["labels"]["compose_service"]) for target in targets}
    expected = {(service["command"][1], name) for name, service in observed.stack.services.items()}
    assert scraped == expected
    down = [(target["scrapeUrl"], target["lastError"]) for target in targets if target["health"] != "up"]
    assert not down


def test_alert_rules_load_and_evaluate(observed: Observed) -> None:
    rules = [rule for group in observed.api("rules")["groups"] for rule in group["rules"]]
    assert {rule["name"] for rule in rules if rule["type"] == "alerting"} == set(alert_rules())
    assert all(rule["health"] == "ok" for rule in rules), rules


def test_every_dashboard_query_and_alert_signal_returns_data(observed: Observed) -> None:
    assert observed.without_data({**dashboard_queries(), **alert_signals()}) == {}


def test_every_metric_they_use_is_exported_by_a_service(observed: Observed) -> None:
    exported = set()
    for port in observed.stack.ports.metrics.values():
        exported |= {line.split("{")[0].split(" ")[0] for line in scrape(port).splitlines() if line and line[0] != "#"}
    used = set().union(*(metric_names(expr) for expr in {**dashboard_queries(), **alert_rules()}.values()))
    assert "ditserve_cache_steps_total" in used and "ditserve_batch_size_count" in used
    # `up` Prometheus writes itself, for every target; ditserve:* are its recording rules.
    assert used - exported == {"up", "ditserve:expected_replicas"}


def test_the_image_healthcheck_sees_every_service_serving(observed: Observed) -> None:
    check = DEPLOY / "docker" / "healthcheck.py"
    for name, process in observed.stack.processes.items():
        result = subprocess.run([sys.executable, check, str(process.pid)], capture_output=True, text=True)
        port = observed.stack.health_ports[name]
        assert (result.returncode, result.stdout.strip()) == (0, f"127.0.0.1:{port}: SERVING"), result.stderr


def test_promtool_accepts_the_prometheus_config_and_the_alert_tests() -> None:
    for args in (["check", "config", "prometheus.yml"], ["test", "rules", "alerts.test.yml"]):
        result = subprocess.run([PROMTOOL, *args], cwd=DEPLOY / "prometheus", capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_parses_every_dashboard_query(tmp_path: Path) -> None:
    queries = list(dashboard_queries().values())
    rules = [{"record": f"dashboard:query_{index}:expr", "expr": expr} for index, expr in enumerate(queries)]
    path = tmp_path / "dashboards.rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}))
    result = subprocess.run([PROMTOOL, "check", "rules", path], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(queries)} rules found" in result.stdout
