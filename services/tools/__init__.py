"""Offline tools: benches, calibration, evaluation, training and model generation.

Nothing under a serving role (encoder, denoiser, vae, gateway) imports this package: tools may use the
services, never the reverse.
"""
