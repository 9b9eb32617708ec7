"""ditserve: diffusion transformers served as gRPC microservices.

This package root holds the generated wire contract (`ditserve.v1`); the client
lives in `ditserve.client` and the servers in `ditserve.services`.
"""

__version__ = "0.1.0"
