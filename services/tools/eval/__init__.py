"""Deterministic judges of generated images: reproducible scores with no learned model in the loop."""
