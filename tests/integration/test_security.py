"""TLS, mutual TLS and bearer tokens on real servers over loopback, and a secured stack end to end."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from factories import cpu_stage
from grpc_health.v1 import health_pb2

from ditserve.client.security import ClientSecurity
from ditserve.client.stub import AsyncPipelineClient, PipelineClient, StageClient
from ditserve.services.common.limits import RequestLimits
from ditserve.services.common.profiling import Profiler
from ditserve.services.common.security import ServerSecurity
from ditserve.services.common.server import ServerOptions, start_server
from ditserve.services.denoiser.service import DenoiserService
from ditserve.services.encoder.service import EncoderService
from ditserve.services.gateway.service import GatewayConfig, GatewayService
from ditserve.services.vae.service import VaeService
from ditserve.v1 import common_pb2

pytestmark = pytest.mark.integration
TOKEN = "s3cret-token"


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA, a server certificate for 127.0.0.1/localhost and a client certificate, made with openssl."""
    root = tmp_path_factory.mktemp("pki")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=ditserve-test-ca",
             "-keyout", "ca.key", "-out", "ca.pem", cwd=root)  # fmt: skip
    for name, extension in (("server", "subjectAltName=IP:127.0.0.1,DNS:localhost"), ("client", "")):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}",
                 "-keyout", f"{name}.key", "-out", f"{name}.csr", cwd=root)  # fmt: skip
        (root / f"{name}.ext").write_text(extension + "\n" if extension else "basicConstraints=CA:FALSE\n")
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                 "-days", "2", "-extfile", f"{name}.ext", "-out", f"{name}.pem", cwd=root)  # fmt: skip
    (root / "tokens").write_text(f"# accepted tokens\n{TOKEN}\n")
    return root


def _security(pki: Path, mutual: bool = False, token: bool = True) -> ServerSecurity:
    return ServerSecurity(
        tls_cert=pki / "server.pem",
        tls_key=pki / "server.key",
        tls_client_ca=pki / "ca.pem" if mutual else None,
        auth_token_file=pki / "tokens" if token else None,
    )


@pytest.fixture(scope="module")
def secured_stack(pki: Path, model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """encoder, denoiser and vae over mutual TLS with tokens; a gateway that calls them that way and
    itself serves TLS with a token."""
    tmp = tmp_path_factory.mktemp("secured")
    options = ServerOptions(port=0, metrics_port=None)
    stages = {
        "encoder": EncoderService(cpu_stage(model_dir, "encoder", tmp)),
        "denoiser": DenoiserService(cpu_stage(model_dir, "denoiser", tmp)),
        "vae": VaeService(cpu_stage(model_dir, "vae", tmp)),
    }
    running = {role: start_server(service, options, _security(pki, mutual=True)) for role, service in stages.items()}
    address = {role: [f"localhost:{server.port}"] for role, server in running.items()}
    to_stages = ClientSecurity(str(pki / "ca.pem"), str(pki / "client.pem"), str(pki / "client.key"), TOKEN)
    config = GatewayConfig(address["encoder"], address["denoiser"], address["vae"], RequestLimits(), security=to_stages)
    running["gateway"] = start_server(GatewayService(config, Profiler(tmp)), options, _security(pki))
    yield {role: f"localhost:{server.port}" for role, server in running.items()}
    for server in running.values():
        server.stop(grace=1)


def _info(target: str, security: ClientSecurity) -> grpc.StatusCode:
    client = StageClient(target, security=security)
    try:
        client.admin.Info(common_pb2.InfoRequest(), timeout=10)
        return grpc.StatusCode.OK
    except grpc.RpcError as error:
        return error.code()
    finally:
        client.close()


def test_tokens_are_required_and_checked(secured_stack: dict, pki: Path) -> None:
    ca = str(pki / "ca.pem")
    gateway = secured_stack["gateway"]
    assert _info(gateway, ClientSecurity(tls_ca=ca)) is grpc.StatusCode.UNAUTHENTICATED
    assert _info(gateway, ClientSecurity(tls_ca=ca, token="wrong")) is grpc.StatusCode.UNAUTHENTICATED
    assert _info(gateway, ClientSecurity(tls_ca=ca, token=TOKEN)) is grpc.StatusCode.OK
    health = StageClient(gateway, security=ClientSecurity(tls_ca=ca))  # probes need no token
    health.wait_ready(timeout=30)  # the gateway reports SERVING once its own probes have reached the stages
    assert health.health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == 1
    health.close()


def test_tls_clients_need_the_ca_and_mutual_tls_needs_a_certificate(secured_stack: dict, pki: Path) -> None:
    gateway, encoder = secured_stack["gateway"], secured_stack["encoder"]
    assert _info(gateway, ClientSecurity(token=TOKEN)) is grpc.StatusCode.UNAVAILABLE  # plaintext to TLS
    wrong_ca = ClientSecurity(tls_ca=str(pki / "client.pem"), token=TOKEN)
    assert _info(gateway, wrong_ca) is grpc.StatusCode.UNAVAILABLE
    ca_only = ClientSecurity(tls_ca=str(pki / "ca.pem"), token=TOKEN)
    assert _info(encoder, ca_only) is grpc.StatusCode.UNAVAILABLE  # no client certificate
    with_cert = ClientSecurity(str(pki / "ca.pem"), str(pki / "client.pem"), str(pki / "client.key"), TOKEN)
    assert _info(encoder, with_cert) is grpc.StatusCode.OK


def test_a_secured_stack_generates_end_to_end(secured_stack: dict, pki: Path) -> None:
    security = ClientSecurity(tls_ca=str(pki / "ca.pem"), token=TOKEN)
    with PipelineClient(secured_stack["gateway"], security=security) as client:
        output = client.generate("a red circle on a blue background", steps=2, seed=1)
    assert output.images[0].size == (64, 64)

    async def generate() -> object:
        async with AsyncPipelineClient(secured_stack["gateway"], security=security) as client:
            return await client.generate("a red circle on a blue background", steps=2, seed=1)

    assert np.array_equal(np.asarray(asyncio.run(generate()).images[0]), np.asarray(output.images[0]))
