"""Training: data pipeline, loop and checkpoints."""
