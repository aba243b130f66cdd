"""diffjax.diffusion."""
