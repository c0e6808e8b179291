"""Data sets: `shapes` (the procedural spec data set, pure NumPy) and `tfds_shapes` (its TFDS builder)."""
