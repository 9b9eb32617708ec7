"""deploy/k8s: every overlay renders (`kubectl kustomize`, offline) and every object validates against
the Kubernetes OpenAPI schemas (kubernetes-validate ships them; strict: no unknown fields), and the
pieces fit: the gateway's targets are the stages' headless Services on the ports the stages serve,
probes hit --health-port, ConfigMap keys the pods read exist, GPUs only in the GPU overlay, a PDB per
role, the autoscaler's metric is the one the prometheus-adapter rule serves."""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
from functools import cache
from pathlib import Path

import pytest
import yaml

from ditserve.client.cli import build_parser
from ditserve.client.config import repo_root

kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="pip install -e '.[dev]' (kubernetes-validate)")

K8S = repo_root() / "deploy" / "k8s"
OVERLAYS = sorted(path.name for path in (K8S / "overlays").iterdir() if path.is_dir())
KUBECTL = shutil.which("kubectl")
# The oldest release with gRPC probes GA, and the newest the package has schemas for.
VERSIONS = ("1.27.0", kubernetes_validate.latest_version())
STAGES = ("encoder", "denoiser", "vae")
ROLES = ("gateway", *STAGES)
pytestmark = pytest.mark.skipif(
    not KUBECTL, reason="needs kubectl to render the kustomize overlays offline (Debian: kubernetes-client)"
)


