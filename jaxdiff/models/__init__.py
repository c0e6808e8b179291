"""Flax linen modules of Stable Diffusion, built from diffusers/transformers `config.json` dicts."""
