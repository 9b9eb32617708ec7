"""Client side of ditserve: gRPC stubs for the gateway and each stage, and the CLI.

Imports without torch so that a thin client install stays thin.
"""

from ditserve.client.security import ClientSecurity
from ditserve.client.stub import AsyncPipelineClient, GenerateOutput, PipelineClient, StageClient

__all__ = ["AsyncPipelineClient", "ClientSecurity", "GenerateOutput", "PipelineClient", "StageClient"]
