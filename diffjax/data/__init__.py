"""diffjax.data."""
