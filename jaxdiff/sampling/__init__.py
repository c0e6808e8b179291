"""Noise schedules and samplers as pure functions over sigmas (k-diffusion's view)."""
