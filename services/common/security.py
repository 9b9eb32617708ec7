"""Server-side TLS (optionally mutual) and bearer-token authentication, per service.

Health checks stay open so load balancers and orchestrators can probe without
a token; everything else (the work RPCs, Admin with its profiler, reflection)
needs one when --auth-token-file is given.
"""

from __future__ import annotations

import argparse
import hmac
from dataclasses import dataclass
from pathlib import Path

import grpc

from ditserve.services.common.errors import ServiceError

PUBLIC_PREFIXES = ("/grpc.health.v1.",)


class Unauthenticated(ServiceError):
    code = grpc.StatusCode.UNAUTHENTICATED


@dataclass(frozen=True)
class ServerSecurity:
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    auth_token_file: Path | None = None

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        group = parser.add_argument_group("security (default: plaintext, no auth, loopback only)")
        group.add_argument("--tls-cert", type=Path, help="PEM certificate chain: serve TLS")
        group.add_argument("--tls-key", type=Path, help="PEM private key of --tls-cert")
        group.add_argument("--tls-client-ca", type=Path, help="PEM CA: require client certificates (mutual TLS)")
        group.add_argument("--auth-token-file", type=Path, help="accepted bearer tokens, one per line ('#' comments)")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ServerSecurity:
        security = cls(args.tls_cert, args.tls_key, args.tls_client_ca, args.auth_token_file)
        if (security.tls_cert is None) != (security.tls_key is None):
            raise SystemExit("--tls-cert and --tls-key go together")
        if security.tls_client_ca is not None and security.tls_cert is None:
            raise SystemExit("--tls-client-ca needs --tls-cert and --tls-key")
        return security

    def credentials(self) -> grpc.ServerCredentials | None:
        if self.tls_cert is None or self.tls_key is None:
            return None
        client_ca = self.tls_client_ca.read_bytes() if self.tls_client_ca else None
        return grpc.ssl_server_credentials(
            [(self.tls_key.read_bytes(), self.tls_cert.read_bytes())],
            root_certificates=client_ca,
            require_client_auth=client_ca is not None,
        )

    def authenticator(self) -> BearerAuth | None:
        if self.auth_token_file is None:
            return None
        lines = [line.strip() for line in self.auth_token_file.read_text().splitlines()]
        tokens = [line for line in lines if line and not line.startswith("#")]
        if not tokens:
            raise SystemExit(f"--auth-token-file {self.auth_token_file} holds no token")
        return BearerAuth(tokens)


class BearerAuth:
    """Checks `authorization: Bearer TOKEN` in constant time against the accepted tokens."""

    def __init__(self, tokens: list[str]) -> None:
        self._tokens = [token.encode() for token in tokens]

    def check(self, method: str, context: grpc.ServicerContext) -> None:
        if method.startswith(PUBLIC_PREFIXES):
            return
        header = dict(context.invocation_metadata()).get("authorization", "")
        scheme, _, token = header.partition(" ")
        presented = token.strip().encode()
        valid = False
        for accepted in self._tokens:  # no early exit: timing never tells which token was close
            valid |= hmac.compare_digest(presented, accepted)
        if scheme.lower() != "bearer" or not valid:
            raise Unauthenticated("missing or invalid bearer token (send 'authorization: Bearer TOKEN')")
