"""The diffusion model: loading, random-weight presets, samplers, the resident models and their memory."""
