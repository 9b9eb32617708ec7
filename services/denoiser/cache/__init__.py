"""Step caching for the denoiser: TeaCache and DBCache (with TaylorSeer and SCM), per request and branch.

policy.py is the pure decision logic (no torch), flux_blocks.py runs FLUX's forward in stages, and
state.py ties a request's policy to those stages. Nothing is imported here, so the policy module stays
importable without torch.
"""
