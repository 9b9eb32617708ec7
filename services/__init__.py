"""Server side of ditserve: the encoder, denoiser, VAE and gateway services."""
