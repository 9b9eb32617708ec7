"""The gateway: a stateless Pipeline.Generate that chains encoder -> denoiser -> vae."""
