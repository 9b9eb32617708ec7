"""The VAE stage: packed latents -> images (PNG, JPEG, WebP or raw pixels)."""
