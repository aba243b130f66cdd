"""diffjax.evaluation."""
