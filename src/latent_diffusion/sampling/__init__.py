"""Sampling as pure functions over a denoiser: parameterisation, noise schedules, samplers, the guided denoiser,
noise."""