@cache
def rendered(overlay: str) -> tuple[dict, ...]:
    result = subprocess.run(
        [KUBECTL, "kustomize", str(K8S / "overlays" / overlay)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def objects(overlay: str, kind: str) -> dict[str, dict]:
    return {doc["metadata"]["name"]: doc for doc in rendered(overlay) if doc["kind"] == kind}


def container(overlay: str, role: str) -> dict:
    (main,) = objects(overlay, "Deployment")[f"ditserve-{role}"]["spec"]["template"]["spec"]["containers"]
    return main


def args_of(overlay: str, role: str) -> object:
    """The container's args with $(VAR)s from their ConfigMaps, parsed by ditserve's own parser."""
    main = container(overlay, role)
    maps = objects(overlay, "ConfigMap")
    env = {}
    for variable in main.get("env", []):
        ref = variable["valueFrom"]["configMapKeyRef"]
        env[variable["name"]] = maps[ref["name"]]["data"][ref["key"]]
    argv = [re.sub(r"\$\((\w+)\)", lambda match: env[match.group(1)], arg) for arg in main["args"]]
    return build_parser(argv).parse_args(argv)


def test_there_are_cpu_and_gpu_overlays() -> None:
    assert set(OVERLAYS) >= {"cpu", "gpu"}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_validates_against_the_kubernetes_schemas(overlay: str) -> None:
    checked = set()
    for doc in rendered(overlay):
        if doc["apiVersion"].startswith("monitoring.coreos.com/"):
            continue  # a CRD: no schema in Kubernetes' own; checked in test_pod_monitor_scrapes_every_role
        for version in VERSIONS:
            kubernetes_validate.validate(doc, version, strict=True)
        checked.add(doc["kind"])
    assert checked >= {"Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler", "ConfigMap"}


def test_the_validator_rejects_what_kubernetes_would() -> None:
    deployment = copy.deepcopy(objects("cpu", "Deployment")["ditserve-denoiser"])
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grpc"]["port"] = "health"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, VERSIONS[-1], strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_gateway_balances_over_each_stages_headless_service(overlay: str) -> None:
    services = objects(overlay, "Service")
    gateway = args_of(overlay, "gateway")
    for stage in STAGES:
        service = services[f"ditserve-{stage}"]
        assert service["spec"]["clusterIP"] == "None", f"{stage}: headless, so DNS returns every ready pod"
        (port,) = service["spec"]["ports"]
        assert getattr(gateway, stage) == f"dns:///ditserve-{stage}:{port['port']}"
        assert port["port"] == args_of(overlay, stage).port
        labels = objects(overlay, "Deployment")[f"ditserve-{stage}"]["spec"]["template"]["metadata"]["labels"]
        assert service["spec"]["selector"].items() <= labels.items()
    assert services["ditserve-gateway"]["spec"].get("clusterIP") != "None"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_probe_grpc_health_in_plaintext_and_speak_tls_with_tokens(overlay: str) -> None:
    for role in ROLES:
        main, args = container(overlay, role), args_of(overlay, role)
        assert args.host == "0.0.0.0" and args.health_port is not None, role
        assert main["readinessProbe"]["grpc"]["port"] == args.health_port, role
        if role == "gateway":  # NOT_SERVING for want of a stage must not restart it
            assert "tcpSocket" in main["livenessProbe"]
            assert args.stage_tls_ca and args.stage_token_file
        else:
            assert main["livenessProbe"]["grpc"]["port"] == main["startupProbe"]["grpc"]["port"] == args.health_port
        assert args.tls_cert and args.tls_key and args.auth_token_file, role
        mounts = {mount["mountPath"]: mount["name"] for mount in main["volumeMounts"]}
        pod = objects(overlay, "Deployment")[f"ditserve-{role}"]["spec"]["template"]["spec"]
        secrets = {volume["name"]: volume["secret"]["secretName"] for volume in pod["volumes"] if "secret" in volume}
        for path in (args.tls_cert, args.auth_token_file):
            assert secrets[mounts[str(Path(path).parent)]] in {"ditserve-tls", "ditserve-auth"}, path
        assert {"cpu", "memory"} <= main["resources"]["requests"].keys(), role


def test_model_device_and_cache_policy_come_from_configmaps_and_volumes() -> None:
    for overlay, device in (("cpu", "cpu"), ("gpu", "cuda")):
        for stage in STAGES:
            args = args_of(overlay, stage)
            assert args.device == device and str(args.model).startswith("/models/"), (overlay, stage)
            pod = objects(overlay, "Deployment")[f"ditserve-{stage}"]["spec"]["template"]["spec"]
            limits = container(overlay, stage)["resources"].get("limits", {})
            assert (limits.get("nvidia.com/gpu") == "1") == (overlay == "gpu"), (overlay, stage)
            (models,) = [volume for volume in pod["volumes"] if volume["name"] == "models"]
            if overlay == "gpu":
                assert models["persistentVolumeClaim"]["claimName"] in objects(overlay, "PersistentVolumeClaim")
            else:  # the image's embedded model, copied into the volume before the service starts
                assert "emptyDir" in models and pod["initContainers"][0]["image"] == container(overlay, stage)["image"]
        assert (
            objects(overlay, "Deployment")["ditserve-gateway"]["spec"]["template"]["spec"]["containers"][0]["resources"]
            .get("limits", {})
            .get("nvidia.com/gpu")
            is None
        )
        denoiser = args_of(overlay, "denoiser")
        assert denoiser.cache_policy == "none" and denoiser.max_queue == 64
    assert {container(o, "denoiser")["image"] for o in ("cpu", "gpu")} == {"ditserve:cpu", "ditserve:cuda"}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_each_role_has_a_disruption_budget_and_the_denoiser_an_autoscaler(overlay: str) -> None:
    budgets = objects(overlay, "PodDisruptionBudget")
    for role in ROLES:
        labels = objects(overlay, "Deployment")[f"ditserve-{role}"]["spec"]["template"]["metadata"]["labels"]
        (budget,) = [b for b in budgets.values() if b["spec"]["selector"]["matchLabels"].items() <= labels.items()]
        assert budget["spec"]["maxUnavailable"] == 1
    (hpa,) = objects(overlay, "HorizontalPodAutoscaler").values()
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "ditserve-denoiser"}
    (metric,) = hpa["spec"]["metrics"]
    adapter = yaml.safe_load((K8S / "prometheus-adapter.yaml").read_text())
    (rule,) = adapter["rules"]["custom"]
    assert metric["pods"]["metric"]["name"] == rule["name"]["as"]
    assert "ditserve_queue_depth" in rule["metricsQuery"] and "ditserve_queue_capacity" in rule["metricsQuery"]
    assert 1 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pod_monitor_scrapes_every_role_as_its_job(overlay: str) -> None:
    (monitor,) = objects(overlay, "PodMonitor").values()
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    (relabel,) = endpoint["relabelings"]
    assert relabel["targetLabel"] == "job"
    assert relabel["sourceLabels"] == ["__meta_kubernetes_pod_label_app_kubernetes_io_component"]
    for role in ROLES:
        pod = objects(overlay, "Deployment")[f"ditserve-{role}"]["spec"]["template"]
        assert monitor["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
        assert pod["metadata"]["labels"]["app.kubernetes.io/component"] == role
        ports = {port["name"]: port["containerPort"] for port in container(overlay, role)["ports"]}
        assert ports[endpoint["port"]] == args_of(overlay, role).metrics_port
