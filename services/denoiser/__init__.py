"""The denoiser service: runs the diffusion transformer (FLUX) step by step."""
