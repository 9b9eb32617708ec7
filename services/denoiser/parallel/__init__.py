"""Sequence parallelism for the denoiser: one sample's tokens split across ranks (Ulysses, ring, both).

mesh.py: SPConfig, the (ring, ulysses) process groups, byte-counted collectives. attention.py: Ulysses,
ring and USP attention. sharding.py: a family's token inputs split and the output gathered. serving.py:
rank 0 serving gRPC while followers replay its calls. A family's sequence-parallel executor (e.g.
families/flux/parallel.py) puts these together; docs/sequence-parallel.md says when it pays off.
Nothing is imported here, so importing the package loads no torch.
"""
