"""Builds tiny, deterministic models locally so tests and demos need no hub and no GPU."""
